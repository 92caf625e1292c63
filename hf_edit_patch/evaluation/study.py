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

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from .experiment import PROBE_NAMES, PROBE_TASKS, RESULTS_FILE

__all__ = [
    "aggregate",
    "load_points",
    "parse_regularizer",
    "plot_drift_vs_edits",
    "plot_success_vs_budget",
    "study_table",
    "BUDGET_METRICS",
    "STUDY_METRICS",
]

# the order of regularizer families in tables and legends; "base" is the unedited model
FAMILIES = ("base", "none", "rect", "random", "pca", "norm", "auto", "stack")
GROUP_KEYS = ("method", "setting", "unit", "regularizer", "edits")
ROW_KEYS = ("method", "setting", "unit", "seed", "regularizer", "edits")
# per-seed ratios against the whole update: (name, metric)
RATIOS = (
    ("rel_reliability", "reliability"),
    ("rel_generalization", "generalization"),
    ("rel_kl", "kl"),
    ("rel_nnz", "nnz"),
)
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


# ---------------------------------------------------------------------- reading


def _read_results(folder: str | os.PathLike) -> dict[str, Any]:
    folder = os.fspath(folder)
    path = folder if os.path.isfile(folder) else os.path.join(folder, RESULTS_FILE)
    if not os.path.isdir(folder) and not os.path.isfile(folder):
        raise FileNotFoundError(f"{folder}: no such experiment folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder}: no {RESULTS_FILE} in this folder (not an experiment output folder, or its run has not "
            "saved anything yet)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        raise ValueError(f"{path} is not an experiment's results (no 'config')")
    return results


def _get(d: Any, *keys: str) -> Any:
    """`d[k1][k2]...`, or None where a level is missing."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _probe_values(point: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for task, found in (point.get("probes") or {}).items():
        if isinstance(found, dict):
            out[f"{task}_adherence"] = found.get("adherence")
            out[f"{task}_auc"] = found.get("auc")
    return out


def load_points(folders: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per (folder, run, checkpoint), and one for the base model of every folder.

    A row holds method, setting, unit, seed, regularizer ("base" for the unedited model), edits (int), folder,
    reliability, generalization, locality, kl, ppl (perplexity of the edited model), nnz (stored entries) and, for
    every probe task found in any folder, `"{task}_adherence"` and `"{task}_auc"`. The base row has kl 0.0, ppl the
    base perplexity and nnz 0. A value a point does not hold is None. A folder may also be given as the path of its
    `results.json`.
    """
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    rows: list[dict[str, Any]] = []
    for folder in folders:
        results = _read_results(folder)
        config = results["config"]
        ident = {
            "method": config.get("method"),
            "setting": config.get("setting"),
            "unit": config.get("unit"),
            "seed": config.get("seed"),
            "folder": os.fspath(folder),
        }
        base = results.get("base")
        if isinstance(base, dict):
            rows.append(
                {
                    **ident,
                    "regularizer": "base",
                    "edits": 0,
                    "reliability": _get(base, "editing", "reliability"),
                    "generalization": _get(base, "editing", "generalization"),
                    "locality": _get(base, "editing", "locality"),
                    "kl": 0.0,
                    "ppl": _get(base, "drift", "ppl_base"),
                    "nnz": 0,
                    **_probe_values(base),
                }
            )
        for run in (results.get("runs") or {}).values():
            checkpoints = run.get("checkpoints") or {}
            for n, point in sorted(checkpoints.items(), key=lambda kv: int(kv[0])):
                rows.append(
                    {
                        **ident,
                        "regularizer": run.get("regularizer"),
                        "edits": int(n),
                        "reliability": _get(point, "editing", "reliability"),
                        "generalization": _get(point, "editing", "generalization"),
                        "locality": _get(point, "editing", "locality"),
                        "kl": _get(point, "drift", "kl"),
                        "ppl": _get(point, "drift", "ppl_edited"),
                        "nnz": point.get("nnz"),
                        **_probe_values(point),
                    }
                )
    probe_keys = [f"{t}_{m}" for t in _probe_order(rows) for m in ("adherence", "auc")]
    for row in rows:
        for key in probe_keys:
            row.setdefault(key, None)
    return rows


def _probe_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    found = {k.rsplit("_", 1)[0] for row in rows for k in row if k.endswith(("_adherence", "_auc"))}
    return [t for t in PROBE_TASKS if t in found] + sorted(found - set(PROBE_TASKS))


# ---------------------------------------------------------------------- aggregating


def parse_regularizer(spec: str) -> tuple[str, float | None]:
    """("rect", 0.4) for "rect:0.4", ("none", None) for "none"; a value that is not a number gives None."""
    name, _, value = str(spec).partition(":")
    try:
        return name, float(value) if value else None
    except ValueError:
        return name, None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return value


def _stats(values: Sequence[Any]) -> dict[str, Any]:
    nums = [v for v in (_number(v) for v in values) if v is not None]
    return {
        "mean": statistics.fmean(nums) if nums else None,
        "std": statistics.stdev(nums) if len(nums) >= 2 else None,
        "count": len(nums),
    }


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups rows by (method, setting, unit, regularizer, edits) and summarizes each metric over seeds.

    Every group gets method, setting, unit, regularizer, family and keep (`parse_regularizer`), edits, seeds (the
    sorted seeds present), and for each metric a dict {"mean", "std" (sample standard deviation, None with fewer
    than 2 values), "count" (values that are not None)}. Rows of one seed in one group (the same run read from two
    folders) are averaged first, so that a seed counts once.

    Ratios against the whole update: `rel_reliability`, `rel_generalization`, `rel_kl` and `rel_nnz` are, for each
    seed that has the metric both in this group and in the "none" group of the same method, setting, unit and
    edits (with a non-zero value there), the seed's value divided by its "none" value; they are summarized over
    seeds like the metrics. They are None-valued (count 0) where no seed has both, e.g. for the base model.
    """
    metrics: list[str] = []
    for row in rows:
        for key in row:
            if key not in ROW_KEYS and key != "folder" and key not in metrics:
                metrics.append(key)
    # group -> seed -> metric -> values
    groups: dict[tuple, dict[Any, dict[str, list[Any]]]] = {}
    for row in rows:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"a row lacks {missing}: {row}")
        key = tuple(row[k] for k in GROUP_KEYS)
        per_seed = groups.setdefault(key, {}).setdefault(row["seed"], {})
        for m in metrics:
            per_seed.setdefault(m, []).append(row.get(m))
    # one value per (group, seed, metric): the mean of that seed's rows
    by_seed = {
        key: {seed: {m: _stats(vals)["mean"] for m, vals in values.items()} for seed, values in seeds.items()}
        for key, seeds in groups.items()
    }
    out = []
    for key, seeds in by_seed.items():
        group = dict(zip(GROUP_KEYS, key, strict=True))
        family, keep = parse_regularizer(group["regularizer"])
        group.update(family=family, keep=keep, seeds=sorted(seeds, key=_seed_key))
        for m in metrics:
            group[m] = _stats([values.get(m) for values in seeds.values()])
        none = by_seed.get((*key[:3], "none", key[4]), {})
        for name, m in RATIOS:
            ratios = []
            for seed, values in seeds.items():
                own, ref = values.get(m), (none.get(seed) or {}).get(m)
                if own is not None and ref is not None and ref != 0:
                    ratios.append(own / ref)
            group[name] = _stats(ratios)
        out.append(group)
    out.sort(key=_group_order)
    return out


def _seed_key(seed: Any) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def _group_order(group: dict[str, Any]) -> tuple:
    family = group.get("family") or parse_regularizer(group["regularizer"])[0]
    keep = group.get("keep")
    rank = FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)
    return (
        str(group["setting"]),
        str(group["method"]),
        str(group["unit"]),
        rank,
        family,
        -keep if keep is not None else 0.0,
        group["regularizer"],
        group["edits"],
    )


# ---------------------------------------------------------------------- tables


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
    for g in sorted(agg, key=_group_order):
        cells = [str(g["method"]), str(g["setting"]), str(g["unit"]), str(g["regularizer"]), str(g["edits"])]
        cells.append(str(len(g.get("seeds") or [])))
        cells += [_cell(g.get(m), m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('plots need matplotlib: pip install "hf_edit_patch[eval]"') from exc
    return plt


def _select(
    agg: Sequence[dict[str, Any]], method: str | None, setting: str | None, unit: str | None
) -> tuple[list[dict[str, Any]], tuple[str, str, str]]:
    """The groups of one (method, setting, unit); a None argument is inferred when the groups hold one value."""
    chosen = {}
    for key, value in (("method", method), ("setting", setting), ("unit", unit)):
        if value is None:
            found = sorted({str(g[key]) for g in agg if all(g[k] == v for k, v in chosen.items())})
            if len(found) != 1:
                raise ValueError(
                    f"the groups hold {key}s {found}: pass {key}= to pick one" if found else "no groups to plot"
                )
            value = found[0]
        chosen[key] = value
    groups = [g for g in agg if all(g[k] == v for k, v in chosen.items())]
    if not groups:
        raise ValueError(f"no groups for {chosen}")
    return groups, (chosen["method"], chosen["setting"], chosen["unit"])


_FAMILY_STYLE = {  # colormap (or one color), marker, linestyle
    "none": ("Greys", "o", "-"),
    "rect": ("Blues", "s", "-"),
    "random": ("Oranges", "^", "--"),
    "pca": ("Greens", "D", "-."),
    "norm": ("Purples", "v", ":"),
    "auto": ("tab:brown", "P", (0, (5, 1))),
    "stack": ("RdPu", "X", (0, (3, 1, 1, 1))),
}


def _styles(regularizers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A color, marker and linestyle per regularizer: one per family, darker for larger keep values."""
    import matplotlib

    by_family: dict[str, list[str]] = {}
    for spec in regularizers:
        by_family.setdefault(parse_regularizer(spec)[0], []).append(spec)
    out = {}
    for family, specs in by_family.items():
        cmap_name, marker, linestyle = _FAMILY_STYLE.get(family, ("Greys", "*", "-"))
        cmap = matplotlib.colormaps.get(cmap_name)
        specs.sort(key=lambda s: -(parse_regularizer(s)[1] or 0.0))
        for i, spec in enumerate(specs):
            if family == "none":
                color: Any = "black"
            elif cmap is None:
                color = cmap_name
            else:  # the darkest shade for the largest keep, never so light it vanishes on white
                shade = 0.95 - 0.45 * (i / max(len(specs) - 1, 1)) if len(specs) > 1 else 0.8
                color = cmap(shade)
            out[spec] = {"color": color, "marker": marker, "linestyle": linestyle}
    return out


def _mean_std(group: dict[str, Any] | None, metric: str) -> tuple[float | None, float]:
    stats = (group or {}).get(metric)
    if not isinstance(stats, dict) or stats.get("mean") is None:
        return None, math.nan
    std = stats["std"] if stats.get("count", 0) >= 2 and stats.get("std") is not None else math.nan
    return stats["mean"], std


_DRIFT_PANELS = (
    ("reliability", "reliability"),
    ("generalization", "generalization"),
    ("locality", "locality"),
    ("kl", "KL(base‖edited), nats"),
    ("ppl", "perplexity"),
    ("sentiment_adherence", "SST-2 answer format"),
    ("sentiment_auc", "SST-2 label AUC"),
    ("closed_qa_adherence", "BoolQ answer format"),
    ("closed_qa_auc", "BoolQ label AUC"),
)


def plot_drift_vs_edits(
    agg: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    method: str | None = None,
    setting: str | None = None,
    unit: str | None = None,
) -> str:
    """Writes a PNG grid of metrics against the number of edits, one line per regularizer; returns `path`.

    Panels: reliability, generalization, locality, KL, perplexity, SST-2 and BoolQ answer-format adherence and
    label AUC; a panel no regularizer has a value for is left out. Every line starts at the base model (0 edits)
    when the groups hold it; error bars are the standard deviation over seeds where two or more seeds have the
    value. `method`, `setting` and `unit` pick the groups; each may be left out when the groups hold only one.
    """
    plt = _pyplot()
    groups, (method, setting, unit) = _select(agg, method, setting, unit)
    base = {g["edits"]: g for g in groups if g["regularizer"] == "base"}.get(0)
    edited = [g for g in groups if g["regularizer"] != "base"]
    regularizers = []
    for g in sorted(edited, key=_group_order):
        if g["regularizer"] not in regularizers:
            regularizers.append(g["regularizer"])
    panels = [(m, t) for m, t in _DRIFT_PANELS if any(_mean_std(g, m)[0] is not None for g in edited)]
    if not panels:
        raise ValueError(f"no metric to plot for {method} {setting} {unit}")
    styles = _styles(regularizers)
    cols = 3 if len(panels) > 4 else len(panels)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.2 * rows), squeeze=False)
    seeds = sorted({s for g in groups for s in g.get("seeds") or []}, key=_seed_key)
    for ax, (metric, title) in zip(axes.flat, panels, strict=False):
        for spec in regularizers:
            points = sorted((g for g in edited if g["regularizer"] == spec), key=lambda g: g["edits"])
            if base is not None:
                points.insert(0, base)
            xs, ys, errs = [], [], []
            for g in points:
                mean, std = _mean_std(g, metric)
                if mean is not None:
                    xs.append(g["edits"])
                    ys.append(mean)
                    errs.append(std)
            if not xs or (len(xs) == 1 and base is not None and xs[0] == 0):
                continue
            style = styles[spec]
            ax.errorbar(
                xs,
                ys,
                yerr=errs if any(not math.isnan(e) for e in errs) else None,
                label=spec,
                color=style["color"],
                marker=style["marker"],
                linestyle=style["linestyle"],
                markersize=4.5,
                linewidth=1.4,
                capsize=2.5,
                elinewidth=0.9,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    ordered = [r for r in regularizers if r in handles]
    fig.suptitle(
        f"{method} {setting} × {unit}: metrics vs edits (mean ± std over seeds {', '.join(map(str, seeds))}; "
        "0 edits = base model)",
        fontsize=11,
    )
    fig.legend(
        [handles[r] for r in ordered],
        ordered,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=9,
        title="regularizer",
    )
    fig.tight_layout()
    path = os.fspath(path)
    _mkdir_for(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _mkdir_for(path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)


_BUDGET_PANELS = (
    ("rel_reliability", "reliability / none's", 0.94, "94%"),
    ("rel_generalization", "generalization / none's", 0.94, "94%"),
    ("rel_kl", "KL / none's", 0.5, "half"),
    ("kl", "KL(base‖edited), nats", None, None),
)
_LINE_FAMILIES = ("rect", "random", "pca")
_POINT_FAMILIES = ("norm", "auto", "stack")


def plot_success_vs_budget(
    agg: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    edits: int,
    *,
    method: str | None = None,
    setting: str | None = None,
    unit: str | None = None,
) -> str:
    """Writes a PNG of what each budget keeps at `edits` edits against the keep ratio; returns `path`.

    Panels: reliability, generalization and KL as ratios to the whole update's (`rel_*`, per seed then averaged;
    dashed lines at 94%, 94% and half), and the absolute KL. The x axis is the keep ratio (log scale, 0.05 to 0.4,
    wider when a point lies outside): one line per family with a keep ratio (rect, random, pca), error bars the
    standard deviation over seeds; the lines are drawn a few percent apart along x so that their error bars do not
    hide each other. The whole update ("none") is a horizontal reference line (100% on the ratio panels). The
    budgets without a keep ratio (norm, auto, stack) are single points at their mean stored-entries fraction
    `rel_nnz` (stored entries over those of "none", seed by seed): for stack that fraction is of the stored whole
    updates, so it falls as edits grow. Such a point is left out when `rel_nnz` is unknown (no stored
    entries recorded for it or for "none"). `method`, `setting` and `unit` pick the groups as in
    `plot_drift_vs_edits`.
    """
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, PercentFormatter

    groups, (method, setting, unit) = _select(agg, method, setting, unit)
    at = [g for g in groups if g["edits"] == edits and g["regularizer"] != "base"]
    if not at:
        found = sorted({g["edits"] for g in groups if g["regularizer"] != "base"})
        raise ValueError(f"no {method} {setting} {unit} groups at {edits} edits; edits present: {found}")
    none = next((g for g in at if g["regularizer"] == "none"), None)
    lines = {f: gs for f in _LINE_FAMILIES if (gs := [g for g in at if g["family"] == f and g["keep"] is not None])}
    points = [g for g in sorted(at, key=_group_order) if g["family"] in _POINT_FAMILIES]
    styles = _styles([g["regularizer"] for g in at])
    xs_all = [g["keep"] for gs in lines.values() for g in gs]
    xs_all += [_mean_std(g, "rel_nnz")[0] for g in points if _mean_std(g, "rel_nnz")[0] is not None]
    lo = min([0.05, *[x for x in xs_all if x > 0]]) / 1.25
    hi = max([0.4, *xs_all]) * 1.25
    ticks = sorted({0.05, 0.1, 0.2, 0.4} | {float(f"{x:.1g}") for x in xs_all if x > 0 and not 0.05 <= x <= 0.4})
    dodge = {f: 1.035 ** (i - (len(lines) - 1) / 2) for i, f in enumerate(lines)}

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    for ax, (metric, title, threshold, threshold_label) in zip(axes.flat, _BUDGET_PANELS, strict=True):
        ratio = metric.startswith("rel_")
        ref, ref_std = (1.0, math.nan) if ratio and none is not None else _mean_std(none, metric)
        if ref is not None:
            ax.axhline(ref, color="black", linewidth=1.3, label="none (whole update)")
            if not math.isnan(ref_std):
                ax.axhspan(ref - ref_std, ref + ref_std, color="black", alpha=0.08, linewidth=0)
        if threshold is not None:
            ax.axhline(threshold, color="crimson", linestyle="--", linewidth=1.0, label=f"{threshold_label} of none")
        for family, gs in lines.items():
            gs = sorted(gs, key=lambda g: g["keep"])
            xs, ys, errs = [], [], []
            for g in gs:
                mean, std = _mean_std(g, metric)
                if mean is not None:
                    xs.append(g["keep"] * dodge[family])
                    ys.append(mean)
                    errs.append(std)
            if not xs:
                continue
            style = styles[gs[-1]["regularizer"]]
            ax.errorbar(
                xs,
                ys,
                yerr=errs if any(not math.isnan(e) for e in errs) else None,
                label=family,
                color=style["color"],
                marker=style["marker"],
                linestyle=style["linestyle"],
                markersize=5,
                linewidth=1.5,
                capsize=3,
            )
        for g in points:
            x, x_std = _mean_std(g, "rel_nnz")
            y, y_std = _mean_std(g, metric)
            if x is None or y is None or x <= 0:
                continue
            style = styles[g["regularizer"]]
            ax.errorbar(
                [x],
                [y],
                xerr=None if math.isnan(x_std) else [x_std],
                yerr=None if math.isnan(y_std) else [y_std],
                label=g["regularizer"],
                color=style["color"],
                marker=style["marker"],
                linestyle="none",
                markersize=7,
                capsize=3,
            )
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ratio:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("keep ratio (norm, auto, stack: stored entries / none's)")
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    seeds = sorted({s for g in at for s in g.get("seeds") or []}, key=_seed_key)
    fig.suptitle(
        f"{method} {setting} × {unit} at {edits} edits: budget vs what the edit keeps "
        f"(mean ± std over seeds {', '.join(map(str, seeds))})",
        fontsize=11,
    )
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    fig.tight_layout()
    path = os.fspath(path)
    _mkdir_for(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
