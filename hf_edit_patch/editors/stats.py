"""Key statistics for ROME and MEMIT: the second moment `C = E[k kᵀ]` of the inputs of MLP output projections.

ROME and MEMIT solve for a weight change of an MLP output projection (`model.layers.5.mlp.down_proj` in Llama, an
`nn.Linear`; `transformer.h.5.mlp.c_proj` in GPT-2, a transformers `Conv1D`) that is small *under the distribution of
its inputs* `k` (the MLP activations, of width `d`: `intermediate_size` for Llama, `4 · n_embd` for GPT-2). That
distribution enters as `C = E[k kᵀ]`, a float32 `[d, d]` matrix estimated over the non-padding tokens of a text corpus.

This module computes such matrices ([`compute_second_moments`]), caches them on disk keyed by everything that changes
their content ([`StatsKey`], [`StatsCache`]), and shares them through the Hugging Face Hub ([`push_stats_to_hub`],
[`load_stats_from_hub`]). Editors call [`get_second_moments`], which reuses cached matrices and computes only the
missing ones.

Corpora ([`TextSource`], [`load_texts`]): a local `.txt` file (one text per line; blank lines are skipped), a `.json`
file (a list of strings or of objects holding `text_field`), a `.jsonl` file (one string or object per line), or a
Hugging Face `datasets` id (`"wikitext"` is short for `Salesforce/wikitext`, config `wikitext-103-raw-v1`, as in ROME).
The first `sample_count` non-blank texts are used, in file order; shuffle the file beforehand for a random sample.
Without any corpus, [`model_sampled_texts`] lets the model write its own (labelled as such in the cache key).

Memory: all requested modules are collected in one forward pass per batch, and the forward pass stops right after the
last of them has run (later layers and the LM head never run). One pass keeps one `[d, d]` float32 matrix per module
in memory (5 SmolLM2 `down_proj` layers: 5 · 1536² · 4 B = 47 MB), plus one batch of activations. When the matrices
of all modules together exceed `max_bytes` (2 GiB by default), the modules are split, in forward order, into groups
that fit, and the corpus is run once per group; results are identical either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..batching import model_device as _model_device
from ..batching import pad_id as _pad_id
from ..errors import PatchError
from ..hub import resolve as hub
from ..hub.files import atomic_path, atomic_write, file_sha256
from ..hub.push import PushOptions, push_folder
from ..modules import model_source, resolve_weight
from ..version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PROMPTS",
    "StatsCache",
    "StatsEntry",
    "StatsError",
    "StatsFormatError",
    "StatsKey",
    "StatsUnavailableError",
    "TextSource",
    "compute_second_moments",
    "get_second_moments",
    "load_stats_from_hub",
    "load_texts",
    "model_sampled_texts",
    "push_stats_to_hub",
    "stats_keys",
]

STATS_FORMAT = "hf_edit_patch.stats"
STATS_FORMAT_VERSION = 1
TENSOR_NAME = "second_moment"
INDEX_FILENAME = "index.json"
ACCUMULATION_DTYPES = ("float32",)
DEFAULT_MAX_BYTES = 2**31
"""Default bound on the bytes of `C` matrices accumulated in one pass over the corpus (2 GiB)."""
DEFAULT_PROMPTS = ("The", "In", "A", "It", "This", "He", "She", "We", "On", "When")
"""Generic prompts that [`model_sampled_texts`] continues, in turn."""
MODEL_SAMPLED_PREFIX = "model-sampled"
MODEL_SAMPLED_SEED = 0
MODEL_SAMPLED_MAX_NEW_TOKENS = 64
TEXT_SUFFIXES = (".txt", ".json", ".jsonl")
DATASET_ALIASES = {"wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1")}
"""Short names of Hugging Face datasets: name -> (dataset id, config)."""

_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")


class StatsError(PatchError):
    """Invalid arguments or data for key statistics (a `ValueError`)."""


class StatsUnavailableError(StatsError):
    """No statistics are cached and there is no corpus to compute them from (or it cannot be reached)."""


class StatsFormatError(StatsError):
    """A corpus file, a statistics file or a statistics index is malformed or inconsistent."""


class _StopForward(Exception):
    """Raised by a hook once every requested module has run, to skip the rest of the forward pass."""


# --------------------------------------------------------------------------------------------------------------------
# Keys and the cache
# --------------------------------------------------------------------------------------------------------------------


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
    >>> from hf_edit_patch.editors.stats import StatsKey
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
        >>> from hf_edit_patch.editors.stats import StatsKey
        >>> StatsKey("gpt2", None, "transformer.h.5.mlp.c_proj", "model-sampled:0:100", "", 100, 64).to_dict()
        {'model_id': 'gpt2', 'revision': None, 'module': 'transformer.h.5.mlp.c_proj', 'dataset': 'model-sampled:0:100', 'text_field': '', 'sample_count': 100, 'max_length': 64, 'dtype': 'float32'}
        ```
        """  # noqa: E501
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> StatsKey:
        """
        A key from [`StatsKey.to_dict`]'s output; every field must be present, and no other.

        Raises:
            `StatsFormatError`: naming the missing or unexpected fields, or the invalid value.

        Example:

        ```python
        >>> from hf_edit_patch.editors.stats import StatsKey
        >>> key = StatsKey("gpt2", None, "transformer.h.5.mlp.c_proj", "model-sampled:0:100", "", 100, 64)
        >>> StatsKey.from_dict(key.to_dict()) == key
        True
        ```
        """
        expected = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != expected:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise StatsFormatError(f"a statistics key needs exactly the fields {sorted(expected)}, got {got}")
        try:
            return cls(**data)
        except StatsError as exc:
            raise StatsFormatError(f"invalid statistics key {data!r}: {exc}") from None

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
        >>> from hf_edit_patch.editors.stats import StatsKey
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
    >>> from hf_edit_patch.editors.stats import StatsCache, StatsKey
    >>> cache = StatsCache("/tmp/my_stats")
    >>> key = StatsKey("gpt2", None, "transformer.h.5.mlp.c_proj", "model-sampled:0:100", "", 100, 64)
    >>> cache.put(key, torch.eye(3072), count=6400)  # doctest: +SKIP
    >>> cache.get(key).shape  # doctest: +SKIP
    torch.Size([3072, 3072])
    ```
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        if cache_dir is None:
            from ..hub.default_model import default_cache_dir

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
        >>> from hf_edit_patch.editors.stats import StatsCache
        >>> cache = StatsCache("/tmp/my_stats")
        >>> [cache.get(e.key).shape for e in cache.entries()]  # doctest: +SKIP
        [torch.Size([1536, 1536])]
        ```
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            matrix, _, _ = _read_stats_file(path, expected_key=key)
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
        >>> from hf_edit_patch.editors.stats import StatsCache, StatsKey
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
        >>> from hf_edit_patch.editors.stats import StatsCache
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
    try:
        key_data = json.loads(metadata["key"])
        count = int(metadata["count"])
    except (KeyError, ValueError) as exc:
        raise StatsFormatError(f"{path} has no valid 'key' and 'count' metadata: {exc}") from None
    return StatsKey.from_dict(key_data), count


def _read_stats_file(path: Path, *, expected_key: StatsKey | None = None) -> tuple[torch.Tensor, StatsKey, int]:
    """The validated matrix, key and token count of a statistics file (safetensors only: nothing is unpickled)."""
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


# --------------------------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource:
    """
    A corpus of texts: a local `.txt`/`.json`/`.jsonl` file or a Hugging Face `datasets` id.

    Local files: `.txt` holds one text per line (blank lines are skipped); `.json` holds a list of strings, or of
    objects whose `text_field` is the text; `.jsonl` holds one string or object per line. Texts that are empty or only
    whitespace are skipped everywhere. A string that names an existing file, ends in one of these suffixes, or can
    only be a path is a local file; anything else is a dataset id, loaded lazily with `datasets.load_dataset` (which
    must be installed, and can only download when the Hub can be reached).

    Args:
        dataset (`str` or `os.PathLike`):
            A file path, a dataset id, or `"wikitext"` (short for `Salesforce/wikitext`, `wikitext-103-raw-v1`).
        text_field (`str`, *optional*, defaults to `"text"`):
            The field holding the text (not used for `.txt` files or lists of strings).
        split (`str`, *optional*, defaults to `"train"`):
            The dataset split (not used for local files).
        config (`str`, *optional*):
            The dataset configuration name (not used for local files).

    Example:

    ```python
    >>> from hf_edit_patch.editors.stats import TextSource
    >>> source = TextSource("../shared/data/tasks/boolq_dev.jsonl", text_field="passage")  # doctest: +SKIP
    >>> source.fingerprint()  # doctest: +SKIP
    'file:boolq_dev.jsonl@sha256:6e3c...'
    >>> len(source.take(100))  # doctest: +SKIP
    100
    ```
    """

    dataset: str
    text_field: str = "text"
    split: str = "train"
    config: str | None = None
    _local: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        dataset = self.dataset
        if isinstance(dataset, os.PathLike):
            dataset = os.fspath(dataset)
        if not isinstance(dataset, str) or not dataset.strip():
            raise StatsError(f"a corpus must be a file path or a dataset id, got {self.dataset!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise StatsError(f"text_field must be a non-empty string, got {self.text_field!r}")
        expanded = os.path.expanduser(dataset)
        if os.path.isfile(expanded) or (_looks_local(dataset) and not os.path.isdir(expanded)):
            dataset = os.path.abspath(expanded)
            object.__setattr__(self, "_local", True)
        elif os.path.isdir(expanded):  # a dataset saved in a local folder, for `datasets.load_dataset`
            dataset = os.path.abspath(expanded)
        elif dataset in DATASET_ALIASES and self.config is None:
            dataset, config = DATASET_ALIASES[dataset]
            object.__setattr__(self, "config", config)
        object.__setattr__(self, "dataset", dataset)

    @property
    def is_local(self) -> bool:
        """Whether the corpus is a local file (else a Hugging Face dataset)."""
        return self._local

    @property
    def key_text_field(self) -> str:
        """The text field as it enters a [`StatsKey`]: `""` for `.txt` files, where it plays no part."""
        return "" if self.is_local and self.dataset.lower().endswith(".txt") else self.text_field

    def fingerprint(self) -> str:
        """
        The corpus as it enters a [`StatsKey`]: for local files their name and sha256 (read now), so that an edited
        file gets new statistics; for datasets their id, configuration and split.

        Raises:
            `StatsUnavailableError`: if a local file does not exist.
        """
        if self.is_local:
            self._check_file()
            return f"file:{os.path.basename(self.dataset)}@{file_sha256(self.dataset)}"
        config = f":{self.config}" if self.config else ""
        return f"hf-dataset:{self.dataset}{config}@{self.split}"

    def iter_texts(self) -> Iterator[str]:
        """The non-blank texts of the corpus, in order, read lazily."""
        texts = self._iter_file() if self.is_local else self._iter_dataset()
        for text in texts:
            if text.strip():
                yield text

    def take(self, n: int | None) -> list[str]:
        """The first `n` non-blank texts (all of them if `n` is `None`)."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise StatsError(f"sample_count must be a positive integer or None, got {n!r}")
        return list(itertools.islice(self.iter_texts(), n))

    def _check_file(self) -> None:
        if not os.path.isfile(self.dataset):
            raise StatsUnavailableError(
                f"the corpus file {self.dataset} does not exist; accepted corpora: a local "
                f"{'/'.join(TEXT_SUFFIXES)} file or a Hugging Face dataset id"
            )

    def _iter_file(self) -> Iterator[str]:
        self._check_file()
        suffix = os.path.splitext(self.dataset)[1].lower()
        if suffix not in TEXT_SUFFIXES:
            raise StatsFormatError(
                f"cannot read texts from {self.dataset}: suffix {suffix or '(none)'!r} is not one of {TEXT_SUFFIXES}"
            )
        with open(self.dataset, encoding="utf-8") as f:
            if suffix == ".txt":
                for line in f:
                    yield line.strip()
            elif suffix == ".jsonl":
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield self._text_of(_json_line(line, self.dataset, number), f"{self.dataset}, line {number}")
            else:
                try:
                    items = json.load(f)
                except ValueError as exc:
                    raise StatsFormatError(f"{self.dataset} is not valid JSON: {exc}") from None
                if not isinstance(items, list):
                    raise StatsFormatError(
                        f"{self.dataset} holds a JSON {type(items).__name__}; accepted: a list of strings or of "
                        f"objects with a {self.text_field!r} field"
                    )
                for index, item in enumerate(items):
                    yield self._text_of(item, f"{self.dataset}, item {index}")

    def _text_of(self, item: Any, where: str) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict):
            if self.text_field not in item:
                raise StatsFormatError(
                    f"{where} has no field {self.text_field!r} (fields: {sorted(item)}); pass text_field=..."
                )
            value = item[self.text_field]
            if value is None:
                return ""
            if isinstance(value, str):
                return value
            raise StatsFormatError(f"{where}: field {self.text_field!r} is a {type(value).__name__}, not a string")
        raise StatsFormatError(f"{where} is a {type(item).__name__}; accepted: a string or an object")

    def _iter_dataset(self) -> Iterator[str]:
        hint = (
            f"or use a local {'/'.join(TEXT_SUFFIXES)} file (stats_dataset='corpus.jsonl', text_field=...), or "
            "allow_model_sampled=True for statistics from text the model samples itself"
        )
        try:
            import datasets
        except ImportError as exc:
            raise StatsUnavailableError(
                f"{self.dataset!r} is not a local file, and loading it as a Hugging Face dataset needs the `datasets` "
                f"package, which is not installed: pip install datasets, {hint}"
            ) from exc
        try:
            data = datasets.load_dataset(self.dataset, self.config, split=self.split)
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise StatsUnavailableError(
                f"could not load the Hugging Face dataset {self.dataset!r} (config {self.config!r}, split "
                f"{self.split!r}): {exc}. Offline, only datasets already in the datasets cache can be loaded; {hint}"
            ) from exc
        if self.text_field not in data.column_names:
            raise StatsFormatError(
                f"the dataset {self.dataset!r} has no column {self.text_field!r} (columns: {data.column_names}); "
                "pass text_field=..."
            )
        for index, row in enumerate(data.select_columns([self.text_field])):
            yield self._text_of(row, f"{self.dataset!r}, row {index}")


def _looks_local(dataset: str) -> bool:
    """Whether `dataset` can only be a file path: a text-file suffix, or a path that no dataset id looks like."""
    return (
        dataset.lower().endswith(TEXT_SUFFIXES)
        or os.path.isabs(dataset)
        or dataset.startswith((".", "~"))
        or os.sep in dataset.replace("/", "")
    )


def _json_line(line: str, path: str, number: int) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise StatsFormatError(f"{path}, line {number} is not valid JSON: {exc}") from None


def load_texts(
    dataset: str | os.PathLike,
    *,
    text_field: str = "text",
    split: str = "train",
    sample_count: int | None = 1000,
) -> list[str]:
    """
    The first `sample_count` non-blank texts of a local file or a Hugging Face dataset (see [`TextSource`]).

    Args:
        dataset (`str` or `os.PathLike`):
            A `.txt` file (one text per line), a `.json` file (a list of strings or objects), a `.jsonl` file (one
            string or object per line), or a Hugging Face dataset id (`"wikitext"` for WikiText-103, as in ROME).
        text_field (`str`, *optional*, defaults to `"text"`):
            The field holding the text in objects and dataset rows.
        split (`str`, *optional*, defaults to `"train"`):
            The split of a Hugging Face dataset.
        sample_count (`int`, *optional*, defaults to 1000):
            How many texts to return; `None` for all.

    Returns:
        `list[str]`: the texts, in corpus order.

    Raises:
        `StatsUnavailableError`: if the file does not exist, or a dataset cannot be loaded (`datasets` not installed,
        offline).
        `StatsFormatError`: if the file is malformed or an object lacks `text_field`.

    Example:

    ```python
    >>> from hf_edit_patch.editors.stats import load_texts
    >>> texts = load_texts("../shared/data/tasks/boolq_dev.jsonl", text_field="passage", sample_count=3)  # doctest: +SKIP
    >>> texts[0][:40]  # doctest: +SKIP
    'All biomass goes through at least some o'
    ```
    """  # noqa: E501
    return TextSource(dataset, text_field=text_field, split=split).take(sample_count)


# --------------------------------------------------------------------------------------------------------------------
# Text sampled from the model itself
# --------------------------------------------------------------------------------------------------------------------


def model_sampled_texts(
    model: Any,
    tokenizer: Any,
    n: int,
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    top_k: int = 50,
    batch_size: int = 64,
    show_progress: bool = True,
) -> list[str]:
    """
    `n` texts sampled from the model itself (top-k sampling), for computing statistics without any corpus.

    Text `i` continues `prompts[i % len(prompts)]`. The global random state is left untouched: sampling runs under
    `torch.random.fork_rng` seeded with `seed`, so the result depends only on the model, the arguments and the
    hardware. Statistics computed from such text must be labelled as such: [`get_second_moments`] keys them with the
    dataset `"model-sampled:<seed>:<n>"`.

    Args:
        model (`PreTrainedModel`): a causal language model.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        n (`int`): how many texts to sample.
        max_new_tokens (`int`, *optional*, defaults to 64): tokens sampled after each prompt.
        seed (`int`, *optional*, defaults to 0): the random seed.
        prompts (`Sequence[str]`, *optional*): prompts to continue, in turn; defaults to [`DEFAULT_PROMPTS`].
        top_k (`int`, *optional*, defaults to 50): sample among the `top_k` most likely tokens (temperature 1).
        batch_size (`int`, *optional*, defaults to 64): sequences sampled at once (texts whose prompts tokenize
            to the same length share a batch).
        show_progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `list[str]`: the texts (prompt included, special tokens removed).

    Example:

    ```python
    >>> from hf_edit_patch import load_default_model
    >>> from hf_edit_patch.editors.stats import model_sampled_texts
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> texts = model_sampled_texts(model, tokenizer, 4, max_new_tokens=16)  # doctest: +SKIP
    >>> len(texts)  # doctest: +SKIP
    4
    ```
    """
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens), ("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StatsError(f"{name} must be a positive integer, got {value!r}")
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise StatsError(f"prompts must be a non-empty list of non-blank strings, got {prompts!r}")
    device = _model_device(model)
    pad_id = _pad_id(tokenizer)
    positions = _max_positions(model)
    texts: list[str | None] = [None] * n
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with (
            torch.random.fork_rng(devices=fork_devices),
            torch.no_grad(),
            tqdm(total=n, desc="Sampling texts", unit="text", disable=not show_progress) as bar,
        ):
            torch.manual_seed(seed)
            encoded = [tokenizer(prompt, return_tensors="pt")["input_ids"][0] for prompt in prompts]
            for prompt, ids in zip(prompts, encoded, strict=True):
                if ids.numel() == 0:
                    raise StatsError(f"the prompt {prompt!r} tokenizes to no tokens; pass other prompts=...")
                if positions is not None and positions - ids.numel() < 1:
                    raise StatsError(f"the prompt {prompt!r} fills the model's {positions} positions")
            # texts whose prompts have the same length are sampled together: one generate call per batch
            by_length: dict[int, list[int]] = {}
            for index in range(n):
                by_length.setdefault(encoded[index % len(prompts)].numel(), []).append(index)
            for length, indices in sorted(by_length.items()):
                new_tokens = max_new_tokens if positions is None else min(max_new_tokens, positions - length)
                for chunk in _chunks(indices, batch_size):
                    input_ids = torch.stack([encoded[i % len(prompts)] for i in chunk]).to(device)
                    output = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        do_sample=True,
                        top_k=top_k,
                        top_p=1.0,
                        temperature=1.0,
                        max_new_tokens=new_tokens,
                        pad_token_id=pad_id,
                    )
                    decoded = tokenizer.batch_decode(output, skip_special_tokens=True)
                    for index, text in zip(chunk, decoded, strict=True):
                        texts[index] = text
                    bar.update(len(chunk))
    finally:
        model.train(was_training)
    return [text or "" for text in texts]


# --------------------------------------------------------------------------------------------------------------------
# Computing second moments
# --------------------------------------------------------------------------------------------------------------------


def compute_second_moments(
    model: Any,
    tokenizer: Any,
    module_names: list[str],
    texts: Iterable[str] | TextSource,
    *,
    sample_count: int = 1000,
    max_length: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, torch.Tensor]:
    """
    `C = E[k kᵀ]` over the non-padding tokens of `texts`, where `k` is the input of each of `module_names`.

    One forward pass per batch collects the inputs of all modules (forward pre-hooks), and stops as soon as the last
    of them has run, so later layers and the LM head never run (each module is assumed to run once per forward pass).
    `kᵀk` is accumulated in float32 on the module's device, over the tokens the attention mask keeps, and divided by
    the number of tokens at the end. Texts are truncated to `max_length` tokens, sorted by length (longest first, so
    an out-of-memory error comes at once) and right-padded per batch; padding never enters `C`, and right padding
    with a causal mask leaves every real token's activations as they are without padding.

    Memory: one `[d, d]` float32 matrix per module, plus one batch of activations. If the matrices of all modules
    exceed `max_bytes`, the modules are split in forward order into groups that fit and the corpus is run once per
    group (same results, more time); all 5 `down_proj` matrices of SmolLM2 take 47 MB, so one pass.

    Args:
        model (`PreTrainedModel`):
            A causal language model; its training mode is restored afterwards.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer (a pad token is not needed).
        module_names (`list[str]`):
            `nn.Linear` or transformers `Conv1D` modules, e.g. `["model.layers.5.mlp.down_proj"]`.
        texts (`Iterable[str]` or `TextSource`):
            The corpus; its first `sample_count` non-blank texts are used.
        sample_count (`int`, *optional*, defaults to 1000):
            How many texts to use.
        max_length (`int`, *optional*, defaults to 256):
            Tokens per text.
        batch_size (`int`, *optional*, defaults to 8):
            Texts per forward pass.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over batches.
        max_bytes (`int`, *optional*, defaults to 2 GiB):
            Bound on the bytes of matrices accumulated in one pass over the corpus.

    Returns:
        `dict[str, torch.Tensor]`: for each module, its float32 `[d, d]` second moment, on the CPU.

    Raises:
        `StatsError`: if a module does not exist or is not a linear layer, an argument is invalid, the texts hold no
        tokens, or `max_bytes` cannot hold one matrix.

    Example:

    ```python
    >>> from hf_edit_patch import load_default_model
    >>> from hf_edit_patch.editors.stats import compute_second_moments, load_texts
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> texts = load_texts("../shared/data/tasks/boolq_dev.jsonl", text_field="passage", sample_count=100)  # doctest: +SKIP
    >>> C = compute_second_moments(model, tokenizer, ["model.layers.5.mlp.down_proj"], texts)  # doctest: +SKIP
    >>> C["model.layers.5.mlp.down_proj"].shape  # doctest: +SKIP
    torch.Size([1536, 1536])
    ```
    """  # noqa: E501
    matrices, _ = _compute(
        model,
        tokenizer,
        module_names,
        texts,
        sample_count=sample_count,
        max_length=max_length,
        batch_size=batch_size,
        show_progress=show_progress,
        max_bytes=max_bytes,
    )
    return matrices


def _compute(
    model: Any,
    tokenizer: Any,
    module_names: Sequence[str],
    texts: Iterable[str] | TextSource,
    *,
    sample_count: int,
    max_length: int,
    batch_size: int,
    show_progress: bool,
    max_bytes: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """[`compute_second_moments`], also returning the number of tokens averaged over."""
    for name, value in (
        ("sample_count", sample_count),
        ("max_length", max_length),
        ("batch_size", batch_size),
        ("max_bytes", max_bytes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StatsError(f"{name} must be a positive integer, got {value!r}")
    widths = _input_widths(model, module_names)
    groups = _plan_passes(model, widths, max_bytes)
    corpus = _take_texts(texts, sample_count)
    batches, count = _tokenize(tokenizer, corpus, max_length=max_length, batch_size=batch_size)
    device = _model_device(model)
    logger.info(
        "computing key statistics of %d module(s) from %d texts (%d tokens) in %d pass(es) of %d batch(es)",
        len(widths),
        len(corpus),
        count,
        len(groups),
        len(batches),
    )
    results: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        total = len(groups) * len(batches)
        with torch.no_grad(), tqdm(total=total, desc="Key statistics", unit="batch", disable=not show_progress) as bar:
            for number, group in enumerate(groups, start=1):
                if len(groups) > 1:
                    bar.set_postfix_str(f"pass {number}/{len(groups)}")
                sums = _run_pass(model, group, widths, batches, device, bar)
                for name, summed in sums.items():
                    summed /= count
                    results[name] = ((summed + summed.T) * 0.5).to("cpu")  # addmm is symmetric only up to rounding
                del sums
    finally:
        model.train(was_training)
    return {name: results[name] for name in widths}, count


def _run_pass(
    model: Any,
    group: list[str],
    widths: dict[str, int],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    """Sums of `kᵀk` over all batches for the modules of `group`, in one forward pass per batch."""
    sums = {
        name: torch.zeros(widths[name], widths[name], dtype=torch.float32, device=_module_device(model, name))
        for name in group
    }
    wanted = set(group)
    seen: set[str] = set()
    masks: dict[torch.device, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            flat = x.reshape(-1, x.shape[-1])
            mask = masks.get(x.device)
            if mask is None:
                mask = masks[x.device] = masks[device].to(x.device)
            if flat.shape[0] != mask.numel() or flat.shape[1] != widths[name]:
                raise StatsError(
                    f"module {name!r} received an input of shape {tuple(x.shape)}; expected [batch, tokens, "
                    f"{widths[name]}] with batch · tokens = {mask.numel()} (one row per token of the batch)"
                )
            keys = flat[mask].to(torch.float32)
            acc = sums[name]
            acc.addmm_(keys.T.to(acc.device), keys.to(acc.device))
            seen.add(name)
            if seen >= wanted:
                raise _StopForward

        return hook

    handles = []
    try:
        for name in group:
            handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name), with_kwargs=True))
        for input_ids, attention_mask in batches:
            seen.clear()
            masks.clear()
            masks[device] = attention_mask.to(device).reshape(-1).bool()
            try:
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                missing = sorted(wanted - seen)
                raise StatsError(f"the modules {missing} did not run during the forward pass of the model")
            bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _input_widths(model: Any, module_names: Sequence[str]) -> dict[str, int]:
    """The input width `d` of each module, in the order given (validated: existing, linear, no duplicates)."""
    if isinstance(module_names, str) or not isinstance(module_names, Sequence) or not module_names:
        raise StatsError(f"module_names must be a non-empty list of module names, got {module_names!r}")
    if len(set(module_names)) != len(module_names):
        raise StatsError(f"module_names has duplicates: {list(module_names)}")
    widths = {}
    for name in module_names:
        try:
            _, weight, layout = resolve_weight(model, name)
        except PatchError as exc:
            raise StatsError(str(exc)) from None
        if layout == "linear":
            widths[name] = int(weight.shape[1])
        elif layout == "conv1d":
            widths[name] = int(weight.shape[0])
        else:
            raise StatsError(
                f"module {name!r} is an embedding; key statistics need a linear layer (nn.Linear or Conv1D) whose "
                "input is the key vector, such as an MLP output projection"
            )
    return widths


def _plan_passes(model: Any, widths: dict[str, int], max_bytes: int) -> list[list[str]]:
    """The modules split, in forward (registration) order, into groups whose matrices fit in `max_bytes`."""
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    groups: list[list[str]] = []
    used = 0
    for name in sorted(widths, key=order.__getitem__):
        size = widths[name] ** 2 * 4
        if size > max_bytes:
            raise StatsError(
                f"max_bytes={max_bytes} cannot hold the {widths[name]}×{widths[name]} float32 matrix of {name!r} "
                f"({size} bytes); pass max_bytes >= {size}"
            )
        if not groups or used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _take_texts(texts: Iterable[str] | TextSource, sample_count: int) -> list[str]:
    if isinstance(texts, TextSource):
        corpus = texts.take(sample_count)
    elif isinstance(texts, str | bytes) or not isinstance(texts, Iterable):
        raise StatsError(f"texts must be an iterable of strings or a TextSource, got {type(texts).__name__}")
    else:
        corpus = []
        for text in texts:
            if not isinstance(text, str):
                raise StatsError(f"texts must be strings, got a {type(text).__name__}: {text!r}")
            if text.strip():
                corpus.append(text)
                if len(corpus) == sample_count:
                    break
    if not corpus:
        raise StatsError("the corpus has no non-blank texts")
    if len(corpus) < sample_count:
        logger.info("the corpus has only %d non-blank texts; %d were asked for", len(corpus), sample_count)
    return corpus


def _tokenize(
    tokenizer: Any, texts: list[str], *, max_length: int, batch_size: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Right-padded `(input_ids, attention_mask)` batches, longest texts first, and the number of real tokens."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    sequences = [list(ids) for ids in encoded if len(ids)]
    count = sum(len(ids) for ids in sequences)
    if count == 0:
        raise StatsError("the texts tokenize to no tokens at all")
    sequences.sort(key=len, reverse=True)
    pad_id = _pad_id(tokenizer)
    batches = []
    for chunk in _chunks(sequences, batch_size):
        width = len(chunk[0])
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        batches.append((input_ids, attention_mask))
    return batches, count


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _module_device(model: Any, name: str) -> torch.device:
    return model.get_submodule(name).weight.device


# --------------------------------------------------------------------------------------------------------------------
# The editor-facing entry point
# --------------------------------------------------------------------------------------------------------------------


def get_second_moments(
    model: Any,
    tokenizer: Any,
    module_names: list[str],
    *,
    stats_dataset: str | os.PathLike | TextSource | None = None,
    text_field: str = "text",
    split: str = "train",
    sample_count: int = 1000,
    max_length: int = 256,
    batch_size: int = 8,
    cache: StatsCache | None = None,
    model_id: str | None = None,
    revision: str | None = None,
    allow_model_sampled: bool = False,
    show_progress: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, torch.Tensor]:
    """
    The second moments `C = E[k kᵀ]` of the inputs of `module_names`, from the cache or computed (and then cached).

    Each module has its own cache entry, keyed by the model (id and revision), the module, the corpus (a local file
    by its content hash), the text field, `sample_count`, `max_length` and the accumulation dtype. Cached entries are
    used as they are; the missing ones are computed together (see [`compute_second_moments`]) and stored.

    Without `stats_dataset`, statistics come from text the model samples itself ([`model_sampled_texts`], seed 0,
    `min(max_length, 64)` new tokens, keyed `"model-sampled:0:<sample_count>"`) when `allow_model_sampled=True`;
    otherwise the call fails at once, as a silent fallback would change the edit.

    Args:
        model (`PreTrainedModel`): a causal language model.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        module_names (`list[str]`): the modules whose input statistics are needed.
        stats_dataset (`str`, `os.PathLike` or `TextSource`, *optional*):
            A local `.txt`/`.json`/`.jsonl` file or a Hugging Face dataset id (`"wikitext"` for WikiText-103).
        text_field (`str`, *optional*, defaults to `"text"`): the field holding the text.
        split (`str`, *optional*, defaults to `"train"`): the split of a Hugging Face dataset.
        sample_count (`int`, *optional*, defaults to 1000): texts used.
        max_length (`int`, *optional*, defaults to 256): tokens per text.
        batch_size (`int`, *optional*, defaults to 8): texts per forward pass.
        cache (`StatsCache`, *optional*): where statistics are cached; defaults to `StatsCache()`.
        model_id (`str`, *optional*): the model's id for the key; defaults to what `model_source(model)` finds. A model
            without any id (built from a config) is computed every time and not cached.
        revision (`str`, *optional*): the model's revision for the key; defaults to `model_source(model)`'s.
        allow_model_sampled (`bool`, *optional*, defaults to `False`): without `stats_dataset`, use text the model
            samples itself.
        show_progress (`bool`, *optional*, defaults to `True`): show progress bars.
        max_bytes (`int`, *optional*, defaults to 2 GiB): bound on the matrices accumulated in one pass.

    Returns:
        `dict[str, torch.Tensor]`: for each module, in the order given, its float32 `[d, d]` second moment (CPU).

    Raises:
        `StatsUnavailableError`: without `stats_dataset` and `allow_model_sampled`, or when the corpus cannot be
        loaded; the message says how to provide statistics.
        `StatsError`: for invalid modules or arguments.

    Example:

    ```python
    >>> from hf_edit_patch import load_default_model
    >>> from hf_edit_patch.editors.stats import get_second_moments
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> modules = [f"model.layers.{i}.mlp.down_proj" for i in range(3, 8)]
    >>> C = get_second_moments(model, tokenizer, modules, stats_dataset="../shared/data/tasks/boolq_dev.jsonl",
    ...                        text_field="passage")  # doctest: +SKIP
    >>> C["model.layers.5.mlp.down_proj"].shape  # doctest: +SKIP
    torch.Size([1536, 1536])
    ```
    """
    widths = _input_widths(model, module_names)
    source, keys = _source_and_keys(
        model,
        list(widths),
        stats_dataset=stats_dataset,
        text_field=text_field,
        split=split,
        sample_count=sample_count,
        max_length=max_length,
        model_id=model_id,
        revision=revision,
        allow_model_sampled=allow_model_sampled,
    )
    if keys:
        cache = cache if cache is not None else StatsCache()
    else:
        logger.warning(
            "the model has no id (it was not loaded with from_pretrained): key statistics are computed and not "
            "cached; pass model_id=... to cache them"
        )

    results: dict[str, torch.Tensor] = {}
    for name, key in keys.items():
        matrix = cache.get(key)
        if matrix is None:
            continue
        if matrix.shape != (widths[name], widths[name]):
            logger.warning(
                "the cached statistics of %s are %s, not %d×%d: recomputing them",
                name,
                tuple(matrix.shape),
                widths[name],
                widths[name],
            )
            continue
        logger.info("using cached key statistics of %s (%s)", name, cache.path(key))
        results[name] = matrix

    missing = [name for name in widths if name not in results]
    if missing:
        if source is None:
            texts: list[str] | TextSource = model_sampled_texts(
                model,
                tokenizer,
                sample_count,
                max_new_tokens=min(max_length, MODEL_SAMPLED_MAX_NEW_TOKENS),
                seed=MODEL_SAMPLED_SEED,
                show_progress=show_progress,
            )
        else:
            texts = source
        computed, count = _compute(
            model,
            tokenizer,
            missing,
            texts,
            sample_count=sample_count,
            max_length=max_length,
            batch_size=batch_size,
            show_progress=show_progress,
            max_bytes=max_bytes,
        )
        info = {
            "hf_edit_patch": __version__,
            "torch": torch.__version__,
            "model_dtype": str(getattr(model, "dtype", "")),
            "dataset_path": source.dataset if source is not None and source.is_local else None,
        }
        for name, matrix in computed.items():
            if name in keys:
                cache.put(keys[name], matrix, count, info=info)
            results[name] = matrix
    return {name: results[name] for name in widths}


def _source_and_keys(
    model: Any,
    module_names: Sequence[str],
    *,
    stats_dataset: str | os.PathLike | TextSource | None,
    text_field: str,
    split: str,
    sample_count: int,
    max_length: int,
    model_id: str | None,
    revision: str | None,
    allow_model_sampled: bool,
) -> tuple[TextSource | None, dict[str, StatsKey]]:
    """The corpus (None: model-sampled text) and the cache key of each module's statistics ({} without a model id)."""
    if stats_dataset is None:
        if not allow_model_sampled:
            raise StatsUnavailableError(_no_corpus_message(module_names))
        source: TextSource | None = None
        dataset_key, key_text_field = f"{MODEL_SAMPLED_PREFIX}:{MODEL_SAMPLED_SEED}:{sample_count}", ""
    else:
        source = (
            stats_dataset
            if isinstance(stats_dataset, TextSource)
            else TextSource(stats_dataset, text_field=text_field, split=split)
        )
        dataset_key, key_text_field = source.fingerprint(), source.key_text_field
    found_id, found_revision = model_source(model)
    model_id = model_id or found_id
    revision = revision if revision is not None else found_revision
    if not model_id:
        return source, {}
    return source, {
        name: StatsKey(model_id, revision, name, dataset_key, key_text_field, sample_count, max_length)
        for name in module_names
    }


def stats_keys(
    model: Any,
    module_names: Sequence[str],
    *,
    stats_dataset: str | os.PathLike | TextSource | None = None,
    text_field: str = "text",
    split: str = "train",
    sample_count: int = 1000,
    max_length: int = 256,
    model_id: str | None = None,
    revision: str | None = None,
    allow_model_sampled: bool = False,
) -> dict[str, StatsKey]:
    """
    The [`StatsKey`] under which [`get_second_moments`] caches each module's statistics, for the same arguments.

    Quantities derived from a second moment (AlphaEdit's null-space projection) are cached under the same key.

    Returns:
        `dict[str, StatsKey]`: one key per module; empty when the model has no id (nothing is cached then).

    Example:

    ```python
    >>> from hf_edit_patch.editors.stats import stats_keys
    >>> stats_keys(model, ["model.layers.5.mlp.down_proj"], allow_model_sampled=True)  # doctest: +SKIP
    {'model.layers.5.mlp.down_proj': StatsKey(model_id='HuggingFaceTB/SmolLM2-135M-Instruct', ...)}
    ```
    """
    return _source_and_keys(
        model,
        module_names,
        stats_dataset=stats_dataset,
        text_field=text_field,
        split=split,
        sample_count=sample_count,
        max_length=max_length,
        model_id=model_id,
        revision=revision,
        allow_model_sampled=allow_model_sampled,
    )[1]


def _no_corpus_message(module_names: Sequence[str]) -> str:
    return (
        f"no corpus for the key statistics (C = E[k kᵀ]) of {list(module_names)}, which ROME and MEMIT need. "
        "Provide one of: stats_dataset='wikitext' (a Hugging Face dataset id; needs `pip install datasets` and the "
        "Hub, or the datasets cache); a local .txt (one text per line), .json or .jsonl file, e.g. "
        "stats_dataset='corpus.jsonl', text_field='passage'; allow_model_sampled=True for statistics from text the "
        "model samples itself (fully offline, labelled 'model-sampled' in the cache); or statistics shared on the "
        "Hub: hf_edit_patch.editors.stats.load_stats_from_hub(repo_id) puts them in the cache, then pass the "
        "stats_dataset they were computed from (a Hub dataset is then not downloaded)."
    )


# --------------------------------------------------------------------------------------------------------------------
# Sharing through the Hub
# --------------------------------------------------------------------------------------------------------------------


def push_stats_to_hub(
    cache: StatsCache,
    keys_or_entries: Iterable[StatsKey | StatsEntry],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> Any:
    """
    Uploads cached statistics to a Hub repo in one commit: their safetensors files, an `index.json` and a README.

    The repo is created if needed. Entries already listed in the repo's `index.json` are kept in the new index, so
    statistics can be added over several pushes.

    Args:
        cache (`StatsCache`): where the entries are.
        keys_or_entries (`Iterable[StatsKey | StatsEntry]`): what to upload (e.g. `cache.entries()`).
        repo_id (`str`): the Hub repo, `"namespace/name"`.
        private (`bool`, *optional*): whether a new repo is private.
        token (`str` or `bool`, *optional*): the Hub token.
        commit_message (`str`, *optional*): the commit message.

    Returns:
        `CommitInfo`: the commit of the upload.

    Raises:
        `StatsUnavailableError`: if a key is not in the cache.
        `StatsFormatError`: if a cached file is invalid.

    Example:

    ```python
    >>> from hf_edit_patch.editors.stats import StatsCache, push_stats_to_hub
    >>> cache = StatsCache()
    >>> push_stats_to_hub(cache, cache.entries(), "me/smollm2-key-stats")  # doctest: +SKIP
    ```
    """
    selected: dict[str, tuple[StatsEntry, Path]] = {}
    for item in keys_or_entries:
        key = item.key if isinstance(item, StatsEntry) else item
        if not isinstance(key, StatsKey):
            raise StatsError(f"expected StatsKey or StatsEntry items, got a {type(item).__name__}")
        entry = cache.entry(key)
        if entry is None:
            raise StatsUnavailableError(f"{cache} has no valid statistics for {key}")
        _read_stats_file(entry.path, expected_key=key)  # validated before anything is uploaded
        selected[key.filename()] = (entry, entry.path)
    if not selected:
        raise StatsError("no statistics selected to push")

    def save(folder: str) -> None:
        previous = _existing_index_entries(repo_id, token)
        listed = {item["filename"]: item for item in previous}
        for filename, (entry, path) in selected.items():
            shutil.copyfile(path, os.path.join(folder, filename))
            listed[filename] = {
                "filename": filename,
                "key": entry.key.to_dict(),
                "count": entry.count,
                "sha256": file_sha256(path),
            }
        index = {
            "format": STATS_FORMAT,
            "format_version": STATS_FORMAT_VERSION,
            "entries": [listed[name] for name in sorted(listed)],
        }
        atomic_write(os.path.join(folder, INDEX_FILENAME), json.dumps(index, indent=2) + "\n")
        atomic_write(os.path.join(folder, "README.md"), _stats_card(index["entries"]))

    message = commit_message or f"Upload key statistics of {len(selected)} module(s) with hf_edit_patch"
    return push_folder(save, repo_id, PushOptions(private=private, token=token, commit_message=message))


def _existing_index_entries(repo_id: str, token: str | bool | None) -> list[dict[str, Any]]:
    path = hub.resolve_file(repo_id, INDEX_FILENAME, token=token, missing_ok=True, force_download=True)
    return [] if path is None else _parse_index(path)


def _parse_index(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise StatsFormatError(f"{path} is not a readable statistics index: {exc}") from None
    if (
        not isinstance(index, dict)
        or index.get("format") != STATS_FORMAT
        or index.get("format_version") != STATS_FORMAT_VERSION
        or not isinstance(index.get("entries"), list)
    ):
        raise StatsFormatError(
            f"{path} is not a statistics index of format {STATS_FORMAT!r} version {STATS_FORMAT_VERSION} "
            "(expected an object with 'format', 'format_version' and a list of 'entries')"
        )
    entries = []
    for number, item in enumerate(index["entries"]):
        if not isinstance(item, dict) or not {"filename", "key", "count", "sha256"} <= set(item):
            raise StatsFormatError(f"{path}: entry {number} needs 'filename', 'key', 'count' and 'sha256'")
        key = StatsKey.from_dict(item["key"])
        if item["filename"] != key.filename():
            raise StatsFormatError(
                f"{path}: entry {number} names the file {item['filename']!r}; its key belongs in {key.filename()!r}"
            )
        entries.append(item)
    return entries


def _stats_card(entries: list[dict[str, Any]]) -> str:
    rows = "\n".join(
        f"| {e['key']['model_id']} | {e['key']['revision'] or ''} | `{e['key']['module']}` | {e['key']['dataset']} | "
        f"{e['key']['sample_count']} | {e['key']['max_length']} | {e['count']} |"
        for e in entries
    )
    return (
        "---\ntags:\n- hf_edit_patch\n- rome\n- memit\n---\n\n"
        "# Key statistics for ROME / MEMIT\n\n"
        "Second moments `C = E[k kᵀ]` (float32) of the inputs of MLP output projections, computed with "
        "hf_edit_patch over the non-padding tokens of a corpus. Load them with\n\n"
        "```python\nfrom hf_edit_patch.editors.stats import load_stats_from_hub\nload_stats_from_hub(REPO_ID)\n```\n\n"
        "| model | revision | module | corpus | texts | max length | tokens |\n"
        "|---|---|---|---|---|---|---|\n"
        f"{rows}\n"
    )


def load_stats_from_hub(
    repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache: StatsCache | None = None,
    local_files_only: bool = False,
) -> list[StatsEntry]:
    """
    Downloads the statistics listed in a Hub repo's `index.json` (or a local folder's) into the cache.

    Every file is checked before any is stored: its sha256 against the index, its key metadata against the index and
    its file name, the matrix's shape, dtype and finiteness. Files are read with safetensors only; nothing is
    unpickled.

    Args:
        repo_id (`str` or `os.PathLike`): a Hub repo id, or a local folder written the same way.
        revision (`str`, *optional*): a branch, tag or commit of the repo.
        token (`str` or `bool`, *optional*): the Hub token.
        cache (`StatsCache`, *optional*): where to store them; defaults to `StatsCache()`.
        local_files_only (`bool`, *optional*, defaults to `False`): use only the huggingface_hub cache.

    Returns:
        `list[StatsEntry]`: the stored entries.

    Raises:
        `PatchNotFoundError`: if the repo or one of its files cannot be found or downloaded.
        `StatsFormatError`: if the index or a file is invalid or does not match the index.

    Example:

    ```python
    >>> from hf_edit_patch.editors.stats import load_stats_from_hub
    >>> entries = load_stats_from_hub("me/smollm2-key-stats")  # doctest: +SKIP
    >>> [e.key.module for e in entries]  # doctest: +SKIP
    ['model.layers.3.mlp.down_proj', 'model.layers.4.mlp.down_proj']
    ```
    """
    cache = cache if cache is not None else StatsCache()
    options = {"revision": revision, "token": token, "local_files_only": local_files_only}
    index_path = hub.resolve_file(repo_id, INDEX_FILENAME, **options)
    loaded: list[tuple[StatsKey, torch.Tensor, int]] = []
    for item in tqdm(_parse_index(index_path), desc="Loading key statistics", unit="file"):
        key = StatsKey.from_dict(item["key"])
        path = hub.resolve_file(repo_id, item["filename"], **options)
        if file_sha256(path) != item["sha256"]:
            raise StatsFormatError(f"{item['filename']} of {repo_id!r} does not match the sha256 in its index")
        matrix, _, count = _read_stats_file(Path(path), expected_key=key)
        if count != item["count"]:
            raise StatsFormatError(
                f"{item['filename']} of {repo_id!r} averages over {count} tokens, its index says {item['count']}"
            )
        loaded.append((key, matrix, count))
    info = {"source": f"hub:{os.fspath(repo_id)}" + (f"@{revision}" if revision else "")}
    entries = [cache.put(key, matrix, count, info=info) for key, matrix, count in loaded]
    logger.info("loaded %d key statistics from %s into %s", len(entries), repo_id, cache.cache_dir)
    return entries
