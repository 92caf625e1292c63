"""`edit` (requests → patch folder), `apply` (base + patches → merged model folder, or a quick generate) and
`inspect` (modules, sizes, encodings, provenance; fingerprints against a base model)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from typing import Any

from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    CLIError,
    add_hub_args,
    add_model_args,
    add_request_args,
    hub_kwargs,
    json_object,
    keep_ratio,
    load_model,
    print_json,
    read_requests,
    say,
    show_progress,
)

METHODS = ("rome", "memit", "ft", "alphaedit", "kn", "mend")
"""The editing methods (`hf_edit_patch.editing.METHODS`, kept here so that `--help` does not load torch)."""
DEFAULT_KEEP_RATIO = 0.4
"""`hf_edit_patch.editing.DEFAULT_KEEP_RATIO`, for `--help` (a test keeps the two equal)."""
STACK_REGULARIZERS = ("norm_anchor", "prune", "rect")
"""The registered stack-level regularizers (`hf_edit_patch.patch.stack_regularizers`), for `--help`."""


def add_parsers(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "edit",
        parents=[common],
        epilog=epilog,
        formatter_class=fmt,
        help="compute an edit and save it as a patch folder",
        description="Edit a model with ROME, MEMIT, FT, AlphaEdit, knowledge neurons (KN) or a trained MEND editor "
        f"and save the update as a patch (the model is not changed). RECT keeps {DEFAULT_KEEP_RATIO:.0%} of ΔW unless "
        "--keep-ratio or --norm-budget says otherwise, as hf_edit_patch.edit does. Key statistics (ROME, MEMIT, "
        "AlphaEdit) come from --stats-dataset, the cache, or with --model-sampled-stats from text the model samples "
        "itself; the first computation takes from about a minute to many minutes on a CPU, with a progress bar.",
    )
    add_model_args(p)
    add_request_args(
        p,
        help_file="a JSON list (or one object) or a .jsonl file of requests: EditRequest fields "
        "(prompt, subject, target_new, ...), CounterFact or ZsRE records",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="rome",
        help=f"editing method: {', '.join(METHODS)} (default: rome; mend needs --hparams '{{\"editor\": PATH}}')",
    )
    p.add_argument(
        "--keep-ratio",
        type=keep_ratio,
        default=argparse.SUPPRESS,
        help="fraction of ΔW the regularizer keeps, 'auto' (the smallest that keeps the edit), or 'none' (the whole "
        f"update) (default: {DEFAULT_KEEP_RATIO}, the same as hf_edit_patch.edit)",
    )
    p.add_argument(
        "--norm-budget",
        type=float,
        default=None,
        help="RECT instead of --keep-ratio: keep the fewest entries carrying this fraction of ΔW's squared norm",
    )
    p.add_argument("--regularizer", choices=("rect", "random", "pca"), default="rect", help="(default: rect)")
    p.add_argument(
        "--hparams", default=None, help="method hyperparameters as JSON or @file.json, e.g. '{\"layer\": 5}'"
    )
    p.add_argument(
        "--stats-dataset",
        default=None,
        help="corpus for the key statistics of ROME, MEMIT and AlphaEdit: a local .txt/.json/.jsonl file, or a "
        "`datasets` id such as wikitext (needs the eval extra and the Hub once)",
    )
    p.add_argument("--stats-text-field", default="text", help="text field of a JSON corpus (default: text)")
    p.add_argument(
        "--model-sampled-stats",
        action="store_true",
        help="without a corpus: statistics from text the model samples itself (offline; recorded as such)",
    )
    p.add_argument("--stats-cache-dir", default=None, help="key statistics cache (default: ~/.cache/hf_edit_patch)")
    p.add_argument("--value-dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")
    group = p.add_argument_group("editing on top of a stack")
    group.add_argument(
        "--on",
        nargs="+",
        metavar="PATCH",
        default=None,
        help="compute the edit on the model with these patches attached (folders or Hub ids, stacks too, in "
        "order): the new patch records them as its parents and goes on top of them (apply PATCH... OUTPUT_DIR)",
    )
    group.add_argument(
        "--stack-regularizer",
        choices=STACK_REGULARIZERS,
        default=None,
        help="bound the accumulated update of the stack with the new patch on top: prune (singular values above "
        "threshold x the weight's largest are compressed), norm_anchor (Frobenius norm at most alpha x the "
        "weight's), rect (RECT on the accumulated update); see docs/lifelong.md",
    )
    group.add_argument(
        "--stack-regularizer-kwargs",
        default=None,
        metavar="JSON",
        help="its settings, e.g. '{\"threshold\": 0.5}' (prune), '{\"alpha\": 0.1}' (norm_anchor), "
        "'{\"keep_ratio\": 0.4}' (rect)",
    )
    p.add_argument(
        "--license", default=None, help="license id for the patch card (default: the base model's if known)"
    )
    p.add_argument("--overwrite-card", action="store_true", help="replace a README.md a person edited")
    p.add_argument("-o", "--output-dir", required=True, help="the patch folder to write")
    p.set_defaults(func=run_edit)

    p = sub.add_parser(
        "apply",
        parents=[common],
        epilog=epilog,
        formatter_class=fmt,
        help="attach patches to a base model: save the merged model, or generate from prompts",
        description="Attach patches (folders or Hub ids, in order) to a base model; save the merged model with "
        "--output-dir and/or compare continuations without and with the patches with --prompt.",
    )
    p.add_argument("patches", nargs="+", metavar="PATCH", help="patch folders or Hub ids (stacks too), in order")
    add_model_args(p)
    p.add_argument("-o", "--output-dir", default=None, help="save the merged model and tokenizer here")
    p.add_argument("--prompt", action="append", default=[], help="generate from this prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate per prompt (default: 20)")
    p.add_argument("--strict", action="store_true", help="refuse patches whose fingerprints differ")
    add_hub_args(p)
    p.set_defaults(func=run_apply)

    p = sub.add_parser(
        "inspect",
        parents=[common],
        epilog=epilog,
        formatter_class=fmt,
        help="show a patch's modules, sizes, encodings and provenance; check fingerprints against a model",
        description="Show what a patch (or a stack) changes and where it came from; for a stack, also its conflicts "
        "(facts edited twice, contradicting requests, entries several patches change). With --model, check that the "
        "model's weights are those the patch was computed on (exit 1 when they differ).",
    )
    p.add_argument("patch", metavar="PATCH", help="a patch folder or Hub id")
    p.add_argument("--model", default=None, help="check fingerprints against this model ('default' for SmolLM2)")
    p.add_argument("--model-revision", default=None, help="branch, tag or commit of a Hub model")
    p.add_argument("--dtype", default=None, help="weight dtype of the model to check against")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_hub_args(p)
    p.set_defaults(func=run_inspect)


# ---------------------------------------------------------------------------------------------------------- edit
def run_edit(args: argparse.Namespace) -> int:
    from ..editing.entry import edit
    from ..hub.corpora import CLI_OPTION_NAMES, corpus_option_names
    from ..hub.stats_cache import StatsCache
    from ..patched_model import PatchedModel
    from ..patched_model.consolidate import stack_regularizer_record

    requests = read_requests(args, required=True)
    hparams = json_object(args.hparams, "--hparams")
    stack_settings = json_object(args.stack_regularizer_kwargs, "--stack-regularizer-kwargs")
    if stack_settings and args.stack_regularizer is None:
        raise CLIError("--stack-regularizer-kwargs needs --stack-regularizer")
    stack_regularizer_record(args.stack_regularizer, stack_settings)  # an unknown setting fails before the model
    if os.path.isfile(args.output_dir):
        raise CLIError(f"--output-dir {args.output_dir!r} is a file; give a folder")
    budget = {"keep_ratio": args.keep_ratio} if hasattr(args, "keep_ratio") else {}  # else edit()'s default
    if budget and args.norm_budget is not None:
        raise CLIError("give --keep-ratio or --norm-budget, not both")
    below = read_patches(args.on, {}) if args.on else []  # before the model: a bad patch fails in a second
    model, tokenizer = load_model(args)
    if below:
        model = PatchedModel(model)
        for name, _, patch in below:
            model.add_patch(patch, name)
        say(f"Editing on top of {len(below)} patch(es): {', '.join(model.active_patches)}")
    with corpus_option_names(CLI_OPTION_NAMES):  # errors about the corpus name this command's flags
        patch = edit(
            model,
            tokenizer,
            requests,
            method=args.method,
            **budget,
            norm_budget=args.norm_budget,
            regularizer=args.regularizer,
            hparams=hparams or None,
            stats_dataset=args.stats_dataset,
            stats_text_field=args.stats_text_field,
            allow_model_sampled_stats=args.model_sampled_stats,
            stats_cache=StatsCache(args.stats_cache_dir) if args.stats_cache_dir else None,
            value_dtype=args.value_dtype,
            show_progress=show_progress(args),
            stack_regularizer=args.stack_regularizer,
            stack_regularizer_kwargs=stack_settings or None,
        )
    patch.save_pretrained(args.output_dir, license=args.license, overwrite_card=args.overwrite_card)
    numel = sum(d.numel for d in patch.deltas.values())
    say(
        f"Saved a {args.method} patch of {len(requests)} request(s) to {args.output_dir}: {len(patch.deltas)} "
        f"module(s), {patch.nnz:,} of {numel:,} entries changed ({patch.nnz / max(numel, 1):.1%}), "
        f"{patch.nbytes() / 1e6:.3f} MB"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------- apply
def _patch_name(source: str, taken: list[str], index: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(source))).lstrip(".-")[:100]
    return name if name and name not in taken else f"patch{index}"


def read_patches(sources: list[str], hub_options: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """`(name, source, EditPatch)` for every patch of `sources` (patches or saved stacks), in order, read and
    validated (format, content hash) before any model is loaded; a missing or malformed patch fails here."""
    from ..errors import PatchNotFoundError
    from ..hub.resolve import resolve_file
    from ..patch.config import CONFIG_NAME, STACK_NAME, read_stack
    from ..patch.edit_patch import EditPatch

    options = dict(hub_options)
    sub = options.pop("subfolder", None)
    found: list[tuple[str, str, Any]] = []
    for index, source in enumerate(sources):
        taken = [name for name, _, _ in found]
        if resolve_file(source, CONFIG_NAME, subfolder=sub, missing_ok=True, **options) is not None:
            found.append((_patch_name(source, taken, index), source, EditPatch.from_pretrained(source, **hub_options)))
            continue
        stack = resolve_file(source, STACK_NAME, subfolder=sub, missing_ok=True, **options)
        if stack is None:
            where = repr(source) + (f" (subfolder {sub!r})" if sub else "")
            raise PatchNotFoundError(f"{where} has neither {CONFIG_NAME} (a patch) nor {STACK_NAME} (a stack)")
        for name in read_stack(stack):
            patch = EditPatch.from_pretrained(source, subfolder=f"{sub}/{name}" if sub else name, **options)
            found.append((name if name not in taken else f"patch{index}_{name}", source, patch))
            taken.append(found[-1][0])
    return found


def run_apply(args: argparse.Namespace) -> int:
    from ..hub.files import apply_default_mode
    from ..interop.export_record import merged_record, write_merged_record
    from ..modules import SOURCE_ATTRIBUTE
    from ..patched_model import PatchedModel
    from .demo import continuation

    if not args.output_dir and not args.prompt:
        raise CLIError("nothing to do: give --output-dir (save the merged model) and/or --prompt (generate)")
    if args.output_dir and os.path.isfile(args.output_dir):
        raise CLIError(f"--output-dir {args.output_dir!r} is a file; give a folder")
    patches = read_patches(args.patches, hub_kwargs(args))  # before the model: a bad patch fails in a second
    model, tokenizer = load_model(args)
    # the base model (id, revision, GGUF-converted or not) and every patch in order, as `export` records them
    record = merged_record(model, {name: patch for name, _, patch in patches}, sources={n: s for n, s, _ in patches})
    pm = PatchedModel(model)
    for name, _, patch in patches:
        pm.add_patch(patch, name, strict=args.strict)
    say(f"Attached {len(pm.active_patches)} patch(es): {', '.join(pm.active_patches)}")
    for prompt in args.prompt:
        with pm.disable_patches():
            before_text = continuation(pm, tokenizer, prompt, args.max_new_tokens)
        after_text = continuation(pm, tokenizer, prompt, args.max_new_tokens)
        say(f"{prompt!r}\n  base:    {before_text!r}\n  patched: {after_text!r}")
    if args.output_dir:
        merged = pm.merge_and_unload()
        if hasattr(merged.config, SOURCE_ATTRIBUTE):  # the merged weights are no longer the converted ones
            delattr(merged.config, SOURCE_ATTRIBUTE)
        merged.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        write_merged_record(args.output_dir, record)
        apply_default_mode(args.output_dir)  # safetensors writes 0o600 files; a model folder is for sharing
        say(f"Saved the merged model to {args.output_dir}")
    else:
        pm.unload()
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------- inspect
def _describe(patch: Any, source: str, subfolder: str | None) -> dict[str, Any]:
    from ..patch.encoding import encoded_nbytes

    cfg = patch.config
    modules = []
    for name, delta in patch.deltas.items():
        rec = cfg.modules[name]
        modules.append(
            {
                "name": name,
                "shape": list(rec.shape),
                "layout": rec.layout,
                "nnz": delta.nnz,
                "density": delta.nnz / delta.numel,
                "encoding": rec.encoding,
                "bytes": encoded_nbytes(delta, rec.encoding),
            }
        )
    numel = sum(d.numel for d in patch.deltas.values())
    return {
        "source": source,
        "subfolder": subfolder,
        "modules": modules,
        "nnz": patch.nnz,
        "numel": numel,
        "density": patch.nnz / max(numel, 1),
        "bytes": sum(m["bytes"] for m in modules),
        "provenance": {
            k: v
            for k, v in cfg.to_dict().items()
            if k not in ("modules", "patch_type")  # modules are listed above
        },
    }


def _check(patch: Any, model: Any) -> list[dict[str, Any]]:
    from ..errors import PatchError
    from ..modules import resolve_weight
    from ..patch.encoding import fingerprint

    out = []
    for name, rec in patch.config.modules.items():
        try:
            _, weight, layout = resolve_weight(model, name)
        except PatchError as exc:
            out.append({"module": name, "status": "missing", "detail": str(exc)})
            continue
        if layout != rec.layout or tuple(weight.shape) != rec.shape:
            detail = f"model has {layout} {list(weight.shape)}, patch {rec.layout} {list(rec.shape)}"
            out.append({"module": name, "status": "shape mismatch", "detail": detail})
        elif rec.fingerprint is None:
            out.append({"module": name, "status": "unknown", "detail": "the patch records no fingerprint"})
        else:
            same = fingerprint(weight) == rec.fingerprint
            out.append({"module": name, "status": "match" if same else "differs", "detail": ""})
    return out


def _print_patch(info: dict[str, Any]) -> None:
    prov = info["provenance"]
    title = info["source"] + (f" (subfolder {info['subfolder']})" if info["subfolder"] else "")
    reg = f"{prov['regularizer']} keeping {prov['keep_ratio']}" if prov["regularizer"] else "none"
    say(f"Patch {title}")
    say(f"  base model:   {prov['base_model_name_or_path']} (revision {prov['base_model_revision'] or 'unknown'})")
    say(f"  editor:       {prov['editor']} {json.dumps(prov['editor_hparams'], sort_keys=True)}")
    say(f"  regularizer:  {reg}")
    changed = f"{info['nnz']:,} of {info['numel']:,} entries ({info['density']:.2%})"
    say(f"  changed:      {changed}, {info['bytes']:,} bytes")
    say(f"  values:       {prov['value_dtype']}; content {prov['content_hash']}")
    say(f"  written by:   hf_edit_patch {prov['library_version']} (format {prov['format_version']})")
    parents = ", ".join(p.get("name", "?") for p in prov["parent_patches"]) or "none"
    say(f"  parents:      {parents}")
    say(f"  modules ({len(info['modules'])}):")
    for m in info["modules"]:
        shape = "×".join(map(str, m["shape"]))
        say(
            f"    {m['name']:<40} {shape:>11} {m['layout']:<7} nnz {m['nnz']:>10,} ({m['density']:6.2%}) "
            f"{m['encoding']:<7} {m['bytes']:>11,} B"
        )
    say(f"  requests ({len(prov['requests'])}):")
    for r in prov["requests"][:20]:
        text = str(r.get("prompt", "")).replace("{}", str(r.get("subject", "")))
        say(
            f"    {text!r} -> {r.get('target_new')!r}"
            + (f" (was {r['target_true']!r})" if r.get("target_true") else "")
        )
    if len(prov["requests"]) > 20:
        say(f"    ... and {len(prov['requests']) - 20} more")


def run_inspect(args: argparse.Namespace) -> int:
    from ..errors import PatchNotFoundError
    from ..hub.resolve import resolve_file
    from ..patch.config import CONFIG_NAME, STACK_NAME, read_stack
    from ..patch.conflicts import find_conflicts
    from ..patch.edit_patch import EditPatch

    kwargs = hub_kwargs(args)
    sub = kwargs.pop("subfolder")
    names = None
    if resolve_file(args.patch, CONFIG_NAME, subfolder=sub, missing_ok=True, **kwargs) is not None:
        subfolders = [sub]
    else:
        stack = resolve_file(args.patch, STACK_NAME, subfolder=sub, missing_ok=True, **kwargs)
        if stack is None:
            raise PatchNotFoundError(f"{args.patch!r} has neither {CONFIG_NAME} (a patch) nor {STACK_NAME} (a stack)")
        names = read_stack(stack)
        subfolders = [f"{sub}/{n}" if sub else n for n in names]
    patches = [(s, EditPatch.from_pretrained(args.patch, subfolder=s, **kwargs)) for s in subfolders]
    infos = [_describe(p, args.patch, s) for s, p in patches]
    conflicts = find_conflicts([(n, p) for n, (_, p) in zip(names, patches, strict=True)]) if names else None
    failed = 0
    accumulated = None
    if args.model is not None:
        args.model = None if args.model == "default" else args.model
        model, _ = load_model(args)
        failed, accumulated = _check_stack(model, infos, [p for _, p in patches])
    if args.json:
        out = infos[0] if conflicts is None else {"patches": infos, "conflicts": conflicts.to_dict()}
        print_json(out if accumulated is None else {**out, "accumulated": accumulated})
    else:
        for info in infos:
            _print_patch(info)
            for c in info.get("fingerprint_check", []):
                say(f"  fingerprint {c['module']}: {c['status']}" + (f" ({c['detail']})" if c["detail"] else ""))
        if conflicts is not None:
            say(f"Stack of {conflicts}")
        if accumulated is not None:
            _print_accumulated(accumulated, stacked=conflicts is not None)
    if failed:
        message = f"Fingerprint check failed: {failed} module(s) differ from the weights the patch was computed on"
        if args.json:  # stdout holds the JSON alone
            sys.stderr.write(message + "\n")
        else:
            say(message)
        return EXIT_FAILURE
    return EXIT_OK


def _check_stack(model: Any, infos: list[dict[str, Any]], patches: list[Any]) -> tuple[int, dict[str, Any] | None]:
    """Checks each patch against the model with the patches below it attached (a stack's patches were computed on
    those weights), recording the result in its info; returns the number of modules that differ and, when none
    does, the accumulated update of them all (`stack_update_stats`). The model is left as it was."""
    from ..evaluation.accumulated import stack_update_stats
    from ..patched_model import PatchedModel

    pm = PatchedModel(model)
    failed = 0
    try:
        for index, (info, patch) in enumerate(zip(infos, patches, strict=True)):
            info["fingerprint_check"] = _check(patch, model)
            statuses = {c["status"] for c in info["fingerprint_check"]}
            failed += sum(c["status"] not in ("match", "unknown") for c in info["fingerprint_check"])
            if statuses <= {"match", "unknown", "differs"}:  # it fits the model: the next ones sit on it
                with warnings.catch_warnings():  # differing fingerprints are reported by the check above
                    warnings.simplefilter("ignore", UserWarning)
                    pm.add_patch(patch, f"p{index}")
        return failed, None if failed else stack_update_stats(pm)
    finally:
        pm.unload()


def _print_accumulated(stats: dict[str, dict[str, Any]], *, stacked: bool) -> None:
    what = "The stack's accumulated update ΣΔW" if stacked else "The update ΣΔW"

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    say(f"{what} against the model's weights W, per module:")
    for module, st in stats.items():
        before, edited = st["cond_before"], st["cond_edited"]
        cond = ratio(edited / before if before and edited else None)
        say(
            f"  {module:<40} ‖ΣΔW‖/‖W‖ {ratio(st['rel_fro']):>7}   σmax(ΣΔW)/σmax(W) {ratio(st['rel_spectral']):>7}   "
            f"cond(W+ΣΔW)/cond(W) {cond:>7}"
        )
    grown = [m for m, st in stats.items() if (st["rel_fro"] or 0.0) > 1.0]
    if grown:
        say(
            f"ΣΔW is larger than W in {len(grown)} module(s). In the lifelong study of docs/results.md, an "
            "unregularized ROME stack degraded from there (perplexity +22% at 1.1×, doubled at 1.8×); the "
            "stack-level regularizers of docs/lifelong.md (edit --stack-regularizer, consolidate --regularizer) "
            "bound it."
        )
