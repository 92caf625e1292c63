"""RECT selection kernel (`hf_edit_patch.kernels.rect_select`) through Triton's interpreter, against an oracle.

The oracle is written here from the definition (keys, then a stable sort), independent of the kernel and of
`rect_select_reference`; the Triton path must match it exactly: the same flat indices and bit-equal values.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import importlib.util
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from hf_edit_patch.kernels import rect_select as rs  # noqa: E402
from hf_edit_patch.kernels import rect_select_reference as ref_module  # noqa: E402
from hf_edit_patch.kernels.cpu_parallel import Claims  # noqa: E402
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


def oracle_order(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Flat positions from the largest key to the smallest, equal keys by position (a stable sort).

    Keys are the bits of |ΔW / W| in float32, NaN → -1."""
    ratio = delta.to(torch.float32) / weight.to(torch.float32)
    keys = ratio.view(torch.int32) & 0x7FFFFFFF
    keys = torch.where(torch.isnan(ratio), torch.full_like(keys, -1), keys).flatten().to(torch.int64)
    # equal keys: the lower flat index first (NumPy's stable sort: several times faster than torch's on CPU)
    return torch.from_numpy(np.argsort(-keys.numpy(), kind="stable"))


def oracle(
    delta: torch.Tensor, weight: torch.Tensor, k: int, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: the k largest keys by a stable sort (`oracle_order`, or `order` computed by it), indices
    sorted."""
    order = oracle_order(delta, weight) if order is None else order
    flat = torch.from_numpy(np.sort(order[:k].numpy()))
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


# ----------------------------------------------------------------------------------------------- CPU reference paths


def structured_inputs(shape, dtype, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = U·Vᵀ of the given rank (0: dense) over W with exact zeros, and ΔW exactly zero on whole rows.

    Zeros in W give +inf ratios (ΔW != 0) and 0/0 (ΔW == 0 too); zero rows of U tie every entry of the row at 0;
    a quantized third of W and of V makes many ratios repeat exactly."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    weight = torch.randn(shape, generator=gen) * 0.02
    weight = torch.where(
        torch.rand(shape, generator=gen) < 0.3, torch.randint(1, 3, shape, generator=gen) * 0.01, weight
    )
    weight[torch.rand(shape, generator=gen) < 0.02] = 0.0
    if rank == 0:
        delta = torch.randn(shape, generator=gen)
    else:
        u = torch.randn(rows, rank, generator=gen) * (torch.rand(rows, 1, generator=gen) < 0.8)
        v = torch.randn(rank, cols, generator=gen)
        v = torch.where(
            torch.rand(rank, cols, generator=gen) < 0.3, torch.randint(-2, 3, (rank, cols), generator=gen) * 0.5, v
        )
        delta = u @ v
    return (delta * 1e-3).to(dtype), weight.to(dtype)


# sizes around the thresholds of the CPU reference: the exact partition up to _PARTITION_MAX entries, one thread up
# to _SINGLE_THREAD_MAX, blocks shared by threads above it
THRESHOLD_SHAPES = {
    "partition": (256, 256),  # 2^16 entries
    "sampled, one thread": (257, 256),  # just over 2^16
    "sampled, two threads": (2049, 1024),  # just over 2^21
}
SMALL_THRESHOLDS = {"_PARTITION_MAX": 1 << 12, "_SINGLE_THREAD_MAX": 1 << 15, "_BLOCK": 1 << 12}
SMALL_SHAPES = {"partition": (64, 64), "sampled, one thread": (65, 64), "sampled, two threads": (129, 257)}
RANKS = {"rank_one": 1, "rank_32": 32, "dense": 0}


def check_path(path: str, shape, rank: int, dtype: torch.dtype) -> None:
    n = shape[0] * shape[1]
    assert (n <= ref_module._PARTITION_MAX) == (path == "partition")
    assert (n > ref_module._SINGLE_THREAD_MAX) == (path == "sampled, two threads")
    delta, weight = structured_inputs(shape, dtype, rank, seed=rank)
    order = oracle_order(delta, weight)
    for keep in (0.1, 0.2, 0.4, 0.9):
        k = k_for(n, keep)
        want = oracle(delta, weight, k, order)
        assert_same_selection(ref_module.rect_select_reference(delta, weight, k), want, f"{path} {dtype} keep={keep}")


@pytest.mark.parametrize("rank", list(RANKS))
@pytest.mark.parametrize("path", list(THRESHOLD_SHAPES))
def test_reference_paths_at_their_thresholds(monkeypatch, path, rank):
    """Each CPU path keeps exactly the oracle's entries on the updates editors produce, with ties and zeros, at
    the sizes where it starts."""
    monkeypatch.setattr(ref_module, "_threads", lambda n_blocks: 2 if path == "sampled, two threads" else 1)
    check_path(path, THRESHOLD_SHAPES[path], RANKS[rank], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("rank", list(RANKS))
@pytest.mark.parametrize("path", list(SMALL_SHAPES))
def test_reference_paths_with_every_dtype(monkeypatch, path, rank, dtype):
    """The same on small matrices, with the thresholds and the block scaled down."""
    for name, value in SMALL_THRESHOLDS.items():
        monkeypatch.setattr(ref_module, name, value)
    monkeypatch.setattr(ref_module, "_threads", lambda n_blocks: 2 if path == "sampled, two threads" else 1)
    check_path(path, SMALL_SHAPES[path], RANKS[rank], dtype)


def test_threads_follow_the_size_threshold():
    small = -(-ref_module._SINGLE_THREAD_MAX // ref_module._BLOCK)
    assert ref_module._threads(small) == 1
    assert ref_module._threads(small + 1) == min(torch.get_num_threads(), small + 1)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "sea_of_ties"])
def test_a_stalled_thread_is_not_waited_for_and_never_writes_late(monkeypatch, ties):
    """A worker that stalls while it holds a block: the calling thread computes that block again and returns. The
    worker wakes up in the middle of a second selection, between its two passes, which reuses the mask the worker
    would write: its stale results are dropped, and neither selection changes."""
    monkeypatch.setattr(ref_module, "_BLOCK", 1 << 12)
    monkeypatch.setattr(ref_module, "_threads", lambda n_blocks: 2)
    caller = threading.get_ident()
    release, stalled, resumed = threading.Event(), threading.Event(), threading.Event()
    scan, run_pass = ref_module._Band.scan, ref_module._run
    passes = []

    def stalling_scan(self, i, scratch):
        if threading.get_ident() == caller:
            stalled.wait(30)  # let the worker take a block first
        elif not stalled.is_set():
            stalled.set()
            release.wait(30)
            scan(self, i, scratch)
            resumed.set()
            return
        scan(self, i, scratch)

    def parallel(*args, **kwargs):
        run_pass(*args, **kwargs)
        passes.append(args[0])
        if len(passes) == 3:  # the second selection's first pass is done: wake the worker up now
            release.set()
            assert resumed.wait(30)  # set once its stale copy has tried to write

    monkeypatch.setattr(ref_module._Band, "scan", stalling_scan)
    monkeypatch.setattr(ref_module, "_run", parallel)
    if ties:
        delta, weight = mixed_inputs((300, 701), torch.float32, seed=21)
        delta[::3] = 0.0  # a third of the rows tie at key 0
    else:
        delta, weight = structured_inputs((300, 701), torch.float32, rank=1, seed=21)
    k = k_for(delta.numel(), 0.8 if ties else 0.4)  # with ties: the threshold is the tied key 0
    first = ref_module.rect_select_reference(delta, weight, k)
    assert stalled.is_set(), "no worker thread took a block"
    assert not resumed.is_set(), "the calling thread waited for the stalled worker"
    kept = (first[0].clone(), first[1].clone())
    other_delta, other_weight = structured_inputs((300, 701), torch.float32, rank=0, seed=22)
    second = ref_module.rect_select_reference(other_delta, other_weight, k)
    assert len(passes) == 4 and resumed.is_set()
    assert_same_selection(first, oracle(delta, weight, k), "first selection")
    assert torch.equal(first[0], kept[0]) and torch.equal(first[1], kept[1]), "a late worker wrote into the result"
    assert_same_selection(second, oracle(other_delta, other_weight, k), "second selection")


def test_claims_hand_out_items_once_keep_the_first_write_and_find_overdue_items():
    claims = Claims(3)
    assert [claims.take(), claims.take()] == [0, 1]
    claims.slowest = 10.0
    late, wait = claims.overdue()
    assert late == [] and 0 < wait <= 1.0 and not claims.wait(0)
    written = []
    claims.commit(1, written.append, "first")
    claims.commit(1, written.append, "late copy")
    assert written == ["first"]
    claims.slowest = 0.0
    time.sleep(0.001)
    assert claims.overdue()[0] == [0], "an item held longer than twice the slowest one is overdue"
    with pytest.raises(RuntimeError):
        claims.commit(0, lambda: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert claims.overdue()[0] == [0], "a failed write leaves its item for another thread"
    claims.commit(0, written.append, "retry")
    assert claims.take() == 2 and claims.take() is None
    claims.commit(2, written.append, "last")
    assert claims.wait(0) and written == ["first", "retry", "last"]


def test_sample_size_and_band_limits():
    from hf_edit_patch.kernels.topk import band_limits, sample_size

    assert sample_size(100) == 100 and sample_size(1 << 16) == 1 << 12 and sample_size(884_736) == 13_824
    assert sample_size(45_088_768) == 1 << 18
    gen = torch.Generator().manual_seed(5)
    keys = torch.randint(0, 1 << 30, (20_000,), generator=gen).numpy().astype("int32")
    for q in (0.001, 0.1, 0.4, 0.999):
        k = max(1, round(q * 1_000_000))
        lo, hi = band_limits(keys, 1_000_000, k)
        ordered = sorted(keys.tolist(), reverse=True)
        rank = k / 1_000_000 * keys.size
        assert lo <= hi
        assert sum(key > hi for key in ordered) <= rank <= sum(key >= lo for key in ordered)


NON_FINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


@pytest.mark.parametrize("bad", list(NON_FINITE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("path", list(SMALL_SHAPES))
def test_check_finite_finds_one_bad_entry_on_every_path(monkeypatch, path, dtype, bad):
    for name, value in SMALL_THRESHOLDS.items():
        monkeypatch.setattr(ref_module, name, value)
    monkeypatch.setattr(ref_module, "_threads", lambda n_blocks: 2 if path == "sampled, two threads" else 1)
    delta, weight = structured_inputs(SMALL_SHAPES[path], dtype, rank=1)
    k = k_for(delta.numel(), 0.4)
    assert_same_selection(
        ref_module.rect_select_reference(delta, weight, k, check_finite=True), oracle(delta, weight, k), path
    )
    delta.view(-1)[delta.numel() * 2 // 3] = NON_FINITE[bad]  # in a later block: found while scanning
    with pytest.raises(ref_module.NonFiniteDeltaError, match="non-finite"):
        ref_module.rect_select_reference(delta, weight, k, check_finite=True)
    with pytest.raises(ref_module.NonFiniteDeltaError):
        ref_module.rect_select_reference(delta, weight, delta.numel(), check_finite=True)  # everything kept
    after = structured_inputs(SMALL_SHAPES[path], dtype, rank=0, seed=3)  # the buffers stay usable
    assert_same_selection(ref_module.rect_select_reference(*after, k), oracle(*after, k), f"{path} after an error")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", list(SMALL_SHAPES))
def test_drop_zeros_leaves_out_exactly_the_zero_values(monkeypatch, path, dtype):
    """Zeros are kept only when the threshold reaches key 0; `drop_zeros` leaves those out, ±0 alike."""
    for name, value in SMALL_THRESHOLDS.items():
        monkeypatch.setattr(ref_module, name, value)
    monkeypatch.setattr(ref_module, "_threads", lambda n_blocks: 2 if path == "sampled, two threads" else 1)
    delta, weight = structured_inputs(SMALL_SHAPES[path], dtype, rank=1)  # a fifth of the rows of ΔW are zero
    delta[1::10] = -0.0
    n = delta.numel()
    order = oracle_order(delta, weight)
    for keep in (0.4, 0.9, 1.0):
        k = k_for(n, keep)
        flat, values = oracle(delta, weight, k, order)
        nonzero = values != 0
        assert keep < 0.5 or not bool(nonzero.all()), "the case must keep some zeros"
        got = ref_module.rect_select_reference(delta, weight, k, drop_zeros=True)
        assert_same_selection(got, (flat[nonzero], values[nonzero]), f"{path} keep={keep}")


def test_a_closed_run_writes_nothing_more():
    claims = Claims(2)
    assert claims.take() == 0
    written = []
    claims.close()
    claims.commit(0, written.append, "late")
    assert written == [] and not claims.wait(0)


def test_rect_sparsify_reports_non_finite_entries_through_the_fused_check(monkeypatch):
    from hf_edit_patch.regularizers.matrix import rect_sparsify

    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "reference")
    delta, weight = structured_inputs((257, 256), torch.float32, rank=1)
    delta[200, 3], delta[250, 7] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match=r"up_proj: ΔW has non-finite entries \(2 of them\)"):
        rect_sparsify(delta, weight, 0.4, name="up_proj")


def test_concurrent_callers_each_get_their_own_exact_selection(monkeypatch):
    """Selections started at once from several threads share the worker pool and the per-thread buffers: each
    returns exactly what it returns alone, on the multi-threaded path with every kind of update."""
    for name, value in SMALL_THRESHOLDS.items():
        monkeypatch.setattr(ref_module, name, value)
    monkeypatch.setattr(ref_module, "_threads", lambda n_blocks: 3)
    shape = SMALL_SHAPES["sampled, two threads"]
    n = shape[0] * shape[1]
    cases = [
        (*structured_inputs(shape, torch.float32, rank, seed=seed), k_for(n, keep))
        for seed, (rank, keep) in enumerate([(1, 0.4), (32, 0.1), (0, 0.2), (1, 0.9), (0, 0.4), (32, 0.4)])
    ]
    alone = [ref_module.rect_select_reference(d, w, k) for d, w, k in cases]
    results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(cases))

    def call(i: int) -> None:
        try:
            start.wait()
            for repeat in range(5):
                results[i, repeat] = ref_module.rect_select_reference(*cases[i])
        except BaseException as exc:  # surfaced below: a failure in a thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (i, repeat), (flat, values) in results.items():
        assert torch.equal(flat, alone[i][0]), (i, repeat)
        assert torch.equal(values, alone[i][1]), (i, repeat)
    assert len(results) == 5 * len(cases)
