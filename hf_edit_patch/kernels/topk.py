"""Integer keys of the RECT score |ΔW / W| and an exact top-k over integer keys, without sorting a matrix.

Keys are the int32 bit patterns of the float32 scores |ΔW / W| (the bits of a non-negative float are monotone in
its value), with 0/0 mapped to -1 so that it ranks lowest; a nonzero ΔW over W == 0 gives +inf (`INF_KEY`), above
every finite ratio. Ties go to the lower position.

The exact k-th largest key is found without sorting: the k-th largest key of a sample (`sample_size`) brackets it
inside a narrow band (`band_limits`: 4.5 standard deviations of the sample rank on either side), and `kthvalue`
(on CPU `kth_smallest`: a histogram of the high bits, then a partition of one bucket) runs on the band only. The
sample is stratified (`sample_positions`: one position drawn at random from each of equal runs of the flat
matrix), not strided: a stride that divides the row length visits a few columns only, and the updates editors
produce are structured by column (ROME's u·vᵀ scales every column by its own v_j), so a strided sample of
|u·vᵀ / W| misplaces the band. When the sample misleads anyway (the band misses the k-th key, which the margin
makes rare), an exact `kthvalue` over all keys takes over.

Shared by the RECT reference selection (`rect_select_reference.py`) and the regularizers, which rank by the same
keys.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = [
    "INF_KEY",
    "NUMPY_FLOATS",
    "SAMPLE_SIZE",
    "band_limits",
    "gather",
    "kth_largest",
    "kth_smallest",
    "rect_keys",
    "sample_positions",
    "sample_size",
    "top_k_positions",
]

INF_KEY = 0x7F800000  # the key of +inf; larger keys are NaN bit patterns
SAMPLE_SIZE = 1 << 18  # sample size for the threshold band
NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)  # dtypes whose tensors have a NumPy view
_SMALL = 1 << 20  # below this many entries, kthvalue on everything is cheap enough
_BAND_DEVIATIONS = 4.5  # half-width of the threshold band, in standard deviations of the sample rank


def rect_keys(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys ordered like |ΔW / W| in float32 (0/0 → -1)."""
    score = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    torch.div(delta.detach().to(torch.float32), weight.detach().to(torch.float32), out=score)
    keys = score.view(torch.int32).view(-1)
    keys.bitwise_and_(0x7FFFFFFF)  # |score|: clear the sign bit
    keys.masked_fill_(keys > INF_KEY, -1)  # NaN (0/0) ranks lowest
    return keys


@functools.lru_cache(maxsize=8)
def sample_positions(n: int, size: int) -> np.ndarray:
    """`size` sorted flat positions in [0, n): one drawn uniformly from each of `size` equal runs (fixed seed).

    Every entry is equally likely to be drawn whatever the matrix's row length, so the sample's quantiles are
    unbiased on structured matrices too; the draw is fixed, so a selection's running time does not vary between
    calls (its result never depends on the sample). Read-only, cached per `(n, size)`.
    """
    size = max(1, min(size, n))
    edges = np.arange(size + 1, dtype=np.int64) * n // size
    draw = np.random.default_rng(0x5EC7).random(size)
    positions = edges[:-1] + (draw * (edges[1:] - edges[:-1])).astype(np.int64)
    positions.setflags(write=False)
    return positions


def sample_size(n: int) -> int:
    """How many keys to sample from n to place the threshold band: n / 64, between 2^12 and `SAMPLE_SIZE`.

    A larger sample costs more random reads and a larger histogram, and narrows the band (about 6 / sqrt(s) of the
    entries), which every entry is tested against and whose keys are gathered and ranked. Measured at 576x1536,
    n / 64 beat n / 16, n / 32 and n / 128 by 3-20%; on large matrices the cap keeps the band near 1%.
    """
    return max(1, min(n, SAMPLE_SIZE, max(1 << 12, n >> 6)))


def band_limits(sample: torch.Tensor | np.ndarray, n: int, k: int) -> tuple[int, int]:
    """Keys `(lo, hi)` that bracket the k-th largest of n keys, judged from a sample of them.

    The band spans 4.5 standard deviations of the sample rank on either side (plus 32 keys): the k-th largest key
    falls outside it with a probability below 10^-5 (a stratified sample varies less than the binomial bound), and
    then an exact selection takes over. Six deviations cost 8% more at 576x1536 (a wider band to gather and rank)
    for a miss that is already rare. Two order statistics, found by one histogram (`kth_smallest`).
    """
    keys = np.asarray(sample).reshape(-1)
    s = keys.size
    q = k / n
    margin = _BAND_DEVIATIONS * math.sqrt(s * q * (1 - q)) + 32
    # ranks from the top: lo is the sample's (q s + margin)-th largest, hi its (q s - margin)-th largest
    lo_at = s - 1 - min(s - 1, math.ceil(q * s + margin))
    hi_at = s - 1 - max(0, math.floor(q * s - margin))
    return kth_smallest(keys, lo_at, hi_at)


def kth_smallest(keys: np.ndarray, *picks: int) -> tuple[int, ...]:
    """`np.partition(keys, pick)[pick]` for each pick, for int32 keys, by one histogram of their high bits and a
    partition of the bucket that holds each: NumPy's introselect alone takes 2 to 7 ns a key as its pivots fall, a
    histogram about 1."""
    keys = np.asarray(keys, dtype=np.int32).reshape(-1)
    if keys.size <= 1 << 12:
        return tuple(int(x) for x in np.partition(keys, picks)[list(picks)])
    low = int(keys.min())
    offsets = np.subtract(keys, low, dtype=np.int64)
    shift = max(0, int(offsets.max()).bit_length() - 11)  # at most 2048 buckets
    buckets = np.right_shift(offsets, shift, out=offsets)
    up_to = np.cumsum(np.bincount(buckets))  # up_to[b]: keys in buckets 0..b
    found = []
    for pick in picks:
        b = int(np.searchsorted(up_to, pick, side="right"))
        first = int(up_to[b - 1]) if b else 0
        members = keys.take((buckets == b).nonzero()[0])
        found.append(int(np.partition(members, pick - first)[pick - first]))
    return tuple(found)


def kth_largest(keys: torch.Tensor, k: int) -> tuple[int, int]:
    """`(t, above)`: the k-th largest of flat integer `keys` and how many keys are strictly greater."""
    n = keys.numel()
    if n > _SMALL:
        where = torch.tensor(sample_positions(n, SAMPLE_SIZE), device=keys.device)
        lo, hi = band_limits(keys[where].cpu(), n, k)
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


def gather(source: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """`source.reshape(-1)[flat]` (NumPy's take is ~2x faster on CPU, where the dtype allows)."""
    source = source.detach().reshape(-1)
    if source.device.type == "cpu" and source.dtype in NUMPY_FLOATS:
        return torch.from_numpy(np.take(source.numpy(), flat.numpy()))
    return source[flat]
