"""How much an edit changed the weights: Manhattan distance and fractions of large relative changes.

Gu et al. (2024), "Model Editing Harms General Abilities of Large Language Models: Regularization to the
Rescue" (Table 1), relate the damage an editing method does to general abilities to how far it moves the
weights: the total absolute change (Manhattan distance) and the share of entries whose relative change
|ΔW| / |W| exceeds 0.077 and 0.171. `weight_change_stats` computes those numbers for any pair of models or state
dicts, e.g. a base model and the same model with an edit patch attached.

Example:
    ```python
    from hf_edit_patch.evaluation import weight_change_stats

    base = {k: v.clone() for k, v in model.state_dict().items()}
    pm = PatchedModel.from_pretrained(model, "out/eiffel")
    stats = weight_change_stats(base, pm)
    stats["manhattan"], stats["frac_rel_change_gt"][0.077]
    ```
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["weight_change_stats"]

DEFAULT_THRESHOLDS = (0.077, 0.171)

# Entries processed at once per matrix: bounds the float64 temporaries to a few MiB whatever the matrix size.
_CHUNK_ELEMENTS = 1 << 20

_ACCEPTED = "a state dict (mapping of parameter name to tensor), a torch.nn.Module or a PatchedModel"


def _as_state_dict(obj: Any, what: str) -> Mapping[str, torch.Tensor]:
    """The `{name: tensor}` view of a state dict, a module, or the underlying model of a PatchedModel."""
    if getattr(obj, "is_patched_model", False):
        obj = obj.base_model  # its weights are the patched weights while patches are active
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for name, value in obj.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{what} must map parameter names (str) to tensors, but entry {name!r} is a "
                    f"{type(value).__name__}; accepted: {_ACCEPTED}"
                )
        return obj
    raise TypeError(f"{what} must be {_ACCEPTED}, got {type(obj).__name__}")


def _check_thresholds(thresholds: Any) -> tuple[float, ...]:
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
        raise TypeError(
            f"thresholds must be a non-empty sequence of numbers such as (0.077, 0.171), got "
            f"{type(thresholds).__name__} {thresholds!r}"
        )
    if not thresholds:
        raise ValueError("thresholds must not be empty; pass at least one number, e.g. (0.077, 0.171)")
    checked = []
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, Real):
            raise TypeError(f"every threshold must be a real number, got {type(t).__name__} {t!r} in {thresholds!r}")
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"every threshold must be finite and >= 0, got {t!r} in {thresholds!r}")
        checked.append(float(t))
    return tuple(checked)


def _is_matrix(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.is_floating_point()


def _matrix_stats(base: torch.Tensor, edited: torch.Tensor, thresholds: tuple[float, ...]) -> tuple[float, list[int]]:
    """Sum of |ΔW| (float64) and, per threshold, the count of entries with |ΔW| / |W| > t, over row chunks."""
    rows, cols = base.shape
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    manhattan = 0.0
    counts = [0] * len(thresholds)
    for start in range(0, rows, step):
        b = base[start : start + step].to(torch.float64)  # may be a view of the input: never modified in place
        e = edited[start : start + step].to(device=b.device, dtype=torch.float64)
        rel = torch.sub(e, b).abs_()
        manhattan += float(rel.sum())
        # |ΔW| / |W|: +inf where W == 0 and ΔW != 0, NaN (then 0) where both are 0.
        rel.div_(b.abs()).nan_to_num_(nan=0.0, posinf=math.inf)
        for i, t in enumerate(thresholds):
            counts[i] += int((rel > t).sum())
    return manhattan, counts


def weight_change_stats(
    base: Mapping[str, torch.Tensor] | nn.Module,
    edited: Mapping[str, torch.Tensor] | nn.Module,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """Manhattan distance and fractions of large relative changes between two sets of weights.

    Only floating-point 2-D weight matrices present in both, with the same shape, that differ in at least one
    entry are considered; unchanged matrices do not dilute the fractions. Tied weights listed under two names in
    a state dict count under each name. Everything is computed in float64, one row chunk at a time, so no
    full-size temporary copy of a matrix is made.

    These are the weight-space measures of Gu et al. (2024), "Model Editing Harms General Abilities of Large
    Language Models: Regularization to the Rescue", Table 1, whose thresholds 0.077 and 0.171 are the defaults.

    Args:
        base: the weights before the edit: a state dict (`{name: tensor}`), a `torch.nn.Module`, or a
            `PatchedModel` (its underlying model, as currently patched).
        edited: the weights after the edit, in any of the same forms. For a `PatchedModel` the names are those
            of the underlying model (no `base_model.` prefix), so it compares with the plain model's state dict.
        thresholds: relative-change thresholds t; non-empty, finite and >= 0. An entry counts when
            |ΔW| / |W_base| > t (strictly). Where W_base == 0 the relative change is +inf if ΔW != 0 (it
            counts for every t) and 0 if ΔW == 0.

    Returns:
        `{"manhattan": float, "frac_rel_change_gt": {t: float}, "n_matrices": int, "n_entries": int,
        "modules": list[str]}`: the sum of |W_edited - W_base| over the differing matrices, the fraction of
        their entries above each threshold (keyed by the threshold as a float), how many matrices differ, their
        total number of entries, and their sorted names. With no differing matrix all numbers are 0.

    Raises:
        TypeError: `base` or `edited` is not a state dict, module or PatchedModel, or a threshold is not a number.
        ValueError: `thresholds` is empty or holds a negative or non-finite value, or the two share no 2-D
            floating-point weight name (e.g. a state dict with a `base_model.` prefix against a plain one).

    Example:
        ```python
        >>> base = {"w": torch.tensor([[1.0, 2.0], [0.0, 4.0]])}
        >>> edited = {"w": torch.tensor([[1.5, 2.0], [0.1, 4.0]])}
        >>> stats = weight_change_stats(base, edited, thresholds=(0.1, 0.5))
        >>> round(stats["manhattan"], 6), stats["frac_rel_change_gt"]
        (0.6, {0.1: 0.5, 0.5: 0.25})
        ```
    """
    thresholds = _check_thresholds(thresholds)
    base_sd = _as_state_dict(base, "base")
    edited_sd = _as_state_dict(edited, "edited")

    common = [name for name, t in base_sd.items() if _is_matrix(t) and name in edited_sd]
    if not common:
        raise ValueError(
            "base and edited share no 2-D floating-point weight name; they must be weights of the same "
            f"architecture with the same parameter names (e.g. base {list(base_sd)[:2]}, edited "
            f"{list(edited_sd)[:2]})"
        )

    manhattan = 0.0
    counts = [0] * len(thresholds)
    n_entries = 0
    modules = []
    with torch.no_grad():
        for name in common:
            b, e = base_sd[name], edited_sd[name]
            if not _is_matrix(e) or b.shape != e.shape:
                logger.warning(
                    "Skipping %r: base is %s %s, edited is %s %s", name, b.dtype, list(b.shape), e.dtype, list(e.shape)
                )
                continue
            e_same = e if e.device == b.device and e.dtype == b.dtype else None
            if e_same is not None and torch.equal(b, e_same):
                continue
            m, c = _matrix_stats(b, e, thresholds)
            if e_same is None and m == 0.0:  # different dtype/device but equal values
                continue
            manhattan += m
            counts = [x + y for x, y in zip(counts, c, strict=True)]
            n_entries += b.numel()
            modules.append(name)

    fractions = {t: (c / n_entries if n_entries else 0.0) for t, c in zip(thresholds, counts, strict=True)}
    logger.debug("weight_change_stats: %d differing matrices, %d entries", len(modules), n_entries)
    return {
        "manhattan": manhattan,
        "frac_rel_change_gt": fractions,
        "n_matrices": len(modules),
        "n_entries": n_entries,
        "modules": sorted(modules),
    }
