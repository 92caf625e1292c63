"""Exact sparse add and restore: attach a patch to a weight in place, and detach it bit-exactly.

`sparse_add_(weight, flat, values)` does, for each `i`, in one pass (the gather and the write in the same kernel):

    original[i] = W.flat[flat[i]]
    W.flat[flat[i]] = cast_to_W_dtype(float32(W.flat[flat[i]]) + float32(values[i]))

and returns `original`. `restore_(weight, flat, original)` writes `original` back at `flat`: a copy of the saved
bits, never a subtraction, so detaching is exact whatever rounding the add did.

Each op has a Triton kernel (`_sparse_add_triton` / `_restore_triton`: validate, pick a block size, launch) and a
pure-torch reference twin (`sparse_add_reference_` / `restore_reference_`) with the same semantics; the public
functions pick one with `use_triton(weight)` (see `dispatch.py`).

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

try:  # optional dependency: the reference path needs torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

__all__ = [
    "restore_",
    "restore_bytes",
    "restore_reference_",
    "sparse_add_",
    "sparse_add_bytes",
    "sparse_add_reference_",
]

INDEX_DTYPES = (torch.int64, torch.int32)
TRITON_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_WEIGHT_DTYPES = TRITON_WEIGHT_DTYPES + (torch.float64,)
TRITON_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_VALUE_DTYPES = TRITON_VALUE_DTYPES + (torch.float64,)

CUDA_BLOCK = 1024  # elements per program on a GPU: 8 per thread with 4 warps
CUDA_NUM_WARPS = 4
INTERPRET_MAX_BLOCK = 1 << 16  # the interpreter pays per program, so few big programs (numpy does the work)

# dtype codes passed to the kernels as constexprs
_F32, _F16, _BF16 = 0, 1, 2
_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size → integer dtype of the same width


# --------------------------------------------------------------------------------------------------- validation


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _check_args(
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


def _empty_like_entries(weight: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=weight.dtype, device=weight.device)


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


def _sparse_add_triton(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Launcher of the Triton sparse add: validates, picks the block size, launches one pass."""
    n = _check_args(
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
        return _empty_like_entries(weight)
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


def _restore_triton(weight: torch.Tensor, flat: torch.Tensor, original: torch.Tensor) -> None:
    """Launcher of the Triton restore: validates, picks the block size, launches a bit copy."""
    n = _check_args("restore_", weight, flat, original, "original", REFERENCE_WEIGHT_DTYPES, None)
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


# ----------------------------------------------------------------------------------------------- reference twins


def sparse_add_reference_(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Pure-torch twin of `sparse_add_`, same semantics and validation; also accepts float64 weights and values.

    `cast(float32(W[flat]) + float32(values))` with torch's casts (round to nearest even). A few whole-tensor ops
    with one temporary for a float32 weight (`torch.take` gather, an in-place add into the converted values,
    `scatter_` write): faster than `w[flat]` and `w[flat] = new`. Chunking into cache-sized pieces is faster
    still on an idle CPU but far slower on a busy one (every op's parallel region waits for both threads), so it
    is not done.
    """
    n = _check_args("sparse_add_", weight, flat, values, "values", REFERENCE_WEIGHT_DTYPES, REFERENCE_VALUE_DTYPES)
    if n == 0:
        return _empty_like_entries(weight)
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
    n = _check_args("restore_", weight, flat, original, "original", REFERENCE_WEIGHT_DTYPES, None)
    if n == 0:
        return
    weight.detach().view(-1).scatter_(0, flat.to(torch.int64), original.detach())


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
        return _sparse_add_triton(weight, flat, values)
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
        _restore_triton(weight, flat, original)
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
