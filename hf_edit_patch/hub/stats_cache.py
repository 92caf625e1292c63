"""The key statistics cache: second-moment matrices on disk, one safetensors file per [`StatsKey`].

A [`StatsKey`] names everything that changes a matrix's content (model and revision, module, corpus, text field,
sample count, length, dtype); [`StatsCache`] keeps one file per key in a folder, with the key and the number of tokens
in the file's metadata. Files are written atomically and validated when read ([`read_stats_file`]): safetensors only,
nothing is unpickled, and a file whose metadata does not match its key, shape, dtype or finiteness is refused.

The folder defaults to `stats/` in the hf_edit_patch cache. `hf_edit_patch.hub.stats_sharing` moves entries to and
from the Hub; `hf_edit_patch.editing.statistics.get_second_moments` fills the cache.

Example:
    ```python
    >>> from hf_edit_patch.hub.stats_cache import StatsCache
    >>> [(e.key.module, e.count) for e in StatsCache().entries()]  # doctest: +SKIP
    [('model.layers.3.mlp.down_proj', 124231), ('model.layers.4.mlp.down_proj', 124231)]
    ```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import StatsError, StatsFormatError
from ..schema import Enum, Int, Nullable, Object, Str, parse_json, shorten, validate
from .default_model import default_cache_dir
from .files import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "ACCUMULATION_DTYPES",
    "STATS_FORMAT",
    "STATS_FORMAT_VERSION",
    "StatsCache",
    "StatsEntry",
    "StatsKey",
    "read_stats_file",
]

STATS_FORMAT = "hf_edit_patch.stats"
STATS_FORMAT_VERSION = 1
TENSOR_NAME = "second_moment"
ACCUMULATION_DTYPES = ("float32",)

_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")
_COUNT_RE = re.compile(r"[1-9][0-9]{0,17}")  # a token count, written by `StatsCache.put` as a decimal string
# The declared schema of a key, as the metadata of a statistics file and the Hub index hold it: every field present.
STATS_KEY_SCHEMA = Object(
    {
        "model_id": Str(min_length=1, max_length=4096),
        "revision": Nullable(Str(max_length=1024)),
        "module": Str(min_length=1, max_length=1024),
        "dataset": Str(min_length=1, max_length=4096),
        "text_field": Str(max_length=256),
        "sample_count": Int(1, 2**40),
        "max_length": Int(1, 2**24),
        "dtype": Enum(ACCUMULATION_DTYPES),
    },
    required=("model_id", "revision", "module", "dataset", "text_field", "sample_count", "max_length", "dtype"),
    extra="forbid",
    what="a JSON object (a statistics key)",
)


@dataclass(frozen=True)
class StatsKey:
    """
    Everything that determines the content of one second-moment matrix; two equal keys name the same matrix.

    Args:
        model_id (`str`):
            The model's Hub id or folder (see [`hf_edit_patch.modules.model_source`]).
        revision (`str`, *optional*):
            The model's commit (or a description of converted weights); `None` when unknown.
        module (`str`):
            The module whose inputs `k` were collected, e.g. `"model.layers.5.mlp.down_proj"`.
        dataset (`str`):
            The corpus: `"file:<name>@sha256:<hex>"` for a local file (its content hash, so a copy elsewhere has the
            same key and an edited file does not), `"hf-dataset:<id>[:<config>]@<split>"` for a Hugging Face
            dataset, `"model-sampled:<seed>:<n>"` for text the model sampled itself.
        text_field (`str`):
            The field holding the text in `.json`/`.jsonl` files and datasets (`""` where it does not apply).
        sample_count (`int`):
            The number of texts asked for (the first ones of the corpus).
        max_length (`int`):
            Tokens per text; longer texts are truncated.
        dtype (`str`, *optional*, defaults to `"float32"`):
            The dtype the matrix was accumulated and is stored in.

    Example:

    ```python
    >>> from hf_edit_patch.hub.stats_cache import StatsKey
    >>> key = StatsKey("HuggingFaceTB/SmolLM2-135M-Instruct", None, "model.layers.5.mlp.down_proj",
    ...                "hf-dataset:Salesforce/wikitext:wikitext-103-raw-v1@train", "text", 1000, 256)
    >>> key.filename()  # doctest: +SKIP
    'SmolLM2-135M-Instruct--model.layers.5.mlp.down_proj--3f0c9a4e1b2d7c8e5a6f.safetensors'
    ```
    """

    model_id: str
    revision: str | None
    module: str
    dataset: str
    text_field: str
    sample_count: int
    max_length: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("model_id", "module", "dataset"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise StatsError(f"StatsKey.{name} must be a non-empty string, got {value!r}")
        if self.revision is not None and not isinstance(self.revision, str):
            raise StatsError(f"StatsKey.revision must be a string or None, got {self.revision!r}")
        if not isinstance(self.text_field, str):
            raise StatsError(f"StatsKey.text_field must be a string, got {self.text_field!r}")
        for name in ("sample_count", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StatsError(f"StatsKey.{name} must be a positive integer, got {value!r}")
        if self.dtype not in ACCUMULATION_DTYPES:
            raise StatsError(f"StatsKey.dtype must be one of {ACCUMULATION_DTYPES}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """
        The key's fields as a JSON-serializable dict.

        Example:

        ```python
        >>> from hf_edit_patch.hub.stats_cache import StatsKey
        >>> StatsKey("gpt2", None, "transformer.h.5.mlp.c_proj", "model-sampled:0:100", "", 100, 64).to_dict()
        {'model_id': 'gpt2', 'revision': None, 'module': 'transformer.h.5.mlp.c_proj', 'dataset': 'model-sampled:0:100', 'text_field': '', 'sample_count': 100, 'max_length': 64, 'dtype': 'float32'}
        ```
        """  # noqa: E501
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "a statistics key") -> StatsKey:
        """
        A key from [`StatsKey.to_dict`]'s output; every field must be present, and no other.

        Raises:
            `StatsFormatError`: naming the missing or unexpected fields, or the invalid value.

        Example:

        ```python
        >>> from hf_edit_patch.hub.stats_cache import StatsKey
        >>> key = StatsKey("gpt2", None, "transformer.h.5.mlp.c_proj", "model-sampled:0:100", "", 100, 64)
        >>> StatsKey.from_dict(key.to_dict()) == key
        True
        ```
        """
        expected = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != expected:
            got = shorten(sorted(map(str, data))) if isinstance(data, dict) else type(data).__name__
            raise StatsFormatError(
                f"{source}: a statistics key needs exactly the fields {sorted(expected)}, got {got}"
            )
        fields = validate(STATS_KEY_SCHEMA, data, source=source, error=StatsFormatError)
        try:
            return cls(**fields)
        except StatsError as exc:
            raise StatsFormatError(f"{source}: invalid statistics key {shorten(data)}: {exc}") from None

    def digest(self) -> str:
        """The sha256 (hex) of the key's canonical JSON form and the file format version."""
        canonical = json.dumps(
            {"format": STATS_FORMAT, "format_version": STATS_FORMAT_VERSION, **self.to_dict()},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def filename(self) -> str:
        """
        A stable file name: readable model and module names, then a hash of the whole key.

        Example:

        ```python
        >>> from hf_edit_patch.hub.stats_cache import StatsKey
        >>> key = StatsKey("gpt2", None, "transformer.h.5.mlp.c_proj", "model-sampled:0:100", "", 100, 64)
        >>> key.filename().startswith("gpt2--transformer.h.5.mlp.c_proj--")
        True
        ```
        """
        model = _slug(self.model_id.rstrip("/\\").replace("\\", "/").split("/")[-1])[:60]
        return f"{model}--{_slug(self.module)[:120]}--{self.digest()[:20]}.safetensors"


def _slug(text: str) -> str:
    return _SLUG_RE.sub("-", text).strip("-.") or "x"


@dataclass(frozen=True)
class StatsEntry:
    """One stored matrix: its key, the number of tokens it averages over, and its file."""

    key: StatsKey
    count: int
    path: Path


class StatsCache:
    """
    A folder of second-moment matrices, one safetensors file per [`StatsKey`], with the key in the file's metadata.

    Files are written atomically, so a crash never leaves a half-written entry; a file that cannot be read back or
    whose metadata does not match its key is ignored (with a warning) and recomputed.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            The folder. Defaults to `stats/` in the hf_edit_patch cache
            ([`hf_edit_patch.hub.default_model.default_cache_dir`]:
            `$HF_EDIT_PATCH_CACHE`, else `$XDG_CACHE_HOME/hf_edit_patch`, else `~/.cache/hf_edit_patch`).

    Example:

    ```python
    >>> import torch
    >>> from hf_edit_patch.hub.stats_cache import StatsCache, StatsKey
    >>> cache = StatsCache("/tmp/my_stats")
    >>> key = StatsKey("gpt2", None, "transformer.h.5.mlp.c_proj", "model-sampled:0:100", "", 100, 64)
    >>> cache.put(key, torch.eye(3072), count=6400)  # doctest: +SKIP
    >>> cache.get(key).shape  # doctest: +SKIP
    torch.Size([3072, 3072])
    ```
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        if cache_dir is None:
            cache_dir = default_cache_dir() / "stats"
        self.cache_dir = Path(cache_dir).expanduser()

    def __repr__(self) -> str:
        return f"StatsCache({os.fspath(self.cache_dir)!r})"

    def path(self, key: StatsKey) -> Path:
        """Where the matrix of `key` is (or would be) stored."""
        return self.cache_dir / key.filename()

    def entry(self, key: StatsKey) -> StatsEntry | None:
        """The stored entry of `key` (read from metadata only, the matrix is not loaded), or `None`."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            found, count = _read_metadata(path)
        except StatsFormatError as exc:
            logger.warning("ignoring the unreadable statistics file %s: %s", path, exc)
            return None
        if found != key:
            logger.warning("ignoring %s: its metadata names another key (%s)", path, found)
            return None
        return StatsEntry(key, count, path)

    def get(self, key: StatsKey) -> torch.Tensor | None:
        """
        The matrix stored for `key` (float32, on the CPU), or `None` if there is none or it is invalid.

        Example:

        ```python
        >>> from hf_edit_patch.hub.stats_cache import StatsCache
        >>> cache = StatsCache("/tmp/my_stats")
        >>> [cache.get(e.key).shape for e in cache.entries()]  # doctest: +SKIP
        [torch.Size([1536, 1536])]
        ```
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            matrix, _, _ = read_stats_file(path, expected_key=key)
        except StatsFormatError as exc:
            logger.warning("ignoring the invalid statistics file %s (it will be recomputed): %s", path, exc)
            return None
        return matrix

    def put(self, key: StatsKey, C: torch.Tensor, count: int, *, info: dict[str, Any] | None = None) -> StatsEntry:
        """
        Stores `C` (the second moment over `count` tokens) for `key`, replacing any previous entry atomically.

        Args:
            key (`StatsKey`): what the matrix is.
            C (`torch.Tensor`): a finite square float32 matrix.
            count (`int`): the number of tokens it averages over.
            info (`dict`, *optional*): informational metadata (not part of the key), stored as JSON.

        Returns:
            `StatsEntry`: the stored entry.

        Raises:
            `StatsFormatError`: if `C` or `count` is invalid.

        Example:

        ```python
        >>> import torch
        >>> from hf_edit_patch.hub.stats_cache import StatsCache, StatsKey
        >>> key = StatsKey("gpt2", None, "transformer.h.5.mlp.c_proj", "model-sampled:0:100", "", 100, 64)
        >>> StatsCache("/tmp/my_stats").put(key, torch.eye(3072), count=6400).count  # doctest: +SKIP
        6400
        ```
        """
        from safetensors.torch import save_file

        matrix = C.detach().to("cpu").contiguous()
        _validate_matrix(matrix, key, count, where="the matrix to store")
        metadata = {
            "format": STATS_FORMAT,
            "format_version": str(STATS_FORMAT_VERSION),
            "key": json.dumps(key.to_dict(), sort_keys=True),
            "count": str(count),
            "info": json.dumps(info or {}, sort_keys=True, default=str),
        }
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        with atomic_path(path) as tmp:
            save_file({TENSOR_NAME: matrix}, tmp, metadata=metadata)
        logger.debug("stored key statistics of %s in %s", key.module, path)
        return StatsEntry(key, count, path)

    def entries(self) -> list[StatsEntry]:
        """
        Every valid entry in the folder, sorted by file name (invalid files are skipped with a warning).

        Example:

        ```python
        >>> from hf_edit_patch.hub.stats_cache import StatsCache
        >>> [(e.key.module, e.count) for e in StatsCache().entries()]  # doctest: +SKIP
        [('model.layers.3.mlp.down_proj', 124231), ('model.layers.4.mlp.down_proj', 124231)]
        ```
        """
        if not self.cache_dir.is_dir():
            return []
        found = []
        for path in sorted(self.cache_dir.glob("*.safetensors")):
            try:
                key, count = _read_metadata(path)
            except StatsFormatError as exc:
                logger.warning("skipping the unreadable statistics file %s: %s", path, exc)
                continue
            if path.name != key.filename():
                logger.warning("skipping %s: its key belongs in %s", path, key.filename())
                continue
            found.append(StatsEntry(key, count, path))
        return found


def _read_metadata(path: Path) -> tuple[StatsKey, int]:
    """`(key, count)` from a statistics file's header, without reading the matrix."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for malformed headers
        raise StatsFormatError(f"{path} is not a readable safetensors file: {exc}") from exc
    return _parse_metadata(metadata, path)


def _parse_metadata(metadata: dict[str, str], path: Path) -> tuple[StatsKey, int]:
    if metadata.get("format") != STATS_FORMAT or metadata.get("format_version") != str(STATS_FORMAT_VERSION):
        raise StatsFormatError(
            f"{path} is not a statistics file of format {STATS_FORMAT!r} version {STATS_FORMAT_VERSION} "
            f"(its metadata says format={metadata.get('format')!r}, version={metadata.get('format_version')!r})"
        )
    key_text, count_text = metadata.get("key"), metadata.get("count")
    if key_text is None or not isinstance(count_text, str) or not _COUNT_RE.fullmatch(count_text):
        raise StatsFormatError(
            f"{path} has no valid 'key' and 'count' metadata (count {shorten(count_text)}; accepted: a positive "
            "integer of at most 18 digits)"
        )
    source = f"{path}: metadata 'key'"
    key_data = parse_json(key_text, source=source, error=StatsFormatError, max_bytes=1 << 16)
    return StatsKey.from_dict(key_data, source=source), int(count_text)


def read_stats_file(path: Path, *, expected_key: StatsKey | None = None) -> tuple[torch.Tensor, StatsKey, int]:
    """
    The validated matrix, key and token count of a statistics file (safetensors only: nothing is unpickled).

    Args:
        path (`Path`): a file written by [`StatsCache.put`].
        expected_key (`StatsKey`, *optional*): the key the file must hold.

    Raises:
        `StatsFormatError`: if the file is unreadable, holds other tensors or another key, or its matrix is not a
        finite square matrix of the key's dtype with a non-negative diagonal.

    Example:

    ```python
    >>> from hf_edit_patch.hub.stats_cache import StatsCache, read_stats_file
    >>> entry = StatsCache().entries()[0]  # doctest: +SKIP
    >>> matrix, key, count = read_stats_file(entry.path, expected_key=entry.key)  # doctest: +SKIP
    ```
    """
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())
            if names != [TENSOR_NAME]:
                raise StatsFormatError(f"{path} must hold exactly one tensor {TENSOR_NAME!r}, found {names}")
            matrix = f.get_tensor(TENSOR_NAME)
    except StatsFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise StatsFormatError(f"{path} is not a readable safetensors file: {exc}") from exc
    key, count = _parse_metadata(metadata, path)
    if expected_key is not None and key != expected_key:
        raise StatsFormatError(f"{path} holds the statistics of {key}, not of {expected_key}")
    _validate_matrix(matrix, key, count, where=os.fspath(path))
    return matrix, key, count


def _validate_matrix(matrix: torch.Tensor, key: StatsKey, count: Any, *, where: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise StatsFormatError(f"{where}: the token count must be a positive integer, got {count!r}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise StatsFormatError(f"{where}: a second moment is a non-empty square matrix, not {tuple(matrix.shape)}")
    if matrix.dtype != getattr(torch, key.dtype):
        raise StatsFormatError(f"{where}: dtype {matrix.dtype} does not match the key's dtype {key.dtype!r}")
    if not bool(torch.isfinite(matrix).all()):
        raise StatsFormatError(f"{where}: the matrix has non-finite entries")
    if bool((matrix.diagonal() < 0).any()):
        raise StatsFormatError(f"{where}: the diagonal of a second moment cannot be negative")
