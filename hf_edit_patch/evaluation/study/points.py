"""Experiment folders read into rows: one per (folder, run, checkpoint) and one for each folder's base model.

Example:
    ```python
    rows = load_points(["out/seq50-s0", "out/seq50-s1"])
    rows[0]["regularizer"], rows[0]["edits"], rows[0]["kl"]  # ('base', 0, 0.0)
    ```
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from ..experiment.results import RESULTS_FILE, read_results
from ..tasks.prompts import PROBE_TASKS

__all__ = ["load_points"]


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
    return read_results(path)


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
