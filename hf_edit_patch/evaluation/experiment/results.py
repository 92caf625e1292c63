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
import os
from pathlib import Path
from typing import Any

from ...errors import EvaluationFormatError
from ...hub.files import atomic_write
from ...schema import AnyJSON, Map, Nullable, Number, Object, Str, read_json, validate
from .config import ADDED_FIELDS, MEASUREMENT_FIELDS

__all__ = [
    "RESULTS_FILE",
    "RESULTS_SCHEMA",
    "ResultsFile",
    "add_missing",
    "average_points",
    "point_summary",
    "read_results",
]

RESULTS_FILE = "results.json"
MAX_RESULTS_BYTES = 256 << 20
_SCORE = Nullable(Number())
# One measured point: what the study, the summaries and the runner read back; other measures are kept as they are.
POINT_SCHEMA = Object(
    {
        "editing": Map(_SCORE, max_length=256),
        "drift": Object({"kl": _SCORE, "ppl_edited": _SCORE, "ppl_base": _SCORE}, extra="keep"),
        "tasks": Map(AnyJSON(), max_length=256),
        "probes": Map(Object({"adherence": _SCORE, "auc": _SCORE}, extra="keep"), max_length=256),
        "nnz": _SCORE,  # an average over single edits is a float
        "seconds": _SCORE,
        "edit_seconds": _SCORE,
        "measure_seconds": _SCORE,
    },
    extra="keep",
    what="a JSON object (a measured point)",
)
# The declared schema of results.json.
RESULTS_SCHEMA = Object(
    {
        "config": Map(AnyJSON(), max_length=1024),
        "base": Nullable(POINT_SCHEMA),
        "runs": Map(
            Object(
                {
                    "regularizer": Nullable(Str(max_length=256)),
                    "checkpoints": Map(
                        POINT_SCHEMA,
                        max_length=1_000_000,
                        key=Str(min_length=1, max_length=9, pattern=r"[0-9]+", what="a number of edits"),
                    ),
                },
                required=("checkpoints",),
                extra="keep",
                what="a JSON object (a run: regularizer, checkpoints)",
            ),
            max_length=10_000,
        ),
    },
    required=("config", "runs"),
    extra="keep",
)


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """An experiment's `results.json`, bounded before parsing and checked against `RESULTS_SCHEMA`.

    Raises:
        FileNotFoundError: there is no such file.
        EvaluationFormatError: (a `ValueError`) the file is not valid JSON or not an experiment's results, naming the
            field, the value received and what is accepted.

    Example:
        ```python
        >>> read_results("out/exp/results.json")["config"]["method"]  # doctest: +SKIP
        'memit'
        ```
    """
    path = os.fspath(path)
    data = read_json(path, error=EvaluationFormatError, max_bytes=MAX_RESULTS_BYTES)
    return validate(RESULTS_SCHEMA, data, source=path, error=EvaluationFormatError)


class ResultsFile:
    """`results.json` (and its lock file `results.json.lock`) in `output_dir`."""

    def __init__(self, output_dir: Path) -> None:
        self.folder = output_dir
        self.path = output_dir / RESULTS_FILE

    def load_or_start(self, config: dict[str, Any]) -> dict[str, Any]:
        """The results on disk, with `config` recorded; fresh results when there is no file yet.

        Raises:
            ValueError: the file holds results of another configuration (fields other than `MEASUREMENT_FIELDS`
                differ), or is not an experiment's results (`EvaluationFormatError`).
        """
        if self.path.exists():
            results = read_results(self.path)
            old = dict(results["config"])
            new = dict(config)
            for key in MEASUREMENT_FIELDS:  # what is measured may change between runs
                old.pop(key, None)
                new.pop(key, None)
            for key, value in ADDED_FIELDS.items():  # written before the field existed: its old meaning
                old.setdefault(key, value)
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
                    add_missing(results, read_results(self.path))
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
