"""`export` (base model + patches -> a standalone transformers folder, or one GGUF file for llama.cpp-family runtimes).

Every patch is read and validated before the model is loaded, so a typo costs no model load.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .common import (
    EXIT_OK,
    CLIError,
    add_hub_args,
    add_model_args,
    hub_kwargs,
    load_model,
    say,
    show_progress,
)
from .patches import read_patches

GGUF_TYPES = ("base", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""`hf_edit_patch.interop.export_gguf.GGUF_TYPES`, kept here so that `--help` does not load torch (a test keeps the
two equal)."""


def add_parsers(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="bake patches into the base model: a transformers folder (--format hf) or one GGUF file (--format gguf)",
        description="Attach patches (folders or Hub ids, in order) to a base model and write the result as a\n"
        "standalone model:\n"
        "  --format hf    a folder that plain transformers loads (and vLLM or TGI serve), with a card naming the\n"
        "                 base model and every patch (content hashes) and hf_edit_patch_merged.json;\n"
        "  --format gguf  one .gguf file for llama.cpp-family runtimes. For the default model it keeps the base's\n"
        "                 own 4-bit type and re-quantizes only the blocks the edit touches.\n"
        "For GGUF the command reports how much of the edit survives the encoding: per edited matrix, and the\n"
        "edited facts' target probabilities before and after. Patches are validated before the model is loaded.",
    )
    p.add_argument("patches", nargs="+", metavar="PATCH", help="patch folders or Hub ids (stacks too), in order")
    add_model_args(p)
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf: a model folder; gguf: a .gguf file")
    p.add_argument("-o", "--output", required=True, help="the folder (--format hf) or .gguf file (--format gguf)")
    p.add_argument(
        "--gguf-type",
        choices=GGUF_TYPES,
        default=None,
        help="GGUF encoding: 'base' keeps the base GGUF's types (default when there is one, e.g. for the default "
        "model), else f16 (default), f32, bf16, or q8_0/q5_1/q5_0/q4_1/q4_0",
    )
    p.add_argument(
        "--edited-type",
        choices=GGUF_TYPES[1:],
        default=None,
        help="a different encoding for the edited matrices only (e.g. q8_0 in a 4-bit file)",
    )
    p.add_argument(
        "--base-gguf",
        default="auto",
        help="the GGUF the base weights came from (metadata, tokenizer and untouched tensors are copied): a path, "
        "'auto' (default: the default model's), or 'none' to write from the model alone",
    )
    p.add_argument("--report", default=None, help="also write the export report (JSON) to this file")
    p.add_argument("--no-measure", action="store_true", help="GGUF: skip measuring the edited facts after encoding")
    p.add_argument("--repo-id", default=None, help="Hub repo the folder is meant for, shown in its card")
    p.add_argument("--license", default=None, help="license id for the card (default: the base model's if known)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export at --output")
    p.add_argument("--strict", action="store_true", help="refuse patches whose fingerprints differ")
    add_hub_args(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..hub.files import atomic_write
    from ..interop.export import export_model
    from ..patched_model import PatchedModel

    if args.format == "gguf" and not args.output.endswith(".gguf"):
        raise CLIError(f"--format gguf writes one file: give -o NAME.gguf, got {args.output!r}")
    if args.format == "hf" and (args.gguf_type or args.edited_type):
        raise CLIError("--gguf-type and --edited-type apply to --format gguf only")
    if args.format == "gguf" and args.base_gguf not in ("auto", "none") and not os.path.isfile(args.base_gguf):
        raise CLIError(f"--base-gguf {args.base_gguf!r} is not a file (give a path, 'auto' or 'none')")
    patches = read_patches(args.patches, hub_kwargs(args))  # before the model: a bad patch fails in a second
    model, tokenizer = load_model(args)
    pm = PatchedModel(model)
    for name, _, patch in patches:
        pm.add_patch(patch, name, strict=args.strict)
    report = export_model(
        pm,
        args.output,
        tokenizer=tokenizer,
        format=args.format,
        gguf_type=args.gguf_type,
        edited_type=args.edited_type,
        base_gguf=None if args.base_gguf == "none" else args.base_gguf,
        sources={name: source for name, source, _ in patches},
        repo_id=args.repo_id,
        license=args.license,
        overwrite=args.overwrite,
        measure=not args.no_measure,
        show_progress=show_progress(args),
    )
    kind = "a transformers folder" if args.format == "hf" else f"a GGUF file ({report.gguf_type})"
    say(f"Exported {kind} with {len(patches)} patch(es) baked in: {report.path}")
    if report.base_gguf:
        say(f"  base GGUF: {report.base_gguf}")
    summary = report.summary()
    if summary:
        say("What survives the encoding (per edited matrix, then per fact: target probability merged -> file):")
        say("\n".join(f"  {line}" for line in summary.splitlines()))
    if args.report:
        atomic_write(args.report, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        say(f"Report: {args.report}")
    return EXIT_OK
