"""Pure-torch twin of the sparse add and restore (`sparse_add.py`): the same semantics and validation, no Triton.

`sparse_add_reference_` computes `cast(float32(W[flat]) + float32(values))` with torch's casts (round to nearest
even) and returns the replaced entries; `restore_reference_` writes them back, a copy. Both also accept float64
weights (and float64 values), which the Triton sparse add does not.
"""

from __future__ import annotations

import torch

from .sparse_add_checks import REFERENCE_VALUE_DTYPES, REFERENCE_WEIGHT_DTYPES, check_sparse_args, empty_entries

__all__ = ["restore_reference_", "sparse_add_reference_"]


def sparse_add_reference_(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Pure-torch twin of `sparse_add_`, same semantics and validation; also accepts float64 weights and values.

    `cast(float32(W[flat]) + float32(values))` with torch's casts (round to nearest even). A few whole-tensor ops
    with one temporary for a float32 weight (`torch.take` gather, an in-place add into the converted values,
    `scatter_` write): faster than `w[flat]` and `w[flat] = new`. Chunking into cache-sized pieces is faster
    still on an idle CPU but far slower on a busy one (every op's parallel region waits for both threads), so it
    is not done.
    """
    n = check_sparse_args(
        "sparse_add_", weight, flat, values, "values", REFERENCE_WEIGHT_DTYPES, REFERENCE_VALUE_DTYPES
    )
    if n == 0:
        return empty_entries(weight)
    w = weight.detach().view(-1)
    values = values.detach()
    idx = flat.to(torch.int64)  # no copy for int64; take and scatter_ want int64
    original = torch.take(w, idx)
    if weight.dtype != torch.float32:
        new = original.to(torch.float32).add_(values.to(torch.float32)).to(weight.dtype)
    elif values.dtype == torch.float32:
        new = original + values
    else:  # add into the converted copy: a float32 add is commutative, bit for bit
        new = values.to(torch.float32).add_(original)
    w.scatter_(0, idx, new)  # the indices are unique: a plain write
    return original


def restore_reference_(weight: torch.Tensor, flat: torch.Tensor, original: torch.Tensor) -> None:
    """Pure-torch twin of `restore_`: writes `original` back at `flat` (a copy, exact)."""
    n = check_sparse_args("restore_", weight, flat, original, "original", REFERENCE_WEIGHT_DTYPES, None)
    if n == 0:
        return
    weight.detach().view(-1).scatter_(0, flat.to(torch.int64), original.detach())
