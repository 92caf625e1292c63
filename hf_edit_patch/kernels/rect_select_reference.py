"""Pure-torch twin of `rect_select.py` (no Triton): exact top-k of |ΔW / W| with deterministic ties, fast on CPU.

The keys and the sampled threshold band `[lo, hi]` are those of `topk.py` (a stratified sample, unbiased on the
column-structured updates editors produce). On CPU the selection takes two passes over blocks of ΔW and W:

- pass 1 computes |ΔW / W| in float32, marks every key above the band in a bool mask, and gathers the keys and
  positions inside the band (about 1% of the entries). When the sample shows that a band edge is a heavily
  repeated key (many equal ratios: zeros in ΔW, a sea of ties), the entries equal to `lo` or `hi` are only counted,
  never gathered, so that a tie over most of the matrix costs no more than a distinct ratio;
- the threshold is picked from the counts and the gathered keys; the kept band entries are marked;
- pass 2 writes the marked positions, already sorted, and their values. A block that holds counted edge entries to
  keep recomputes its keys and marks them (the first ones in flat order, when the edge is the threshold).

When the sample misleads (the band misses the k-th key, which the margin makes rare), an exact top-k over all keys
takes over. Up to 2^20 entries (`_PARTITION_MAX`) that exact path runs directly: the keys fit in cache, and one
`np.partition` over them costs less than the sample and the band.

Both passes stream over blocks of 2¹⁶ entries whose keys stay in L2, so no matrix-sized float intermediate is
allocated. Blocks are handed out one at a time to `torch.get_num_threads()` threads (NumPy releases the GIL), so a
thread that another process slows down holds up one block, not a fixed share of the matrix. Other devices use the
same algorithm with whole-tensor torch operations (`top_k_positions`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .topk import INF_KEY, SAMPLE_SIZE, band_limits, gather, rect_keys, sample_positions, top_k_positions

__all__ = ["rect_select_reference"]

_PARTITION_MAX = 1 << 20  # up to this many entries, the keys fit in cache and one np.partition beats sampling
_BLOCK = 1 << 17  # CPU block: 256 KiB of float32 keys, L2-resident with its ΔW and W slices
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


def _flat_numpy(t: torch.Tensor) -> np.ndarray | None:
    """A flat NumPy view of a CPU tensor (bfloat16 as its uint16 bits), or None for dtypes NumPy cannot hold."""
    t = t.detach().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy() if t.dtype in _NUMPY_VIEWS else None


class _Scratch:
    """One thread's block buffers: the float32 ratios, an int32 and two bool scratch arrays, bfloat16 widening."""

    def __init__(self) -> None:
        self.ratio = np.empty(_BLOCK, np.float32)
        self.int32 = np.empty(_BLOCK, np.int32)
        self.bool = np.empty(_BLOCK, bool)
        self.widened = (np.empty(_BLOCK, np.uint32), np.empty(_BLOCK, np.uint32))


class _CpuBlocks:
    """Flat NumPy views of ΔW and W and the float32 |ΔW / W| of any slice of them."""

    def __init__(self, delta: torch.Tensor, weight: torch.Tensor) -> None:
        self.delta, self.weight = _flat_numpy(delta), _flat_numpy(weight)
        if self.delta is None or self.weight is None:  # float8 and friends: widened once, exactly
            self.delta = _flat_numpy(delta.to(torch.float32)) if self.delta is None else self.delta
            self.weight = _flat_numpy(weight.to(torch.float32)) if self.weight is None else self.weight
        self.n = self.delta.size
        self.n_blocks = -(-self.n // _BLOCK)

    def block(self, i: int) -> slice:
        return slice(i * _BLOCK, min((i + 1) * _BLOCK, self.n))

    @staticmethod
    def _operand(x: np.ndarray, out: np.ndarray) -> np.ndarray:
        if x.dtype != np.uint16:  # float16/32/64: np.divide casts it to float32 exactly (dtype=float32)
            return x
        np.left_shift(x, 16, out=out, dtype=np.uint32)  # bfloat16 bits are the high half of float32's
        return out.view(np.float32)

    def ratio(self, where: slice | np.ndarray, out: np.ndarray, widened: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """float32 |ΔW / W| at `where` into `out`, an IEEE round-to-nearest division in float32 (NaN for 0/0)."""
        d, w = self.delta[where], self.weight[where]
        size = d.size
        out = out[:size]
        np.divide(self._operand(d, widened[0][:size]), self._operand(w, widened[1][:size]), out=out, dtype=np.float32)
        return np.abs(out, out=out)

    def keys(self, where: slice | np.ndarray) -> np.ndarray:
        """int32 keys at `where` (NaN → -1), in fresh arrays: for the sample and the exact fallback."""
        size = len(range(self.n)[where]) if isinstance(where, slice) else where.size
        out = np.empty(size, np.float32)
        widened = (np.empty(size, np.uint32), np.empty(size, np.uint32))
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
    """Threads for a matrix of `n_blocks` blocks: torch's intra-op setting, at least 2 blocks each."""
    return max(1, min(torch.get_num_threads(), n_blocks // 2))


class _Workers:
    """A thread pool kept between calls (a selection on a small matrix takes about a millisecond: starting threads
    for each pass would cost a good part of it), dropped in a forked child, whose copy would have no threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        self._local = threading.local()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock, self._pool, self._size = threading.Lock(), None, 0

    def pool(self, size: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._size < size:
                old, self._pool, self._size = self._pool, ThreadPoolExecutor(size, "rect-select"), size
                if old is not None:
                    old.shutdown(wait=False)
            return self._pool

    def scratch(self) -> _Scratch:
        """This thread's block buffers, kept between calls (fresh ones would be faulted in on every pass)."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.ratio.size < _BLOCK:
            scratch = self._local.scratch = _Scratch()
        return scratch


_WORKERS = _Workers()


def _parallel(work: Callable[[int, _Scratch], None], n_items: int, threads: int) -> None:
    """Runs `work(i, scratch)` for every i in `range(n_items)` on `threads` threads (this one included).

    Items are handed out one at a time from a shared counter, in order: when another process slows one thread
    down, the others take over its share instead of waiting for it.
    """
    lock, counter = threading.Lock(), iter(range(n_items))

    def worker() -> None:
        scratch = _WORKERS.scratch()
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # NumPy's error state is per thread
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                work(i, scratch)

    if threads <= 1:
        worker()
        return
    pool = _WORKERS.pool(threads - 1)
    futures = [pool.submit(worker) for _ in range(threads - 1)]
    try:
        worker()
    finally:
        for future in futures:  # every worker is done with the shared arrays before they are used or dropped
            future.exception()
    for future in futures:
        future.result()


class _Band:
    """Pass 1's findings for one band `[lo, hi]`: per block, the count above it (marked in `kept`), the counts of
    its edges (when counted) and the keys and positions strictly inside it (or inside it, edges included)."""

    def __init__(self, src: _CpuBlocks, lo: int, hi: int, count_edges: bool) -> None:
        self.lo, self.hi, self.count_edges = lo, hi, count_edges
        self.kept = _fresh(src.n, bool)
        nb = src.n_blocks
        self.above, self.at_hi, self.at_lo = (np.zeros(nb, np.int64) for _ in range(3))
        self.band_keys: list[np.ndarray] = [np.empty(0, np.int32)] * nb
        self.band_pos: list[np.ndarray] = [np.empty(0, np.int64)] * nb
        # inside the band: 0 <= key - base < width, one unsigned comparison
        base, width = (lo + 1, hi - lo - 1) if count_edges else (lo, hi - lo + 1)
        self._base, self._width = np.int32(base), np.uint32(max(width, 0))
        self._hi_float = np.int32(hi).view(np.float32)
        self._src = src

    def scan(self, i: int, scratch: _Scratch) -> None:
        where = self._src.block(i)
        ratio = self._src.ratio(where, scratch.ratio, scratch.widened)
        size = ratio.size
        keys, mark, flag = ratio.view(np.int32), self.kept[where], scratch.bool[:size]
        np.greater(ratio, self._hi_float, out=mark)  # NaN (0/0) compares false: never above
        self.above[i] = np.count_nonzero(mark)
        if self.count_edges:
            self.at_hi[i] = np.count_nonzero(np.equal(keys, self.hi, out=flag))
            if self.lo < self.hi:
                self.at_lo[i] = np.count_nonzero(np.equal(keys, self.lo, out=flag))
        shifted = np.subtract(keys, self._base, out=scratch.int32[:size])
        np.less(shifted.view(np.uint32), self._width, out=flag)  # NaN bit patterns lie above hi <= INF_KEY
        pos = np.flatnonzero(flag)
        self.band_keys[i] = keys[pos]
        self.band_pos[i] = pos + where.start


def _quota(counts: np.ndarray, needed: int) -> np.ndarray:
    """How many of each block's entries to keep so that the first `needed` in flat order are kept."""
    before = np.cumsum(counts) - counts
    return np.clip(needed - before, 0, counts)


def _two_pass(src: _CpuBlocks, k: int, lo: int, hi: int, count_edges: bool, threads: int):
    """`(flat, values)` with the threshold inside `[lo, hi]`, or None when the k-th largest key is not there."""
    band = _Band(src, lo, hi, count_edges)
    _parallel(band.scan, src.n_blocks, threads)
    keys_in = np.concatenate(band.band_keys)
    above, at_hi, inside, at_lo = int(band.above.sum()), int(band.at_hi.sum()), keys_in.size, int(band.at_lo.sum())
    add_hi, add_lo = np.zeros_like(band.at_hi), np.zeros_like(band.at_lo)
    keep_inside = None
    if k <= above:
        return None
    if k <= above + at_hi:  # the threshold is hi, a counted edge: its first k - above entries are kept
        add_hi = _quota(band.at_hi, k - above)
    elif k <= above + at_hi + inside:  # inside the band: every hi entry and the top of the band are kept
        add_hi = band.at_hi
        need = k - above - at_hi
        pick = inside - need
        t = int(np.partition(keys_in, pick)[pick])
        keep_inside = keys_in > t
        tied = np.flatnonzero(keys_in == t)
        keep_inside[tied[: need - int(np.count_nonzero(keep_inside))]] = True  # positions ascend: lowest win
    elif k <= above + at_hi + inside + at_lo:  # the threshold is lo, a counted edge
        add_hi, keep_inside = band.at_hi, np.ones(inside, bool)
        add_lo = _quota(band.at_lo, k - above - at_hi - inside)
    else:
        return None
    kept_inside = np.concatenate(band.band_pos)[keep_inside] if keep_inside is not None else np.empty(0, np.int64)
    band.kept[kept_inside] = True
    per_block = band.above + add_hi + add_lo + np.bincount(kept_inside // _BLOCK, minlength=src.n_blocks)
    offsets = np.zeros(src.n_blocks + 1, dtype=np.int64)
    np.cumsum(per_block, out=offsets[1:])

    flat = _fresh(k, np.int64)
    values = _fresh(k, src.delta.dtype)

    def write(i: int, scratch: _Scratch) -> None:
        where = src.block(i)
        mark = band.kept[where]
        if add_hi[i] or add_lo[i]:  # counted edge entries to keep: find them again
            keys = src.ratio(where, scratch.ratio, scratch.widened).view(np.int32)
            for edge, count in ((hi, add_hi[i]), (lo, add_lo[i])):
                if count:
                    mark[np.flatnonzero(np.equal(keys, edge, out=scratch.bool[: keys.size]))[:count]] = True
        pos = np.flatnonzero(mark)
        out = slice(int(offsets[i]), int(offsets[i + 1]))
        np.take(src.delta[where], pos, out=values[out], mode="clip")  # "raise" with out= buffers a copy
        np.add(pos, where.start, out=flat[out])

    _parallel(write, src.n_blocks, threads)
    return flat, values


def _edges_are_heavy(sample: np.ndarray, lo: int, hi: int) -> bool:
    """Whether the band's edge keys are repeated enough in the sample that gathering them would be costly."""
    in_band = np.count_nonzero((sample >= lo) & (sample <= hi))
    at_edges = np.count_nonzero(sample == lo) + (np.count_nonzero(sample == hi) if hi != lo else 0)
    return at_edges > _EDGE_SHARE * max(in_band, 1)


def _select_by_partition(src: _CpuBlocks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact, with every key in one array: the k-th largest by `np.partition` (an introselect, AVX-512 in NumPy 2),
    then one comparison. On one thread it is ~1.5x faster than the two passes at 576x1536, ~1.2x slower at 10^7
    entries (measured on 2 cores beside a test run)."""
    keys = src.keys(slice(None))
    t = int(np.partition(keys, src.n - k)[src.n - k])
    kept = keys > t
    above = int(np.count_nonzero(kept))
    if above < k:  # ties at the threshold: the lowest positions win
        kept[np.flatnonzero(keys == t)[: k - above]] = True
    flat = np.flatnonzero(kept)
    return flat, np.take(src.delta, flat)


def _select_cpu(delta: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = _CpuBlocks(delta, weight)
    n = src.n
    found = None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf and NaN are ranked on purpose
        if n > _PARTITION_MAX:
            sample = src.keys(sample_positions(n, min(SAMPLE_SIZE, n // 16)))
            lo, hi = band_limits(sample, n, k)
            # lo = -1 (0/0 entries at the threshold) and bands outside the finite keys take the exact path
            if 0 <= lo <= hi <= INF_KEY:
                found = _two_pass(src, k, lo, hi, _edges_are_heavy(sample, lo, hi), _threads(src.n_blocks))
        if found is None:  # small, or the sample misled
            found = _select_by_partition(src, k)
    return torch.from_numpy(found[0]), _as_dtype(found[1], delta.dtype)


def rect_select_reference(delta: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(flat_indices, values)` of the k entries with the largest |ΔW / W| (see the module docstring).

    `flat_indices` is int64 and strictly increasing; `values` are ΔW's entries there, in ΔW's dtype.

    Raises:
        ValueError: for shapes that differ or are not 2-D, non-float inputs, or k outside [1, numel].
    """
    _check(delta, weight, k)
    n = delta.numel()
    if k == n:
        flat = torch.arange(n, device=delta.device)
    elif delta.device.type == "cpu" and weight.device.type == "cpu":
        return _select_cpu(delta, weight, k)
    else:
        flat = top_k_positions(rect_keys(delta, weight.to(delta.device)), k)
    return flat, gather(delta, flat)
