"""Plots of an experiment's results: `scores.png` (every measure against the number of edits, one line per
regularizer) and `heatmap.png` (where the update lands in the first edited matrix). They need matplotlib
(``pip install "hf_edit_patch[eval]"``), imported when a plot is drawn.

Example:
    ```python
    results = json.load(open("out/exp/results.json"))
    plot_results(results, "out/exp")  # ['out/exp/scores.png', 'out/exp/heatmap.png']
    ```
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..tasks.prompts import PROBE_TASKS
from .tables import PROBE_NAMES, result_points

__all__ = ["plot_results"]


def _series(results: dict[str, Any], getter: Any) -> dict[str, tuple[list[int], list[float]]]:
    """{regularizer: (edits, values)} including the base model at 0 edits where the getter applies to it."""
    out = {}
    base = results.get("base")
    for run in results["runs"].values():
        xs, ys = [], []
        if base is not None:
            try:
                xs.append(0)
                ys.append(getter(base))
            except (KeyError, TypeError):
                xs.pop()
        for n, point in sorted(run["checkpoints"].items(), key=lambda kv: int(kv[0])):
            try:
                y = getter(point)
            except (KeyError, TypeError):
                continue
            if y is not None:
                xs.append(int(n))
                ys.append(y)
        out[run["regularizer"]] = (xs, ys)
    return out


def _first(per_module: dict[str, Any]) -> Any:
    return next(iter(per_module.values()))


def plot_results(results: dict[str, Any], output_dir: str | os.PathLike) -> list[str]:
    """Writes `scores.png` (editing metrics, drift, label probes and task scores vs number of edits, one line per
    regularizer) and `heatmap.png` (pooled |ΔW| of the first edited matrix at the last checkpoint); returns their
    paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('plots need matplotlib: pip install "hf_edit_patch[eval]"') from exc

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels: list[tuple[str, Any]] = [
        ("reliability", lambda p: p["editing"]["reliability"]),
        ("generalization", lambda p: p["editing"]["generalization"]),
        ("locality", lambda p: p["editing"]["locality"]),
        ("KL(base‖edited), nats", lambda p: p["drift"]["kl"]),
        ("perplexity", lambda p: p["drift"]["ppl_edited"]),
        ("entries with |ΔW/W| > 0.077", lambda p: p["weights"]["frac_rel_change_gt"]["0.077"]),
    ]
    points = result_points(results)
    if any(p.get("first_edits") for p in points):
        n_first = next(p["first_edits"]["n"] for p in points if p.get("first_edits"))
        panels.insert(1, (f"reliability, first {n_first} edits", lambda p: p["first_edits"]["reliability"]))
    if any(p.get("accumulated") for p in points):
        # the first edited matrix: its accumulated update against the weight under it
        panels += [
            ("‖ΣΔW‖_F / ‖W‖_F", lambda p: _first(p["accumulated"])["rel_fro"]),
            ("σmax(ΣΔW) / σmax(W)", lambda p: _first(p["accumulated"])["rel_spectral"]),
            ("condition number of W + ΣΔW", lambda p: _first(p["accumulated"])["cond_edited"]),
        ]
    probed = {t for p in points for t in (p.get("probes") or {})}
    for t in (t for t in PROBE_TASKS if t in probed):
        panels += [
            (f"{PROBE_NAMES[t]} answer format", lambda p, t=t: p["probes"][t]["adherence"]),
            (f"{PROBE_NAMES[t]} label AUC", lambda p, t=t: p["probes"][t]["auc"]),
        ]
    tasks = sorted({t for run in results["runs"].values() for p in run["checkpoints"].values() for t in p["tasks"]})
    panels += [(f"task: {t}", lambda p, t=t: p["tasks"][t]) for t in tasks]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.1 * rows), squeeze=False)
    for ax, (title, getter) in zip(axes.flat, panels, strict=False):
        for label, (xs, ys) in _series(results, getter).items():
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    config = results.get("config", {})
    fig.suptitle(
        f"{config.get('method', '')} {config.get('setting', '')} × {config.get('unit', '')} on "
        f"{config.get('model') or 'SmolLM2-135M-Instruct'}",
        fontsize=12,
    )
    fig.tight_layout()
    paths = [str(out / "scores.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    # one checkpoint for every map, the largest all runs reached, so that the maps compare like with like
    with_maps = [
        (run["regularizer"], {n: p["heatmap"] for n, p in run["checkpoints"].items() if "heatmap" in p})
        for run in results["runs"].values()
    ]
    with_maps = [(label, m) for label, m in with_maps if m]
    common = set.intersection(*(set(m) for _, m in with_maps)) if with_maps else set()
    maps = []
    for label, m in with_maps:
        n = max(common, key=int) if common else max(m, key=int)
        maps.append((label, n, m[n]))
    if maps:
        import numpy as np

        vmax = max(float(np.max(m["abs_delta"])) for _, _, m in maps) or 1.0
        fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 3.6), squeeze=False)
        for ax, (label, n, m) in zip(axes.flat, maps, strict=True):
            im = ax.imshow(np.asarray(m["abs_delta"]), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
            ax.set_title(f"{label}, {n} edits", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="mean |ΔW| per block")
        fig.suptitle(f"|ΔW| of {maps[0][2]['module']}", fontsize=11)
        paths.append(str(out / "heatmap.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
