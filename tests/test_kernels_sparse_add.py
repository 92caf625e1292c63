"""`sparse_add_` / `restore_`: the Triton kernels (through Triton's interpreter on CPU) against the reference twins.

Every comparison is bit-wise (integer views, so -0.0 and +0.0 or two NaN payloads are told apart).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before torch, triton and the kernels are imported

import importlib.util
import math
import sys
import zlib

import pytest
import torch

from hf_edit_patch.kernels import sparse_add as sa
from hf_edit_patch.kernels.sparse_add import (
    restore_,
    restore_bytes,
    restore_triton_,
    sparse_add_,
    sparse_add_bytes,
    sparse_add_triton_,
)
from hf_edit_patch.kernels.sparse_add_reference import restore_reference_, sparse_add_reference_

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# the interpreter computes with numpy, which warns where a float16/bfloat16/float32 result overflows to inf
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in (cast|add):RuntimeWarning")


@pytest.fixture
def triton_ok() -> None:
    pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _auto_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_EDIT_PATCH_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_INT_OF_WIDTH[t.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        diff = (a != e).nonzero().flatten()
        first = diff[:5]
        raise AssertionError(
            f"{what}: {diff.numel()} of {a.numel()} elements differ bit-wise, first at flat positions "
            f"{first.tolist()}: got {actual.reshape(-1)[first].tolist()} (bits {a[first].tolist()}), expected "
            f"{expected.reshape(-1)[first].tolist()} (bits {e[first].tolist()})"
        )


def spec(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The definition, written naively: float32 add, then torch's cast."""
    expected = weight.clone().reshape(-1)
    expected[flat.long()] = (weight.reshape(-1)[flat.long()].float() + values.float()).to(weight.dtype)
    return expected.view(weight.shape)


def check_both_paths(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Triton (interpreted) and reference agree bit for bit on weight and originals, both restore exactly.

    Returns the patched weight.
    """
    w_tri, w_ref = weight.clone(), weight.clone()
    o_tri = sparse_add_triton_(w_tri, flat, values)
    o_ref = sparse_add_reference_(w_ref, flat, values)
    assert_bits_equal(o_ref, weight.reshape(-1)[flat.long()], "reference original vs the weight's entries")
    assert_bits_equal(w_ref, spec(weight, flat, values), "reference weight vs the definition")
    assert_bits_equal(o_tri, o_ref, "original (triton vs reference)")
    assert_bits_equal(w_tri, w_ref, "patched weight (triton vs reference)")
    patched = w_tri.clone()
    restore_triton_(w_tri, flat, o_tri)
    restore_reference_(w_ref, flat, o_ref)
    assert_bits_equal(w_tri, weight, "weight after triton restore_")
    assert_bits_equal(w_ref, weight, "weight after reference restore_")
    return patched


def _random_flat(numel: int, density: float | str, gen: torch.Generator) -> torch.Tensor:
    k = 1 if density == "single" else max(1, round(density * numel))
    if k == numel:
        return torch.arange(numel)
    return torch.randperm(numel, generator=gen)[:k].sort().values


def _random_values(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal values at scales from 1e-4 to 10, so sums round in every way."""
    scale = 10.0 ** (torch.rand(n, generator=gen) * 5 - 4)
    return (torch.randn(n, generator=gen) * scale).to(dtype)


SHAPES = [(1, 1), (7, 13), (33, 65), (1000,), (577, 1531)]
DENSITIES = ["single", 0.01, 0.4, 1.0]
SHAPE_DENSITY = [
    pytest.param(shape, density, id=f"{'x'.join(map(str, shape))}-d{density}")
    for shape in SHAPES
    for density in DENSITIES
    if shape != (1, 1) or density == "single"  # a 1x1 weight has one entry whatever the density
]


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("vdtype", VALUE_DTYPES, ids=lambda d: f"v_{str(d)[6:]}")
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=lambda d: f"w_{str(d)[6:]}")
@pytest.mark.parametrize(("shape", "density"), SHAPE_DENSITY)
def test_sweep_triton_matches_reference(shape, density, wdtype, vdtype) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, wdtype, vdtype, density)).encode()))
    weight = torch.randn(shape, generator=gen).to(wdtype)
    flat = _random_flat(weight.numel(), density, gen)
    values = _random_values(flat.numel(), vdtype, gen)
    patched = check_both_paths(weight, flat, values)
    untouched = torch.ones(weight.numel(), dtype=torch.bool)
    untouched[flat] = False
    assert_bits_equal(bits(patched)[untouched], bits(weight)[untouched], "entries outside flat")


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=str)
def test_int32_indices(wdtype) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(33, 65, generator=gen).to(wdtype)
    flat = _random_flat(weight.numel(), 0.4, gen).to(torch.int32)
    values = _random_values(flat.numel(), torch.float16, gen)
    check_both_paths(weight, flat, values)


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_weight_pattern(wdtype) -> None:
    """All 65,536 bit patterns of the weight (NaNs excluded) plus random finite float32 values of every magnitude:
    covers subnormals, ±0, ±inf, ties, and overflow to inf in the float32 → float16 / bfloat16 rounding."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(wdtype)
    weight = weight[~torch.isnan(weight)].contiguous()
    v_bits = torch.randint(-(2**31), 2**31, (weight.numel(),), generator=gen, dtype=torch.int64).to(torch.int32)
    values = v_bits.view(torch.float32)
    values = torch.where(torch.isfinite(values), values, torch.zeros(()))
    # also values near each weight's scale, so the add really rounds (random bits alone are mostly far apart)
    near = weight.float() * (torch.rand(weight.numel(), generator=gen) * 2**-6)
    near = torch.where(torch.isfinite(near), near, torch.zeros(()))
    flat = torch.arange(weight.numel())
    check_both_paths(weight, flat, values)
    check_both_paths(weight, flat, near)


@pytest.mark.usefixtures("triton_ok")
def test_bfloat16_ties_round_to_even() -> None:
    one = 1.0
    ulp = 2.0**-7  # of bfloat16 at 1
    weight = torch.tensor([one, one + ulp, one, -one - ulp, 2.0**-126], dtype=torch.bfloat16)
    values = torch.tensor([ulp / 2, ulp / 2, ulp / 2 + 2**-20, -ulp / 2, 2.0**-134], dtype=torch.float32)
    patched = check_both_paths(weight, torch.arange(5), values)
    expected = [one, one + 2 * ulp, one + ulp, -one - 2 * ulp, 2.0**-126]  # ties go to even; above a tie, up
    assert patched.tolist() == expected


@pytest.mark.usefixtures("triton_ok")
def test_float16_overflow_becomes_inf() -> None:
    weight = torch.tensor([60000.0, -60000.0, 65504.0, 65504.0, 1.0], dtype=torch.float16)
    values = torch.tensor([60000.0, -60000.0, 16.0, 15.0, 0.0], dtype=torch.float16)
    patched = check_both_paths(weight, torch.arange(5), values)
    # 65504 + 16 = 65520 is the tie between the largest finite (65504) and 65536 (inf): even is inf
    assert patched.tolist() == [math.inf, -math.inf, math.inf, 65504.0, 1.0]


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=str)
def test_overflow_at_the_top_of_each_dtype(wdtype) -> None:
    big = torch.finfo(wdtype).max
    weight = torch.tensor([big, -big, big], dtype=wdtype)
    values = torch.tensor([big, -big, -big], dtype=torch.float32)
    patched = check_both_paths(weight, torch.arange(3), values)
    assert patched.tolist() == [math.inf, -math.inf, 0.0]


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("vdtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=str)
def test_negative_zero(wdtype, vdtype) -> None:
    weight = torch.tensor([-0.0, -0.0, 0.0, 1.0, -1.0], dtype=wdtype)
    values = torch.tensor([-0.0, 0.0, -0.0, -1.0, 1.0], dtype=vdtype)
    patched = check_both_paths(weight, torch.arange(5), values)
    assert torch.signbit(patched).tolist() == [True, False, False, False, False]  # -0 + -0 = -0, else +0


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("vdtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=str)
def test_subnormals(wdtype, vdtype) -> None:
    tiny_w = torch.finfo(wdtype).smallest_normal
    tiny_v = torch.finfo(vdtype).smallest_normal
    scales = torch.tensor([0.5, 0.25, 2.0**-5, 2.0**-9, 0.75, -0.5, -(2.0**-9), 1.0, 3.0])
    weight = (scales * tiny_w).to(wdtype)
    values = (scales.flip(0) * tiny_v).to(vdtype)
    assert bool((weight.abs() < tiny_w).any()) and bool((values.abs() < tiny_v).any())  # really subnormal
    check_both_paths(weight, torch.arange(weight.numel()), values)
    check_both_paths(weight, torch.arange(weight.numel()), -values)


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=str)
def test_nan_in_weight_stays_nan_and_restores_bit_exactly(wdtype) -> None:
    weight = torch.tensor([1.0, math.nan, 2.0, -math.nan], dtype=wdtype)
    values = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float32)
    w_tri, w_ref = weight.clone(), weight.clone()
    o_tri = sparse_add_triton_(w_tri, torch.arange(4), values)
    o_ref = sparse_add_reference_(w_ref, torch.arange(4), values)
    assert_bits_equal(o_tri, o_ref, "original")
    assert torch.isnan(w_tri).tolist() == torch.isnan(w_ref).tolist() == [False, True, False, True]
    finite = ~torch.isnan(w_ref)
    assert_bits_equal(w_tri[finite], w_ref[finite], "non-NaN entries")  # NaN payloads are not canonical in torch
    restore_triton_(w_tri, torch.arange(4), o_tri)
    assert_bits_equal(w_tri, weight, "weight after restore_")


@pytest.mark.usefixtures("triton_ok")
def test_weight_with_storage_offset_and_parameter() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(10, 13, generator=gen)
    before = base.clone()
    weight = base[2:7]  # contiguous, starts 26 elements into the storage
    flat = torch.tensor([0, 5, 64])
    values = torch.tensor([1.0, 2.0, 3.0])
    check_both_paths(weight, flat, values)
    original = sparse_add_triton_(weight, flat, values)
    assert_bits_equal(base[:2], before[:2], "rows before the view")
    assert_bits_equal(base[7:], before[7:], "rows after the view")
    assert base[2, 0] == before[2, 0] + 1 and base[6, 12] == before[6, 12] + 3
    restore_triton_(weight, flat, original)
    assert_bits_equal(base, before, "storage after restore_")

    param = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    saved = param.detach().clone()
    for add, restore in ((sparse_add_triton_, restore_triton_), (sparse_add_reference_, restore_reference_)):
        original = add(param, flat[:2], values[:2])  # outside no_grad, on a leaf that requires grad
        assert not original.requires_grad
        restore(param, flat[:2], original)
        assert_bits_equal(param.detach(), saved, f"parameter after {add.__name__} + {restore.__name__}")


# ------------------------------------------------------------------------------------------------------ validation

PATHS = [
    pytest.param(
        (sparse_add_triton_, restore_triton_),
        id="triton",
        marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    ),
    pytest.param((sparse_add_reference_, restore_reference_), id="reference"),
]


def _rejects(fn, weight: torch.Tensor, *args, match: str) -> None:
    before = weight.clone()
    with pytest.raises(ValueError, match=match):
        fn(weight, *args)
    assert_bits_equal(weight, before, "weight after a rejected call")


@pytest.mark.parametrize("path", PATHS)
def test_rejects_bad_indices(path) -> None:
    add, restore = path
    weight = torch.randn(3, 4)
    v2, o2 = torch.ones(2), torch.zeros(2)
    for flat, match in [
        (torch.tensor([0, 12]), r"must lie in \[0, 12\).*max 12"),
        (torch.tensor([-1, 3]), r"must lie in \[0, 12\).*min -1"),
        (torch.tensor([5, 2]), r"strictly increasing.*5 then 2"),
        (torch.tensor([2, 2]), r"strictly increasing.*2 then 2"),
        (torch.tensor([0.0, 1.0]), "int64 or int32"),
        (torch.tensor([[0, 1]]), "1-D integer tensor"),
        (torch.tensor([0, 1], dtype=torch.int16), "int64 or int32"),
    ]:
        _rejects(add, weight, flat, v2, match=match)
        _rejects(restore, weight, flat, o2, match=match)


@pytest.mark.parametrize("path", PATHS)
def test_rejects_bad_values_and_weights(path) -> None:
    add, restore = path
    weight = torch.randn(3, 4)
    flat = torch.tensor([1, 2])
    _rejects(add, weight, flat, torch.ones(3), match=r"same length as flat \(2\)")
    _rejects(add, weight, flat, torch.ones(2, 1), match="must be 1-D")
    _rejects(add, weight, flat, torch.ones(2, dtype=torch.int32), match="values must be a floating tensor of dtype")
    _rejects(restore, weight, flat, torch.ones(2, dtype=torch.float16), match="must have the weight's dtype")
    _rejects(add, weight.t(), flat, torch.ones(2), match="weight must be contiguous")
    _rejects(restore, weight.t(), flat, torch.ones(2), match="weight must be contiguous")
    int_weight = torch.arange(12)
    _rejects(add, int_weight, flat, torch.ones(2), match=r"weight must be a floating tensor of dtype float32")
    _rejects(restore, int_weight, flat, torch.ones(2), match=r"weight must be a floating tensor of dtype float32")
    with pytest.raises(TypeError, match="flat must be a torch.Tensor"):
        add(weight, [1, 2], torch.ones(2))


@pytest.mark.parametrize("path", PATHS)
def test_rejects_device_mismatch(path) -> None:
    """'meta' stands in for a second device on a CPU-only machine: the check fires before any data is read."""
    add, restore = path
    weight = torch.randn(3, 4)
    _rejects(add, weight, torch.tensor([1, 2], device="meta"), torch.ones(2), match="must be on one device")
    _rejects(add, weight, torch.tensor([1, 2]), torch.ones(2, device="meta"), match="must be on one device")
    _rejects(restore, weight, torch.tensor([1, 2]), torch.ones(2, device="meta"), match="must be on one device")


@pytest.mark.usefixtures("triton_ok")
def test_float64_is_reference_only_for_the_add() -> None:
    weight = torch.randn(3, 4, dtype=torch.float64)
    flat = torch.tensor([1, 2])
    _rejects(sparse_add_triton_, weight, flat, torch.ones(2), match="float64 is accepted on the reference path")
    _rejects(sparse_add_triton_, weight.float(), flat, torch.ones(2, dtype=torch.float64), match="reference path only")
    w_ref = weight.clone()
    values = torch.tensor([0.1, 1e-9], dtype=torch.float64)
    original = sparse_add_reference_(w_ref, flat, values)
    assert_bits_equal(w_ref, spec(weight, flat, values), "float64 reference vs the definition")
    restore_triton_(w_ref, flat, original)  # the restore kernel copies bits, float64 included
    assert_bits_equal(w_ref, weight, "float64 weight after restore_")
    for wdtype in WEIGHT_DTYPES:  # float64 values: rounded to float32 first, then added in float32
        w16 = torch.randn(3, 4).to(wdtype)
        w_ref = w16.clone()
        sparse_add_reference_(w_ref, flat, values)
        assert_bits_equal(w_ref, spec(w16, flat, values), f"{wdtype} weight + float64 values vs the definition")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=str)
def test_empty_index_list_is_a_no_op(path, wdtype) -> None:
    add, restore = path
    weight = torch.randn(3, 4).to(wdtype)
    before = weight.clone()
    original = add(weight, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float16))
    assert original.shape == (0,) and original.dtype == wdtype and original.device == weight.device
    restore(weight, torch.empty(0, dtype=torch.int32), original)
    assert_bits_equal(weight, before, "weight after an empty add and restore")


# -------------------------------------------------------------------------------------------------------- dispatch


def _boom(*args, **kwargs):
    raise AssertionError("this path must not run")


def _public_round_trip() -> None:
    weight = torch.randn(5, 7, dtype=torch.bfloat16)
    before = weight.clone()
    flat = torch.tensor([0, 3, 34])
    values = torch.tensor([0.25, -1.0, 3.0], dtype=torch.float16)
    original = sparse_add_(weight, flat, values)
    assert_bits_equal(weight, spec(before, flat, values), "weight after sparse_add_")
    restore_(weight, flat, original)
    assert_bits_equal(weight, before, "weight after restore_")


def test_forced_reference_never_calls_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "reference")
    monkeypatch.setattr(sa, "sparse_add_triton_", _boom)
    monkeypatch.setattr(sa, "restore_triton_", _boom)
    _public_round_trip()


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_interpreter_runs_the_triton_kernel(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", mode)
    monkeypatch.setattr(sa, "sparse_add_reference_", _boom)
    monkeypatch.setattr(sa, "restore_reference_", _boom)
    _public_round_trip()


def test_auto_without_interpreter_on_cpu_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(sa, "sparse_add_triton_", _boom)
    monkeypatch.setattr(sa, "restore_triton_", _boom)
    _public_round_trip()


@pytest.mark.usefixtures("triton_ok")
def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    weight = torch.randn(3, 4)
    before = weight.clone()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sparse_add_(weight, torch.tensor([1]), torch.ones(1))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        restore_(weight, torch.tensor([1]), torch.ones(1))
    assert_bits_equal(weight, before, "weight after a refused call")


def test_module_imports_and_runs_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "reference")
    name = "hf_edit_patch.kernels._sparse_add_without_triton"
    spec_ = importlib.util.spec_from_file_location(name, sa.__file__)
    module = importlib.util.module_from_spec(spec_)
    monkeypatch.setitem(sys.modules, name, module)
    spec_.loader.exec_module(module)
    assert module.triton is None
    weight = torch.randn(4, 4)
    before = weight.clone()
    original = module.sparse_add_(weight, torch.tensor([0, 15]), torch.ones(2))
    module.restore_(weight, torch.tensor([0, 15]), original)
    assert_bits_equal(weight, before, "weight after a round trip without Triton")
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        module.sparse_add_triton_(weight, torch.tensor([0, 15]), torch.ones(2))
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        module.restore_triton_(weight, torch.tensor([0, 15]), original)


def test_bytes_helpers() -> None:
    # index 8 + value 2 + weight read 4 + weight write 4 + original write 4
    assert sparse_add_bytes(10, torch.float32, torch.float16) == 10 * 22
    assert sparse_add_bytes(10, torch.bfloat16, torch.bfloat16, torch.int32) == 10 * (4 + 2 + 6)
    # index 8 + original read 2 + weight write 2
    assert restore_bytes(10, torch.bfloat16) == 10 * 12
    assert restore_bytes(0, torch.float32) == 0
