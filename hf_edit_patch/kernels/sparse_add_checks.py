"""Argument checks and dtype tables of the sparse add and restore, shared by the Triton kernels and their twin.

Both paths validate with `check_sparse_args` before anything touches memory, so a bad call fails the same way
whichever implementation runs; the dtype tables say what each path accepts.
"""

from __future__ import annotations

import torch

__all__ = [
    "INDEX_DTYPES",
    "REFERENCE_VALUE_DTYPES",
    "REFERENCE_WEIGHT_DTYPES",
    "TRITON_VALUE_DTYPES",
    "TRITON_WEIGHT_DTYPES",
    "check_sparse_args",
    "empty_entries",
]

INDEX_DTYPES = (torch.int64, torch.int32)
TRITON_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_WEIGHT_DTYPES = TRITON_WEIGHT_DTYPES + (torch.float64,)
TRITON_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_VALUE_DTYPES = TRITON_VALUE_DTYPES + (torch.float64,)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def check_sparse_args(
    op: str,
    weight: torch.Tensor,
    flat: torch.Tensor,
    vals: torch.Tensor,
    vals_name: str,
    weight_dtypes: tuple[torch.dtype, ...],
    value_dtypes: tuple[torch.dtype, ...] | None,
    reference_only: str = "",
) -> int:
    """Validates the arguments of `op` before anything touches memory; returns the number of entries.

    `value_dtypes=None` means `vals` must have the weight's dtype (restore). `reference_only` is appended to dtype
    errors on the Triton path (e.g. that float64 is accepted on the reference path).

    Raises:
        TypeError: when an argument is not a tensor.
        ValueError: naming what was wrong and what is accepted.
    """
    for name, t in (("weight", weight), ("flat", flat), (vals_name, vals)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dtype not in weight_dtypes:
        raise ValueError(
            f"{op}: weight must be a floating tensor of dtype {_names(weight_dtypes)}{reference_only}, "
            f"got {weight.dtype}"
        )
    if not weight.is_contiguous():
        raise ValueError(
            f"{op}: weight must be contiguous (it is updated in place through its flat view), got shape "
            f"{list(weight.shape)} with strides {list(weight.stride())}"
        )
    if flat.dim() != 1 or flat.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"{op}: flat must be a 1-D integer tensor of dtype int64 or int32, got {flat.dtype} of shape "
            f"{list(flat.shape)}"
        )
    if vals.dim() != 1 or vals.shape[0] != flat.shape[0]:
        raise ValueError(
            f"{op}: {vals_name} must be 1-D with the same length as flat ({flat.shape[0]}), got shape "
            f"{list(vals.shape)}"
        )
    if value_dtypes is None:
        if vals.dtype != weight.dtype:
            raise ValueError(
                f"{op}: {vals_name} must have the weight's dtype {weight.dtype} (an exact restore copies bits), "
                f"got {vals.dtype}; cast it explicitly if a lossy restore is really meant"
            )
    elif vals.dtype not in value_dtypes:
        raise ValueError(
            f"{op}: {vals_name} must be a floating tensor of dtype {_names(value_dtypes)}{reference_only}, "
            f"got {vals.dtype}"
        )
    if not (weight.device == flat.device == vals.device):
        raise ValueError(
            f"{op}: weight, flat and {vals_name} must be on one device, got {weight.device}, {flat.device} and "
            f"{vals.device}"
        )
    n = int(flat.shape[0])
    if n == 0:
        return 0
    if n > 1:
        step_ok = flat[1:] > flat[:-1]
        if not bool(step_ok.all()):
            bad = (~step_ok).nonzero().flatten()
            i = int(bad[0])
            raise ValueError(
                f"{op}: flat indices must be strictly increasing (sorted, no duplicates); {bad.numel()} of "
                f"{n - 1} steps are not, first at position {i + 1} ({int(flat[i])} then {int(flat[i + 1])})"
            )
    lo, hi = int(flat[0]), int(flat[-1])  # min and max, the indices being increasing
    if lo < 0 or hi >= weight.numel():
        raise ValueError(
            f"{op}: flat indices must lie in [0, {weight.numel()}) for a weight of shape {list(weight.shape)}, "
            f"got min {lo} and max {hi}"
        )
    return n


def empty_entries(weight: torch.Tensor) -> torch.Tensor:
    """The `original` of an empty patch: no entries, the weight's dtype and device."""
    return torch.empty(0, dtype=weight.dtype, device=weight.device)
