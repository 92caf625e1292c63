"""Markdown tables of an experiment's results: every checkpoint's editing metrics, drift, label probes and weight
change (`summary_table`), forgetting and the accumulated update of long runs (`stack_table`), and the general-task
scores (`tasks_table`).

Example:
    ```python
    results = json.load(open("out/exp/results.json"))
    print(summary_table(results))
    print(tasks_table(results))
    ```
"""

from __future__ import annotations

from typing import Any

from ..tasks.prompts import PROBE_TASKS

__all__ = ["PROBE_NAMES", "fmt", "result_points", "stack_table", "summary_table", "tasks_table"]

PROBE_NAMES = {"sentiment": "SST-2", "nli": "RTE", "closed_qa": "BoolQ"}


def fmt(value: Any, spec: str = ".3f") -> str:
    """`value` formatted with `spec`, or "–" for None."""
    return "–" if value is None else format(value, spec)


def result_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The base model's point (if measured) and every run's checkpoints."""
    base = [results["base"]] if results.get("base") else []
    return base + [p for run in results["runs"].values() for p in run["checkpoints"].values()]


def summary_table(results: dict[str, Any]) -> str:
    """A Markdown table of every run's checkpoints (and the base model): editing metrics, drift, weight change."""
    probe_tasks = [t for t in PROBE_TASKS if any(t in (p.get("probes") or {}) for p in result_points(results))]
    probes_head = "".join(f" {PROBE_NAMES[t]} format / AUC |" for t in probe_tasks)
    head = (
        "| run | edits | reliability | generalization | locality | KL | perplexity |"
        + probes_head
        + " stored entries | δ > 0.077 | δ > 0.171 | Manhattan |\n|---|---|---|---|---|---|---|"
        + "---|" * (len(probe_tasks) + 4)
    )

    def probes(point: dict[str, Any]) -> str:
        found = point.get("probes") or {}
        cells = [
            f" {fmt(found[t]['adherence'], '.2f')} / {fmt(found[t]['auc'], '.2f')} |" if t in found else " – |"
            for t in probe_tasks
        ]
        return "".join(cells)

    rows = [head]
    base = results.get("base")
    if base is not None:
        e, d = base["editing"], base["drift"]
        rows.append(
            f"| base | 0 | {fmt(e['reliability'])} | {fmt(e['generalization'])} | {fmt(e['locality'])} | 0 "
            f"| {fmt(d['ppl_base'], '.2f')} |{probes(base)} 0 | 0 | 0 | 0 |"
        )
    for run in results["runs"].values():
        for n, p in sorted(run["checkpoints"].items(), key=lambda kv: int(kv[0])):
            e, d, w = p["editing"], p["drift"], p.get("weights") or {}
            frac = w.get("frac_rel_change_gt", {})
            rows.append(
                f"| {run['regularizer']} | {n} | {fmt(e['reliability'])} | {fmt(e['generalization'])} "
                f"| {fmt(e['locality'])} | {fmt(d['kl'], '.4f')} | {fmt(d['ppl_edited'], '.2f')} |{probes(p)}"
                f" {fmt(p.get('nnz'), ',')} | {fmt(frac.get('0.077'), '.1%')} | {fmt(frac.get('0.171'), '.1%')} "
                f"| {fmt(w.get('manhattan'), '.1f')} |"
            )
    return "\n".join(rows)


def stack_table(results: dict[str, Any]) -> str:
    """A Markdown table of long runs, per checkpoint: reliability over all edits and over the first ones (forgetting),
    drift, and the accumulated update of every edited matrix against the weight under it (Frobenius and spectral norm
    ratios, condition number of the edited matrix). Empty when no checkpoint measured the accumulated update."""
    points = [p for run in results["runs"].values() for p in run["checkpoints"].values()]
    if not any(p.get("accumulated") for p in points):
        return ""
    n_first = next((p["first_edits"]["n"] for p in points if p.get("first_edits")), None)
    rows = [
        f"| run | edits | reliability | first {n_first or '–'} | generalization | locality | KL | perplexity | matrix "
        "| ‖ΣΔW‖/‖W‖ | σmax(ΣΔW)/σmax(W) | cond(W + ΣΔW) / cond(W) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"].values():
        for n, p in sorted(run["checkpoints"].items(), key=lambda kv: int(kv[0])):
            e, d, first = p["editing"], p["drift"], p.get("first_edits") or {}
            head = (
                f"| {run['regularizer']} | {n} | {fmt(e['reliability'])} | {fmt(first.get('reliability'))} "
                f"| {fmt(e['generalization'])} | {fmt(e['locality'])} | {fmt(d['kl'], '.4f')} "
                f"| {fmt(d['ppl_edited'], '.2f')} |"
            )
            for name, a in (p.get("accumulated") or {"–": {}}).items():
                cond = a.get("cond_edited") / a["cond_before"] if a.get("cond_before") else None
                rows.append(
                    f"{head} {name.removesuffix('.weight')} | {fmt(a.get('rel_fro'), '.2f')} "
                    f"| {fmt(a.get('rel_spectral'), '.2f')} | {fmt(cond, '.2f')} |"
                )
                head = "| | | | | | | | |"
    return "\n".join(rows)


def tasks_table(results: dict[str, Any]) -> str:
    """A Markdown table of the general-task scores of the base model and of every checkpoint that ran them."""
    lines = []
    base = results.get("base") or {}
    points = [("base", 0, base.get("tasks") or {})]
    for run in results["runs"].values():
        for n, p in sorted(run["checkpoints"].items(), key=lambda kv: int(kv[0])):
            if p.get("tasks"):
                points.append((run["regularizer"], int(n), p["tasks"]))
    tasks = sorted({t for _, _, s in points for t in s})
    if not tasks:
        return ""
    lines.append("| run | edits | " + " | ".join(tasks) + " | mean |")
    lines.append("|---|---|" + "---|" * (len(tasks) + 1))
    for label, n, scores in points:
        if not scores:
            continue
        mean = sum(scores[t] for t in tasks) / len(tasks)
        lines.append(f"| {label} | {n} | " + " | ".join(fmt(scores.get(t)) for t in tasks) + f" | {fmt(mean)} |")
    return "\n".join(lines)
