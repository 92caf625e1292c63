"""Plots of aggregated groups: metrics against the number of edits (`plot_drift_vs_edits`) and what each budget
keeps against its keep ratio (`plot_success_vs_budget`). They need matplotlib (``pip install "hf_edit_patch[eval]"``),
imported when a plot is drawn.

Example:
    ```python
    plot_drift_vs_edits(agg, "out/drift_vs_edits.png")
    plot_success_vs_budget(agg, "out/success_vs_budget.png", edits=50)
    ```
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .aggregate import group_order, parse_regularizer, seed_key

__all__ = ["plot_drift_vs_edits", "plot_success_vs_budget"]


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
    for g in sorted(edited, key=group_order):
        if g["regularizer"] not in regularizers:
            regularizers.append(g["regularizer"])
    panels = [(m, t) for m, t in _DRIFT_PANELS if any(_mean_std(g, m)[0] is not None for g in edited)]
    if not panels:
        raise ValueError(f"no metric to plot for {method} {setting} {unit}")
    styles = _styles(regularizers)
    cols = 3 if len(panels) > 4 else len(panels)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.2 * rows), squeeze=False)
    seeds = sorted({s for g in groups for s in g.get("seeds") or []}, key=seed_key)
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
    points = [g for g in sorted(at, key=group_order) if g["family"] in _POINT_FAMILIES]
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
    seeds = sorted({s for g in at for s in g.get("seeds") or []}, key=seed_key)
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
