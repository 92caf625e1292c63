"""Integer keys of the RECT score |ΔW / W| and an exact top-k over integer keys, without sorting a matrix.

Keys are the int32 bit patterns of the float32 scores |ΔW / W| (the bits of a non-negative float are monotone in
its value), with 0/0 mapped to -1 so that it ranks lowest; a nonzero ΔW over W == 0 gives +inf (`INF_KEY`), above
every finite ratio. Ties go to the lower position.

The exact k-th largest key is found without sorting: the k-th largest key of a sample brackets it inside a narrow
band (`band_limits`: six standard deviations of the sample rank wide), and `kthvalue` runs on the band only. The
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
    "rect_keys",
    "sample_positions",
    "top_k_positions",
]

INF_KEY = 0x7F800000  # the key of +inf; larger keys are NaN bit patterns
SAMPLE_SIZE = 1 << 18  # sample size for the threshold band
NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)  # dtypes whose tensors have a NumPy view
_SMALL = 1 << 20  # below this many entries, kthvalue on everything is cheap enough


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


def band_limits(sample: torch.Tensor | np.ndarray, n: int, k: int) -> tuple[int, int]:
    """Keys `(lo, hi)` that bracket the k-th largest of n keys, judged from a sample of them."""
    ordered = np.sort(np.asarray(sample).reshape(-1))[::-1]
    s = ordered.size
    q = k / n
    margin = 6.0 * math.sqrt(s * q * (1 - q)) + 32
    return int(ordered[min(s - 1, math.ceil(q * s + margin))]), int(ordered[max(0, math.floor(q * s - margin))])


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
