"""Reference RECT selection (no Triton): exact top-k of |ΔW / W| with deterministic ties, fast on CPU.

Keys are the int32 bit patterns of the float32 scores |ΔW / W| (the bits of a non-negative float are monotone in
its value), with 0/0 mapped to -1 so that it ranks lowest; a nonzero ΔW over W == 0 gives +inf, above every finite
ratio. Ties go to the lower row-major index.

The exact k-th largest key is found without sorting the matrix: the k-th largest key of a strided sample brackets
it inside a narrow band (six standard deviations of the sample rank wide), one pass counts the keys above the band
and gathers the few inside it, and the threshold is picked among those. A second pass writes the kept positions,
already sorted. When the sample misleads (the band misses the k-th key, which the margin makes rare), an exact
`kthvalue` over all keys takes over.

On CPU both passes stream over blocks of 2¹⁷ entries whose keys stay in cache, so the matrix-sized intermediates
(scores, masks) are never allocated: on 2 cores a 4096×11008 matrix takes ~0.11 s, against ~0.14 s (warm) to
~1 s (first call) for NumPy's `argpartition`, which returns neither values nor sorted, tie-stable positions.
Other devices use the same algorithm with whole-tensor torch operations.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_EXP_MASK = 0x7F800000  # +inf; larger magnitudes are NaN
_SAMPLE = 1 << 18  # sample size for the threshold band
_SMALL = 1 << 20  # below this many entries, kthvalue on everything is cheap enough
_BLOCK = 1 << 17  # CPU block: 512 KiB of float32 keys, cache-resident
_NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)


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


def rect_keys(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys ordered like |ΔW / W| in float32 (0/0 → -1)."""
    score = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    torch.div(delta.detach().to(torch.float32), weight.detach().to(torch.float32), out=score)
    keys = score.view(torch.int32).view(-1)
    keys.bitwise_and_(0x7FFFFFFF)  # |score|: clear the sign bit
    keys.masked_fill_(keys > _EXP_MASK, -1)  # NaN (0/0) ranks lowest
    return keys


def _band_limits(sample: torch.Tensor | np.ndarray, n: int, k: int) -> tuple[int, int]:
    """Keys `(lo, hi)` that bracket the k-th largest of n keys, judged from a sample of them."""
    ordered = np.sort(np.asarray(sample, dtype=np.int64))[::-1]
    s = ordered.size
    q = k / n
    margin = 6.0 * math.sqrt(s * q * (1 - q)) + 32
    return int(ordered[min(s - 1, math.ceil(q * s + margin))]), int(ordered[max(0, math.floor(q * s - margin))])


def kth_largest(keys: torch.Tensor, k: int) -> tuple[int, int]:
    """`(t, above)`: the k-th largest of flat integer `keys` and how many keys are strictly greater."""
    n = keys.numel()
    if n > _SMALL:
        lo, hi = _band_limits(keys[:: n // _SAMPLE].cpu(), n, k)
        above_hi = int((keys > hi).sum())
        if above_hi < k:
            band = keys[(keys >= lo) & (keys <= hi)]
            if above_hi + band.numel() >= k:
                t = int(torch.kthvalue(band, band.numel() - (k - above_hi) + 1).values)
                return t, above_hi + int((band > t).sum())
    t = int(torch.kthvalue(keys, n - k + 1).values)
    return t, int((keys > t).sum())


def top_k_positions(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int64 positions of the k largest of flat integer `keys`; ties go to the lower position."""
    if k >= keys.numel():
        return torch.arange(keys.numel(), device=keys.device)
    t, above = kth_largest(keys, k)
    mask = keys > t
    if above < k:  # ties at the threshold: the lowest positions win
        mask[torch.nonzero(keys == t).flatten()[: k - above]] = True
    return torch.nonzero(mask).flatten()


class _CpuBlocks:
    """Float32 NumPy views of ΔW and W block by block, and the keys of a block in a reused buffer."""

    def __init__(self, delta: torch.Tensor, weight: torch.Tensor) -> None:
        self.delta = delta.detach().reshape(-1)
        self.weight = weight.detach().reshape(-1)
        self.n = self.delta.numel()
        self.buffer = np.empty(min(_BLOCK, self.n), dtype=np.float32)

    @staticmethod
    def _f32(t: torch.Tensor) -> np.ndarray:
        return t.numpy() if t.dtype == torch.float32 else t.to(torch.float32).numpy()

    def keys(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        out = self.buffer[: stop - start] if out is None else out
        np.divide(self._f32(self.delta[start:stop]), self._f32(self.weight[start:stop]), out=out)
        keys = out.view(np.int32)
        np.bitwise_and(keys, 0x7FFFFFFF, out=keys)
        nan = keys > _EXP_MASK
        if nan.any():
            keys[nan] = -1
        return keys

    def blocks(self):
        for start in range(0, self.n, _BLOCK):
            stop = min(start + _BLOCK, self.n)
            yield start, self.keys(start, stop)


def _select_cpu(delta: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    src = _CpuBlocks(delta, weight)
    n = src.n
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf and NaN are ranked on purpose
        if n <= _SMALL:
            return top_k_positions(torch.from_numpy(src.keys(0, n, np.empty(n, np.float32))), k)
        stride = n // _SAMPLE
        sample = np.empty(len(range(0, n, stride)), dtype=np.float32)
        np.divide(src._f32(src.delta[::stride]), src._f32(src.weight[::stride]), out=sample)
        sample_keys = sample.view(np.int32)
        np.bitwise_and(sample_keys, 0x7FFFFFFF, out=sample_keys)
        sample_keys[sample_keys > _EXP_MASK] = -1
        lo, hi = _band_limits(sample_keys, n, k)

        above, band = 0, []
        for _, keys in src.blocks():  # pass 1: count above the band, gather the band
            above += int(np.count_nonzero(keys > hi))
            band.append(keys[(keys >= lo) & (keys <= hi)])
        band_keys = np.concatenate(band)
        if not above < k <= above + band_keys.size:  # the sample misled: exact, slower
            keys = torch.from_numpy(src.keys(0, n, np.empty(n, np.float32)))
            return top_k_positions(keys, k)
        pick = band_keys.size - (k - above)
        t = int(np.partition(band_keys, pick)[pick])
        ties = k - above - int(np.count_nonzero(band_keys > t))

        flat = np.empty(k, dtype=np.int64)
        filled = 0
        for start, keys in src.blocks():  # pass 2: write the kept positions, in order
            keep = keys > t
            if ties:
                first = np.flatnonzero(keys == t)[:ties]
                keep[first] = True
                ties -= first.size
            idx = np.flatnonzero(keep)
            flat[filled : filled + idx.size] = idx + start
            filled += idx.size
    assert filled == k, "internal error: RECT selection kept a wrong number of entries"
    return torch.from_numpy(flat)


def gather(source: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """`source.reshape(-1)[flat]` (NumPy's take is ~2x faster on CPU, where the dtype allows)."""
    source = source.detach().reshape(-1)
    if source.device.type == "cpu" and source.dtype in _NUMPY_FLOATS:
        return torch.from_numpy(np.take(source.numpy(), flat.numpy()))
    return source[flat]


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
        flat = _select_cpu(delta, weight, k)
    else:
        flat = top_k_positions(rect_keys(delta, weight.to(delta.device)), k)
    return flat, gather(delta, flat)
