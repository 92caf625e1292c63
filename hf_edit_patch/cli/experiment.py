"""`experiment`: edit a model step by step and measure what each step costs (resumable; JSON results and PNG plots).

The runner is `hf_edit_patch.evaluation.experiment`; this module only reads the command line into an
`ExperimentConfig` and prints the tables. `scripts/run_experiment.py` runs the same command.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..evaluation.experiment.config import COUNTERFACTUALS, SETTINGS, UNITS, ExperimentConfig
from ..evaluation.tasks.prompts import PROBE_TASKS, TASKS
from .common import EXIT_OK, CLIError, say, show_progress

__all__ = ["add_parsers", "config_from_args", "run_experiment_command"]


def add_parsers(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "experiment",
        parents=[common],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="edit a model step by step and measure editing metrics, drift, weight changes and tasks",
        description="Edit a model step by step and measure what it costs (resumable; JSON results and PNG plots).",
    )
    p.add_argument(
        "--data",
        default=None,
        help="ZsRE records (a JSON list, e.g. zsre_eval.json); not needed with --counterfactuals only",
    )
    p.add_argument(
        "--counterfactuals",
        default="none",
        choices=COUNTERFACTUALS,
        help="generated CounterFact-style requests the model does not already state (hf_edit_patch.counterfactuals): "
        "'fill' after the ZsRE records up to the last checkpoint, 'only' instead of them (default: none)",
    )
    p.add_argument("--output-dir", required=True, help="results.json, patches and plots go here (resumable)")
    p.add_argument(
        "--method",
        default="rome",
        choices=("rome", "memit", "ft", "alphaedit", "kn", "mend"),
        help="editor (mend needs --hparams '{\"editor\": PATH}', a trained MEND editor)",
    )
    p.add_argument(
        "--regularizers",
        nargs="+",
        default=["none", "rect:0.4"],
        help="none, rect:K, random:K, pca:K (K the keep ratio), norm:F (RECT norm budget), auto (RECT with "
        "keep_ratio='auto'), stack:K (sequential: the stack re-sparsified to K), prune:T (every edit keeps the "
        "singular values of the accumulated update under about T·σ_max(W)), anchor:A (every edit keeps "
        "‖ΔW_acc‖_F ≤ A·‖W‖_F) (default: none rect:0.4)",
    )
    p.add_argument("--setting", default="sequential", choices=SETTINGS)
    p.add_argument("--unit", default="instance", choices=UNITS, help="one request per edit, or --batch-size")
    p.add_argument("--batch-size", type=int, default=10, help="requests per edit with --unit batch (default: 10)")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[1, 10, 50, 100], help="edits to measure at")
    p.add_argument(
        "--first-edits",
        type=int,
        default=50,
        help="forgetting: past this many edits, the first ones are scored again at every checkpoint (default: 50)",
    )
    p.add_argument("--seed", type=int, default=0, help="record order: 0 keeps the file's order")
    p.add_argument("--model", default=None, help="model id or folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--hparams", default=None, help="editor hyperparameters as JSON (e.g. '{\"layer\": 5}')")
    p.add_argument("--tasks", nargs="*", default=list(TASKS), help=f"general tasks (default: all of {TASKS})")
    p.add_argument("--task-limit", type=int, default=50, help="examples per task (default: 50; 0 for all)")
    p.add_argument("--task-batch-size", type=int, default=16)
    p.add_argument(
        "--task-checkpoints", type=int, nargs="*", default=None, help="checkpoints that run the tasks (default: all)"
    )
    p.add_argument("--task-data-dir", default=None, help="folder with the task files (else `datasets` by name)")
    p.add_argument("--drift-texts", required=True, help="neutral texts for drift (.txt, .json or .jsonl)")
    p.add_argument("--drift-text-field", default="passage", help="field of a JSON record holding the text")
    p.add_argument("--drift-n", type=int, default=32, help="texts for drift (the file's last ones; default 32)")
    p.add_argument("--drift-max-length", type=int, default=64, help="tokens per drift text (default 64)")
    p.add_argument("--stats-dataset", default=None, help="corpus for the key statistics (else model-sampled text)")
    p.add_argument("--stats-text-field", default="text")
    p.add_argument("--single-task-edits", type=int, default=1, help="single editing: edits measured in full")
    p.add_argument(
        "--probes",
        nargs="*",
        default=[],
        choices=PROBE_TASKS,
        help="label probes (answer-format adherence, label-likelihood AUC) on these tasks; data from --task-data-dir",
    )
    p.add_argument("--probe-limit", type=int, default=32, help="examples per probe task (default 32)")
    p.add_argument("--probe-max-length", type=int, default=160, help="tokens per probe prompt (default 160)")
    p.add_argument("--no-plots", action="store_true", help="write results.json only, no PNG plots")
    p.set_defaults(func=run_experiment_command)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The `ExperimentConfig` of parsed `experiment` arguments.

    Raises:
        ValueError: `--hparams` is not a JSON object, or the configuration is invalid.
    """
    try:
        hparams = json.loads(args.hparams) if args.hparams else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--hparams is not valid JSON: {exc}") from exc
    if not isinstance(hparams, dict):
        raise ValueError(f"--hparams must be a JSON object, got {args.hparams!r}")
    return ExperimentConfig(
        data=args.data,
        method=args.method,
        regularizers=list(args.regularizers),
        setting=args.setting,
        unit=args.unit,
        batch_size=args.batch_size,
        checkpoints=list(args.checkpoints),
        seed=args.seed,
        model=args.model,
        hparams=hparams,
        tasks=list(args.tasks),
        task_limit=args.task_limit or None,
        task_batch_size=args.task_batch_size,
        task_data_dir=args.task_data_dir,
        drift_texts=args.drift_texts,
        drift_text_field=args.drift_text_field,
        drift_n=args.drift_n,
        drift_max_length=args.drift_max_length,
        task_checkpoints=args.task_checkpoints,
        stats_dataset=args.stats_dataset,
        stats_text_field=args.stats_text_field,
        single_task_edits=args.single_task_edits,
        probe_tasks=list(args.probes),
        probe_limit=args.probe_limit,
        probe_max_length=args.probe_max_length,
        counterfactuals=args.counterfactuals,
        first_edits=args.first_edits,
    )


def run_experiment_command(args: argparse.Namespace) -> int:
    """Runs (or resumes) the experiment of parsed `experiment` arguments and prints its tables."""
    from ..evaluation.experiment.results import RESULTS_FILE
    from ..evaluation.experiment.runner import run_experiment
    from ..evaluation.experiment.tables import stack_table, summary_table, tasks_table

    config = config_from_args(args)
    for path, what in ((config.data, "--data"), (config.drift_texts, "--drift-texts")):
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"{what}: no such file {path!r}")
    results = run_experiment(config, args.output_dir, plots=not args.no_plots, show_progress=show_progress(args))
    say(summary_table(results) + "\n")
    for table in (stack_table(results), tasks_table(results)):
        if table:
            say(table + "\n")
    say(f"Results in {Path(args.output_dir) / RESULTS_FILE}")
    return EXIT_OK
