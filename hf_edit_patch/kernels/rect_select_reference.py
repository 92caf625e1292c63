"""Pure-torch twin of `rect_select.py` (no Triton): exact top-k of |ΔW / W| with deterministic ties, fast on CPU.

The keys and the sampled threshold band `[lo, hi]` are those of `topk.py` (a stratified sample, unbiased on the
column-structured updates editors produce). On CPU the selection takes two passes over blocks of ΔW and W:

- pass 1 computes |ΔW / W| in float32, marks every key above the band in a bool mask, and gathers the keys and
  positions inside the band (about 5% of the entries at 576x1536, 1.2% from 2^24 entries). When the sample shows
  that a band edge is a heavily repeated key (many equal ratios: zeros in ΔW, a sea of ties), the entries equal to
  `lo` or `hi` are only counted, never gathered, so that a tie over most of the matrix costs no more than a
  distinct ratio;
- the threshold is picked from the counts and the gathered keys (`kth_smallest`: a histogram, then a partition
  of one bucket); the kept band entries are marked;
- pass 2 writes the marked positions, already sorted, and their values. A block that holds counted edge entries to
  keep recomputes its keys and marks them (the first ones in flat order, when the edge is the threshold).

When the sample misleads (the band misses the k-th key, which the margin makes rare), an exact top-k over all keys
takes over. Up to `_PARTITION_MAX` entries that exact path runs directly: one `np.partition` over so few keys costs
less than a sample and a band.

Blocks hold 2^18 entries. Comparisons run on the float32 ratios (a NaN compares false, so 0/0 is never above a
threshold nor inside a band), and 16-bit operands are widened per block (float16 by torch: NumPy's own float16
cast is about 20x slower). The mask and the block buffers are kept between calls: fresh memory is faulted in page
by page, which cost up to a quarter of a selection's time at 576x1536.

Up to `_SINGLE_THREAD_MAX` entries one thread does everything, pass 2 included as one `nonzero` and one `take`.
Larger matrices are shared by `torch.get_num_threads()` threads (NumPy releases the GIL in its loops): blocks are
handed out one at a time, a block still held by a thread that another process has descheduled is computed again
by the calling thread instead of waited for, and only the first copy of a block writes its results
(`cpu_parallel.py`). The calling thread faults the output arrays in while the others start pass 1. Other devices
use the same algorithm with whole-tensor torch operations (`top_k_positions`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from .cpu_parallel import Claims, parallel
from .topk import (
    INF_KEY,
    band_limits,
    gather,
    kth_smallest,
    rect_keys,
    sample_positions,
    sample_size,
    top_k_positions,
)

__all__ = ["NonFiniteDeltaError", "all_finite", "rect_select_reference"]

_PARTITION_MAX = 1 << 16  # up to this many entries, one np.partition over all keys beats a sample and a band
_SINGLE_THREAD_MAX = 1 << 21  # up to this many entries, a second thread gains under 6% (memory-bound passes)
_BLOCK = 1 << 18  # CPU block: 1 MiB of float32 ratios; smaller blocks cost more in Python and GIL hand-offs
_MASK_CACHE_MAX = 1 << 26  # the pass-1 mask (a byte per entry: 45 MB at 4096x11008) is kept up to this size
_TORCH_CHUNK = 1 << 15  # torch widens float16 on the calling thread below its parallel grain size (32768)
_NUMPY_VIEWS = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_EDGE_SHARE = 0.25  # count the band's edges instead of gathering them when they hold this share of its sample


def _check(delta: torch.Tensor, weight: torch.Tensor, k: int) -> None:
    if not isinstance(delta, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("delta and weight must be torch tensors")
    if delta.shape != weight.shape or delta.dim() != 2:
        raise ValueError(
            f"delta and weight must be 2-D of the same shape, got {list(delta.shape)} and {list(weight.shape)}"
        )
    if not (delta.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"delta and weight must be floating tensors, got {delta.dtype} and {weight.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= delta.numel():
        raise ValueError(f"k must be an integer in [1, {delta.numel()}] for a {list(delta.shape)} matrix, got {k!r}")


class NonFiniteDeltaError(ValueError):
    """ΔW holds an inf or a NaN, found by a selection asked to check (`check_finite=True`)."""


_INF_BITS = {
    np.dtype(t): bits for t, bits in ((np.float16, 0x7C00), (np.float32, 0x7F800000), (np.float64, 0x7FF << 52))
}
_INF_BITS[np.dtype(np.uint16)] = 0x7F80  # bfloat16, as its bits
_INT_VIEWS = {2: (np.int16, np.uint16), 4: (np.int32, np.uint32), 8: (np.int64, np.uint64)}


def all_finite(x: np.ndarray) -> bool:
    """Whether every entry of a flat float16/32/64 array (or bfloat16 as its uint16 bits) is finite.

    Two integer maxima of the bits and no float arithmetic (faster than a float sum): an IEEE float is finite iff
    its magnitude bits lie below inf's, i.e. iff, read as a signed integer, a positive one lies below inf's bits and,
    read as an unsigned integer, a negative one lies below -inf's.
    """
    if x.size == 0:
        return True
    inf = _INF_BITS[x.dtype]
    signed, unsigned = _INT_VIEWS[x.itemsize]
    return int(x.view(signed).max()) < inf and int(x.view(unsigned).max()) < inf | (1 << (8 * x.itemsize - 1))


def _drop_zeros(flat: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nonzero = (np.bitwise_and(values, 0x7FFF) if values.dtype == np.uint16 else values) != 0  # bfloat16 bits: ±0
    keep = nonzero.nonzero()[0]
    return (flat, values) if keep.size == flat.size else (flat.take(keep), values.take(keep))


def _flat_numpy(t: torch.Tensor) -> np.ndarray | None:
    """A flat NumPy view of a CPU tensor (bfloat16 as its uint16 bits), or None for dtypes NumPy cannot hold."""
    t = t.detach().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy() if t.dtype in _NUMPY_VIEWS else None


def _widen(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """A float32 operand for the division: float32 and float64 as they are (np.divide casts float64 to float32
    exactly), bfloat16 bits shifted into float32's high half, float16 widened by torch into `out`."""
    if x.dtype == np.uint16:
        np.left_shift(x, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    if x.dtype != np.float16:
        return x
    wide = torch.from_numpy(out)
    for start in range(0, x.size, _TORCH_CHUNK):
        stop = min(start + _TORCH_CHUNK, x.size)
        wide[start:stop].copy_(torch.from_numpy(x[start:stop]))
    return out


class _Scratch:
    """One thread's block buffers: the float32 ratios, three bool masks and two float32 widened operands."""

    def __init__(self, size: int) -> None:
        self.ratio = np.empty(size, np.float32)
        self.flags = (np.empty(size, bool), np.empty(size, bool), np.empty(size, bool))
        self.widened = (np.empty(size, np.float32), np.empty(size, np.float32))


class _CpuBlocks:
    """Flat NumPy views of ΔW and W and the float32 |ΔW / W| of any slice of them."""

    def __init__(self, delta: torch.Tensor, weight: torch.Tensor) -> None:
        self.delta, self.weight = _flat_numpy(delta), _flat_numpy(weight)
        if self.delta is None or self.weight is None:  # float8 and friends: widened once, exactly
            self.delta = _flat_numpy(delta.to(torch.float32)) if self.delta is None else self.delta
            self.weight = _flat_numpy(weight.to(torch.float32)) if self.weight is None else self.weight
        self.n = self.delta.size
        self.n_blocks = -(-self.n // _BLOCK)
        self._float32 = self.delta.dtype == self.weight.dtype == np.float32

    def block(self, i: int) -> slice:
        return slice(i * _BLOCK, min((i + 1) * _BLOCK, self.n))

    def ratio(self, where: slice | np.ndarray, out: np.ndarray, widened: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """float32 |ΔW / W| at `where` into `out`, an IEEE round-to-nearest division in float32 (NaN for 0/0)."""
        if isinstance(where, slice):
            d, w = self.delta[where], self.weight[where]
        else:  # take gathers faster than fancy indexing
            d, w = np.take(self.delta, where), np.take(self.weight, where)
        size = d.size
        out = out[:size]
        if self._float32:
            np.divide(d, w, out=out)
        else:
            np.divide(_widen(d, widened[0][:size]), _widen(w, widened[1][:size]), out=out, dtype=np.float32)
        return np.abs(out, out=out)

    def keys(self, where: slice | np.ndarray) -> np.ndarray:
        """int32 keys at `where` (NaN → -1), in fresh arrays: for the sample and the exact fallback."""
        size = len(range(self.n)[where]) if isinstance(where, slice) else where.size
        out = np.empty(size, np.float32)
        widened = (np.empty(size, np.float32), np.empty(size, np.float32))
        keys = self.ratio(where, out, widened).view(np.int32)
        nan = np.greater(keys, INF_KEY, out=np.empty(size, bool))
        if nan.any():
            np.copyto(keys, -1, where=nan)
        return keys


def _as_dtype(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """ΔW's values taken from its NumPy view, back in ΔW's dtype (bits reinterpreted, or narrowed back exactly)."""
    out = torch.from_numpy(values)
    if out.dtype == dtype:
        return out
    return out.view(dtype) if out.element_size() == dtype.itemsize else out.to(dtype)


def _fresh(n: int, dtype) -> np.ndarray:
    """`np.empty(n, dtype)` with its memory faulted in by this thread, one touch per 2 MiB.

    NumPy asks for transparent huge pages on large arrays; when worker threads fault the same fresh array in
    concurrently, the kernel's huge-page allocation can stall them for hundreds of milliseconds.
    """
    out = np.empty(n, dtype=dtype)
    out[:: max(1, (2 << 20) // out.itemsize)] = 0
    return out


def _threads(n_blocks: int) -> int:
    """Threads for a matrix of `n_blocks` blocks: one up to `_SINGLE_THREAD_MAX` entries, else torch's intra-op
    setting, at most one per block."""
    if n_blocks * _BLOCK <= _SINGLE_THREAD_MAX:
        return 1
    return max(1, min(torch.get_num_threads(), n_blocks))


class _Buffers:
    """Each thread's buffers, kept between calls: fresh memory would be faulted in on every pass."""

    def __init__(self) -> None:
        self._local = threading.local()

    def scratch(self) -> _Scratch:
        """This thread's block buffers."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.ratio.size != _BLOCK:
            scratch = self._local.scratch = _Scratch(_BLOCK)
        return scratch

    def mask(self, n: int) -> np.ndarray:
        """A bool buffer of n entries for the calling thread's selection, kept up to `_MASK_CACHE_MAX` bytes."""
        if n > _MASK_CACHE_MAX:
            return _fresh(n, bool)
        mask = getattr(self._local, "mask", None)
        if mask is None or mask.size < n:
            mask = self._local.mask = _fresh(max(n, 1 << 20), bool)
        return mask[:n]


_BUFFERS = _Buffers()


def _run(work: Callable[[int, _Scratch], None], claims: Claims, threads: int, first=None) -> None:
    parallel(work, claims, threads, scratch=_BUFFERS.scratch, first=first)


def _as_float(key: int) -> np.float32:
    return np.int32(key).view(np.float32)


class _Band:
    """Pass 1's findings for one band `[lo, hi]`: per block, the count above it (marked in `kept`), the counts of
    its edges (when counted) and the keys and positions strictly inside it (or inside it, edges included).

    With `shared`, other threads scan too and each block's mask is written by its commit only (see `Claims`);
    alone, this thread writes it in place."""

    def __init__(
        self, src: _CpuBlocks, lo: int, hi: int, count_edges: bool, shared: bool, check_finite: bool = False
    ) -> None:
        self.lo, self.hi, self.count_edges, self.shared, self.check_finite = lo, hi, count_edges, shared, check_finite
        self.kept = _BUFFERS.mask(src.n)
        nb = src.n_blocks
        self.above, self.at_hi, self.at_lo = (np.zeros(nb, np.int64) for _ in range(3))
        self.band_keys: list[np.ndarray] = [np.empty(0, np.int32)] * nb
        self.band_pos: list[np.ndarray] = [np.empty(0, np.int64)] * nb
        self.claims = Claims(nb)
        self._lo, self._hi = _as_float(lo), _as_float(hi)
        self._src = src

    def scan(self, i: int, scratch: _Scratch) -> None:
        where = self._src.block(i)
        ratio = self._src.ratio(where, scratch.ratio, scratch.widened)
        if self.check_finite and not all_finite(self._src.delta[where]):  # ΔW's block is in cache: no extra pass
            raise NonFiniteDeltaError("delta has non-finite entries")
        size = ratio.size
        flag, edge = scratch.flags[0][:size], scratch.flags[1][:size]
        mark = scratch.flags[2][:size] if self.shared else self.kept[where]
        # float comparisons order non-negative ratios as their keys do, and a NaN (0/0) compares false
        np.greater(ratio, self._hi, out=mark)
        above, at_hi, at_lo = np.count_nonzero(mark), 0, 0
        if self.count_edges:  # strictly inside: lo < r < hi, i.e. (r > lo) and not (r >= hi)
            np.greater_equal(ratio, self._hi, out=edge)
            at_hi = np.count_nonzero(edge) - above
            if self.lo < self.hi:
                at_lo = np.count_nonzero(np.equal(ratio, self._lo, out=flag))
                np.greater(ratio, self._lo, out=flag)
                np.not_equal(flag, edge, out=flag)  # edge (r >= hi) implies flag (r > lo)
            else:
                flag[:] = False
        else:  # lo <= r <= hi, i.e. (r >= lo) and not (r > hi)
            np.greater_equal(ratio, self._lo, out=flag)
            np.not_equal(flag, mark, out=flag)  # mark (r > hi) implies flag (r >= lo)
        pos = flag.nonzero()[0]  # flatnonzero of a 1-D array, without its Python wrappers
        found = (above, at_hi, at_lo, ratio.view(np.int32).take(pos), pos + where.start)
        self.claims.commit(i, self._store, i, mark if self.shared else None, found)

    def _store(self, i: int, mark: np.ndarray | None, found: tuple) -> None:
        if mark is not None:
            np.copyto(self.kept[self._src.block(i)], mark)
        self.above[i], self.at_hi[i], self.at_lo[i], self.band_keys[i], self.band_pos[i] = found


def _quota(counts: np.ndarray, needed: int) -> np.ndarray:
    """How many of each block's entries to keep so that the first `needed` in flat order are kept."""
    before = np.cumsum(counts) - counts
    return np.clip(needed - before, 0, counts)


def _mark_edges(src: _CpuBlocks, band: _Band, i: int, mark: np.ndarray, counts, scratch: _Scratch) -> None:
    """Marks, in block i's `mark`, the first `count` entries whose key is each counted edge (hi, then lo)."""
    ratio = src.ratio(src.block(i), scratch.ratio, scratch.widened)
    for edge, count in zip((band._hi, band._lo), counts, strict=True):
        if count:
            mark[np.flatnonzero(np.equal(ratio, edge, out=scratch.flags[0][: ratio.size]))[:count]] = True


def _two_pass(src: _CpuBlocks, k: int, lo: int, hi: int, count_edges: bool, threads: int, check_finite: bool):
    """`(flat, values, threshold key)` with the threshold inside `[lo, hi]`, or None when the k-th largest key is not
    there."""
    shared = threads > 1
    band = _Band(src, lo, hi, count_edges, shared, check_finite)
    out: list[np.ndarray] = []

    def outputs() -> None:  # fresh memory is zeroed by the kernel as it is faulted in: overlapped with the scan
        out.extend((_fresh(k, np.int64), _fresh(k, src.delta.dtype)))

    _run(band.scan, band.claims, threads, first=outputs if shared else None)
    keys_in = np.concatenate(band.band_keys)
    above, at_hi, inside, at_lo = int(band.above.sum()), int(band.at_hi.sum()), keys_in.size, int(band.at_lo.sum())
    add_hi, add_lo = np.zeros_like(band.at_hi), np.zeros_like(band.at_lo)
    keep_inside = None
    if k <= above:
        return None
    if k <= above + at_hi:  # the threshold is hi, a counted edge: its first k - above entries are kept
        add_hi, t = _quota(band.at_hi, k - above), hi
    elif k <= above + at_hi + inside:  # inside the band: every hi entry and the top of the band are kept
        add_hi = band.at_hi
        need = k - above - at_hi
        pick = inside - need
        (t,) = kth_smallest(keys_in, pick)
        keep_inside = keys_in > t
        tied = np.flatnonzero(keys_in == t)
        keep_inside[tied[: need - int(np.count_nonzero(keep_inside))]] = True  # positions ascend: lowest win
    elif k <= above + at_hi + inside + at_lo:  # the threshold is lo, a counted edge
        add_hi, keep_inside, t = band.at_hi, np.ones(inside, bool), lo
        add_lo = _quota(band.at_lo, k - above - at_hi - inside)
    else:
        return None
    kept_inside = np.empty(0, np.int64)
    if keep_inside is not None:  # NumPy's boolean indexing is several times slower than nonzero and take
        kept_inside = np.concatenate(band.band_pos).take(keep_inside.nonzero()[0])
    band.kept[kept_inside] = True

    if not shared:  # alone: mark the counted edges in place, then one pass over the whole mask
        scratch = _BUFFERS.scratch()
        for i in np.flatnonzero(add_hi + add_lo):
            _mark_edges(src, band, i, band.kept[src.block(i)], (add_hi[i], add_lo[i]), scratch)
        flat = band.kept.nonzero()[0]
        return flat, src.delta.take(flat), t

    starts = np.searchsorted(kept_inside, np.arange(src.n_blocks + 1) * _BLOCK)  # kept_inside ascends
    per_block = band.above + add_hi + add_lo + np.diff(starts)
    offsets = np.zeros(src.n_blocks + 1, dtype=np.int64)
    np.cumsum(per_block, out=offsets[1:])
    flat, values = out
    claims = Claims(src.n_blocks)

    def write(i: int, scratch: _Scratch) -> None:
        where = src.block(i)
        mark = band.kept[where]
        if add_hi[i] or add_lo[i]:  # counted edge entries to keep, marked in a copy: `kept` is only read here
            marked = scratch.flags[1][: mark.size]
            np.copyto(marked, mark)
            mark = marked
            _mark_edges(src, band, i, mark, (add_hi[i], add_lo[i]), scratch)
        pos = mark.nonzero()[0]
        claims.commit(
            i,
            _copy,
            flat,
            values,
            slice(int(offsets[i]), int(offsets[i + 1])),
            pos,
            where.start,
            np.take(src.delta[where], pos),
        )

    _run(write, claims, threads)
    return flat, values, t


def _copy(flat: np.ndarray, values: np.ndarray, out: slice, pos: np.ndarray, start: int, kept: np.ndarray) -> None:
    np.copyto(values[out], kept)
    np.add(pos, start, out=flat[out])


def _edges_are_heavy(sample: np.ndarray, lo: int, hi: int) -> bool:
    """Whether the band's edge keys are repeated enough in the sample that gathering them would be costly."""
    in_band = np.count_nonzero((sample >= lo) & (sample <= hi))
    at_edges = np.count_nonzero(sample == lo) + (np.count_nonzero(sample == hi) if hi != lo else 0)
    return at_edges > _EDGE_SHARE * max(in_band, 1)


def _select_by_partition(src: _CpuBlocks, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact, with every key in one array: the k-th largest by `np.partition` (an introselect), then one
    comparison. The fast path for small matrices, and the fallback when a sample misleads."""
    keys = src.keys(slice(None))
    t = int(np.partition(keys, src.n - k)[src.n - k])
    kept = keys > t
    above = int(np.count_nonzero(kept))
    if above < k:  # ties at the threshold: the lowest positions win
        kept[np.flatnonzero(keys == t)[: k - above]] = True
    flat = np.flatnonzero(kept)
    return flat, np.take(src.delta, flat), t


def _select_cpu(delta: torch.Tensor, weight: torch.Tensor, k: int, check_finite: bool, drop_zeros: bool):
    src = _CpuBlocks(delta, weight)
    n = src.n
    found = None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf and NaN are ranked on purpose
        if n > _PARTITION_MAX and k < n:
            sample = src.keys(sample_positions(n, sample_size(n)))
            lo, hi = band_limits(sample, n, k)
            # lo = -1 (0/0 entries at the threshold) and bands outside the finite keys take the exact path
            if 0 <= lo <= hi <= INF_KEY:
                threads = _threads(src.n_blocks)
                found = _two_pass(src, k, lo, hi, _edges_are_heavy(sample, lo, hi), threads, check_finite)
        if found is None:  # small, all kept, or the sample misled
            if check_finite and not all_finite(src.delta):
                raise NonFiniteDeltaError("delta has non-finite entries")
            found = _select_by_partition(src, k) if k < n else (np.arange(n), src.delta.copy(), -1)
    flat, values, t = found
    if drop_zeros and t <= 0:  # a kept key above 0 has a nonzero ΔW: zeros are possible only down to key 0
        flat, values = _drop_zeros(flat, values)
    return torch.from_numpy(flat), _as_dtype(values, delta.dtype)


def rect_select_reference(
    delta: torch.Tensor, weight: torch.Tensor, k: int, *, check_finite: bool = False, drop_zeros: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(flat_indices, values)` of the k entries with the largest |ΔW / W| (see the module docstring).

    `flat_indices` is int64 and strictly increasing; `values` are ΔW's entries there, in ΔW's dtype. With
    `check_finite`, an inf or a NaN in ΔW raises (checked while ΔW is read anyway); with `drop_zeros`, kept entries
    whose value is ±0 are left out (fewer than k remain).

    Raises:
        ValueError: for shapes that differ or are not 2-D, non-float inputs, or k outside [1, numel].
        NonFiniteDeltaError: with `check_finite`, when ΔW holds an inf or a NaN.
    """
    _check(delta, weight, k)
    if delta.device.type == "cpu" and weight.device.type == "cpu":
        return _select_cpu(delta, weight, k, check_finite, drop_zeros)
    if check_finite and not bool(torch.isfinite(delta).all()):
        raise NonFiniteDeltaError("delta has non-finite entries")
    n = delta.numel()
    flat = (
        torch.arange(n, device=delta.device)
        if k == n
        else top_k_positions(rect_keys(delta, weight.to(delta.device)), k)
    )
    values = gather(delta, flat)
    if drop_zeros:
        nonzero = torch.nonzero(values != 0).flatten()
        flat, values = flat[nonzero], values[nonzero]
    return flat, values
