"""`consolidate`: replace a run of patches in a stack by one patch holding their accumulated update, regularized if
asked (`PatchedModel.consolidate`), and save the resulting stack."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import EXIT_OK, CLIError, add_hub_args, add_model_args, hub_kwargs, json_object, load_model, say
from .patches import STACK_REGULARIZERS, read_patches


def add_parsers(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "consolidate",
        parents=[common],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="replace a run of patches in a stack by one patch, regularized if asked",
        description="Attach patches (folders or Hub ids, stacks too, in order) to the base model, replace a run of "
        "consecutive ones (--patches; default: all) by one patch holding their accumulated update, bounded by a "
        "stack-level regularizer if one is given, and save the stack to --output-dir. The new patch records the "
        "patches it replaces (names, content hashes) and all their requests; removing it restores the weights under "
        "it bit for bit.",
    )
    p.add_argument("patches", nargs="+", metavar="PATCH", help="patch folders or Hub ids (stacks too), in order")
    add_model_args(p)
    p.add_argument(
        "--patches",
        dest="run",
        nargs="+",
        metavar="NAME",
        default=None,
        help="the run to replace: names of consecutive patches of the stack (default: every patch)",
    )
    p.add_argument(
        "--regularizer",
        choices=STACK_REGULARIZERS,
        default=None,
        help="bound the accumulated update (default: none, the exact accumulated update); see docs/lifelong.md",
    )
    p.add_argument(
        "--regularizer-kwargs",
        default=None,
        metavar="JSON",
        help="its settings, e.g. '{\"threshold\": 0.5}' (prune), '{\"alpha\": 0.1}' (norm_anchor)",
    )
    p.add_argument("--name", default=None, help="the new patch's name (default: FIRST-LAST of the run)")
    p.add_argument(
        "--value-dtype",
        choices=("auto", "float16", "bfloat16", "float32"),
        default="float32",
        help="stored dtype of the new patch's values (default: float32)",
    )
    p.add_argument("--license", default=None, help="license id for the cards (default: the base model's if known)")
    p.add_argument("-o", "--output-dir", required=True, help="the stack folder to write (not one of the inputs)")
    add_hub_args(p)
    p.set_defaults(func=run_consolidate)


def _same_folder(a: str, b: str) -> bool:
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def run_consolidate(args: argparse.Namespace) -> int:
    from ..patched_model import PatchedModel
    from ..patched_model.consolidate import consolidated_name, stack_regularizer_record

    settings = json_object(args.regularizer_kwargs, "--regularizer-kwargs")
    if settings and args.regularizer is None:
        raise CLIError("--regularizer-kwargs needs --regularizer")
    stack_regularizer_record(args.regularizer, settings)  # an unknown setting fails before anything is read
    if os.path.isfile(args.output_dir):
        raise CLIError(f"--output-dir {args.output_dir!r} is a file; give a folder")
    if any(_same_folder(source, args.output_dir) for source in args.patches):
        raise CLIError(
            f"--output-dir {args.output_dir!r} is one of the patches read; write the consolidated stack to another "
            "folder (the inputs stay as they are)"
        )
    patches = read_patches(args.patches, hub_kwargs(args))  # before the model: a bad patch fails in a second
    names = [name for name, _, _ in patches]
    if args.run is not None:
        missing = [n for n in args.run if n not in names]
        if missing:
            raise CLIError(f"--patches names {missing}, which the stack does not hold; its patches are {names}")
    model, _ = load_model(args)
    pm = PatchedModel(model)
    for name, _, patch in patches:
        pm.add_patch(patch, name)
    new = pm.consolidate(
        args.run,
        args.regularizer,
        regularizer_kwargs=settings or None,
        patch_name=args.name,
        value_dtype=args.value_dtype,
    )
    pm.save_pretrained(args.output_dir, license=args.license)
    replaced = [c["name"] for c in new.config.consolidates]
    numel = sum(d.numel for d in new.deltas.values())
    name = args.name if args.name is not None else consolidated_name(replaced)
    say(
        f"Replaced {len(replaced)} patch(es) ({', '.join(replaced)}) by {name!r}"
        + (f" under {args.regularizer}" if args.regularizer else "")
        + f": {len(new.deltas)} module(s), {new.nnz:,} of {numel:,} entries changed, {new.nbytes() / 1e6:.3f} MB"
    )
    say(f"Saved the stack of {len(pm.active_patches)} patch(es) to {args.output_dir}: {', '.join(pm.active_patches)}")
    pm.unload()
    return EXIT_OK
