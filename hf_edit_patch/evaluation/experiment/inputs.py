"""What an experiment edits and scores against, kept in its output folder: the requests (`requests.json`) and the
base model's locality reference (`locality_reference.json`).

Generating counterfactuals the model does not already state and decoding every neighborhood prompt take minutes;
a resumed runner, or a runner of another regularizer sharing the folder, reads them back instead. Keeping the
requests also makes a resume independent of numerics: a borderline counterfactual scored on another thread count
cannot change which requests the saved patches were made for.

Each file records the key it was made for: for the requests, their number, the data file's SHA-256, the seed, the
counterfactual setting and the model; for the reference, the requests' SHA-256 and the model. A file is used only
when its key equals the current one; one that is missing, unreadable or made for another key is computed again and
rewritten atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ...errors import EvaluationFormatError
from ...hub.files import atomic_write, file_sha256
from ...requests import EditRequest
from ...schema import AnyJSON, Int, List, Map, Object, Str, read_json, validate
from ..scoring import LocalityReference

logger = logging.getLogger(__name__)

__all__ = ["REFERENCE_FILE", "REQUESTS_FILE", "data_sha256", "kept_reference", "kept_requests", "requests_sha256"]

REQUESTS_FILE = "requests.json"
REFERENCE_FILE = "locality_reference.json"
_MAX_BYTES = 256 << 20
_KEY = Map(AnyJSON(), max_length=64)
_REQUESTS_SCHEMA = Object(
    {"key": _KEY, "value": List(Map(AnyJSON(), max_length=64), max_length=10_000_000)},
    required=("key", "value"),
    what="an experiment's requests file",
)
_REFERENCE_SCHEMA = Object(
    {
        "key": _KEY,
        "value": Map(List(Int(minimum=0), max_length=4096), max_length=10_000_000, key=Str(max_length=1 << 20)),
    },
    required=("key", "value"),
    what="an experiment's locality reference file",
)
T = TypeVar("T")


def data_sha256(path: str | None) -> str:
    """The data file's content hash (`hub.files.file_sha256`), "" when the requests come from no file."""
    return file_sha256(path) if path else ""


def requests_sha256(requests: list[EditRequest]) -> str:
    """The SHA-256 of the requests, in order, as canonical JSON."""
    text = json.dumps([r.to_dict() for r in requests], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _kept(
    path: Path,
    schema: Object,
    key: dict[str, Any],
    make: Callable[[], T],
    load: Callable[[Any], T],
    dump: Callable[[T], Any],
) -> T:
    """`load` of the value kept at `path` under `key`, else `make()`'s value, kept there under `key`."""
    if path.exists():
        try:
            kept = read_json(path, error=EvaluationFormatError, max_bytes=_MAX_BYTES)
            kept = validate(schema, kept, source=str(path), error=EvaluationFormatError)
            if kept["key"] == key:
                value = load(kept["value"])
                logger.info("read %s", path)
                return value
            logger.info("%s was made for %s; computing it for %s", path, kept["key"], key)
        except (OSError, ValueError) as err:
            logger.warning("ignoring %s and computing it again: %s", path, err)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(path), json.dumps({"key": key, "value": dump(value)}, ensure_ascii=False) + "\n")
    return value


def kept_requests(folder: Path, key: dict[str, Any], make: Callable[[], list[EditRequest]]) -> list[EditRequest]:
    """The requests kept in `folder` under `key`, else `make()`'s, which are then kept.

    `key` holds everything the requests depend on; `data_sha256` of the data file stands for its contents."""
    return _kept(
        folder / REQUESTS_FILE,
        _REQUESTS_SCHEMA,
        key,
        make,
        lambda rows: [EditRequest.from_dict(r) for r in rows],
        lambda requests: [r.to_dict() for r in requests],
    )


def kept_reference(
    folder: Path, requests: list[EditRequest], model: str | None, make: Callable[[], LocalityReference]
) -> LocalityReference:
    """The locality reference kept in `folder` for exactly these requests and model, else `make()`'s, then kept."""
    return _kept(
        folder / REFERENCE_FILE,
        _REFERENCE_SCHEMA,
        {"requests_sha256": requests_sha256(requests), "model": model},
        make,
        lambda tokens: LocalityReference({p: tuple(t) for p, t in tokens.items()}),
        lambda reference: {p: list(t) for p, t in reference.tokens.items()},
    )
