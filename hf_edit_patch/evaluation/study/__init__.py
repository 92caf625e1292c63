"""Several experiment folders read together: seeds averaged, regularizers compared with the whole update.

`run_experiment` writes one `results.json` per output folder (one method × setting × unit × seed, several
regularizers). This module reads many of them at once:

- `load_points` flattens every folder into rows, one per (folder, run, checkpoint) and one for the base model
  (regularizer "base", 0 edits): editing metrics, drift (KL, perplexity), stored entries and label probes.
- `aggregate` groups the rows by (method, setting, unit, regularizer, edits) and gives each metric's mean, sample
  standard deviation and count over seeds. It also compares every group with the whole update ("none") of the same
  method, setting, unit and number of edits, seed by seed: `rel_reliability`, `rel_generalization`, `rel_kl` and
  `rel_nnz` (stored entries) are the ratios of a seed's values, then averaged over seeds. "Keeps ≥ 94% of the
  reliability" reads `rel_reliability` ≥ 0.94; "halves the KL" reads `rel_kl` ≤ 0.5.
- `study_table` writes the groups as a Markdown table ("mean ± std" over seeds).
- `plot_drift_vs_edits` and `plot_success_vs_budget` draw the metrics against the number of edits and against the
  keep ratio.

It needs only the standard library (no torch); the plots need matplotlib (``pip install "hf_edit_patch[eval]"``).
Modules: `points` (reading), `aggregate`, `tables` and `plots`.

Usage:
    ```python
    from hf_edit_patch.evaluation import study

    agg = study.aggregate(study.load_points(["out/seq50-s0", "out/seq50-s1", "out/seq50-s2"]))
    print(study.study_table(agg, edits=50))
    study.plot_drift_vs_edits(agg, "out/drift_vs_edits.png")
    study.plot_success_vs_budget(agg, "out/success_vs_budget.png", edits=50)
    ```
    ```bash
    python scripts/study.py out/seq50-s0 out/seq50-s1 out/seq50-s2 --output-dir out/study --edits 50
    ```
"""

from __future__ import annotations

from .aggregate import aggregate, parse_regularizer
from .plots import plot_drift_vs_edits, plot_success_vs_budget
from .points import load_points
from .tables import BUDGET_METRICS, STUDY_METRICS, study_table

__all__ = [
    "BUDGET_METRICS",
    "STUDY_METRICS",
    "aggregate",
    "load_points",
    "parse_regularizer",
    "plot_drift_vs_edits",
    "plot_success_vs_budget",
    "study_table",
]
