"""Configuration of an edit patch: what it changes, where it came from, and how it is stored.

`PatchConfig` is what `patch_config.json` holds. It is a plain dataclass validated once in `__post_init__`; keys
written by a newer version of the library are dropped with a warning instead of failing.

Example:
    ```python
    >>> from hf_edit_patch import PatchConfig
    >>> cfg = PatchConfig(base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", regularizer="rect",
    ...                   keep_ratio=0.4)
    >>> PatchConfig.from_dict(cfg.to_dict()) == cfg
    True
    ```
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import PatchError, PatchFormatError
from ..schema import AnyJSON, Enum, Float, Int, List, Map, Nullable, Object, Str, read_json, shorten, validate
from ..version import __version__

FORMAT_VERSION = 1
PATCH_TYPE = "EDIT_PATCH"
CONFIG_NAME = "patch_config.json"
WEIGHTS_NAME = "patch_model.safetensors"
STACK_NAME = "patch_stack.json"
PATCH_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

LAYOUTS = ("linear", "conv1d", "embedding")
ENCODINGS = ("coo", "bitmask", "csr")
VALUE_DTYPES = ("float16", "bfloat16", "float32")
WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")
REGULARIZERS = ("rect", "random", "pca")


# Bounds of what a config may hold, checked before any arithmetic: a weight dimension fits int32 (so a flat index
# fits int64), and lists and strings stay far below what the 32 MiB file limit lets through anyway.
MAX_DIM = 2**31 - 1
MAX_MODULES = 100_000
MAX_REQUESTS = 1_000_000
MAX_STACK = 10_000
MAX_TEXT = 65_536
_SHA256 = Str(max_length=71, pattern=r"sha256:[0-9a-f]{64}", what="'sha256:' then 64 lowercase hex digits")
_TEXT = Str(max_length=MAX_TEXT)

# One declared schema per file. Which encodings and format versions this version reads, and which patch type it
# is, are checked by the dataclasses below, whose messages say to upgrade.
MODULE_RECORD_SCHEMA = Object(
    {
        "shape": List(Int(1, MAX_DIM), min_length=2, max_length=2),
        "layout": Enum(LAYOUTS),
        "nnz": Int(0, MAX_DIM * MAX_DIM),
        "encoding": Str(max_length=64),
        "weight_dtype": Nullable(Enum(WEIGHT_DTYPES)),
        "fingerprint": Nullable(_SHA256),
    },
    required=("shape",),
    what="a JSON object (a module record)",
)
REQUEST_SCHEMA = Object(
    {
        "prompt": _TEXT,
        "subject": _TEXT,
        "target_new": _TEXT,
        "target_true": Nullable(_TEXT),
        "paraphrases": List(_TEXT, max_length=10_000),
        "neighborhood": List(_TEXT, max_length=10_000),
    },
    extra="keep",
    what="a JSON object (an edit request)",
)
PARENT_SCHEMA = Object(
    {"name": Str(max_length=128), "editor": Nullable(Str(max_length=256)), "content_hash": Nullable(_SHA256)},
    extra="keep",
    what="a JSON object (a parent patch: name, editor, content_hash)",
)
STACK_REGULARIZER_SCHEMA = Object(
    {"name": Str(min_length=1, max_length=64)},
    required=("name",),
    extra="keep",
    what="a JSON object (a stack regularizer: name and settings)",
)
PATCH_CONFIG_SCHEMA = Object(
    {
        "patch_type": Str(max_length=64),
        "format_version": Int(1, 2**31 - 1),
        "library_version": Str(max_length=64),
        "base_model_name_or_path": Nullable(Str(max_length=4096)),
        "base_model_revision": Nullable(Str(max_length=1024)),
        "model_type": Nullable(Str(max_length=256)),
        "modules": Map(
            MODULE_RECORD_SCHEMA,
            max_length=MAX_MODULES,
            key=Str(min_length=1, max_length=1024),
            what="module name to record",
        ),
        "editor": Nullable(Str(max_length=256)),
        "editor_hparams": Map(AnyJSON(), max_length=1024),
        "regularizer": Nullable(Enum(REGULARIZERS)),
        "keep_ratio": Nullable(Float(0.0, 1.0, exclusive_minimum=True)),
        "regularizer_kwargs": Map(AnyJSON(), max_length=256),
        "requests": List(REQUEST_SCHEMA, max_length=MAX_REQUESTS),
        "parent_patches": List(PARENT_SCHEMA, max_length=MAX_STACK),
        "consolidates": List(PARENT_SCHEMA, max_length=MAX_STACK),
        "stack_regularizer": Nullable(STACK_REGULARIZER_SCHEMA),
        "value_dtype": Enum(VALUE_DTYPES),
        "content_hash": Nullable(_SHA256),
        "tensors_sha256": Nullable(_SHA256),
    },
)
# The characters of each name are checked by `check_patch_name` where the stack is loaded, before any file is read.
STACK_SCHEMA = Object(
    {
        "patches": List(Str(min_length=1, max_length=128), max_length=MAX_STACK),
        "content_hashes": List(Nullable(_SHA256), max_length=MAX_STACK),
    },
    required=("patches",),
)


@dataclass
class ModuleRecord:
    """What a patch knows about one target module."""

    shape: tuple[int, int] = field(metadata={"help": "Shape of the module's weight, in the module's own layout."})
    layout: str = field(
        default="linear",
        metadata={"help": "Weight layout: 'linear' ([out, in]), 'conv1d' (GPT-2 Conv1D, [in, out]), 'embedding'."},
    )
    nnz: int = field(default=0, metadata={"help": "Number of stored entries."})
    encoding: str = field(default="coo", metadata={"help": f"Storage encoding, one of {ENCODINGS}."})
    weight_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the weight the delta was computed against."}
    )
    fingerprint: str | None = field(
        default=None, metadata={"help": "sha256 fingerprint of that weight ('sha256:<hex>'), see `fingerprint`."}
    )

    def __post_init__(self) -> None:
        shape = tuple(self.shape) if isinstance(self.shape, (list, tuple)) else ()
        if len(shape) != 2 or not all(type(s) is int and 0 < s <= MAX_DIM for s in shape):
            raise PatchFormatError(f"module shape must be two integers from 1 to {MAX_DIM}, got {shorten(self.shape)}")
        self.shape = shape
        if self.layout not in LAYOUTS:
            raise PatchFormatError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if type(self.nnz) is not int or not 0 <= self.nnz <= shape[0] * shape[1]:
            raise PatchFormatError(
                f"nnz must be an integer in [0, {shape[0] * shape[1]}] for shape {shape}, got {shorten(self.nnz)}"
            )
        if self.encoding not in ENCODINGS:
            raise PatchFormatError(
                f"unknown encoding {self.encoding!r}; this version of hf_edit_patch reads {ENCODINGS} "
                "(a newer version may have written it: upgrade hf_edit_patch)"
            )
        if self.weight_dtype is not None and self.weight_dtype not in WEIGHT_DTYPES:
            raise PatchFormatError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {self.weight_dtype!r}")
        if self.fingerprint is not None and not (
            isinstance(self.fingerprint, str) and self.fingerprint.startswith("sha256:")
        ):
            raise PatchFormatError(f"fingerprint must look like 'sha256:<hex>', got {self.fingerprint!r}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "a module record") -> ModuleRecord:
        """A record from its JSON object, checked against `MODULE_RECORD_SCHEMA` (unknown keys dropped with a warning).

        Raises:
            PatchFormatError: naming `where`, the field, the value received and what is accepted.
        """
        fields = validate(MODULE_RECORD_SCHEMA, data, source=where)
        try:
            return cls(**fields)
        except PatchFormatError as exc:
            raise PatchFormatError(f"{where}: {exc}") from exc


@dataclass
class PatchConfig:
    """Configuration and provenance of an edit patch (the content of `patch_config.json`).

    Example:
        ```python
        >>> cfg = PatchConfig(editor="rome", regularizer="rect", keep_ratio=0.4)
        >>> cfg.to_dict()["keep_ratio"]
        0.4
        ```
    """

    patch_type: str = field(default=PATCH_TYPE, metadata={"help": "Always 'EDIT_PATCH'."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Version of the on-disk format."})
    library_version: str = field(default=__version__, metadata={"help": "hf_edit_patch version that wrote it."})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or path of the model the edit was computed on."}
    )
    base_model_revision: str | None = field(default=None, metadata={"help": "Revision (commit) of that model."})
    model_type: str | None = field(default=None, metadata={"help": "transformers `model_type` of the base model."})
    modules: dict[str, ModuleRecord] = field(
        default_factory=dict, metadata={"help": "Per target module: shape, layout, nnz, encoding, fingerprint."}
    )
    editor: str | None = field(
        default=None, metadata={"help": "Editing method ('rome', 'memit', ...) or 'external' for given deltas."}
    )
    editor_hparams: dict[str, Any] = field(default_factory=dict, metadata={"help": "Hyperparameters of the editor."})
    regularizer: str | None = field(
        default=None, metadata={"help": f"Sparsifying regularizer, one of {REGULARIZERS}, or None."}
    )
    keep_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of ΔW entries the regularizer keeps, in (0, 1]."}
    )
    regularizer_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra regularizer settings (seed of random-k, rank of PCA-k)."}
    )
    requests: list[dict[str, Any]] = field(default_factory=list, metadata={"help": "The edit requests."})
    parent_patches: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Patches active when this one was computed (sequential editing), in order: name, hash."},
    )
    consolidates: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Patches this one replaces (PatchedModel.consolidate), bottom first: name, editor, hash."},
    )
    stack_regularizer: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Stack-level regularizer the accumulated update satisfies with this patch: {'name', settings}."
        },
    )
    value_dtype: str = field(
        default="float16", metadata={"help": f"Stored dtype of ΔW values, one of {VALUE_DTYPES}."}
    )
    content_hash: str | None = field(
        default=None, metadata={"help": "sha256 of the patch's canonical content (indices and values)."}
    )
    tensors_sha256: str | None = field(
        default=None, metadata={"help": "sha256 of patch_model.safetensors, checked when loading."}
    )

    def __post_init__(self) -> None:
        if self.patch_type != PATCH_TYPE:
            raise PatchFormatError(f"patch_type must be {PATCH_TYPE!r}, got {self.patch_type!r}: not an edit patch")
        if type(self.format_version) is not int or self.format_version < 1:
            raise PatchFormatError(f"format_version must be a positive integer, got {shorten(self.format_version)}")
        if self.format_version > FORMAT_VERSION:
            raise PatchFormatError(
                f"this patch uses format version {self.format_version}; hf_edit_patch {__version__} reads up to "
                f"{FORMAT_VERSION}: upgrade hf_edit_patch"
            )
        if self.regularizer is not None and self.regularizer not in REGULARIZERS:
            raise PatchFormatError(f"regularizer must be one of {REGULARIZERS} or None, got {self.regularizer!r}")
        if self.keep_ratio is not None:
            if type(self.keep_ratio) not in (int, float):
                raise PatchFormatError(
                    f"keep_ratio must be a number in (0, 1] or None, got {shorten(self.keep_ratio)}"
                )
            if not (0.0 < self.keep_ratio <= 1.0 and math.isfinite(self.keep_ratio)):  # compared before converting
                raise PatchFormatError(f"keep_ratio must be in (0, 1], got {shorten(self.keep_ratio)}")
            self.keep_ratio = float(self.keep_ratio)
        if self.value_dtype not in VALUE_DTYPES:
            raise PatchFormatError(f"value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")
        if not isinstance(self.modules, dict):
            raise PatchFormatError(f"modules must be a mapping of module name to record, got {type(self.modules)}")
        self.modules = {
            name: rec if isinstance(rec, ModuleRecord) else ModuleRecord.from_dict(rec, f"modules[{name!r}]")
            for name, rec in self.modules.items()
        }
        if self.stack_regularizer is not None and not (
            isinstance(self.stack_regularizer, dict) and isinstance(self.stack_regularizer.get("name"), str)
        ):
            raise PatchFormatError(
                f"stack_regularizer must be None or a mapping with a 'name', got {shorten(self.stack_regularizer)}"
            )
        for name in ("requests", "parent_patches", "consolidates"):
            if not isinstance(getattr(self, name), list):
                raise PatchFormatError(f"{name} must be a list, got {type(getattr(self, name)).__name__}")
        for name in ("editor_hparams", "regularizer_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise PatchFormatError(f"{name} must be a mapping, got {type(getattr(self, name)).__name__}")

    @property
    def target_modules(self) -> list[str]:
        """Names of the modules the patch changes."""
        return list(self.modules)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["modules"] = {name: rec.to_dict() for name, rec in self.modules.items()}
        return json.loads(json.dumps(out))  # deep copy, and proof that it is JSON-serializable

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = CONFIG_NAME) -> PatchConfig:
        """A config from its JSON object, checked against `PATCH_CONFIG_SCHEMA` first.

        Keys written by a newer version are dropped with a warning. `source` names the file in messages.

        Raises:
            PatchFormatError: naming the file, the field, the value received (shortened) and what is accepted.

        Example:
            ```python
            >>> PatchConfig.from_dict({"patch_type": "EDIT_PATCH", "format_version": 1, "keep_ratio": 0.4}).keep_ratio
            0.4
            ```
        """
        fields = validate(PATCH_CONFIG_SCHEMA, data, source=source)
        try:
            return cls(**fields)
        except PatchFormatError as exc:
            raise PatchFormatError(f"{source}: {exc}") from exc

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PatchConfig:
        """Reads `patch_config.json`, bounded in size, depth and numbers before parsing (see `hf_edit_patch.schema`).

        Example:
            ```python
            >>> PatchConfig.from_json_file("out/eiffel/patch_config.json").editor  # doctest: +SKIP
            'rome'
            ```
        """
        path = os.fspath(path)
        return cls.from_dict(read_json(path), source=path)


def check_patch_name(name: str, existing: Mapping[str, Any] | Iterable[str] = ()) -> None:
    """A patch name is 1-128 letters, digits, '_', '-' or '.' (not starting with '.' or '-'): it names a
    subfolder of a saved stack. `existing` holds the names already taken."""
    if not isinstance(name, str) or not PATCH_NAME_RE.match(name) or name in (".", ".."):
        raise PatchError(
            f"patch_name must be 1-128 characters of letters, digits, '_', '-' or '.', not starting "
            f"with '.' or '-', got {name!r}"
        )
    if name in existing:
        raise PatchError(f"a patch named {name!r} is already attached; active patches: {list(existing)}")


def stack_json(names: list[str], content_hashes: list[str | None] | None = None) -> str:
    """The text of `patch_stack.json`: the names of a stack's patches, bottom first, and their content hashes."""
    manifest: dict[str, Any] = {"patches": list(names)}
    if content_hashes is not None:
        if len(content_hashes) != len(names):
            raise PatchError(f"{len(names)} patch names but {len(content_hashes)} content hashes")
        manifest["content_hashes"] = list(content_hashes)
    return json.dumps(manifest, indent=2) + "\n"


def read_stack(path: str | os.PathLike) -> list[str]:
    """The patch names that `patch_stack.json` at `path` lists, bottom first.

    Raises:
        PatchFormatError: the file is not a stack written by `PatchedModel.save_pretrained`.
    """
    return read_stack_manifest(path)[0]


def read_stack_manifest(path: str | os.PathLike) -> tuple[list[str], list[str | None] | None]:
    """The patch names that `patch_stack.json` at `path` lists, bottom first, and their content hashes (None for a
    manifest written without them).

    Raises:
        PatchFormatError: the file is not a stack written by `PatchedModel.save_pretrained`, or lists a different
            number of hashes than names.

    Example:
        ```python
        >>> names, hashes = read_stack_manifest("out/all/patch_stack.json")  # doctest: +SKIP
        ```
    """
    path = os.fspath(path)
    try:
        manifest = validate(STACK_SCHEMA, read_json(path, source=STACK_NAME), source=STACK_NAME)
        names, hashes = manifest["patches"], manifest.get("content_hashes")
        if hashes is not None and len(hashes) != len(names):
            raise PatchFormatError(f"{len(names)} patch names but {len(hashes)} content_hashes")
        return names, hashes
    except PatchFormatError as exc:
        raise PatchFormatError(f"{path} is not a valid patch stack: {exc}") from exc
