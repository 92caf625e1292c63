"""Stack-level regularizers, looked up by name: constraints on the accumulated update of a stack of patches.

A per-matrix regularizer (`sparsifiers.py`) decides what one edit keeps of its own ΔW. A stack-level regularizer
acts on the *accumulated* update of one module, the sum of every patch stacked on it (ΔW_acc = W_now − W_base),
where long runs of edits do their damage: growing norms and ill-conditioning. It takes that update and the weight
under it, and returns a replacement update that satisfies its constraint. `PatchedModel.consolidate` applies one to
a run of patches, and `hf_edit_patch.edit(..., stack_regularizer=...)` computes a new patch so that the stack with
it satisfies the constraint.

The patch layer only looks them up: `hf_edit_patch.regularizers` registers the built-in ones ("rect", "prune",
"norm_anchor") when it is imported. A registered function takes `(delta, weight, *, name, **settings)`, with
`delta` and `weight` float32 tensors of the same shape, and returns the replacement update as a float32 tensor of
that shape, or `delta` itself (the same object) when the constraint already holds, so callers can tell that nothing
changed.

Example:
    ```python
    >>> from hf_edit_patch.patch.stack_regularizers import register_stack_regularizer
    >>> @register_stack_regularizer("clip")
    ... def clip(delta, weight, *, name="delta", bound=0.1):
    ...     return delta if delta.abs().max() <= bound else delta.clamp(-bound, bound)
    ```
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import PatchError

StackRegularizer = Callable[..., torch.Tensor]

_REGISTRY: dict[str, StackRegularizer] = {}


def register_stack_regularizer(name: str, fn: StackRegularizer | None = None) -> Any:
    """Registers `fn` under `name` (usable as a decorator). Registering another function under a taken name is an
    error; registering the same function again is a no-op (modules may be reloaded)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a stack regularizer name must be a non-empty string, got {name!r}")

    def register(f: StackRegularizer) -> StackRegularizer:
        if not callable(f):
            raise TypeError(f"stack regularizer {name!r} must be callable, got {type(f).__name__}")
        known = _REGISTRY.get(name)
        if known is not None and known is not f and getattr(known, "__qualname__", None) != f.__qualname__:
            raise ValueError(f"a stack regularizer named {name!r} is already registered ({known.__module__})")
        _REGISTRY[name] = f
        return f

    return register if fn is None else register(fn)


def registered_stack_regularizers() -> tuple[str, ...]:
    """The names `stack_regularizer=` (and `consolidate(regularizer=...)`) accept right now, sorted."""
    return tuple(sorted(_REGISTRY))


def check_stack_regularizer(name: Any) -> str:
    """`name` when a stack regularizer of that name is registered; else a `PatchError` listing the accepted names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        hint = (
            ""
            if _REGISTRY
            else " (none is registered: `import hf_edit_patch.regularizers` registers the built-in ones)"
        )
        raise PatchError(
            f"unknown stack regularizer {name!r}; accepted: {registered_stack_regularizers()} or None{hint}"
        )
    return name


def _setting_parameters(regularizer: str) -> list[inspect.Parameter]:
    """A registered stack regularizer's settings: its keyword arguments after (delta, weight), besides `name`."""
    fn = _REGISTRY[check_stack_regularizer(regularizer)]
    params = list(inspect.signature(fn).parameters.values())[2:]
    return [p for p in params if p.name != "name" and p.kind is not p.VAR_KEYWORD]


def stack_regularizer_settings(regularizer: str) -> tuple[str, ...]:
    """The names of the settings a registered stack regularizer takes (its keyword arguments besides `name`)."""
    return tuple(p.name for p in _setting_parameters(regularizer))


def stack_regularizer_defaults(regularizer: str) -> dict[str, Any]:
    """The default values of a registered stack regularizer's settings (those that have one other than None)."""
    return {p.name: p.default for p in _setting_parameters(regularizer) if p.default not in (p.empty, None)}


def stack_regularize(
    delta: torch.Tensor,
    weight: torch.Tensor,
    regularizer: str,
    *,
    name: str = "delta",
    settings: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The accumulated update `delta` of one module (on `weight`, the weight under it) under `regularizer`.

    Returns a float32 tensor of `delta`'s shape, or `delta` (as float32: the very object when it was float32) when
    the constraint already holds.

    Example:
        ```python
        >>> import torch, hf_edit_patch as hep
        >>> from hf_edit_patch.patch.stack_regularizers import stack_regularize
        >>> w, dw = torch.eye(4), torch.eye(4)
        >>> float(stack_regularize(dw, w, "norm_anchor", settings={"alpha": 0.5}).norm())
        1.0
        ```
    """
    fn = _REGISTRY[check_stack_regularizer(regularizer)]
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2 or not delta.dtype.is_floating_point:
        raise PatchError(f"{name}: ΔW must be a 2-D floating tensor, got {getattr(delta, 'shape', type(delta))}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(delta.shape):
        raise PatchError(
            f"{name}: the weight must be a tensor of ΔW's shape {list(delta.shape)}, got "
            f"{list(getattr(weight, 'shape', [])) or type(weight).__name__}"
        )
    delta, weight = delta.to(torch.float32), weight.to(torch.float32)
    if not bool(torch.isfinite(delta).all()):
        raise PatchError(f"{name}: ΔW has non-finite entries ({int((~torch.isfinite(delta)).sum())} of them)")
    settings = dict(settings or {})
    accepted = stack_regularizer_settings(regularizer)
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise PatchError(f"stack regularizer {regularizer!r} takes the settings {accepted}, got {unknown}")
    out = fn(delta, weight, name=name, **settings)
    if out is delta:
        return delta
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(delta.shape):
        raise PatchError(f"stack regularizer {regularizer!r} returned {type(out).__name__} for {name}, not a ΔW")
    return out.to(torch.float32)
