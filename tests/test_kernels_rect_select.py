"""RECT selection kernel (`hf_edit_patch.kernels.rect_select`) through Triton's interpreter, against an oracle.

The oracle is written here from the definition (keys, then a stable sort), independent of the kernel and of
`rect_select_reference`; the Triton path must match it exactly: the same flat indices and bit-equal values.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import importlib.util
import sys

import pytest
import torch

pytest.importorskip("triton")

from hf_edit_patch.kernels import rect_select as rs  # noqa: E402
from hf_edit_patch.kernels.rect_select import (  # noqa: E402
    rect_select,
    rect_select_bytes,
    rect_select_triton,
)

REFERENCE_MODULE = "hf_edit_patch.kernels.rect_select_reference"
HAS_REFERENCE = importlib.util.find_spec(REFERENCE_MODULE) is not None
needs_reference = pytest.mark.skipif(
    not HAS_REFERENCE, reason=f"{REFERENCE_MODULE} (kernels/rect_select_reference.py) does not exist yet"
)


@pytest.fixture(autouse=True)
def _auto_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_EDIT_PATCH_KERNELS", raising=False)  # conftest defaults the other tests to the reference


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 7), (7, 13), (33, 65), (129, 257), (300, 701)]
K_FRACTIONS = {"k=1": None, "k=5%": 0.05, "k=40%": 0.4, "k=n": 1.0}
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def oracle(delta: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: keys of |ΔW / W| in float32 (NaN → -1), the k largest by a stable sort, indices sorted."""
    ratio = delta.to(torch.float32) / weight.to(torch.float32)
    keys = ratio.view(torch.int32) & 0x7FFFFFFF
    keys = torch.where(torch.isnan(ratio), torch.full_like(keys, -1), keys).flatten().to(torch.int64)
    order = torch.sort(-keys, stable=True).indices[:k]  # equal keys: the lower flat index first
    flat = torch.sort(order).values
    return flat, delta.flatten()[flat]


def k_for(n: int, fraction: float | None) -> int:
    return 1 if fraction is None else min(n, max(1, round(fraction * n)))


def assert_same_selection(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], what: str):
    got_idx, got_val = got
    want_idx, want_val = want
    assert got_idx.dtype == torch.int64, f"{what}: indices are {got_idx.dtype}, want int64"
    assert got_val.dtype == want_val.dtype, f"{what}: values are {got_val.dtype}, want {want_val.dtype}"
    if got_idx.shape != want_idx.shape:
        missing = sorted(set(want_idx.tolist()) - set(got_idx.tolist()))
        extra = sorted(set(got_idx.tolist()) - set(want_idx.tolist()))
        raise AssertionError(
            f"{what}: {got_idx.numel()} indices, want {want_idx.numel()}; "
            f"missing {len(missing)} (first {missing[:5]}), extra {len(extra)} (first {extra[:5]})"
        )
    if not torch.equal(got_idx, want_idx):
        at = (got_idx != want_idx).nonzero().flatten()
        raise AssertionError(
            f"{what}: {at.numel()} of {want_idx.numel()} selected indices differ, first at output positions "
            f"{at[:5].tolist()}: got {got_idx[at[:5]].tolist()}, want {want_idx[at[:5]].tolist()}"
        )
    if got_idx.numel() > 1:
        assert bool((got_idx[1:] > got_idx[:-1]).all()), f"{what}: indices are not strictly increasing"
    view = _INT_VIEW[want_val.element_size()]
    bad = (got_val.view(view) != want_val.view(view)).nonzero().flatten()
    if bad.numel():
        raise AssertionError(
            f"{what}: {bad.numel()} of {want_val.numel()} values differ bitwise, first at output positions "
            f"{bad[:5].tolist()} (flat {want_idx[bad[:5]].tolist()}): got {got_val[bad[:5]].tolist()}, "
            f"want {want_val[bad[:5]].tolist()}"
        )


# ----------------------------------------------------------------------------------------------- inputs


def mixed_inputs(shape, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ratios plus exact zeros in W (some with ΔW == 0 too: 0/0) and a quantized third (many ties)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    delta = torch.randn(shape, generator=gen) * 0.01
    quantized = torch.rand(shape, generator=gen) < 0.3
    weight = torch.where(quantized, torch.randint(1, 4, shape, generator=gen) * 0.5, weight)
    delta = torch.where(quantized, torch.randint(-3, 4, shape, generator=gen) * 0.25, delta)
    w_zero = torch.rand(shape, generator=gen) < 0.1
    d_zero = torch.rand(shape, generator=gen) < 0.1
    weight[w_zero] = 0.0
    delta[d_zero | (w_zero & (torch.rand(shape, generator=gen) < 0.5))] = 0.0
    return delta.to(dtype), weight.to(dtype)


def all_equal_inputs(shape, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = W / 2 everywhere (W nonzero): every key is the same, ties decide everything."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=gen).abs() + 0.5) * torch.where(
        torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0
    )
    weight = weight.to(dtype)
    return (weight * 0.5).to(dtype), weight


def inf_inputs(shape, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Half of W is exactly zero: nonzero ΔW there gives +inf (many tied infs), zero ΔW gives 0/0."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    delta = torch.randn(shape, generator=gen)
    weight[torch.rand(shape, generator=gen) < 0.5] = 0.0
    delta[torch.rand(shape, generator=gen) < 0.2] = 0.0
    return delta.to(dtype), weight.to(dtype)


def low_rank_inputs(shape, dtype, seed: int = 0, rank: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = U·Vᵀ as ROME (rank one) and MEMIT (low rank) return it: every column scaled alike, some rows zero."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen) * 0.02
    u = torch.randn(shape[0], rank, generator=gen) * (torch.rand(shape[0], 1, generator=gen) < 0.8)
    delta = u @ torch.randn(rank, shape[1], generator=gen) * 1e-3
    return delta.to(dtype), weight.to(dtype)


CASES = {
    "mixed": mixed_inputs,
    "all_equal": all_equal_inputs,
    "inf": inf_inputs,
    "rank_one": low_rank_inputs,
    "rank_8": lambda shape, dtype, seed=0: low_rank_inputs(shape, dtype, seed, rank=8),
}


# ----------------------------------------------------------------------------------------------- oracle sweeps


@pytest.mark.parametrize("kname", list(K_FRACTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_oracle(shape, dtype, kname):
    delta, weight = mixed_inputs(shape, dtype, seed=shape[0] * 1000 + shape[1])
    k = k_for(delta.numel(), K_FRACTIONS[kname])
    assert_same_selection(rect_select_triton(delta, weight, k), oracle(delta, weight, k), f"{shape} {dtype} k={k}")


@pytest.mark.parametrize("case", ["all_equal", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_across_many_blocks(case, dtype):
    """Ties at the threshold spread over 33 blocks of 1024: the tie ranks must carry across blocks."""
    delta, weight = CASES[case]((129, 257), dtype, seed=7)
    n = delta.numel()
    for k in (1, 1000, 1024, 1025, round(0.4 * n), n - 1):
        got = rs._rect_select_launch(delta, weight, k, block_size=1024)
        assert_same_selection(got, oracle(delta, weight, k), f"{case} {dtype} k={k}")


@pytest.mark.parametrize("block_size", [16, 128, 4096])
def test_block_size_does_not_change_the_result(block_size):
    delta, weight = mixed_inputs((33, 65), torch.float32, seed=3)
    for k in (1, 17, 858, 2144):
        want = oracle(delta, weight, k)
        got = rs._rect_select_launch(delta, weight, k, block_size=block_size)
        assert_same_selection(got, want, f"block_size={block_size} k={k}")


def test_all_zero_is_all_nan_and_keeps_the_first_k():
    delta = torch.zeros(7, 13)
    for k in (1, 5, 90):
        idx, val = rect_select_triton(delta, torch.zeros(7, 13), k)
        assert idx.tolist() == list(range(k))
        assert bool((val == 0).all())


@pytest.mark.filterwarnings("error")  # numpy's x / 0, 0 / 0 and overflow warnings stay inside the launcher
def test_order_of_special_keys():
    """+inf (x / 0) > huge > finite > 0 (0 / w) > NaN (0 / 0); signs do not matter."""
    delta = torch.tensor([[0.0, 0.0, 1.0, -3.0, 2.0, 0.0, -1e30, 5.0]])
    weight = torch.tensor([[0.0, 1.0, -4.0, 0.0, 1.0, 0.0, 1e-30, -0.0]])
    # keys: nan, 0, 0.25, inf, 2, nan, inf (overflow), inf
    order = [3, 6, 7, 4, 2, 1, 0, 5]
    for k in range(1, 9):
        idx, _ = rect_select_triton(delta, weight, k)
        assert idx.tolist() == sorted(order[:k]), k
        assert_same_selection((idx, _), oracle(delta, weight, k), f"k={k}")


def test_subnormal_ratios_are_exact():
    """Ratios near and below float32's smallest normal: IEEE division, no flush to zero."""
    gen = torch.Generator().manual_seed(11)
    delta = torch.randn(64, 64, generator=gen) * 1e-30
    weight = torch.randn(64, 64, generator=gen) * 1e10
    ratio = (delta / weight).abs()
    assert bool(((ratio > 0) & (ratio < torch.finfo(torch.float32).tiny)).any())
    for k in (1, 100, 2000):
        assert_same_selection(rect_select_triton(delta, weight, k), oracle(delta, weight, k), f"k={k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_subnormal_16_bit_inputs(dtype):
    """Subnormal ΔW and W in 16-bit formats widen exactly (the interpreter's own bfloat16 cast does not)."""
    gen = torch.Generator().manual_seed(12)
    tiny = torch.finfo(dtype).tiny
    delta = (torch.randn(33, 65, generator=gen) * tiny * 0.3).to(dtype)
    weight = torch.where(
        torch.rand(33, 65, generator=gen) < 0.5, torch.randn(33, 65, generator=gen) * tiny * 0.2, torch.randn(33, 65)
    ).to(dtype)
    assert bool(((delta != 0) & (delta.abs() < tiny)).any()) and bool(((weight != 0) & (weight.abs() < tiny)).any())
    for k in (1, 107, 858):
        assert_same_selection(rect_select_triton(delta, weight, k), oracle(delta, weight, k), f"{dtype} k={k}")


@pytest.mark.parametrize(
    ("delta_dtype", "weight_dtype"),
    [
        (torch.bfloat16, torch.float32),  # 6 bytes per element: keys written once
        (torch.float32, torch.float16),
        (torch.float16, torch.bfloat16),  # 4 bytes: keys recomputed every pass
        (torch.float64, torch.float64),
        (torch.float32, torch.float64),
    ],
    ids=str,
)
def test_mixed_dtypes(delta_dtype, weight_dtype):
    delta, weight = mixed_inputs((33, 65), torch.float64, seed=5)
    delta, weight = delta.to(delta_dtype), weight.to(weight_dtype)
    for k in (1, 107, 858):
        got = rs._rect_select_launch(delta, weight, k, block_size=512)
        assert_same_selection(got, oracle(delta, weight, k), f"{delta_dtype}/{weight_dtype} k={k}")


def test_non_contiguous_inputs_use_row_major_positions():
    delta, weight = mixed_inputs((65, 33), torch.float32, seed=9)
    delta_t, weight_t = delta.t(), weight.t()
    assert not delta_t.is_contiguous()
    for k in (1, 107, 858):
        got = rect_select_triton(delta_t, weight_t, k)
        assert_same_selection(got, oracle(delta_t.contiguous(), weight_t.contiguous(), k), f"k={k}")


def test_values_keep_delta_dtype_and_zeros():
    delta, weight = inf_inputs((7, 13), torch.bfloat16, seed=2)
    idx, val = rect_select_triton(delta, weight, delta.numel() - 1)
    assert val.dtype == torch.bfloat16
    assert bool((val == 0).any()), "zero-valued entries are selected, not dropped"


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("delta", "weight", "k", "match"),
    [
        (torch.ones(3, 4), torch.ones(4, 3), 1, "does not match"),
        (torch.ones(3, 4), torch.ones(3, 4), 0, r"k must be in \[1, numel=12\]"),
        (torch.ones(3, 4), torch.ones(3, 4), 13, r"k must be in \[1, numel=12\]"),
        (torch.ones(3, 4), torch.ones(3, 4), -1, r"k must be in \[1, numel=12\]"),
        (torch.ones(3, 4), torch.ones(3, 4), 1.5, "k must be an integer"),
        (torch.ones(3, 4), torch.ones(3, 4), True, "k must be an integer"),
        (torch.ones(3, 4, dtype=torch.int32), torch.ones(3, 4), 1, "delta must be a floating tensor"),
        (torch.ones(3, 4), torch.ones(3, 4, dtype=torch.int64), 1, "weight must be a floating tensor"),
        (torch.ones(3, 4, dtype=torch.complex64), torch.ones(3, 4), 1, "delta must be a floating tensor"),
        (torch.ones(12), torch.ones(12), 1, "delta must be 2-D"),
        (torch.ones(2, 3, 2), torch.ones(2, 3, 2), 1, "delta must be 2-D"),
        (torch.ones(3, 4), torch.ones(12), 1, "weight must be 2-D"),
        (torch.ones(0, 4), torch.ones(0, 4), 1, r"k must be in \[1, numel=0\]"),
        ([[1.0]], torch.ones(1, 1), 1, "delta must be a torch.Tensor"),
    ],
)
def test_validation_errors(delta, weight, k, match):
    with pytest.raises(ValueError, match=match):
        rect_select_triton(delta, weight, k)
    with pytest.raises(ValueError, match=match):
        rect_select(delta, weight, k)


def test_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="block_size"):
        rs._rect_select_launch(torch.ones(3, 4), torch.ones(3, 4), 2, block_size=100)


# ----------------------------------------------------------------------------------------------- dispatch


def test_rect_select_takes_the_triton_path_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("HF_EDIT_PATCH_KERNELS", raising=False)
    delta, weight = mixed_inputs((33, 65), torch.float16, seed=1)
    calls = []
    monkeypatch.setattr(rs, "rect_select_triton", lambda *a: calls.append(a) or rs._rect_select_launch(*a))
    got = rect_select(delta, weight, 107)
    assert len(calls) == 1
    assert_same_selection(got, oracle(delta, weight, 107), "rect_select")


def test_kernels_defined_interpreted_refuse_compiled_mode(monkeypatch):
    """The kernels were defined under TRITON_INTERPRET=1; unsetting it later is reported, not miscompiled."""
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET before importing"):
        rect_select_triton(torch.ones(3, 4), torch.ones(3, 4), 2)


def test_module_imports_without_triton(monkeypatch):
    """The guarded import: without Triton the module loads, and the Triton path says why it cannot run."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    name = "hf_edit_patch.kernels._rect_select_without_triton"
    spec = importlib.util.spec_from_file_location(name, rs.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert module.triton is None
    assert module.rect_select_bytes(10, 2, torch.float32, torch.float32) == rect_select_bytes(
        10, 2, torch.float32, torch.float32
    )
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        module.rect_select_triton(torch.ones(2, 2), torch.ones(2, 2), 1)


# ----------------------------------------------------------------------------------------------- cross-checks


@needs_reference
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (129, 257)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_rect_select_reference(shape, dtype, case):
    from hf_edit_patch.kernels.rect_select_reference import rect_select_reference

    delta, weight = CASES[case](shape, dtype, seed=4)
    n = delta.numel()
    for k in sorted({1, k_for(n, 0.05), k_for(n, 0.4), n}):
        want = rect_select_reference(delta, weight, k)
        assert_same_selection(want, oracle(delta, weight, k), f"reference vs oracle {case} {shape} {dtype} k={k}")
        assert_same_selection(rect_select_triton(delta, weight, k), want, f"triton vs reference k={k}")


@needs_reference
def test_rect_select_reference_path(monkeypatch):
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "reference")
    delta, weight = mixed_inputs((33, 65), torch.bfloat16, seed=6)
    assert_same_selection(rect_select(delta, weight, 107), oracle(delta, weight, 107), "reference path")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_agrees_with_rect_sparsify(dtype):
    """The regularizer keeps the same entries, less the zero-valued ones."""
    from hf_edit_patch.regularizers.matrix import keep_count, rect_sparsify

    delta, weight = mixed_inputs((33, 65), dtype, seed=8)
    for ratio in (0.05, 0.4):
        idx, val = rect_select_triton(delta, weight, keep_count(ratio, delta.numel()))
        sparse = rect_sparsify(delta, weight, keep_ratio=ratio)
        nonzero = val != 0
        assert sparse.flat_indices.tolist() == idx[nonzero].tolist()
        assert torch.equal(sparse.values, val[nonzero])


def test_bytes_floor():
    assert rect_select_bytes(1000, 400, torch.float32, torch.float32) == 1000 * 8 + 400 * (8 + 4)
    assert rect_select_bytes(1000, 1, torch.bfloat16, torch.float32) == 1000 * 6 + 1 * (8 + 2)
