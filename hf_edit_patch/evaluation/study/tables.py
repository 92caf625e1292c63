"""Aggregated groups as a Markdown table: "mean ± std" over seeds, one row per group.

Example:
    ```python
    print(study_table(agg, edits=50))
    print(study_table(agg, BUDGET_METRICS, edits=50))
    ```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..experiment.tables import PROBE_NAMES
from .aggregate import group_order

__all__ = ["BUDGET_METRICS", "STUDY_METRICS", "study_table"]

STUDY_METRICS = (
    "reliability",
    "generalization",
    "locality",
    "kl",
    "ppl",
    "sentiment_adherence",
    "sentiment_auc",
    "closed_qa_adherence",
    "closed_qa_auc",
    "nnz",
)
BUDGET_METRICS = (
    "rel_reliability",
    "rel_generalization",
    "rel_kl",
    "rel_nnz",
    "reliability",
    "generalization",
    "kl",
    "nnz",
)
_HEADS = {
    "reliability": "reliability",
    "generalization": "generalization",
    "locality": "locality",
    "kl": "KL",
    "ppl": "perplexity",
    "nnz": "stored entries",
    "rel_reliability": "reliability vs none",
    "rel_generalization": "generalization vs none",
    "rel_kl": "KL vs none",
    "rel_nnz": "stored vs none",
}


def _spec(metric: str) -> str:
    if metric.startswith("rel_"):
        return ".1%"
    if metric == "kl":
        return ".4f"
    if metric == "ppl":
        return ".2f"
    if metric == "nnz":
        return ",.0f"
    return ".3f"


def _cell(stats: Any, metric: str) -> str:
    if not isinstance(stats, dict) or stats.get("mean") is None:
        return "–"
    spec = _spec(metric)
    text = format(stats["mean"], spec)
    if stats.get("count", 0) >= 2 and stats.get("std") is not None:
        text += " ± " + format(stats["std"], spec)
    return text


def _head(metric: str) -> str:
    if metric in _HEADS:
        return _HEADS[metric]
    task, _, what = metric.rpartition("_")
    if task in PROBE_NAMES and what in ("adherence", "auc"):
        return f"{PROBE_NAMES[task]} {'format' if what == 'adherence' else 'AUC'}"
    return metric


def study_table(
    agg: Sequence[dict[str, Any]], metrics: Sequence[str] = STUDY_METRICS, edits: int | Iterable[int] | None = None
) -> str:
    """A Markdown table of aggregated groups (`aggregate`), one row per group.

    Rows are sorted by setting, method, unit, regularizer family (base, none, rect, random, pca, norm, auto, stack),
    keep value (largest first) and edits; `edits` keeps only the groups at that number (or those numbers) of edits.
    Cells read "mean ± std" over seeds when two or more seeds have the value, "mean" with one, "–" with none:
    3 decimals for rates and AUC, 4 for KL, 2 for perplexity, thousands separators for stored entries (nnz) and
    percentages for the ratios against the whole update (`rel_*`). The "seeds" column counts the group's seeds.
    """
    if edits is not None:
        wanted = {edits} if isinstance(edits, int) else set(edits)
        agg = [g for g in agg if g["edits"] in wanted]
    head = "| method | setting | unit | regularizer | edits | seeds | " + " | ".join(_head(m) for m in metrics) + " |"
    lines = [head, "|---|---|---|---|---|---|" + "---|" * len(metrics)]
    for g in sorted(agg, key=group_order):
        cells = [str(g["method"]), str(g["setting"]), str(g["unit"]), str(g["regularizer"]), str(g["edits"])]
        cells.append(str(len(g.get("seeds") or [])))
        cells += [_cell(g.get(m), m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
