"""Rows of many experiment folders grouped over seeds: each metric's mean, standard deviation and count, and the
ratios of every regularizer's values to the whole update's ("none"), seed by seed.

Example:
    ```python
    agg = aggregate(load_points(["out/seq50-s0", "out/seq50-s1", "out/seq50-s2"]))
    [g["rel_kl"]["mean"] for g in agg if g["regularizer"] == "rect:0.4"]
    ```
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["FAMILIES", "GROUP_KEYS", "RATIOS", "ROW_KEYS", "aggregate", "group_order", "parse_regularizer", "seed_key"]

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
        group.update(family=family, keep=keep, seeds=sorted(seeds, key=seed_key))
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
    out.sort(key=group_order)
    return out


def seed_key(seed: Any) -> tuple:
    """A sort key for seeds: numbers first, in order, then the others by name."""
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def group_order(group: dict[str, Any]) -> tuple:
    """A sort key for groups: setting, method, unit, regularizer family (`FAMILIES`), keep (largest first), edits."""
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
