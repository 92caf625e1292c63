"""Tables and plots of many experiment folders together: seeds averaged, budgets compared with the whole update.

Reads `results.json` of every folder (`hf_edit_patch.evaluation.study`), groups the checkpoints by method, setting,
unit, regularizer and number of edits, and writes to --output-dir:

- `drift_vs_edits_<method>_<setting>.png`: editing metrics, drift and label probes against the number of edits,
  one line per regularizer (mean ± std over seeds),
- `success_vs_budget_<method>_<setting>_<edits>.png`: reliability, generalization and KL relative to the whole
  update at --edits edits, against the keep ratio,
- `study.md`: the table of every checkpoint and the budget table at --edits, also printed.

`--regularizers 'rect:*' auto` keeps only some regularizers (and always the base model and "none"); `--tag` is
appended to the file names.

When a method and setting were run with both units (instance and batch), the unit is added to the file names.

Usage:
    .venv/bin/python scripts/study.py /work/runs/seq50-s0 /work/runs/seq50-s1 /work/runs/seq50-s2 \\
        --output-dir out/study --edits 50
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys

from hf_edit_patch.evaluation.study import (
    BUDGET_METRICS,
    aggregate,
    load_points,
    plot_drift_vs_edits,
    plot_success_vs_budget,
    study_table,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="experiment output folders (each with results.json)")
    parser.add_argument("--output-dir", required=True, help="where the PNGs and study.md go")
    parser.add_argument("--edits", type=int, default=50, help="checkpoint of the budget plot and table (default 50)")
    parser.add_argument(
        "--regularizers",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="only these regularizers, as shell patterns (e.g. 'rect:*' auto); the base model and 'none' are always "
        "kept (default: all)",
    )
    parser.add_argument("--tag", default="", help="appended to the file names (e.g. to keep several selections)")
    args = parser.parse_args(argv)
    try:
        rows = load_points(args.folders)
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if args.regularizers:
        keep = ("base", "none", *args.regularizers)
        rows = [r for r in rows if any(fnmatch.fnmatchcase(r["regularizer"], p) for p in keep)]
    agg = aggregate(rows)
    if not agg:
        sys.stderr.write("error: the folders hold no measured point yet\n")
        return 2
    os.makedirs(args.output_dir, exist_ok=True)

    combos = sorted({(g["method"], g["setting"], g["unit"]) for g in agg})
    units: dict[tuple[str, str], int] = {}
    for method, setting, _ in combos:
        units[(method, setting)] = units.get((method, setting), 0) + 1
    written, notes = [], []
    for method, setting, unit in combos:
        name = f"{method}_{setting}" + (f"_{unit}" if units[(method, setting)] > 1 else "") + args.tag
        pick = {"method": method, "setting": setting, "unit": unit}
        try:
            path = os.path.join(args.output_dir, f"drift_vs_edits_{name}.png")
            written.append(plot_drift_vs_edits(agg, path, **pick))
        except ValueError as exc:
            notes.append(f"drift_vs_edits_{name}.png not written: {exc}")
        try:
            path = os.path.join(args.output_dir, f"success_vs_budget_{name}_{args.edits}.png")
            written.append(plot_success_vs_budget(agg, path, args.edits, **pick))
        except ValueError as exc:
            notes.append(f"success_vs_budget_{name}_{args.edits}.png not written: {exc}")

    budget = [g for g in agg if g["edits"] == args.edits]
    text = "## Every checkpoint (mean ± std over seeds)\n\n" + study_table(agg) + "\n\n"
    text += f"## Budgets at {args.edits} edits (ratios to the whole update, per seed)\n\n"
    text += (study_table(budget, BUDGET_METRICS) if budget else f"No group reached {args.edits} edits.") + "\n"
    with open(os.path.join(args.output_dir, f"study{args.tag}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    sys.stdout.write(text + "\n")
    for note in notes:
        sys.stderr.write(f"note: {note}\n")
    sys.stdout.write("\n".join([*written, os.path.join(args.output_dir, f"study{args.tag}.md")]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
