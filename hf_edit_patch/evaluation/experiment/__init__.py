"""The paper's experiments: edit a model step by step and measure what each step costs.

Settings (Gu et al. 2024): *single* editing starts every edit from the unedited model, *sequential* editing stacks
each edit on the previous ones; an edit holds one request (*instance*) or `batch_size` requests (*batch*). Each
run is one editor × regularizer × setting over the first `max(checkpoints)` requests; at every checkpoint (number
of edited requests) it records:

- editing metrics on the requests edited so far (`score_edits`: reliability, generalization, locality),
- next-token drift against the base model on neutral text (`drift`: KL, perplexity),
- the paper's weight statistics (`weight_change_stats`) and a pooled |ΔW| map of the first edited matrix,
- the eight general-ability tasks (`run_general_tasks`), when `tasks` is not empty,
- label probes on SST-2, RTE and BoolQ (`probes.label_probes`: answer-format adherence and label-likelihood AUC),
  when `probe_tasks` is not empty.

Results go to `<output_dir>/results.json`, rewritten atomically after every checkpoint. Sequential runs save each
edit as a patch under `<output_dir>/patches/<run>/`; a rerun with the same configuration skips finished
checkpoints and re-attaches the saved patches (stacking is exact) instead of recomputing them. The measurement
settings (`MEASUREMENT_FIELDS`: tasks, probes, regularizers and checkpoints) may change between reruns: a finished
checkpoint that lacks a measure now asked for gets it added (sequential runs re-attach their saved patches to do
so; single runs edit again). Single runs compute each group's whole update once and apply every regularizer to
it (`compute_update` / `regularize_update` of `hf_edit_patch.editing`), so regularizers are compared on the same
ΔW. Plots are written as PNG by `plot_results`.

Usage:
    ```bash
    python scripts/run_experiment.py --data ../shared/data/editing/zsre_eval.json --method rome \\
        --regularizers none rect:0.4 random:0.4 pca:0.4 --checkpoints 10 20 30 --output-dir out/exp
    hf-edit-patch experiment --help        # the same, from the command line tool
    ```

Modules: `config` (what to run: `ExperimentConfig`, regularizer specs, the ZsRE requests and neutral texts),
`runner` (`run_experiment`: editing, resuming), `measures` (what is recorded at a checkpoint), `results` (the
results file), `tables` and `plots`. The runner needs torch and is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy import lazy_exports

__all__ = [
    "RESULTS_FILE",
    "ExperimentConfig",
    "load_zsre",
    "plot_results",
    "run_experiment",
    "stack_table",
    "summary_table",
    "tasks_table",
]

_LAZY = {
    "ExperimentConfig": "config",
    "load_zsre": "config",
    "RESULTS_FILE": "results",
    "plot_results": "plots",
    "run_experiment": "runner",
    "stack_table": "tables",
    "summary_table": "tables",
    "tasks_table": "tables",
}

if TYPE_CHECKING:
    from .config import ExperimentConfig, load_zsre
    from .plots import plot_results
    from .results import RESULTS_FILE
    from .runner import run_experiment
    from .tables import stack_table, summary_table, tasks_table


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
