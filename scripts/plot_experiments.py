"""Plots and tables of several experiment folders together (runs of the same model, data and record order).

Usage:
    .venv/bin/python scripts/plot_experiments.py out/exp-rome out/exp-baselines --output-dir docs/img/rome-seq
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hf_edit_patch.evaluation.experiment.plots import plot_results
from hf_edit_patch.evaluation.experiment.results import RESULTS_FILE
from hf_edit_patch.evaluation.experiment.tables import stack_table, summary_table, tasks_table

# what must agree for runs to be compared in one figure
SHARED = ("data", "method", "setting", "unit", "batch_size", "seed", "model", "hparams", "drift_texts", "drift_n")


def merge(folders: list[str]) -> dict:
    merged: dict = {"config": None, "base": None, "runs": {}}
    for folder in folders:
        with open(Path(folder) / RESULTS_FILE, encoding="utf-8") as f:
            results = json.load(f)
        config = results["config"]
        if merged["config"] is None:
            merged["config"], merged["base"] = config, results["base"]
        else:
            differ = [k for k in SHARED if config.get(k) != merged["config"].get(k)]
            if differ:
                raise SystemExit(f"{folder}: not comparable with {folders[0]} (differs in {differ})")
            if not (merged["base"] or {}).get("tasks") and (results["base"] or {}).get("tasks"):
                merged["base"] = results["base"]
        for name, run in results["runs"].items():
            merged["runs"].setdefault(name, run)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="experiment output folders (with results.json)")
    parser.add_argument("--output-dir", required=True, help="where scores.png and heatmap.png go")
    args = parser.parse_args(argv)
    merged = merge(args.folders)
    paths = plot_results(merged, args.output_dir)
    tables = [summary_table(merged), stack_table(merged), tasks_table(merged)]
    sys.stdout.write("\n\n".join(t for t in tables if t) + "\n\n" + "\n".join(paths) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
