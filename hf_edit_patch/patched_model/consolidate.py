"""The accumulated update of a stack, and the patches computed from it: a consolidated run of patches, and a new
edit regularized against the whole stack.

Both read the weights under a stack (or under part of it) without touching the model: the current weights with the
undo data of the patches above some position written back into a copy, top patch first, which gives those weights
bit for bit. The accumulated update of a run of patches is then the difference of two such copies.

- `consolidate_run` builds the one patch that replaces a run of consecutive patches: their accumulated update,
  changed by a regularizer if one is given, computed against the weights under the run (its fingerprints are those
  weights'), recording the replaced patches (names, editors, content hashes) and all their requests.
  `PatchedModel.consolidate` attaches it in their place.
- `stack_regularized_patch` turns a new edit ΔW into the patch R(ΔW_acc + ΔW) − ΔW_acc, so that the stack with the
  new patch satisfies the stack-level regularizer R (`hf_edit_patch.edit(..., stack_regularizer=...)`).

Example:
    ```python
    >>> pm.consolidate(["p2", "p3"], regularizer="prune", patch_name="c")      # doctest: +SKIP
    >>> patch = hep.edit(pm, tokenizer, [req], method="rome", keep_ratio=None,
    ...                  stack_regularizer="norm_anchor", stack_regularizer_kwargs={"alpha": 0.1})  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PatchError
from ..modules import resolve_weight
from ..patch.edit_patch import EditPatch
from ..patch.encoding import fingerprint
from ..patch.stack_regularizers import (
    check_stack_regularizer,
    stack_regularize,
    stack_regularizer_defaults,
    stack_regularizer_settings,
)
from .stack import PatchStack, stack_of

logger = logging.getLogger(__name__)

__all__ = [
    "Regularize",
    "consolidate_run",
    "consolidated_name",
    "exact_difference",
    "run_of",
    "stack_regularized_patch",
    "stack_regularizer_record",
    "weights_under",
]

Regularize = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
"""`(module, accumulated ΔW in float32, weight under it) -> replacement ΔW` (or the ΔW itself: nothing to change)."""


def weights_under(
    model: nn.Module, stack: PatchStack, modules: Iterable[str], position: int
) -> dict[str, torch.Tensor]:
    """Copies of the weights of `modules` with only the patches below `position` applied, bit for bit.

    The current weights, with the values the patches at positions >= `position` overwrote written back top patch
    first (their undo data: exact whatever the dtype). A patch that wrote every entry of a weight saved all of it, so
    the patches above the lowest such one are skipped: on a stack of dense updates (ROME, MEMIT) one write gives the
    weights under the run, however many patches lie above it. The model is not touched. Hold the stack's lock.
    """
    above = list(stack.patches)[position:]
    out = {}
    for module in modules:
        weight = resolve_weight(model, module)[1].detach().clone()
        flat = weight.view(-1)
        writes = [a for name in above for a in stack.applied.get(name, []) if a.module == module]  # none if disabled
        dense = next((k for k, a in enumerate(writes) if a.flat.numel() == flat.numel()), None)  # indices are unique
        if dense is not None:
            writes = writes[: dense + 1]
        for applied in reversed(writes):
            flat[applied.flat.to(weight.device)] = applied.original.to(weight.device, weight.dtype)
        out[module] = weight
    return out


def exact_difference(top: torch.Tensor, under: torch.Tensor, *, name: str = "delta", steps: int = 8) -> torch.Tensor:
    """The float32 ΔW with cast(float32(under) + ΔW) == top, entry by entry, wherever float32 can express one.

    `top − under` in float32 is that ΔW for almost every entry (exactly so when both are within a factor of two of
    each other, and always for half-precision weights of similar magnitude). Where rounding the sum misses `top`,
    ΔW is moved one float32 step at a time towards it (at most `steps`). For float32 weights whose sign the run
    flipped, the steps of ΔW can be coarser than those of `top`: such an entry is left as close as float32 allows
    (one unit in the last place of `top`), and counted in the log.
    """
    under32 = under.to(torch.float32)
    delta = top.to(torch.float32) - under32
    for _ in range(steps):
        wrong = (under32 + delta).to(top.dtype) != top
        if not bool(wrong.any()):
            return delta
        towards = torch.where(top[wrong].to(torch.float32) > (under32 + delta)[wrong], math.inf, -math.inf)
        delta[wrong] = torch.nextafter(delta[wrong], towards.to(torch.float32))
    wrong = int(((under32 + delta).to(top.dtype) != top).sum())
    if wrong:
        logger.info("%s: %d entries of the accumulated update are reproduced to the last bit but one", name, wrong)
    return delta


def run_of(active: Sequence[str], patch_names: Sequence[str] | str | None) -> list[str]:
    """The run of consecutive active patches `patch_names` names (None: all of them), in stack order.

    Raises:
        PatchError: an unknown name, a repeated one, names that are not consecutive in the stack, or no patches.
    """
    if patch_names is None:
        names = list(active)
    else:
        if isinstance(patch_names, str):
            patch_names = [patch_names]
        names = list(patch_names)
        unknown = [n for n in names if n not in active]
        if unknown:
            raise PatchError(f"no patch named {unknown[0]!r}; active patches: {list(active)}")
        if len(set(names)) != len(names):
            raise PatchError(f"patch_names repeats a patch: {names}")
        names = sorted(names, key=list(active).index)
        start = list(active).index(names[0])
        if list(active)[start : start + len(names)] != names:
            raise PatchError(
                f"patch_names must be consecutive patches of the stack; {names} are not (active patches: "
                f"{list(active)}): consolidate a run of neighbours, or remove the ones in between first"
            )
    if not names:
        raise PatchError("there are no active patches to consolidate")
    return names


def consolidated_name(names: Sequence[str]) -> str:
    """The default name of the patch that replaces `names`: the name itself for one patch, else 'first-last'."""
    name = names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"
    return name if len(name) <= 128 else name[:128]


def stack_regularizer_record(regularizer: str | None, settings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a patch records of a stack regularizer: `{"name": ..., **settings}` with the defaults of the settings not
    given filled in (so the record says what was applied whatever later defaults become), checked; None for none.

    Raises:
        PatchError: an unknown regularizer or setting, or settings without a regularizer.
    """
    if regularizer is None:
        if settings:
            raise PatchError(f"stack regularizer settings {dict(settings)} need a stack regularizer")
        return None
    check_stack_regularizer(regularizer)
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(stack_regularizer_settings(regularizer)))
    if unknown:
        raise PatchError(
            f"stack regularizer {regularizer!r} takes the settings {stack_regularizer_settings(regularizer)}, got "
            f"{unknown}"
        )
    return {"name": regularizer, **stack_regularizer_defaults(regularizer), **settings}


def _by_name(record: dict[str, Any] | None) -> Regularize | None:
    if record is None:
        return None
    settings = {k: v for k, v in record.items() if k != "name"}
    return lambda module, delta, weight: stack_regularize(
        delta, weight, record["name"], name=module, settings=settings
    )


def consolidate_run(
    model: nn.Module,
    stack: PatchStack,
    names: Sequence[str],
    *,
    regularizer: str | None = None,
    regularizer_kwargs: Mapping[str, Any] | None = None,
    regularize: Regularize | None = None,
    value_dtype: str | torch.dtype = "float32",
    editor_hparams: dict[str, Any] | None = None,
) -> EditPatch:
    """The patch that replaces the run `names` of `stack` (consecutive, in order): their accumulated update.

    The update is the weights with the run applied minus the weights under it, per module the run touches, in
    float32; a stack regularizer (`regularizer` by name with `regularizer_kwargs`, or a `regularize` function)
    replaces it module by module. The patch keeps every nonzero entry of the result, records the weights under the
    run as its fingerprints, the patches below the run as its parents, the run as `consolidates` and all their
    requests. The model is not touched; hold the stack's lock.

    Raises:
        PatchError: an unknown regularizer or setting, or a run whose update is zero everywhere.
    """
    record = stack_regularizer_record(regularizer, regularizer_kwargs)
    if record is not None and regularize is not None:
        raise PatchError("give a stack regularizer by name or a regularize function, not both")
    regularize = regularize or _by_name(record)
    order = list(stack.patches)
    start, stop = order.index(names[0]), order.index(names[-1]) + 1
    run = [(n, stack.patches[n]) for n in order[start:stop]]
    modules = sorted({m for _, p in run for m in p.deltas})
    under = weights_under(model, stack, modules, start)
    top = weights_under(model, stack, modules, stop)
    deltas: dict[str, torch.Tensor] = {}
    for module in modules:
        acc = exact_difference(top.pop(module), under[module], name=module)
        deltas[module] = acc if regularize is None else regularize(module, acc, under[module])
    kept = {m: d for m, d in deltas.items() if bool(d.count_nonzero())}
    if not kept:
        raise PatchError(f"the patches {list(names)} change no weight: there is nothing to consolidate")
    patch = EditPatch.from_deltas(
        kept,
        model,
        regularizer=None,
        value_dtype=value_dtype,
        editor="stack",
        editor_hparams=dict(editor_hparams or {}),
        requests=[r for _, p in run for r in p.config.requests],
    )
    cfg = patch.config
    patch.config = dataclasses.replace(
        cfg,
        modules={m: dataclasses.replace(rec, fingerprint=fingerprint(under[m])) for m, rec in cfg.modules.items()},
        parent_patches=[{"name": n, "content_hash": stack.patches[n].config.content_hash} for n in order[:start]],
        consolidates=[{"name": n, "editor": p.config.editor, "content_hash": p.config.content_hash} for n, p in run],
        stack_regularizer=record,
    )
    return patch


def stack_regularized_patch(
    model: nn.Module,
    patch: EditPatch,
    regularizer: str,
    regularizer_kwargs: Mapping[str, Any] | None = None,
    *,
    value_dtype: str | torch.dtype = "auto",
    show_progress: bool | None = None,
) -> EditPatch:
    """The patch that makes the stack of `model` with `patch` on top satisfy a stack-level regularizer.

    For every module of `patch` (ΔW, computed on `model`'s current weights): new = R(ΔW_acc + ΔW) − ΔW_acc, where
    ΔW_acc is the accumulated update of `model`'s active patches (zero for a model that is not a `PatchedModel`) and
    R the regularizer, applied against the base weights. Where R changes nothing, the module keeps ΔW as it is.
    The result records `patch`'s editor, hyperparameters, requests and per-matrix regularizer, the active patches
    as parents, and the stack regularizer. The model is not touched.

    Example:
        ```python
        >>> patch = stack_regularized_patch(pm, patch, "prune", {"threshold": 1.0})  # doctest: +SKIP
        ```
    """
    if not isinstance(patch, EditPatch):
        raise TypeError(f"patch must be an EditPatch, got {type(patch).__name__}")
    if regularizer is None:
        raise PatchError("stack_regularized_patch needs a stack regularizer")
    record = stack_regularizer_record(regularizer, regularizer_kwargs)
    regularize = _by_name(record)
    patched = getattr(model, "is_patched_model", False)
    inner = model.base_model if patched else model
    stack = stack_of(inner)
    with stack.lock:
        modules = list(patch.deltas)
        if patched:
            base = weights_under(inner, stack, modules, 0)
        else:
            base = {m: resolve_weight(inner, m)[1].detach() for m in modules}
        deltas: dict[str, Any] = {}
        for module, delta in patch.deltas.items():
            weight_now = resolve_weight(inner, module)[1].detach()
            acc = weight_now.to(torch.float32) - base[module].to(torch.float32)
            total = acc + delta.to_dense(torch.float32).to(acc.device)
            out = regularize(module, total, base[module])  # type: ignore[misc]
            deltas[module] = delta if out is total else out - acc
        cfg = patch.config
        if all(deltas[m] is d for m, d in patch.deltas.items()):  # the constraint holds with the edit as it is
            return EditPatch(patch.deltas, dataclasses.replace(cfg, stack_regularizer=record))
        new = EditPatch.from_deltas(
            deltas,
            model,
            regularizer=None,
            value_dtype=value_dtype,
            editor=patch.config.editor or "external",
            editor_hparams=patch.config.editor_hparams,
            requests=patch.config.requests,
            show_progress=show_progress,
        )
    new.config = dataclasses.replace(
        new.config,
        regularizer=cfg.regularizer,
        keep_ratio=cfg.keep_ratio,
        regularizer_kwargs=dict(cfg.regularizer_kwargs),
        stack_regularizer=record,
    )
    return new
