"""hf_edit_patch: knowledge edits as small, shareable, exactly removable patches for Hugging Face models.

Example:
    ```python
    import hf_edit_patch as hep

    model, tokenizer = hep.load_default_model()
    patch = hep.EditPatch.from_deltas({"model.layers.5.mlp.down_proj": dw}, model, keep_ratio=0.4)
    pm = hep.PatchedModel.from_pretrained(model, patch)
    base = pm.unload()   # bit-identical to the model before
    ```

Names are imported lazily, so `import hf_edit_patch` is fast and loads torch only when a name is used; the first
such name loads the editing layer, which plugs the regularizers and `PatchedModel.edit` into the layers below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "PatchConfig": "patch.config",
    "EditRequest": "requests",
    "edit": "editing.entry",
    "ModuleRecord": "patch.config",
    "SparseDelta": "patch.sparse",
    "EditPatch": "patch.edit_patch",
    "PatchedModel": "patched_model",
    "rect_sparsify": "regularizers.matrix",
    "random_sparsify": "regularizers.matrix",
    "pca_sparsify": "regularizers.matrix",
    "sparsify": "patch.sparsifiers",
    "fingerprint": "patch.encoding",
    "load_default_model": "hub.default_model",
    "DEFAULT_MODEL_ID": "hub.default_model",
    "PatchError": "errors",
    "PatchFormatError": "errors",
    "PatchValidationError": "errors",
    "FingerprintMismatchError": "errors",
    "PatchNotFoundError": "errors",
}

__all__ = [
    "DEFAULT_MODEL_ID",
    "EditPatch",
    "EditRequest",
    "FingerprintMismatchError",
    "ModuleRecord",
    "PatchConfig",
    "PatchError",
    "PatchFormatError",
    "PatchNotFoundError",
    "PatchValidationError",
    "PatchedModel",
    "SparseDelta",
    "__version__",
    "edit",
    "fingerprint",
    "load_default_model",
    "pca_sparsify",
    "random_sparsify",
    "rect_sparsify",
    "sparsify",
]

if TYPE_CHECKING:
    from .editing.entry import edit
    from .errors import (
        FingerprintMismatchError,
        PatchError,
        PatchFormatError,
        PatchNotFoundError,
        PatchValidationError,
    )
    from .hub.default_model import DEFAULT_MODEL_ID, load_default_model
    from .patch.config import ModuleRecord, PatchConfig
    from .patch.edit_patch import EditPatch
    from .patch.encoding import fingerprint
    from .patch.sparse import SparseDelta
    from .patch.sparsifiers import sparsify
    from .patched_model import PatchedModel
    from .regularizers.matrix import pca_sparsify, random_sparsify, rect_sparsify
    from .requests import EditRequest


_SUBPACKAGES = ("editors", "evaluation")  # imported on first access: `hep.evaluation.metrics`


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_edit_patch' has no attribute {name!r}")
    if module != "errors":
        # the layers plug into each other on import: the editing layer registers the regularizers and
        # `PatchedModel.edit`, so every name taken from the package works whatever is used first
        importlib.import_module(".editing", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBPACKAGES])
