"""The `prune` stack regularizer's spectrum, computed from a Gram eigendecomposition, against its SVD twin."""

from __future__ import annotations

import math

import pytest
import torch

from hf_edit_patch.patch.stack_regularizers import stack_regularize
from hf_edit_patch.regularizers.stack import largest_singular_value, prune_restrain


def prune_by_svd(delta: torch.Tensor, weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """The definition, from a full float64 SVD of ΔW and of W."""
    d, w = delta.double(), weight.double()
    tau = threshold * float(torch.linalg.svdvals(w)[0])
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    kept = torch.where(s > tau, tau * (1.0 + torch.log(s / tau)), s)
    return ((u * kept) @ vh).to(delta.dtype)


def with_spectrum(rows: int, cols: int, sigmas: list[float], seed: int) -> torch.Tensor:
    """A rows×cols matrix with the given nonzero singular values and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    u = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, r, generator=gen, dtype=torch.float64))[0]
    return ((u * torch.tensor(sigmas, dtype=torch.float64)) @ v.T).float()


SHAPES = [(37, 11), (5, 29), (16, 16), (1, 9), (64, 3), (96, 160)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("threshold", [0.3, 1.0])
def test_prune_equals_its_svd_twin_on_odd_shapes(shape, threshold):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    weight = torch.randn(shape, generator=gen)
    delta = 2.0 * torch.randn(shape, generator=gen)  # full rank, several directions over τ
    out = prune_restrain(delta, weight, threshold=threshold)
    assert out is not delta
    torch.testing.assert_close(out, prune_by_svd(delta, weight, threshold), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("wide", [True, False], ids=["wide", "tall"])
def test_low_rank_and_repeated_singular_values(wide):
    weight = with_spectrum(48, 80, [1.0] * 48, seed=1)  # σ_max(W) = 1
    # A rank-5 update: a repeated pair over τ, one exactly at τ·(1 + 1e-3), one under, one at zero's door.
    delta = with_spectrum(48, 80, [4.0, 4.0, 0.501, 0.3, 1e-6], seed=2)
    if not wide:
        weight, delta = weight.T.contiguous(), delta.T.contiguous()
    out = prune_restrain(delta, weight, threshold=0.5)
    torch.testing.assert_close(out, prune_by_svd(delta, weight, 0.5), rtol=1e-5, atol=1e-5)
    s = torch.linalg.svdvals(out.double())
    big = 0.5 * (1.0 + math.log(4.0 / 0.5))
    torch.testing.assert_close(s[:5], torch.tensor([big, big, 0.5 * (1 + math.log(1.002)), 0.3, 1e-6],
                                                   dtype=torch.float64), rtol=1e-5, atol=1e-6)  # fmt: skip
    assert float(s[5:].abs().max()) < 1e-5  # no new directions


def test_an_update_under_the_bound_comes_back_as_the_very_tensor():
    weight = with_spectrum(20, 30, [2.0, 1.0], seed=3)
    # Frobenius norm over τ = 1, so the spectrum is computed, but no singular value exceeds it.
    delta = with_spectrum(20, 30, [0.9, 0.9, 0.9], seed=4)
    assert float(delta.norm()) > 1.0
    assert prune_restrain(delta, weight, threshold=0.5) is delta
    small = 1e-3 * delta  # under τ even in Frobenius norm: no decomposition needed
    assert prune_restrain(small, weight, threshold=0.5) is small


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_weight_and_update_dtype_matches_the_twin(dtype):
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(24, 40, generator=gen).to(dtype)
    delta = (3.0 * torch.randn(24, 40, generator=gen)).to(dtype)
    out = stack_regularize(delta, weight, "prune", settings={"threshold": 0.4})
    assert out.dtype == torch.float32 and out.shape == delta.shape
    expected = prune_by_svd(delta.float(), weight.float(), 0.4)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(1, 1), (3, 70), (70, 3), (33, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_largest_singular_value_matches_the_svd(shape, dtype):
    gen = torch.Generator().manual_seed(shape[0] + 7 * shape[1])
    m = torch.randn(shape, generator=gen).to(dtype)
    expected = float(torch.linalg.svdvals(m.double())[0])
    assert largest_singular_value(m) == pytest.approx(expected, rel=1e-12)
    assert largest_singular_value(torch.zeros(shape, dtype=dtype)) == 0.0


def test_a_weight_changed_in_place_gets_its_own_spectrum():
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(30, 50, generator=gen)
    delta = 4.0 * torch.randn(30, 50, generator=gen)
    first = prune_restrain(delta, weight, threshold=0.5)
    torch.testing.assert_close(prune_restrain(delta, weight, threshold=0.5), first, rtol=0, atol=0)  # remembered σ
    weight.mul_(2.0)  # the same tensor object, twice the spectrum: τ doubles
    again = prune_restrain(delta, weight, threshold=0.5)
    torch.testing.assert_close(again, prune_by_svd(delta, weight, 0.5), rtol=2e-5, atol=2e-5)
    assert float((again - first).abs().max()) > 0.1
