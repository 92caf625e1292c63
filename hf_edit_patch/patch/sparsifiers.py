"""The regularizers a patch can be built with, looked up by name.

`EditPatch.from_deltas(..., regularizer="rect")` turns each dense ΔW into a `SparseDelta` with the function
registered under that name. The patch layer only looks regularizers up: `hf_edit_patch.regularizers` registers
the built-in ones (`rect`, `random`, `pca`) when it is imported, which `import hf_edit_patch` does on first use of
a patch, a model or an edit. A registered function takes `(delta, weight, keep_ratio, *, name, **kwargs)` and
returns a `SparseDelta` in ΔW's layout.

Example:
    ```python
    >>> from hf_edit_patch.patch.sparsifiers import register_sparsifier
    >>> @register_sparsifier("magnitude")
    ... def magnitude(delta, weight, keep_ratio, *, name="delta"):
    ...     ...
    ```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import PatchError
from .sparse import SparseDelta

Sparsifier = Callable[..., SparseDelta]

_REGISTRY: dict[str, Sparsifier] = {}


def register_sparsifier(name: str, fn: Sparsifier | None = None) -> Any:
    """Registers `fn` under `name` (usable as a decorator). Registering another function under a taken name is an
    error; registering the same function again is a no-op (modules may be reloaded)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a regularizer name must be a non-empty string, got {name!r}")

    def register(f: Sparsifier) -> Sparsifier:
        if not callable(f):
            raise TypeError(f"regularizer {name!r} must be callable, got {type(f).__name__}")
        known = _REGISTRY.get(name)
        if known is not None and known is not f and getattr(known, "__qualname__", None) != f.__qualname__:
            raise ValueError(f"a regularizer named {name!r} is already registered ({known.__module__})")
        _REGISTRY[name] = f
        return f

    return register if fn is None else register(fn)


def registered_sparsifiers() -> tuple[str, ...]:
    """The names `regularizer=` accepts right now, sorted."""
    return tuple(sorted(_REGISTRY))


def sparsify(
    delta: torch.Tensor,
    weight: torch.Tensor,
    regularizer: str | None,
    keep_ratio: float | None,
    *,
    name: str = "delta",
    **kwargs: Any,
) -> SparseDelta:
    """Applies the regularizer registered as `regularizer` to one dense ΔW; None keeps every nonzero entry.

    Example:
        ```python
        >>> import torch, hf_edit_patch as hep
        >>> hep.sparsify(torch.randn(8, 4), torch.randn(8, 4), "rect", 0.25).nnz
        8
        ```
    """
    if regularizer is None:
        if keep_ratio is not None:
            raise PatchError(f"keep_ratio={keep_ratio} needs a regularizer; accepted: {registered_sparsifiers()}")
        if kwargs.get("norm_budget") is not None:
            raise PatchError("norm_budget needs regularizer='rect'")
        if not isinstance(delta, torch.Tensor) or delta.dim() != 2 or not delta.dtype.is_floating_point:
            raise PatchError(f"{name}: ΔW must be a 2-D floating tensor, got {getattr(delta, 'shape', type(delta))}")
        if not bool(torch.isfinite(delta).all()):
            raise PatchError(f"{name}: ΔW has non-finite entries ({int((~torch.isfinite(delta)).sum())} of them)")
        return SparseDelta.from_dense(delta, name=name)
    fn = _REGISTRY.get(regularizer) if isinstance(regularizer, str) else None
    if fn is None:
        hint = (
            ""
            if _REGISTRY
            else " (none is registered: `import hf_edit_patch.regularizers` registers the built-in ones)"
        )
        raise PatchError(f"unknown regularizer {regularizer!r}; accepted: {registered_sparsifiers()} or None{hint}")
    return fn(delta, weight, keep_ratio, name=name, **kwargs)
