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
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import PatchError, PatchFormatError
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


def _known_keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _drop_unknown(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(data) - _known_keys(cls))
    if unknown:
        warnings.warn(
            f"Ignoring keys {unknown} in {where}: they were written by a newer version of hf_edit_patch "
            f"(this is {__version__}); upgrade hf_edit_patch to read them.",
            stacklevel=3,
        )
    return {k: v for k, v in data.items() if k not in unknown}


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
        if len(shape) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise PatchFormatError(f"module shape must be two positive integers, got {self.shape!r}")
        self.shape = shape
        if self.layout not in LAYOUTS:
            raise PatchFormatError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.nnz, int) or isinstance(self.nnz, bool) or not 0 <= self.nnz <= shape[0] * shape[1]:
            raise PatchFormatError(
                f"nnz must be an integer in [0, {shape[0] * shape[1]}] for shape {shape}, got {self.nnz!r}"
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
        if not isinstance(data, dict):
            raise PatchFormatError(f"{where} must be a JSON object, got {type(data).__name__}")
        try:
            return cls(**_drop_unknown(cls, data, where))
        except TypeError as exc:
            raise PatchFormatError(f"{where} is missing a required key: {exc}") from exc
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
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise PatchFormatError(f"format_version must be a positive integer, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise PatchFormatError(
                f"this patch uses format version {self.format_version}; hf_edit_patch {__version__} reads up to "
                f"{FORMAT_VERSION}: upgrade hf_edit_patch"
            )
        if self.regularizer is not None and self.regularizer not in REGULARIZERS:
            raise PatchFormatError(f"regularizer must be one of {REGULARIZERS} or None, got {self.regularizer!r}")
        if self.keep_ratio is not None:
            if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
                raise PatchFormatError(f"keep_ratio must be a number in (0, 1] or None, got {self.keep_ratio!r}")
            if not (math.isfinite(self.keep_ratio) and 0.0 < self.keep_ratio <= 1.0):
                raise PatchFormatError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
            self.keep_ratio = float(self.keep_ratio)
        if self.value_dtype not in VALUE_DTYPES:
            raise PatchFormatError(f"value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")
        if not isinstance(self.modules, dict):
            raise PatchFormatError(f"modules must be a mapping of module name to record, got {type(self.modules)}")
        self.modules = {
            name: rec if isinstance(rec, ModuleRecord) else ModuleRecord.from_dict(rec, f"modules[{name!r}]")
            for name, rec in self.modules.items()
        }
        for name in ("requests", "parent_patches"):
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
    def from_dict(cls, data: dict[str, Any]) -> PatchConfig:
        if not isinstance(data, dict):
            raise PatchFormatError(f"{CONFIG_NAME} must hold a JSON object, got {type(data).__name__}")
        return cls(**_drop_unknown(cls, data, CONFIG_NAME))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"

    @classmethod
    def from_json_file(cls, path: str) -> PatchConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PatchFormatError(f"{path} is not valid JSON ({exc}); the file is truncated or corrupt") from exc
        return cls.from_dict(data)


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


def stack_json(names: list[str]) -> str:
    """The text of `patch_stack.json`: the names of a stack's patches, bottom first."""
    return json.dumps({"patches": list(names)}, indent=2) + "\n"


def read_stack(path: str) -> list[str]:
    """The patch names that `patch_stack.json` at `path` lists, bottom first.

    Raises:
        PatchFormatError: the file is not a stack written by `PatchedModel.save_pretrained`.
    """
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)["patches"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("patches must be a list of names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise PatchFormatError(f"{path} is not a valid patch stack ({exc})") from exc
    return names
