"""RECT selection with Triton: the k entries of ΔW with the largest relative change |ΔW / W|, without a sort.

This module holds the Triton kernels, their launcher `rect_select_triton` and the public `rect_select`, which runs
them or the pure-torch twin `rect_select_reference` (`rect_select_reference.py`) as `use_triton` says.

Semantics (the same as `hf_edit_patch.regularizers.rect_sparsify` before it drops zero values):

- score = |float32(ΔW) / float32(W)|, an IEEE round-to-nearest division in float32 whatever the input dtypes;
- integer key = the int32 bit pattern of the score with the sign bit cleared (the IEEE bits of a non-negative float
  are monotone in its value), except that a NaN score (0/0) gets the key -1 and ranks lowest; a nonzero ΔW over a
  zero W gives +inf (key 0x7f800000), above every finite ratio;
- the k largest keys are kept; among equal keys the lower row-major flat index wins;
- the result is `(flat_indices, values)`: int64 flat indices, strictly increasing, exactly k of them, and
  `values = delta.flatten()[flat_indices]` in ΔW's dtype. Zero values are kept (the caller drops them).

Triton design (exact radix select on the keys, then a stable compaction; no sort anywhere):

1. Histogram passes. With u = key + 1 in [0, 2^31), three radix digits of 11, 11 and 9 bits
   (`_DIGITS`): level 1 histograms the top digit of every entry; levels 2 and 3 histogram the next digit of the
   entries whose higher bits equal the prefix chosen so far. Per program, `tl.histogram` counts the digits of one
   block; levels 1 and 2 `tl.atomic_add` that into one global histogram of 2048 bins, level 3 stores its
   512 bins per block (plus the per-block count of entries above the level-3 prefix). After each level the
   host copies the small histogram and picks the bucket holding the k-th largest key (a cumsum), so after
   three levels it knows the exact threshold key t and how many ties at t are needed, `k - #(key > t)`.
2. Compaction pass. The level-3 per-block histograms already give every block's count of entries above t and
   at t (a column sum over at most 512 bins, 2 KiB per block): two exclusive `torch.cumsum`s over the blocks
   give each block's output offset and its tie offset. Inside a block, an inclusive prefix sum of the keep mask
   gives each kept element its slot, and a tie is kept iff its global tie rank is below the ties needed. Flat
   indices come out strictly increasing by construction.

Bytes moved per element (s = ΔW's + W's element sizes): the floor is s, plus (8 + ΔW's size) per kept entry.
This design reads the keys four times (three histograms and the compaction), either recomputed from ΔW and W
each time (4·s) or written once as int32 by level 1 and re-read (s + 4 + 3·4 = s + 16; the compaction then also
re-reads ΔW at the kept entries). The level-3 per-block histograms add 2048 / BLOCK bytes written and at most as
many read back (0.5 + 0.5 B at BLOCK = 4096). Writing the keys is cheaper iff 3·s > 16, i.e. s >= 6: fp32/fp32
(24 B instead of 32 B, floor 8 B), mixed fp32/16-bit (22 instead of 24, floor 6), fp64; 16-bit pairs recompute
(16 B instead of 20 B, floor 4 B). Both variants run the same `_rect_key`, so the keys are identical in every
pass. k == numel needs no selection at all and is answered without a kernel. The host synchronizes three times
(one small histogram per level).

Tested through Triton's interpreter (`TRITON_INTERPRET=1`); the CUDA kernels compile for sm_90 (PTX and cubin,
with `div.rn.f32`) but have not been run on a GPU.
"""

from __future__ import annotations

import contextlib
import operator

import torch

from .dispatch import interpreting, use_triton
from .rect_select_reference import rect_select_reference

try:  # the module must import without Triton: the reference path needs none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

__all__ = ["rect_select", "rect_select_bytes", "rect_select_triton"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Radix digits over u = key + 1 (31 bits): (shift of the digit, digit bits), most significant first.
_DIGITS = ((20, 11), (9, 11), (0, 9))
# Keys are written once and re-read when ΔW and W together take at least this many bytes per element (see above).
_MATERIALIZE_KEYS_MIN_BYTES = 6
# Block sizes: the interpreter pays per program (each op is one numpy call), a GPU wants many small programs.
_BLOCK_INTERPRETER = 1 << 16
_BLOCK_CUDA = 4096
_NUM_WARPS_CUDA = 8


# The mode the kernels below were defined in: `triton.jit` reads TRITON_INTERPRET when it decorates.
_DEFINED_INTERPRETED = interpreting()

if triton is not None:
    # tl.sum and tl.cumsum are @triton.jit functions of triton.language.standard, decorated when Triton is first
    # imported: if that happened before TRITON_INTERPRET=1 was set (transformers imports Triton), an interpreted
    # kernel cannot call them. The builtins tl.reduce / tl.associative_scan with the standard sum combiner work in
    # both modes, and the interpreter recognizes that combiner and runs numpy's sum / cumsum.
    _sum_combine = tl.standard._sum_combine

    @triton.jit
    def _to_f32(x, IS_BF16: tl.constexpr):
        """A loaded block as float32; bfloat16 arrives as int16 bits and is widened exactly by a shift (the
        interpreter's own bfloat16 → float32 cast mishandles subnormals)."""
        if IS_BF16:
            return ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _rect_key(d, w, D_BF16: tl.constexpr, W_BF16: tl.constexpr):
        """int32 RECT keys of loaded ΔW and W blocks: |ΔW / W| bits in float32, -1 where the ratio is NaN."""
        # div_rn: IEEE round-to-nearest (Triton's `/` lowers to the approximate div.full.f32 on NVIDIA GPUs).
        ratio = tl.math.div_rn(_to_f32(d, D_BF16), _to_f32(w, W_BF16))
        bits = ratio.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        return tl.where(ratio != ratio, -1, bits)

    @triton.jit
    def _rect_hist_kernel(
        delta_ptr,
        weight_ptr,
        keys_ptr,
        hist_ptr,
        block_above_ptr,
        n,
        prefix,
        PREFIX_SHIFT: tl.constexpr,
        DIGIT_SHIFT: tl.constexpr,
        NBINS: tl.constexpr,
        FROM_KEYS: tl.constexpr,
        WRITE_KEYS: tl.constexpr,
        PER_BLOCK: tl.constexpr,
        D_BF16: tl.constexpr,
        W_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One radix level: histogram of digit (u >> DIGIT_SHIFT) & (NBINS - 1) over entries with u >> PREFIX_SHIFT
        == prefix, where u = key + 1. Atomically added into `hist_ptr[NBINS]`, or, with PER_BLOCK, stored per
        block in `hist_ptr[num_blocks, NBINS]` together with `block_above_ptr[block]` = #(u >> PREFIX_SHIFT > prefix).
        """
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if FROM_KEYS:
            key = tl.load(keys_ptr + offs, mask=mask, other=-1)
        else:
            d = tl.load(delta_ptr + offs, mask=mask, other=0)
            w = tl.load(weight_ptr + offs, mask=mask, other=0)
            key = _rect_key(d, w, D_BF16, W_BF16)  # masked lanes: 0/0, excluded by `mask` below
            if WRITE_KEYS:
                tl.store(keys_ptr + offs, key, mask=mask)
        u = key + 1
        high = u >> PREFIX_SHIFT
        live = mask & (high == prefix)
        # Dead entries are counted in bin 0 and taken out again: portable across Triton versions (no `mask=`
        # argument) and independent of how out-of-range values are treated.
        digit = tl.where(live, (u >> DIGIT_SHIFT) & (NBINS - 1), 0)
        bins = tl.arange(0, NBINS)
        dead = BLOCK - tl.reduce(live.to(tl.int32), 0, _sum_combine)
        hist = tl.histogram(digit, NBINS) - tl.where(bins == 0, dead, 0)
        if PER_BLOCK:
            tl.store(hist_ptr + pid.to(tl.int64) * NBINS + bins, hist)
            tl.store(block_above_ptr + pid, tl.reduce((mask & (high > prefix)).to(tl.int32), 0, _sum_combine))
        else:
            tl.atomic_add(hist_ptr + bins, hist, mask=hist > 0, sem="relaxed")

    @triton.jit
    def _rect_compact_kernel(
        delta_ptr,
        weight_ptr,
        keys_ptr,
        out_idx_ptr,
        out_val_ptr,
        block_out_ptr,
        block_tie_ptr,
        n,
        threshold,
        ties_needed,
        FROM_KEYS: tl.constexpr,
        D_BF16: tl.constexpr,
        W_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Writes the kept entries (key > threshold, and the first `ties_needed` entries with key == threshold in
        flat order) of one block at its offset `block_out_ptr[block]`; `block_tie_ptr[block]` = ties before it.
        Values are copied as loaded (bfloat16 as int16 bits), so they are bit-exact."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if FROM_KEYS:
            key = tl.load(keys_ptr + offs, mask=mask, other=-1)
        else:
            d = tl.load(delta_ptr + offs, mask=mask, other=0)
            w = tl.load(weight_ptr + offs, mask=mask, other=0)
            key = _rect_key(d, w, D_BF16, W_BF16)
        above = mask & (key > threshold)
        tie = mask & (key == threshold)
        tie_rank = tl.load(block_tie_ptr + pid) + tl.associative_scan(tie.to(tl.int32), 0, _sum_combine) - 1
        keep = above | (tie & (tie_rank < ties_needed))
        slot = tl.load(block_out_ptr + pid) + tl.associative_scan(keep.to(tl.int32), 0, _sum_combine) - 1
        if FROM_KEYS:
            d = tl.load(delta_ptr + offs, mask=keep, other=0)
        tl.store(out_idx_ptr + slot, offs, mask=keep)
        tl.store(out_val_ptr + slot, d, mask=keep)


def _check_inputs(delta: torch.Tensor, weight: torch.Tensor, k: int) -> int:
    """Validates the arguments of `rect_select` and returns k as a Python int.

    Raises:
        ValueError: on non-tensors, non-2-D or mismatched shapes, unsupported dtypes, different devices, or k
            outside [1, numel].
    """
    for name, t in (("delta", delta), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {list(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be a floating tensor of {SUPPORTED_DTYPES}, got {t.dtype}")
    if delta.shape != weight.shape:
        raise ValueError(f"weight shape {list(weight.shape)} does not match delta shape {list(delta.shape)}")
    if delta.device != weight.device:
        raise ValueError(f"delta is on {delta.device} but weight is on {weight.device}")
    if isinstance(k, bool):
        raise ValueError(f"k must be an integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an integer, got {k!r}") from None
    numel = delta.numel()
    if not 1 <= k <= numel:
        raise ValueError(f"k must be in [1, numel={numel}], got {k}")
    return k


def _pick_bucket(hist: torch.Tensor, need: int) -> tuple[int, int]:
    """The bucket holding the `need`-th largest entry of a histogram, and that entry's rank (1-based) within it."""
    counts = hist.to(device="cpu", dtype=torch.int64)
    above = counts.flip(0).cumsum(0).flip(0) - counts  # entries in strictly higher buckets
    bucket = int(torch.nonzero(above < need)[0])  # `above` is non-increasing and above[-1] = 0 < need
    return bucket, need - int(above[bucket])


def _rect_select_launch(
    delta: torch.Tensor, weight: torch.Tensor, k: int, *, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates, picks block sizes and the key layout, and runs the passes (see the module docstring).

    Args:
        block_size: elements per program (a power of two); by default 65536 under the interpreter, 4096 on CUDA.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed (pip install 'hf-edit-patch[triton]')")
    k = _check_inputs(delta, weight, k)
    if interpreting() != _DEFINED_INTERPRETED:
        raise RuntimeError(
            f"the rect_select kernels were defined with TRITON_INTERPRET={int(_DEFINED_INTERPRETED)} but it is now "
            f"{int(interpreting())}: set TRITON_INTERPRET before importing hf_edit_patch.kernels.rect_select"
        )
    if not _DEFINED_INTERPRETED and delta.device.type != "cuda":
        raise RuntimeError(f"compiled Triton kernels need CUDA tensors, got {delta.device}; set TRITON_INTERPRET=1")
    n = delta.numel()
    device = delta.device
    if k == n:  # everything is kept: no selection
        return torch.arange(n, device=device, dtype=torch.int64), delta.reshape(-1).clone()
    delta_flat = delta.contiguous().view(-1)
    weight_flat = weight.contiguous().view(-1)

    interp = interpreting() or device.type != "cuda"
    if block_size is None:
        block_size = min(_BLOCK_INTERPRETER if interp else _BLOCK_CUDA, max(128, triton.next_power_of_2(n)))
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    launch = {} if interp else {"num_warps": _NUM_WARPS_CUDA}
    with _launch_context(device, interp):
        return _run_passes(delta_flat, weight_flat, k, block_size, launch)


def _launch_context(device: torch.device, interp: bool) -> contextlib.ExitStack:
    """The tensors' CUDA device for the launches; under the interpreter, silences numpy's x / 0, 0 / 0 and overflow
    warnings (both are part of the semantics)."""
    stack = contextlib.ExitStack()
    if device.type == "cuda":
        stack.enter_context(torch.cuda.device(device))
    if interp:
        import numpy as np

        stack.enter_context(np.errstate(divide="ignore", invalid="ignore", over="ignore"))
    return stack


def _run_passes(
    delta_flat: torch.Tensor,
    weight_flat: torch.Tensor,
    k: int,
    block_size: int,
    launch: dict[str, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Three radix histogram passes, the threshold, the per-block offsets and the compaction pass."""
    n, device = delta_flat.numel(), delta_flat.device
    flags = {"D_BF16": delta_flat.dtype == torch.bfloat16, "W_BF16": weight_flat.dtype == torch.bfloat16}
    out_val = torch.empty(k, device=device, dtype=delta_flat.dtype)
    # bfloat16 travels as int16 bits: widened by a shift in the kernels, values copied bit for bit
    delta_in, out_val_in = (
        (delta_flat.view(torch.int16), out_val.view(torch.int16)) if flags["D_BF16"] else (delta_flat, out_val)
    )
    weight_in = weight_flat.view(torch.int16) if flags["W_BF16"] else weight_flat
    num_blocks = triton.cdiv(n, block_size)
    grid = (num_blocks,)
    from_keys = delta_flat.element_size() + weight_flat.element_size() >= _MATERIALIZE_KEYS_MIN_BYTES
    keys = torch.empty(n, device=device, dtype=torch.int32) if from_keys else delta_flat  # dummy when unused

    need, prefix, prefix_shift = k, 0, 31
    block_hist = block_above = None
    for level, (shift, bits) in enumerate(_DIGITS):
        nbins = 1 << bits
        last = level == len(_DIGITS) - 1
        if last:
            block_hist = torch.empty((num_blocks, nbins), device=device, dtype=torch.int32)
            block_above = torch.empty(num_blocks, device=device, dtype=torch.int32)
            hist_buf, above_buf = block_hist, block_above
        else:
            hist_buf = torch.zeros(nbins, device=device, dtype=torch.int32)
            above_buf = hist_buf  # unused
        _rect_hist_kernel[grid](
            delta_in,
            weight_in,
            keys,
            hist_buf,
            above_buf,
            n,
            prefix,
            PREFIX_SHIFT=prefix_shift,
            DIGIT_SHIFT=shift,
            NBINS=nbins,
            FROM_KEYS=from_keys and level > 0,
            WRITE_KEYS=from_keys and level == 0,
            PER_BLOCK=last,
            BLOCK=block_size,
            **flags,
            **launch,
        )
        bucket, need = _pick_bucket(block_hist.sum(0) if last else hist_buf, need)
        prefix, prefix_shift = (prefix << bits) | bucket, shift
    threshold, ties_needed = prefix - 1, need  # back from u = key + 1 to keys

    digit = prefix & ((1 << _DIGITS[-1][1]) - 1)
    block_ties = block_hist[:, digit].to(torch.int64)
    block_gt = block_above.to(torch.int64) + block_hist[:, digit + 1 :].sum(1, dtype=torch.int64)
    tie_offset = torch.cumsum(block_ties, 0) - block_ties
    kept_ties = torch.minimum(block_ties, (ties_needed - tie_offset).clamp_min(0))
    block_kept = block_gt + kept_ties
    out_offset = torch.cumsum(block_kept, 0) - block_kept

    out_idx = torch.empty(k, device=device, dtype=torch.int64)
    _rect_compact_kernel[grid](
        delta_in,
        weight_in,
        keys,
        out_idx,
        out_val_in,
        out_offset,
        tie_offset,
        n,
        threshold,
        ties_needed,
        FROM_KEYS=from_keys,
        BLOCK=block_size,
        **flags,
        **launch,
    )
    return out_idx, out_val


def rect_select_triton(delta: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RECT top-k selection with the Triton kernels (CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`).

    Args:
        delta: dense ΔW, 2-D, float16/bfloat16/float32/float64.
        weight: W, same shape and device as `delta` (any of the same dtypes).
        k: how many entries to keep, in [1, numel].

    Non-contiguous inputs are copied to row-major first (flat indices always refer to the row-major layout).

    Returns:
        `(flat_indices, values)`: int64 row-major flat indices, strictly increasing, exactly k of them, and ΔW's
        values there in ΔW's dtype.

    Raises:
        ValueError: on invalid inputs (see `rect_select`).
    """
    return _rect_select_launch(delta, weight, k)


def rect_select(delta: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k entries of ΔW with the largest |ΔW / W| (float32), ties to the lower row-major index.

    Runs the Triton kernels where `use_triton` says so, else the pure-torch reference twin
    (`rect_select_reference`). A 0/0 entry ranks lowest, a nonzero ΔW over a zero W above every finite ratio.

    Returns:
        `(flat_indices, values)`: int64 flat indices, strictly increasing, exactly k of them, and
        `delta.flatten()[flat_indices]` in ΔW's dtype. Zero values are kept.

    Raises:
        ValueError: when an input is not a 2-D float16/bfloat16/float32/float64 tensor, the shapes or devices
            differ, or k is not an integer in [1, numel].
        RuntimeError: when `HF_EDIT_PATCH_KERNELS=triton` forces a kernel that cannot run here.

    Example:
        ```python
        >>> import torch
        >>> w = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
        >>> dw = torch.tensor([[0.5, 0.5], [0.1, 0.5]])
        >>> idx, val = rect_select(dw, w, 2)   # 0.1 over a zero weight ranks first, then 0.5 / 1
        >>> idx.tolist(), val.tolist()
        ([0, 2], [0.5, 0.10000000149011612])
        ```
    """
    k = _check_inputs(delta, weight, k)
    if use_triton(delta, weight):
        return rect_select_triton(delta, weight, k)
    return rect_select_reference(delta, weight, k)


def rect_select_bytes(numel: int, k: int, delta_dtype: torch.dtype, weight_dtype: torch.dtype) -> int:
    """The floor on bytes moved by RECT selection: ΔW and W read once, k int64 indices and k values written."""
    delta_size = delta_dtype.itemsize
    return numel * (delta_size + weight_dtype.itemsize) + k * (8 + delta_size)
