"""An experiment's results file, `<output_dir>/results.json`: read back (checked against the configuration that
wrote it) and rewritten atomically, merged under a file lock with what other runners sharing the folder saved.

Example:
    ```python
    file = ResultsFile(Path("out/exp"))
    results = file.load_or_start(config.to_dict())  # {"config": ..., "base": None, "runs": {}} when new
    file.save(results)
    ```
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ...hub.files import atomic_write
from .config import MEASUREMENT_FIELDS

__all__ = ["RESULTS_FILE", "ResultsFile", "add_missing", "average_points", "point_summary"]

RESULTS_FILE = "results.json"


class ResultsFile:
    """`results.json` (and its lock file `results.json.lock`) in `output_dir`."""

    def __init__(self, output_dir: Path) -> None:
        self.folder = output_dir
        self.path = output_dir / RESULTS_FILE

    def load_or_start(self, config: dict[str, Any]) -> dict[str, Any]:
        """The results on disk, with `config` recorded; fresh results when there is no file yet.

        Raises:
            ValueError: the file holds results of another configuration (fields other than `MEASUREMENT_FIELDS`
                differ).
        """
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                results = json.load(f)
            old = dict(results.get("config", {}))
            new = dict(config)
            for key in MEASUREMENT_FIELDS:  # what is measured may change between runs
                old.pop(key, None)
                new.pop(key, None)
            if old != new:
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise ValueError(
                    f"{self.path} holds results of a different configuration (differs in {changed}); "
                    "use another --output-dir, or delete the file to start over"
                )
            results["config"] = config
            return results
        return {"config": config, "base": None, "runs": {}}

    def save(self, results: dict[str, Any]) -> None:
        """Writes `results`, merged into what is on disk: runners of other regularizers may share the folder.

        Under an exclusive lock on `results.json.lock`, the file is read again and what only it holds (another
        process's runs or measures) is added to `results` in place; where both hold a value, `results` wins.
        """
        import fcntl  # POSIX only: importing this module stays possible elsewhere

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(RESULTS_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists():
                    with open(self.path, encoding="utf-8") as f:
                        on_disk = json.load(f)
                    add_missing(results, on_disk)
                text = json.dumps(results, indent=1, sort_keys=False, default=_json_default) + "\n"
                atomic_write(str(self.path), text)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def add_missing(mine: dict[str, Any], other: dict[str, Any]) -> None:
    """Adds to `mine`, in place and recursively, what only `other` holds; where both hold a value, `mine` wins."""
    for key, value in other.items():
        if key not in mine:
            mine[key] = value
        elif isinstance(mine[key], dict) and isinstance(value, dict):
            add_missing(mine[key], value)


def average_points(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of numeric leaves over the points that have them (single editing averages its edits)."""

    def merge(values: list[Any]) -> Any:
        if all(isinstance(v, dict) for v in values):
            keys = {k for v in values for k in v}
            return {k: merge([v[k] for v in values if k in v]) for k in keys}
        nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums and len(nums) == len(values):
            return sum(nums) / len(nums)
        return values[0]

    out = merge(points)
    out["n_edits_averaged"] = len(points)
    return out


def point_summary(point: dict[str, Any]) -> str:
    """A one-line summary of a checkpoint: its editing metrics and drift."""
    e, d = point["editing"], point["drift"]
    parts = [f"{k} {v:.3f}" for k, v in e.items() if v is not None]
    parts.append(f"KL {d['kl']:.4f}, ppl {d['ppl_edited']:.2f}")
    return ", ".join(parts)
