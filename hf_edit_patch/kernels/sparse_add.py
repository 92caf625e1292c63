"""Exact sparse add and restore: attach a patch to a weight in place, and detach it bit-exactly.

`sparse_add_(weight, flat, values)` does, for each `i`, in one pass (the gather and the write in the same kernel):

    original[i] = W.flat[flat[i]]
    W.flat[flat[i]] = cast_to_W_dtype(float32(W.flat[flat[i]]) + float32(values[i]))

and returns `original`. `restore_(weight, flat, original)` writes `original` back at `flat`: a copy of the saved
bits, never a subtraction, so detaching is exact whatever rounding the add did.

This module holds each op's Triton kernel, its launcher (`sparse_add_triton_` / `restore_triton_`: validate, pick
a block size, launch) and the public functions, which pick the launcher or the pure-torch twin of
`sparse_add_reference.py` (`sparse_add_reference_` / `restore_reference_`, the same semantics) with
`use_triton(weight)` (see `dispatch.py`). Both paths validate with the checks of `sparse_add_checks.py`.

Exactness. The Triton kernel moves the weight, `original` and bfloat16 values as integer bits and does the dtype
conversions itself, so its output is bit-identical to the reference's (`float32` add, then torch's
round-to-nearest-even cast) in Triton's interpreter (tested) and, by the same integer arithmetic, on CUDA:
- bfloat16 → float32 is a 16-bit shift; float32 → bfloat16 rounds to nearest even with integer ops (inf and
  overflow to inf as torch; NaN stays NaN with its sign, quiet bit set). The interpreter's own float32 → bfloat16
  cast truncates and mishandles subnormals, so `.to(tl.bfloat16)` is never used.
- float16 ↔ float32 uses the hardware / numpy casts, which round to nearest even like torch.
- NaN payload bits may differ from torch's, which are not canonical themselves (torch's vectorized CPU cast gives
  0xFFFF for any NaN); only a NaN weight entry can produce one (patch values are finite).

The kernels are built lazily on first use (`triton.jit` decides at definition time whether to interpret, from
`TRITON_INTERPRET`), so importing this module before setting `TRITON_INTERPRET=1` is harmless, and the module
imports without Triton installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .dispatch import interpreting, use_triton
from .sparse_add_checks import (
    REFERENCE_WEIGHT_DTYPES,
    TRITON_VALUE_DTYPES,
    TRITON_WEIGHT_DTYPES,
    check_sparse_args,
    empty_entries,
)
from .sparse_add_reference import restore_reference_, sparse_add_reference_

try:  # optional dependency: the reference path needs torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

__all__ = ["restore_", "restore_bytes", "restore_triton_", "sparse_add_", "sparse_add_bytes", "sparse_add_triton_"]

CUDA_BLOCK = 1024  # elements per program on a GPU: 8 per thread with 4 warps
CUDA_NUM_WARPS = 4
INTERPRET_MAX_BLOCK = 1 << 16  # the interpreter pays per program, so few big programs (numpy does the work)

# dtype codes passed to the kernels as constexprs
_F32, _F16, _BF16 = 0, 1, 2
_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size → integer dtype of the same width


# ------------------------------------------------------------------------------------------------ Triton kernels
# Plain functions, jitted on first use by `_jit` (see the module docstring); all dtype handling is inline.


def _sparse_add_kernel(
    w_ptr,  # weight as integer bits (int32 for float32, int16 for float16/bfloat16)
    flat_ptr,  # int64 or int32, strictly increasing
    v_ptr,  # values: float32, float16, or bfloat16 as int16 bits
    orig_ptr,  # out: the gathered weight entries, integer bits like w_ptr
    n,
    BLOCK: tl.constexpr,
    W_KIND: tl.constexpr,
    V_KIND: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(flat_ptr + offs, mask=mask, other=0).to(tl.int64)
    w_bits = tl.load(w_ptr + idx, mask=mask, other=0)
    tl.store(orig_ptr + offs, w_bits, mask=mask)  # the original, bit for bit
    v_raw = tl.load(v_ptr + offs, mask=mask, other=0)

    if W_KIND == 0:
        w = w_bits.to(tl.float32, bitcast=True)
    elif W_KIND == 1:
        w = w_bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:  # bfloat16 → float32 is exact: the bits go to the upper half
        w = ((w_bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    if V_KIND == 0:
        v = v_raw
    elif V_KIND == 1:
        v = v_raw.to(tl.float32)
    else:
        v = ((v_raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)

    s = w + v
    if W_KIND == 0:
        out = s.to(tl.int32, bitcast=True)
    elif W_KIND == 1:
        out = s.to(tl.float16).to(tl.int16, bitcast=True)
    else:  # float32 → bfloat16, round to nearest even (overflow → inf); NaN keeps its sign, quiet bit set
        bits = s.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = tl.where(s != s, (bits >> 16) | 0x40, rounded).to(tl.int16)
    tl.store(w_ptr + idx, out, mask=mask)


def _restore_kernel(
    w_ptr,  # weight as integer bits
    flat_ptr,
    orig_ptr,  # integer bits of the same width
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(flat_ptr + offs, mask=mask, other=0).to(tl.int64)
    bits = tl.load(orig_ptr + offs, mask=mask, other=0)
    tl.store(w_ptr + idx, bits, mask=mask)


@functools.cache
def _jit(fn: Callable[..., Any], interpret: bool) -> Any:
    """`triton.jit(fn)`, made once per mode: `triton.jit` reads `TRITON_INTERPRET` when it is called."""
    return triton.jit(fn)


def _launch_config(n: int, device: torch.device) -> tuple[int, dict[str, int]]:
    """Block size and launch options: one config, no autotuning (fixed on CUDA, big in the interpreter)."""
    if device.type == "cuda":
        return CUDA_BLOCK, {"num_warps": CUDA_NUM_WARPS}
    return max(16, min(INTERPRET_MAX_BLOCK, triton.next_power_of_2(n))), {}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed (pip install 'hf-edit-patch[triton]')")


def sparse_add_triton_(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`sparse_add_` with the Triton kernel (CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`).

    Validates (float32, float16 or bfloat16 weights and values), picks the block size and launches one pass.

    Raises:
        ValueError: on a bad argument, before the weight is touched.
        RuntimeError: when Triton is not installed.
    """
    _require_triton()
    n = check_sparse_args(
        "sparse_add_",
        weight,
        flat,
        values,
        "values",
        TRITON_WEIGHT_DTYPES,
        TRITON_VALUE_DTYPES,
        " (float64 is accepted on the reference path only)",
    )
    if n == 0:
        return empty_entries(weight)
    original = torch.empty(n, dtype=weight.dtype, device=weight.device)
    values = values.detach().contiguous()
    v_arg = values.view(torch.int16) if values.dtype == torch.bfloat16 else values
    block, options = _launch_config(n, weight.device)
    kernel = _jit(_sparse_add_kernel, interpreting())
    kernel[(triton.cdiv(n, block),)](
        _as_bits(weight.detach().view(-1)),
        flat.contiguous(),
        v_arg,
        _as_bits(original),
        n,
        BLOCK=block,
        W_KIND=_KIND[weight.dtype],
        V_KIND=_KIND[values.dtype],
        **options,
    )
    return original


def restore_triton_(weight: torch.Tensor, flat: torch.Tensor, original: torch.Tensor) -> None:
    """`restore_` with the Triton kernel: validates, picks the block size and launches a bit copy.

    Raises:
        ValueError: on a bad argument, before the weight is touched.
        RuntimeError: when Triton is not installed.
    """
    _require_triton()
    n = check_sparse_args("restore_", weight, flat, original, "original", REFERENCE_WEIGHT_DTYPES, None)
    if n == 0:
        return
    block, options = _launch_config(n, weight.device)
    kernel = _jit(_restore_kernel, interpreting())
    kernel[(triton.cdiv(n, block),)](
        _as_bits(weight.detach().view(-1)),
        flat.contiguous(),
        _as_bits(original.detach().contiguous()),
        n,
        BLOCK=block,
        **options,
    )


# ---------------------------------------------------------------------------------------------------- public API


def sparse_add_(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Adds `values` at the flat positions `flat` of `weight`, in place, and returns the entries it replaced.

    For each `i`: `original[i] = W.flat[flat[i]]`, then
    `W.flat[flat[i]] = cast_to_W_dtype(float32(W.flat[flat[i]]) + float32(values[i]))` (round to nearest even;
    a sum too large for the weight dtype becomes inf, as torch's cast gives).

    Args:
        weight: contiguous float32, float16 or bfloat16 tensor of any shape (float64 on the reference path only);
            updated in place.
        flat: 1-D int64 or int32 indices into `weight.view(-1)`, strictly increasing, in `[0, weight.numel())`.
        values: 1-D float16, bfloat16 or float32 tensor (float64 on the reference path only), same length.

    Returns:
        `original`: the replaced entries, the weight's dtype and device (empty when `flat` is empty). Pass it to
        `restore_` to detach the patch exactly.

    Raises:
        ValueError: on a bad argument, before the weight is touched.
        RuntimeError: when `HF_EDIT_PATCH_KERNELS=triton` forces a kernel that cannot run here.
    """
    if use_triton(weight):
        return sparse_add_triton_(weight, flat, values)
    return sparse_add_reference_(weight, flat, values)


def restore_(weight: torch.Tensor, flat: torch.Tensor, original: torch.Tensor) -> None:
    """Writes `original` (from `sparse_add_`) back at `flat`, in place: a bit copy, never a subtraction.

    `original` must have the weight's dtype; `weight` and `flat` follow `sparse_add_`'s rules (any of float32,
    float16, bfloat16 and float64 on both paths: the kernel copies bits).

    Raises:
        ValueError: on a bad argument, before the weight is touched.
        RuntimeError: when `HF_EDIT_PATCH_KERNELS=triton` forces a kernel that cannot run here.
    """
    if use_triton(weight):
        restore_triton_(weight, flat, original)
    else:
        restore_reference_(weight, flat, original)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sparse_add_bytes(
    nnz: int, weight_dtype: torch.dtype, values_dtype: torch.dtype, index_dtype: torch.dtype = torch.int64
) -> int:
    """Bytes `sparse_add_` moves, for bandwidth figures: reads index, value and weight entry; writes the weight
    entry and `original`."""
    return nnz * (_itemsize(index_dtype) + _itemsize(values_dtype) + 3 * _itemsize(weight_dtype))


def restore_bytes(nnz: int, weight_dtype: torch.dtype, index_dtype: torch.dtype = torch.int64) -> int:
    """Bytes `restore_` moves: reads index and `original`, writes the weight entry."""
    return nnz * (_itemsize(index_dtype) + 2 * _itemsize(weight_dtype))
