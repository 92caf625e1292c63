"""RECT and its baselines against an independent oracle: exact positions, deterministic ties, zero weights."""

from __future__ import annotations

import math

import pytest
import torch

import hf_edit_patch as hep
from hf_edit_patch.kernels import rect_select_reference as ref
from hf_edit_patch.kernels.topk import rect_keys, sample_positions, top_k_positions

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 7), (7, 13), (33, 65), (129, 257), (1031, 1100)]  # the last one takes the sampled CPU path


def oracle_positions(delta: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by float32 |ΔW/W| via a stable full sort: NaN (0/0) lowest, ties to the lower index."""
    score = (delta.float() / weight.float()).abs().reshape(-1).double()
    score = torch.where(torch.isnan(score), torch.full_like(score, -1.0), score)
    order = torch.sort(-score, stable=True).indices[:k]
    return torch.sort(order).values


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape:
        return f"{got.numel()} positions selected, expected {want.numel()}"
    bad = (got != want).nonzero().flatten()
    return f"{bad.numel()} of {want.numel()} positions differ, first at {bad[:5].tolist()}"


def _inputs(shape, dtype, seed=0, zeros=True):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.randn(shape, generator=gen).to(dtype)
    if zeros:
        weight.view(-1)[::5] = 0  # nonzero ΔW over W == 0: ratio +inf
        delta.view(-1)[::10] = 0  # and every other of them 0/0
    return delta, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_selection_matches_oracle(shape, dtype):
    delta, weight = _inputs(shape, dtype)
    n = delta.numel()
    for k in sorted({1, max(1, round(0.05 * n)), max(1, round(0.4 * n)), n}):
        flat, values = ref.rect_select_reference(delta, weight, k)
        want = oracle_positions(delta, weight, k)
        assert torch.equal(flat, want), f"k={k}: {_mismatch(flat, want)}"
        assert torch.equal(values, delta.reshape(-1)[want])


def test_zero_weights_rank_nonzero_delta_first_and_zero_over_zero_last():
    weight = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    delta = torch.tensor([[0.0, 1e-6, 3.0, 5.0]])  # scores: nan, 1e-6, inf, 2.5
    assert ref.rect_select_reference(delta, weight, 1)[0].tolist() == [2]
    assert ref.rect_select_reference(delta, weight, 2)[0].tolist() == [2, 3]
    assert ref.rect_select_reference(delta, weight, 3)[0].tolist() == [1, 2, 3]
    # through the public function the 0/0 entry (ΔW == 0) is never stored
    assert hep.rect_sparsify(delta, weight, keep_ratio=1.0).flat_indices.tolist() == [1, 2, 3]


def test_ties_go_to_the_lower_index_on_the_sampled_path():
    weight = torch.ones(1200, 1000)
    delta = torch.full((1200, 1000), 0.5)
    delta.view(-1)[-10:] = 0.75  # ten clear winners at the end, then a sea of ties
    flat, _ = ref.rect_select_reference(delta, weight, 100)
    assert flat.tolist() == list(range(90)) + list(range(1_199_990, 1_200_000))


@pytest.mark.parametrize("keep", [1e-9, 0.0001, 0.2, 0.4, 0.999, 1.0])
def test_rect_sparsify_keeps_round_keep_ratio_entries(keep):
    delta, weight = _inputs((97, 131), torch.float32, zeros=False)
    out = hep.rect_sparsify(delta, weight, keep_ratio=keep)
    n = delta.numel()
    assert out.nnz == min(n, max(1, math.floor(keep * n + 0.5)))
    assert torch.equal(out.flat_indices, oracle_positions(delta, weight, out.nnz))
    assert out.dtype == delta.dtype


def test_rect_keeps_more_of_a_rank_one_update_than_random_at_equal_budget():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 96, generator=gen)
    delta = torch.outer(torch.randn(64, generator=gen), torch.randn(96, generator=gen)) * 0.01
    rect = hep.rect_sparsify(delta, weight, 0.2)
    rand = hep.random_sparsify(delta, 0.2, seed=0)
    ratio = (delta / weight).abs().reshape(-1)
    assert rect.nnz == rand.nnz
    assert ratio[rect.flat_indices].sum() > ratio[rand.flat_indices].sum()


def test_random_is_seeded_and_pca_follows_its_definition():
    delta, weight = _inputs((40, 50), torch.float32, zeros=False)
    a = hep.random_sparsify(delta, 0.3, seed=7)
    assert a.equal(hep.random_sparsify(delta, 0.3, seed=7))
    assert not a.equal(hep.random_sparsify(delta, 0.3, seed=8))
    assert a.nnz == 600
    p = hep.pca_sparsify(delta, 0.3, rank=2)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    approx = (u[:, :2] * s[:2]) @ vh[:2]
    want = torch.sort(torch.sort(-approx.abs().reshape(-1), stable=True).indices[:600]).values
    assert torch.equal(p.flat_indices, want)
    assert torch.allclose(p.values, approx.reshape(-1)[want])
    assert hep.pca_sparsify(delta, 0.3).nnz == 600  # default rank round(0.3 · 40) = 12


@pytest.mark.parametrize("regularizer", ["rect", "random", "pca"])
def test_every_regularizer_is_selectable_in_from_deltas(llama, regularizer):
    name = "model.layers.0.mlp.down_proj"
    w = llama.get_submodule(name).weight
    patch = hep.EditPatch.from_deltas({name: torch.randn_like(w)}, llama, keep_ratio=0.25, regularizer=regularizer)
    assert patch.config.regularizer == regularizer and patch.nnz == round(0.25 * w.numel())


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.4", None])
def test_keep_ratio_is_validated(bad):
    delta, weight = _inputs((4, 4), torch.float32)
    with pytest.raises(ValueError, match="keep_ratio"):
        hep.rect_sparsify(delta, weight, keep_ratio=bad)


def test_non_finite_delta_is_rejected():
    delta, weight = _inputs((4, 4), torch.float32, zeros=False)
    delta[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite entries \\(1 of them\\)"):
        hep.rect_sparsify(delta, weight, 0.5)
    huge = torch.full((4, 4), 3e38)  # finite, but its sum overflows: still accepted
    assert hep.rect_sparsify(huge, weight, 0.5).nnz == 8


@pytest.mark.parametrize("band", ["above", "below", "empty"])
def test_a_misleading_sample_falls_back_to_the_exact_path(monkeypatch, band):
    delta, weight = _inputs((1031, 1100), torch.float32)
    k = round(0.3 * delta.numel())
    want = oracle_positions(delta, weight, k)
    wrong = {"above": (2**31 - 2, 2**31 - 1), "below": (-1, 0), "empty": (5, 4)}[band]
    monkeypatch.setattr(ref, "band_limits", lambda *args: wrong)
    flat, _ = ref.rect_select_reference(delta, weight, k)
    assert torch.equal(flat, want), _mismatch(flat, want)


@pytest.mark.parametrize("device_path", ["cpu-blocks", "torch"])
def test_both_reference_paths_agree_on_heavy_ties(monkeypatch, device_path):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randint(-3, 4, (1100, 1000), generator=gen).float()  # many zeros, few distinct ratios
    delta = torch.randint(-2, 3, (1100, 1000), generator=gen).float()
    k = 400_000
    want = oracle_positions(delta, weight, k)
    if device_path == "torch":  # the whole-tensor path used for non-CPU devices, run on CPU
        flat = top_k_positions(rect_keys(delta, weight), k)
    else:
        flat, _ = ref.rect_select_reference(delta, weight, k)
    assert torch.equal(flat, want), _mismatch(flat, want)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_cpu_path_is_exact_with_any_thread_count(monkeypatch, threads, dtype):
    """Small blocks and forced threads: zeros, 0/0, infinities and ties spread over many blocks."""
    monkeypatch.setattr(ref, "_BLOCK", 1 << 12)
    monkeypatch.setattr(ref, "_threads", lambda n_blocks: threads)
    gen = torch.Generator().manual_seed(threads)
    weight = torch.randn(1009, 1117, generator=gen)
    weight[torch.rand(weight.shape, generator=gen) < 0.05] = 0.0  # nonzero ΔW over W == 0 ranks first
    delta = torch.randn(weight.shape, generator=gen)
    delta[torch.rand(weight.shape, generator=gen) < 0.05] = 0.0  # some 0/0: rank last
    delta[100:300] = weight[100:300] * 0.5  # a large tie at one ratio
    delta, weight = delta.to(dtype), weight.to(dtype)
    for keep in (1e-6, 0.05, 0.4, 0.93, 0.999999):
        k = max(1, round(keep * delta.numel()))
        want = oracle_positions(delta, weight, k)
        flat, values = ref.rect_select_reference(delta, weight, k)
        assert torch.equal(flat, want), f"keep {keep}: " + _mismatch(flat, want)
        assert values.dtype == dtype and torch.equal(values, delta.reshape(-1)[want])


# ------------------------------------------------------------------------------------------------ structured updates


def _structured(kind: str, shape=(1040, 1024), dtype=torch.float32, seed=0):
    """ΔW of the kinds editors produce, over W like a trained weight.

    1040 x 1024 takes the sampled path (over 2^20 entries), and a stride of n // sample size = 16 divides the row
    length: a strided sample sees 64 of the 1024 columns only, and misplaces the band on a rank-one ΔW.
    """
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    weight = torch.randn(shape, generator=gen) * 0.02
    if kind == "rank_one":  # ROME: u·vᵀ, with some rows of u exactly zero (ΔW == 0 there: tied keys 0)
        u = torch.randn(rows, 1, generator=gen) * (torch.rand(rows, 1, generator=gen) < 0.9)
        delta = u @ torch.randn(1, cols, generator=gen)
    elif kind == "low_rank":  # MEMIT: a batch of 64 requests spread over one layer
        delta = torch.randn(rows, 64, generator=gen) @ torch.randn(64, cols, generator=gen)
    elif kind == "sparse_columns":  # most columns untouched: ΔW == 0 on 75% of the entries, one sea of ties
        delta = torch.randn(shape, generator=gen) * (torch.rand(1, cols, generator=gen) < 0.25)
    else:  # dense, as fine-tuning returns
        delta = torch.randn(shape, generator=gen)
    return (delta * 1e-3).to(dtype), weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["rank_one", "low_rank", "sparse_columns", "dense"])
def test_structured_updates_are_exact_and_the_sample_brackets_the_threshold(monkeypatch, kind, dtype):
    """The kept set equals the exact oracle's, and the sampled band holds the threshold: no exact fallback."""
    delta, weight = _structured(kind, dtype=dtype)
    fallbacks = []
    exact = ref._select_by_partition
    monkeypatch.setattr(ref, "_select_by_partition", lambda *args: fallbacks.append(args) or exact(*args))
    n = delta.numel()
    for keep in (0.01, 0.4, 0.9):
        k = round(keep * n)
        flat, values = ref.rect_select_reference(delta, weight, k)
        want = oracle_positions(delta, weight, k)
        assert torch.equal(flat, want), f"{kind} keep {keep}: " + _mismatch(flat, want)
        assert values.dtype == dtype and torch.equal(values, delta.reshape(-1)[want])
    assert not fallbacks, f"{kind}: the sampled band missed the threshold {len(fallbacks)} times of 3"


@pytest.mark.parametrize("threads", [1, 3])
def test_a_sea_of_ties_is_counted_not_gathered(monkeypatch, threads):
    """ΔW == 0 on 75% of the entries and k beyond the nonzero ones: the threshold is key 0, tied ~10^6 times.

    The band's edges are counted per block and the first tied entries are found again in the blocks that keep
    them; the band itself stays small."""
    monkeypatch.setattr(ref, "_threads", lambda n_blocks: threads)
    gathered = []
    scan = ref._Band.scan

    def spy(self, i, scratch):
        scan(self, i, scratch)
        gathered.append((self.count_edges, self.band_keys[i].size))

    monkeypatch.setattr(ref._Band, "scan", spy)
    delta, weight = _structured("sparse_columns")
    n = delta.numel()
    for k in (round(0.4 * n), round(0.4 * n) + 1, n - 1):
        gathered.clear()
        flat, _ = ref.rect_select_reference(delta, weight, k)
        want = oracle_positions(delta, weight, k)
        assert torch.equal(flat, want), f"k={k}: " + _mismatch(flat, want)
        assert gathered and all(counted for counted, _ in gathered), f"k={k}: the tied edge was gathered"
        size = sum(size for _, size in gathered)
        assert size < 0.05 * n, f"k={k}: {size} band entries gathered of {n}"


def test_sample_positions_cover_every_stratum_once_and_do_not_change():
    n, size = 1040 * 1024, 1040 * 1024 // 16
    pos = sample_positions(n, size)
    stratum = pos * size // n
    assert pos.dtype.name == "int64" and pos.size == size
    assert (pos[1:] > pos[:-1]).all() and pos[0] >= 0 and pos[-1] < n
    assert (stratum == range(size)).all()  # one position in each of the equal runs
    assert len(set((pos % 1024).tolist())) == 1024  # every column, where a stride of 16 sees 64
    sample_positions.cache_clear()
    assert (sample_positions(n, size) == pos).all()
