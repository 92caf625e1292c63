"""`eval`: score a base model without and with a patch (editing metrics, general tasks) → eval.json, plot, card."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..evaluation.tasks.prompts import TASKS as TASK_NAMES  # light: the task runner itself loads torch
from .common import (
    EXIT_OK,
    CLIError,
    add_hub_args,
    add_model_args,
    add_request_args,
    hub_kwargs,
    load_model,
    read_requests,
    say,
    show_progress,
)


def add_parsers(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "eval",
        parents=[common],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="evaluate a patch: editing metrics and general tasks before/after → eval.json, plot and card",
        description="Score the base model without and with the patch: reliability, generalization and locality on "
        "the patch's requests (or --requests), and with --tasks the general-ability tasks of the RECT paper. Writes "
        "eval.json, scores.png and a README.md evaluation card (model-index) to --output-dir, which `push` uploads "
        "with the patch.",
    )
    p.add_argument("patch", metavar="PATCH", help="a patch folder or Hub id")
    add_model_args(p)
    p.add_argument(
        "-o", "--output-dir", default=None, help="where to write (default: PATCH/evaluation for a patch folder)"
    )
    add_request_args(p, help_file="requests to score instead of the patch's own (a JSON or .jsonl file)")
    p.add_argument("--metric", choices=("accuracy", "probability"), default="accuracy", help="(default: accuracy)")
    p.add_argument("--locality-tokens", type=int, default=5, help="tokens compared for locality (default: 5)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    p.add_argument(
        "--tasks", nargs="+", default=[], metavar="TASK", help=f"general tasks, or 'all': {', '.join(TASK_NAMES)}"
    )
    p.add_argument("--task-limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--task-data-dir", default=None, help="folder with the task files (else `datasets` by name)")
    p.add_argument("--task-batch-size", type=int, default=16)
    p.add_argument("--no-plot", action="store_true", help="do not draw scores.png")
    p.add_argument("--strict", action="store_true", help="refuse a patch whose fingerprints differ")
    p.add_argument("--overwrite-card", action="store_true", help="replace a README.md a person edited")
    add_hub_args(p)
    p.set_defaults(func=run_eval)


def _tasks(names: list[str]) -> list[str]:
    if names == ["all"]:
        return list(TASK_NAMES)
    unknown = [t for t in names if t not in TASK_NAMES]
    if unknown:
        raise CLIError(f"unknown task(s) {unknown}; accepted: {', '.join(TASK_NAMES)} or 'all'")
    return list(dict.fromkeys(names))


def _row(name: str, base: Any, patched: Any) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, (int, float)) else "  n/a "

    change = f"{patched - base:+.4f}" if isinstance(base, (int, float)) and isinstance(patched, (int, float)) else ""
    return f"  {name:<16} {fmt(base)}  {fmt(patched)}  {change}"


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluation.report import evaluate_patch, write_evaluation
    from ..patch.edit_patch import EditPatch

    tasks = _tasks(args.tasks)
    for name in ("task_limit", "batch_size", "task_batch_size", "locality_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.task_data_dir is not None and not os.path.isdir(args.task_data_dir):
        raise CLIError(f"--task-data-dir {args.task_data_dir!r} is not a folder")
    output_dir = args.output_dir
    if output_dir is None:
        if not os.path.isdir(args.patch):
            raise CLIError("give --output-dir: PATCH is not a local folder to write the evaluation into")
        output_dir = os.path.join(args.patch, args.subfolder or "", "evaluation")
    requests = read_requests(args, required=False)
    patch = EditPatch.from_pretrained(args.patch, **hub_kwargs(args))
    model, tokenizer = load_model(args)
    results = evaluate_patch(
        model,
        tokenizer,
        patch,
        requests=requests,
        metric=args.metric,
        tasks=tasks,
        task_limit=args.task_limit,
        task_data_dir=args.task_data_dir,
        task_batch_size=args.task_batch_size,
        locality_tokens=args.locality_tokens,
        batch_size=args.batch_size,
        strict=args.strict,
        source=args.patch + (f" (subfolder {args.subfolder})" if args.subfolder else ""),
        show_progress=show_progress(args),
    )
    written = write_evaluation(
        results, output_dir, patch=patch, plots=not args.no_plot, overwrite_card=args.overwrite_card
    )
    say(f"Evaluation of {args.patch} on {results['base_model']['name_or_path']}")
    say(f"  {'':<16} {'base':>6}  {'patched':>7} change")
    for kind in ("editing", "tasks"):
        base, patched = results[kind]["base"], results[kind]["patched"]
        for name in dict.fromkeys([*base, *patched]):
            say(_row(name, base.get(name), patched.get(name)))
    say("Wrote " + ", ".join(written.values()))
    return EXIT_OK
