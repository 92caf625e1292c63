"""Bad input, all or nothing.

Unknown modules, shape/layout/dtype mismatches, out-of-range or repeated indices, non-finite values, truncated or
corrupt files, configs that disagree with their tensors: each must raise a clear `ValueError` subclass naming the
module and the problem, leave the model's weights bit-identical and the active patch list unchanged. Fingerprint
mismatches warn (raise with `strict=True`), saves are atomic, and nothing is ever unpickled.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: Hub calls fail fast

import json
import pickle
import re
import struct

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_edit_patch as hep
from hf_edit_patch import (
    EditPatch,
    FingerprintMismatchError,
    ModuleRecord,
    PatchConfig,
    PatchedModel,
    PatchError,
    PatchFormatError,
    PatchNotFoundError,
    PatchValidationError,
    SparseDelta,
    rect_sparsify,
)
from hf_edit_patch.hub import files as fileio
from hf_edit_patch.hub.files import file_sha256
from hf_edit_patch.patch import edit_patch as patch_module
from hf_edit_patch.patch.config import CONFIG_NAME, STACK_NAME, WEIGHTS_NAME

DOWN0 = "model.layers.0.mlp.down_proj"  # nn.Linear [32, 48]
DOWN1 = "model.layers.1.mlp.down_proj"
UP1 = "model.layers.1.mlp.up_proj"  # nn.Linear [48, 32]
Q0 = "model.layers.0.self_attn.q_proj"  # nn.Linear [32, 32]
C_FC0 = "transformer.h.0.mlp.c_fc"  # Conv1D [32, 128] ([in, out])
C_PROJ0 = "transformer.h.0.mlp.c_proj"  # Conv1D [128, 32]

# keep_ratio on the 32x48 down_proj that makes storage.choose_encoding pick each encoding
KEEP_FOR_ENCODING = {"bitmask": 0.4, "csr": 0.018, "coo": 0.002}


# ---------------------------------------------------------------------------------------------------- helpers
def make_llama(seed: int = 0, intermediate_size: int = 48, num_hidden_layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    differing = [k for k, v in state.items() if not torch.equal(v, expected[k])]
    assert not differing, f"weights changed bit-wise: {differing[:5]}"


def make_patch(model, names, keep_ratio=0.4, seed=0, scale=0.05, **kwargs) -> EditPatch:
    gen = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(model.get_submodule(n).weight.shape, generator=gen) * scale for n in names}
    return EditPatch.from_deltas(deltas, model, keep_ratio=keep_ratio, **kwargs)


def direct_patch(spec: dict, value_dtype: str = "float16") -> EditPatch:
    """An EditPatch built by hand: `spec` is `{name: (shape, layout, flat_indices, values)}`."""
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[value_dtype]
    deltas, records = {}, {}
    for name, (shape, layout, flat, values) in spec.items():
        d = SparseDelta.from_flat(torch.tensor(flat, dtype=torch.int64), torch.tensor(values, dtype=dtype), shape)
        deltas[name] = d
        records[name] = ModuleRecord(shape=tuple(shape), layout=layout, nnz=d.nnz)
    return EditPatch(deltas, PatchConfig(modules=records, value_dtype=value_dtype))


def allof(*patterns: str) -> str:
    """A regex matching a message that contains every pattern, in any order."""
    return "(?s)" + "".join(f"(?=.*{p})" for p in patterns)


def mod(name: str) -> str:
    """Regex for "module '<name>'" as the library writes it."""
    return re.escape(f"module '{name}'")


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


class Held:
    """A PatchedModel already holding one patch ("held"), to check that failed calls change nothing."""

    def __init__(self, model: torch.nn.Module, module: str = UP1, seed: int = 1) -> None:
        self.base = snapshot(model)
        self.pm = PatchedModel(model)
        self.pm.add_patch(make_patch(model, [module], seed=seed), "held")
        self.patched = snapshot(model)
        assert any(not torch.equal(v, self.base[k]) for k, v in self.patched.items())

    def assert_untouched(self) -> None:
        assert self.pm.active_patches == ["held"]
        assert_same(self.pm.base_model, self.patched)
        # the undo data is intact too: taking the held patch off gives the base back exactly
        self.pm.remove_patch("held")
        assert_same(self.pm.base_model, self.base)


@pytest.fixture
def llama_held() -> Held:
    return Held(make_llama())


@pytest.fixture
def gpt2_held() -> Held:
    return Held(make_gpt2(), module=C_PROJ0)


# ---------------------------------------------------------------------------------------------------- errors
def test_error_hierarchy():
    for cls in (hep.PatchError, PatchFormatError, PatchValidationError, FingerprintMismatchError):
        assert issubclass(cls, ValueError)
    assert issubclass(FingerprintMismatchError, PatchValidationError)
    assert issubclass(PatchNotFoundError, OSError)


# ---------------------------------------------------------------------------------------------------- attach
def test_attach_unknown_module_direct(llama_held):
    bad = direct_patch({"model.layers.7.mlp.down_proj": ((32, 48), "linear", [0, 5], [0.5, -0.5])})
    with pytest.raises(PatchValidationError, match=r"'model\.layers\.7\.mlp\.down_proj' does not exist"):
        llama_held.pm.add_patch(bad, "second")
    llama_held.assert_untouched()


def test_attach_unknown_module_from_bigger_model(tmp_path, llama_held):
    big = make_llama(num_hidden_layers=3)
    make_patch(big, ["model.layers.2.mlp.down_proj"]).save_pretrained(tmp_path / "p")
    with pytest.raises(PatchValidationError, match=r"'model\.layers\.2\.mlp\.down_proj' does not exist"):
        llama_held.pm.load_patch(tmp_path / "p", "second")
    llama_held.assert_untouched()


def test_attach_typo_suggests_names(llama_held):
    bad = direct_patch({"model.layers.0.mlp.down_prj": ((32, 48), "linear", [0], [0.5])})
    with pytest.raises(
        PatchValidationError, match=r"'model\.layers\.0\.mlp\.down_prj' does not exist.*did you mean.*down_proj"
    ):
        llama_held.pm.add_patch(bad, "second")
    llama_held.assert_untouched()


def test_attach_shape_mismatch(llama_held):
    other = make_llama(intermediate_size=40)
    bad = make_patch(other, [DOWN0])
    with pytest.raises(PatchValidationError, match=mod(DOWN0) + r".*shape \[32, 48\].*\[32, 40\]"):
        llama_held.pm.add_patch(bad, "second")
    llama_held.assert_untouched()


def test_attach_layout_mismatch_conv1d_record_on_linear(llama_held):
    bad = direct_patch({Q0: ((32, 32), "conv1d", [0, 33], [0.5, 0.25])})
    with pytest.raises(PatchValidationError, match=mod(Q0) + r" has layout 'linear'.*'conv1d'"):
        llama_held.pm.add_patch(bad, "second")
    llama_held.assert_untouched()


def test_attach_layout_mismatch_linear_record_on_conv1d(gpt2_held):
    bad = direct_patch({C_FC0: ((32, 128), "linear", [0, 7], [0.5, 0.25])})
    with pytest.raises(PatchValidationError, match=mod(C_FC0) + r" has layout 'conv1d'.*'linear'"):
        gpt2_held.pm.add_patch(bad, "second")
    gpt2_held.assert_untouched()


def test_attach_conv1d_record_with_transposed_shape(gpt2_held):
    bad = direct_patch({C_FC0: ((128, 32), "conv1d", [0, 7], [0.5, 0.25])})
    with pytest.raises(PatchValidationError, match=mod(C_FC0) + r".*shape \[32, 128\].*\[128, 32\]"):
        gpt2_held.pm.add_patch(bad, "second")
    gpt2_held.assert_untouched()


def test_attach_non_finite_in_fp16_weight():
    model = make_llama().half()
    with torch.no_grad():
        model.get_submodule(DOWN0).weight[0, 0] = 60000.0
    held = Held(model)
    bad = direct_patch({DOWN0: ((32, 48), "linear", [0, 1], [60000.0, 0.5])})
    with pytest.raises(PatchValidationError, match=mod(DOWN0) + r".*1 entries non-finite in torch\.float16"):
        held.pm.add_patch(bad, "second")
    held.assert_untouched()


def test_attach_float32_values_overflowing_fp16_weight():
    held = Held(make_llama().half())
    bad = direct_patch({DOWN0: ((32, 48), "linear", [3, 4], [70000.0, -70000.0])}, value_dtype="float32")
    with pytest.raises(PatchValidationError, match=mod(DOWN0) + r".*2 entries non-finite in torch\.float16"):
        held.pm.add_patch(bad, "second")
    held.assert_untouched()


def _second_module_bad(kind: str) -> tuple[dict, str, str]:
    good = (DOWN0, ((32, 48), "linear", [0, 1, 50], [0.5, -0.25, 0.125]))
    name, spec, match = {
        "unknown": ("model.layers.9.mlp.down_proj", ((32, 48), "linear", [0], [0.5]), r"does not exist"),
        "shape": (DOWN1, ((32, 40), "linear", [0], [0.5]), r"shape \[32, 48\]"),
        "layout": (DOWN1, ((32, 48), "embedding", [0], [0.5]), r"layout"),
        "non-finite": (DOWN1, ((32, 48), "linear", [0], [3.0e38]), r"non-finite"),
    }[kind]
    return {good[0]: good[1], name: spec}, name, match


@pytest.mark.parametrize("kind", ["unknown", "shape", "layout", "non-finite"])
def test_attach_all_or_nothing_second_module_invalid(kind):
    model = make_llama()
    with torch.no_grad():
        model.get_submodule(DOWN1).weight[0, 0] = 3.0e38  # + 3e38 overflows float32
    held = Held(model)
    spec, bad_name, match = _second_module_bad(kind)
    patch = direct_patch(spec, value_dtype="float32")
    assert list(patch.deltas) == [DOWN0, bad_name]  # the valid module comes first
    with pytest.raises(PatchValidationError, match=re.escape(f"'{bad_name}'") + ".*" + match):
        held.pm.add_patch(patch, "second")
    held.assert_untouched()


def test_attach_duplicate_name(tmp_path, llama_held):
    ok = make_patch(llama_held.pm.base_model, [DOWN0])
    with pytest.raises(PatchError, match=r"'held' is already attached"):
        llama_held.pm.add_patch(ok, "held")
    ok.save_pretrained(tmp_path / "p")
    with pytest.raises(PatchError, match=r"'held' is already attached"):
        llama_held.pm.load_patch(tmp_path / "p", "held")
    llama_held.assert_untouched()


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "x" * 129, 5, None])
def test_attach_invalid_patch_name(llama_held, name):
    ok = make_patch(llama_held.pm.base_model, [DOWN0])
    with pytest.raises(PatchError, match=r"patch_name must be"):
        llama_held.pm.add_patch(ok, name)
    llama_held.assert_untouched()


def test_remove_unknown_patch(llama_held):
    with pytest.raises(PatchError, match=r"no patch named 'nope'.*\['held'\]"):
        llama_held.pm.remove_patch("nope")
    llama_held.assert_untouched()


def test_attach_tied_weights_rejected(gpt2_held):
    model = gpt2_held.pm.base_model
    assert model.lm_head.weight is model.transformer.wte.weight
    bad = direct_patch(
        {
            "lm_head": ((64, 32), "linear", [0, 1], [0.5, 0.25]),
            "transformer.wte": ((64, 32), "embedding", [2, 3], [0.5, 0.25]),
        }
    )
    with pytest.raises(PatchValidationError, match=r"'lm_head' and 'transformer\.wte' share one weight tensor"):
        gpt2_held.pm.add_patch(bad, "second")
    gpt2_held.assert_untouched()


def test_attach_integer_weight_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    model[0].weight = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.int8), requires_grad=False)
    snap = snapshot(model)
    pm = PatchedModel(model)
    bad = direct_patch({"0": ((3, 4), "linear", [0], [0.5])})
    with pytest.raises(PatchValidationError, match=mod("0") + r": weight dtype torch\.int8 cannot be patched"):
        pm.add_patch(bad, "p")
    assert pm.active_patches == []
    assert_same(model, snap)


def test_attach_non_contiguous_weight_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    model[0].weight = torch.nn.Parameter(torch.randn(4, 3).t())
    snap = snapshot(model)
    pm = PatchedModel(model)
    bad = direct_patch({"0": ((3, 4), "linear", [0], [0.5])})
    with pytest.raises(PatchValidationError, match=mod("0") + r".*not contiguous"):
        pm.add_patch(bad, "p")
    assert pm.active_patches == []
    assert_same(model, snap)


def test_attach_non_patchable_module_type():
    model = torch.nn.Sequential(torch.nn.Bilinear(2, 2, 2))  # 3-D weight
    pm = PatchedModel(model)
    bad = direct_patch({"0": ((2, 2), "linear", [0], [0.5])})
    with pytest.raises(PatchValidationError, match=mod("0") + r".*no 2-D weight"):
        pm.add_patch(bad, "p")
    assert pm.active_patches == []


# ---------------------------------------------------------------------------------------------------- EditPatch
def test_editpatch_config_disagrees_with_deltas():
    d = SparseDelta.from_flat(torch.tensor([0, 3]), torch.tensor([0.5, 0.25], dtype=torch.float16), (3, 4))
    with pytest.raises(PatchFormatError, match=mod("w") + r": the config says shape \(3, 4\), nnz 3"):
        EditPatch({"w": d}, PatchConfig(modules={"w": ModuleRecord(shape=(3, 4), nnz=3)}))
    with pytest.raises(PatchFormatError, match=mod("w") + r".*shape \(4, 4\).*delta has shape \(3, 4\)"):
        EditPatch({"w": d}, PatchConfig(modules={"w": ModuleRecord(shape=(4, 4), nnz=2)}))
    with pytest.raises(PatchFormatError, match=mod("w") + r".*values float32.*values torch\.float16"):
        EditPatch({"w": d}, PatchConfig(modules={"w": ModuleRecord(shape=(3, 4), nnz=2)}, value_dtype="float32"))
    with pytest.raises(PatchFormatError, match=r"lists modules \['v'\] but the patch holds deltas for \['w'\]"):
        EditPatch({"w": d}, PatchConfig(modules={"v": ModuleRecord(shape=(3, 4), nnz=2)}))


# ---------------------------------------------------------------------------------------------------- SparseDelta
SPARSE_CASES = {
    "row-out-of-range": (
        [[0, 1, 3], [0, 0, 0]],
        [1.0, 2.0, 3.0],
        (3, 4),
        r"indices out of range for shape \(3, 4\): 1 of 3 \(first at positions \[2\]\)",
    ),
    "col-out-of-range": (
        [[0, 1, 2], [0, 4, 9]],
        [1.0, 2.0, 3.0],
        (3, 4),
        r"indices out of range for shape \(3, 4\): 2 of 3 \(first at positions \[1, 2\]\)",
    ),
    "negative-row": ([[-1, 0], [0, 1]], [1.0, 2.0], (3, 4), r"out of range.*1 of 2 \(first at positions \[0\]\)"),
    "negative-col": ([[0, 1], [0, -1]], [1.0, 2.0], (3, 4), r"out of range.*1 of 2 \(first at positions \[1\]\)"),
    "repeated": (
        [[1, 0, 1], [2, 0, 2]],
        [1.0, 2.0, 3.0],
        (3, 4),
        r"repeated indices: 1 duplicates, first at \(row 1, col 2\)",
    ),
    "repeated-many": ([[0, 0, 0, 2], [1, 1, 1, 3]], [1.0, 2.0, 3.0, 4.0], (3, 4), r"repeated indices: 2 duplicates"),
    "nan-inf": (
        [[0, 0, 1, 2], [0, 1, 1, 1]],
        [0.0, float("nan"), 1.0, float("inf")],
        (3, 4),
        r"values must be finite; non-finite: 2 of 4 \(first at positions \[1, 3\]\)",
    ),
    "neg-inf": ([[0], [0]], [float("-inf")], (3, 4), r"non-finite: 1 of 1"),
}


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_sparse_delta_rejects(case):
    indices, values, shape, match = SPARSE_CASES[case]
    idx, val = torch.tensor(indices), torch.tensor(values)
    idx0, val0 = idx.clone(), val.clone()
    with pytest.raises(PatchFormatError, match=re.escape("mod.w: ") + ".*" + match):
        SparseDelta(idx, val, shape, name="mod.w")
    assert torch.equal(idx, idx0)
    assert torch.allclose(val, val0, equal_nan=True)


@pytest.mark.parametrize(
    ("indices", "values", "shape", "match"),
    [
        (torch.tensor([[0], [0]]), torch.tensor([1]), (3, 4), r"values must be float16.*got torch\.int64"),
        (torch.tensor([[0], [0]]), torch.tensor([True]), (3, 4), r"values must be float16.*got torch\.bool"),
        (torch.tensor([[0], [0]]), torch.tensor([1 + 1j]), (3, 4), r"values must be float16.*complex"),
        (torch.tensor([[0.0], [0.0]]), torch.tensor([1.0]), (3, 4), r"indices must be an integer tensor.*float32"),
        (torch.tensor([[True], [False]]), torch.tensor([1.0]), (3, 4), r"indices must be an integer tensor.*bool"),
        (
            torch.zeros(3, 2, dtype=torch.long),
            torch.ones(2),
            (3, 4),
            r"indices must have shape \[2, nnz\], got \[3, 2\]",
        ),
        (torch.zeros(2, dtype=torch.long), torch.ones(2), (3, 4), r"indices must have shape \[2, nnz\], got \[2\]"),
        (
            torch.zeros(2, 2, dtype=torch.long),
            torch.ones(3),
            (3, 4),
            r"values must have shape \[nnz\] = \[2\], got \[3\]",
        ),
        (torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 1), (3, 4), r"values must have shape \[nnz\]"),
        (torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (0, 4), r"shape must be two positive integers"),
        (torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (-3, 4), r"shape must be two positive integers"),
        (torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (2, 3, 4), r"shape must be two positive integers"),
        (torch.zeros(2, 1, dtype=torch.long), torch.ones(1), 12, r"shape must be two positive integers"),
    ],
)
def test_sparse_delta_rejects_dtypes_and_shapes(indices, values, shape, match):
    with pytest.raises(PatchFormatError, match=re.escape("mod.w: ") + ".*" + match):
        SparseDelta(indices, values, shape, name="mod.w")


@pytest.mark.parametrize(
    ("flat", "values", "match"),
    [
        (torch.tensor([0, 12]), torch.ones(2), r"flat indices out of range for shape \(3, 4\): 1 of 2"),
        (torch.tensor([-1, 2]), torch.ones(2), r"flat indices out of range.*first at positions \[0\]"),
        (torch.tensor([0.0, 1.0]), torch.ones(2), r"flat indices must be integers"),
        (torch.tensor([0, 1]), torch.ones(3), r"1-D of the same length, got \[2\] and \[3\]"),
        (torch.tensor([5, 5]), torch.ones(2), r"repeated indices: 1 duplicates, first at \(row 1, col 1\)"),
        (torch.tensor([0, 1]), torch.tensor([1, 2]), r"values must be a float tensor"),
        (torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]), r"non-finite: 1 of 2"),
    ],
)
def test_sparse_delta_from_flat_rejects(flat, values, match):
    with pytest.raises(PatchFormatError, match=re.escape("mod.w: ") + ".*" + match):
        SparseDelta.from_flat(flat, values, (3, 4), name="mod.w")


def test_sparse_delta_other_constructors_reject():
    with pytest.raises(PatchFormatError, match=r"mod\.w: a dense delta must be 2-D"):
        SparseDelta.from_dense(torch.ones(2, 3, 4), name="mod.w")
    with pytest.raises(PatchFormatError, match=r"mod\.w: .*non-finite"):
        SparseDelta.from_dense(torch.tensor([[1.0, float("nan")]]), name="mod.w")
    with pytest.raises(PatchFormatError, match=r"mod\.w: expected a 2-D torch\.sparse_coo tensor"):
        SparseDelta.from_sparse_coo(torch.ones(3, 4), name="mod.w")


def test_sparse_delta_rejection_leaves_inputs_alone():
    idx = torch.tensor([[2, 0, 2], [1, 0, 1]])
    val = torch.tensor([1.0, 2.0, 3.0])
    idx0, val0 = idx.clone(), val.clone()
    with pytest.raises(PatchFormatError, match="repeated"):
        SparseDelta(idx, val, (3, 4))
    assert torch.equal(idx, idx0) and torch.equal(val, val0)


# ---------------------------------------------------------------------------------------------------- building
BAD_KEEP_RATIOS = [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.4"]


@pytest.mark.parametrize("keep_ratio", BAD_KEEP_RATIOS, ids=repr)
@pytest.mark.parametrize("regularizer", ["rect", "random", "pca"])
def test_from_deltas_bad_keep_ratio(keep_ratio, regularizer):
    model = make_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"keep_ratio.*got {re.escape(repr(keep_ratio))}$"):
        make_patch(model, [DOWN0], keep_ratio=keep_ratio, regularizer=regularizer)
    assert_same(model, snap)


@pytest.mark.parametrize("keep_ratio", BAD_KEEP_RATIOS, ids=repr)
def test_rect_sparsify_and_config_bad_keep_ratio(keep_ratio):
    w, dw = torch.randn(6, 5), torch.randn(6, 5)
    with pytest.raises(ValueError, match=rf"keep_ratio.*got {re.escape(repr(keep_ratio))}$"):
        rect_sparsify(dw, w, keep_ratio=keep_ratio)
    with pytest.raises(PatchFormatError, match=rf"keep_ratio.*got {re.escape(repr(keep_ratio))}$"):
        PatchConfig(keep_ratio=keep_ratio)


def test_from_deltas_keep_ratio_without_regularizer():
    with pytest.raises(ValueError, match=r"keep_ratio=0\.4 needs a regularizer"):
        make_patch(make_llama(), [DOWN0], keep_ratio=0.4, regularizer=None)


def test_from_deltas_unknown_regularizer():
    with pytest.raises(ValueError, match=r"unknown regularizer 'topk'"):
        make_patch(make_llama(), [DOWN0], keep_ratio=0.4, regularizer="topk")


@pytest.mark.parametrize(
    ("delta", "match"),
    [
        (torch.randn(48, 32), re.escape(f"'{DOWN0}'") + r" has shape \[48, 32\] but the weight is \[32, 48\]"),
        (torch.randn(32, 47), r"has shape \[32, 47\] but the weight is \[32, 48\]"),
        (torch.randn(32 * 48), r"has shape \[1536\] but the weight is \[32, 48\]"),
        (
            torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.ones(1), (32, 40), check_invariants=True),
            r"\[32, 40\].*\[32, 48\]",
        ),
        (SparseDelta.from_flat(torch.tensor([0]), torch.ones(1), (48, 32)), r"\[48, 32\].*\[32, 48\]"),
        ((torch.randn(32), torch.randn(40)), r"\[32, 40\].*\[32, 48\]"),
    ],
    ids=["transposed", "narrow", "flat", "sparse-coo", "sparse-delta", "factored"],
)
def test_from_deltas_wrong_shape(delta, match):
    model = make_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=allof(re.escape(DOWN0), match)):
        EditPatch.from_deltas({DOWN0: delta}, model, keep_ratio=0.4)
    assert_same(model, snap)


def test_from_deltas_factored_pair_with_mismatched_rank():
    """u [32, 1] and v [48, 2] cannot form u @ v.T: a ValueError naming the module, not a torch RuntimeError."""
    model = make_llama()
    with pytest.raises(ValueError, match=allof(re.escape(DOWN0), r"\[32, 1\]|rank|factor")):
        EditPatch.from_deltas({DOWN0: (torch.randn(32, 1), torch.randn(48, 2))}, model, keep_ratio=0.4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("keep_ratio", [0.4, None])
def test_from_deltas_non_finite(bad, keep_ratio):
    model = make_llama()
    snap = snapshot(model)
    dw = torch.randn(32, 48) * 0.05
    dw[3, 7] = bad
    with pytest.raises(ValueError, match=allof(re.escape(DOWN0), r"non-finite entries \(1 of them\)")):
        EditPatch.from_deltas({DOWN0: dw}, model, keep_ratio=keep_ratio)
    assert_same(model, snap)


def test_from_deltas_integer_delta():
    with pytest.raises(ValueError, match=allof(re.escape(DOWN0), r"floating")):
        EditPatch.from_deltas({DOWN0: torch.ones(32, 48, dtype=torch.int64)}, make_llama(), keep_ratio=0.4)


def test_from_deltas_overflowing_value_dtype():
    dw = torch.zeros(32, 48)
    dw[0, 0] = 1.0e6
    with pytest.raises(ValueError, match=allof(re.escape(DOWN0), r"overflows torch\.float16", "float32")):
        EditPatch.from_deltas({DOWN0: dw}, make_llama(), value_dtype="float16")
    assert EditPatch.from_deltas({DOWN0: dw}, make_llama()).config.value_dtype == "float32"  # auto


def test_from_deltas_bad_value_dtype_unknown_module_and_empty():
    model = make_llama()
    with pytest.raises(ValueError, match=r"value_dtype must be 'auto' or one of .*got 'float8'"):
        make_patch(model, [DOWN0], value_dtype="float8")
    with pytest.raises(PatchValidationError, match=r"'model\.layers\.5\.mlp\.down_proj' does not exist"):
        EditPatch.from_deltas({"model.layers.5.mlp.down_proj": torch.ones(32, 48)}, model, keep_ratio=0.4)
    with pytest.raises(ValueError, match=r"non-empty mapping"):
        EditPatch.from_deltas({}, model, keep_ratio=0.4)


def test_from_deltas_on_patched_model_leaves_it_alone(llama_held):
    dw = torch.randn(32, 48)
    dw[0, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape(DOWN0)):
        EditPatch.from_deltas({DOWN0: dw}, llama_held.pm, keep_ratio=0.4)
    llama_held.assert_untouched()


# ---------------------------------------------------------------------------------------------------- fingerprints
def test_fingerprint_mismatch_warns_and_attaches():
    model = make_llama()
    patch = make_patch(model, [DOWN0])
    with torch.no_grad():
        model.get_submodule(DOWN0).weight[3, 5] += 1e-3
    held = Held(model)
    with pytest.warns(UserWarning, match=allof("differ", re.escape(DOWN0), "strict=True")):
        held.pm.add_patch(patch, "second")
    assert held.pm.active_patches == ["held", "second"]
    w = model.get_submodule(DOWN0).weight
    assert not torch.equal(w, held.patched[f"{DOWN0}.weight"])
    held.pm.remove_patch("second")
    held.assert_untouched()


def test_fingerprint_mismatch_strict_raises(tmp_path):
    model = make_llama()
    patch = make_patch(model, [DOWN0])
    patch.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        model.get_submodule(DOWN0).weight[3, 5] += 1e-3
    held = Held(model)
    with pytest.raises(FingerprintMismatchError, match=allof("differ", re.escape(DOWN0), r"strict=True")):
        held.pm.add_patch(patch, "second", strict=True)
    with pytest.raises(FingerprintMismatchError, match=allof("differ", re.escape(DOWN0))):
        held.pm.load_patch(tmp_path / "p", "second", strict=True)
    with pytest.raises(FingerprintMismatchError, match=allof("differ", re.escape(DOWN0))):
        PatchedModel.from_pretrained(held.pm, tmp_path / "p", "second", strict=True)
    held.assert_untouched()


def test_fingerprint_dtype_change_is_named():
    model = make_llama()
    patch = make_patch(model, [DOWN0])
    held = Held(model.half())
    with pytest.raises(FingerprintMismatchError, match=allof(re.escape(DOWN0), "now float16", "float32")):
        held.pm.add_patch(patch, "second", strict=True)
    held.assert_untouched()


# ---------------------------------------------------------------------------------------------------- files
def saved_patch(folder, encoding: str) -> EditPatch:
    """Saves a one-module patch on DOWN0 stored in `encoding` ('odd': a 5x7 bitmask with padding bits)."""
    if encoding == "odd":
        flat = list(range(0, 35, 2))
        patch = direct_patch({DOWN0: ((5, 7), "linear", flat, [0.125 * (i + 1) for i in range(len(flat))])})
        assert patch.encodings() == {DOWN0: "bitmask"}
    else:
        patch = make_patch(make_llama(), [DOWN0], keep_ratio=KEEP_FOR_ENCODING[encoding])
        assert patch.encodings() == {DOWN0: encoding}
    patch.save_pretrained(folder)
    return patch


def edit_tensors(folder, fn) -> None:
    path = folder / WEIGHTS_NAME
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def edit_config(folder, fn) -> None:
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def set_sha(folder, mode: str) -> None:
    """'stale': leave the config's tensors_sha256 as written; 'null': drop it; 'fresh': the new file's hash."""
    if mode == "stale":
        return
    sha = None if mode == "null" else file_sha256(str(folder / WEIGHTS_NAME))
    edit_config(folder, lambda d: d.__setitem__("tensors_sha256", sha))


def _first_zero_bit(mask: torch.Tensor) -> tuple[int, int]:
    for i, byte in enumerate(mask.tolist()):
        if byte != 0xFF:
            return i, next(b for b in range(8) if not byte >> b & 1)
    raise AssertionError("mask is full")


def _flip_zero_bit(t):
    m = t[f"{DOWN0}.mask"]
    i, b = _first_zero_bit(m)
    m[i] |= 1 << b


def _clear_set_bit(t):
    m = t[f"{DOWN0}.mask"]
    i = int(torch.nonzero(m)[0])
    m[i] &= m[i] - 1  # clears the lowest set bit


def _csr_negative(t):
    c = t[f"{DOWN0}.row_counts"]
    a = int(torch.nonzero(c)[0])
    b = (a + 1) % len(c)
    c[b] += c[a] + 1
    c[a] = -1


def _csr_repeat_col(t):
    c = t[f"{DOWN0}.row_counts"]
    a = int(torch.nonzero(c >= 2)[0])
    start = int(c[:a].sum())
    cols = t[f"{DOWN0}.cols"]
    cols[start + 1] = cols[start]


def _set(key, fn):
    def mutate(t):
        t[f"{DOWN0}.{key}"] = fn(t[f"{DOWN0}.{key}"])

    return mutate


def _setitem(key, index, value):
    def mutate(t):
        t[f"{DOWN0}.{key}"][index] = value

    return mutate


M = mod(DOWN0)
TENSOR_CASES = {
    # id: (encoding, mutation, regex for the message)
    "missing-values": (
        "bitmask",
        lambda t: t.pop(f"{DOWN0}.values"),
        M + r".*'" + re.escape(DOWN0) + r"\.values' is missing",
    ),
    "missing-mask": ("bitmask", lambda t: t.pop(f"{DOWN0}.mask"), M + r".*\.mask' is missing.*'bitmask'"),
    "missing-indices": ("coo", lambda t: t.pop(f"{DOWN0}.indices"), M + r".*\.indices' is missing.*'coo'"),
    "missing-row-counts": ("csr", lambda t: t.pop(f"{DOWN0}.row_counts"), M + r".*\.row_counts' is missing"),
    "missing-cols": ("csr", lambda t: t.pop(f"{DOWN0}.cols"), M + r".*\.cols' is missing"),
    "values-dtype": ("bitmask", _set("values", lambda v: v.float()), M + r": values has dtype torch\.float32"),
    "values-bf16": ("coo", _set("values", lambda v: v.bfloat16()), M + r": values has dtype torch\.bfloat16"),
    "values-int": ("csr", _set("values", lambda v: v.to(torch.int16)), M + r": values has dtype torch\.int16"),
    "values-short": ("bitmask", _set("values", lambda v: v[:-1]), M + r": values has shape \[\d+\]; expected"),
    "values-2d": ("coo", _set("values", lambda v: v[None]), M + r": values has shape \[1, \d+\]"),
    "values-nan": ("bitmask", _setitem("values", 0, float("nan")), M + r": values must be finite.*1 of"),
    "values-inf-coo": ("coo", _setitem("values", -1, float("inf")), M + r": values must be finite.*1 of"),
    "values-inf-csr": ("csr", _setitem("values", 2, float("-inf")), M + r": values must be finite.*1 of"),
    "indices-float": ("coo", _set("indices", lambda v: v.float()), M + r": indices has dtype torch\.float32"),
    "indices-shape": ("coo", _set("indices", lambda v: v[:, :-1]), M + r": indices has shape \[2, 2\]"),
    "indices-row-range": ("coo", _setitem("indices", (0, 0), 32), M + r": indices out of range.*\(32, 48\): 1 of 3"),
    "indices-col-range": ("coo", _setitem("indices", (1, 2), 48), M + r": indices out of range.*\(32, 48\): 1 of 3"),
    "indices-negative": ("coo", _setitem("indices", (1, 1), -1), M + r": indices out of range.*1 of 3"),
    "indices-repeated": (
        "coo",
        lambda t: t[f"{DOWN0}.indices"].__setitem__((slice(None), 1), t[f"{DOWN0}.indices"][:, 0]),
        M + r": repeated indices: 1 duplicates",
    ),
    "mask-extra-bit": ("bitmask", _flip_zero_bit, M + r": mask selects (\d+) entries but the config and values say"),
    "mask-missing-bit": ("bitmask", _clear_set_bit, M + r": mask selects (\d+) entries but the config and values say"),
    "mask-short": ("bitmask", _set("mask", lambda v: v[:-1]), M + r": mask has shape \[191\]; expected \[192\]"),
    "mask-dtype": ("bitmask", _set("mask", lambda v: v.to(torch.int16)), M + r": mask has dtype torch\.int16"),
    "mask-bool": ("bitmask", _set("mask", lambda v: v.bool()), M + r": mask has dtype torch\.bool"),
    "mask-past-numel": ("odd", _setitem("mask", -1, 0x80), M + r": mask has bits set past the 35 entries"),
    "csr-sum": ("csr", _setitem("row_counts", 0, 9), M + r": row_counts must be non-negative and sum to nnz=\d+"),
    "csr-negative": ("csr", _csr_negative, M + r": row_counts must be non-negative"),
    "csr-counts-dtype": ("csr", _set("row_counts", lambda v: v.long()), M + r": row_counts has dtype torch\.int64"),
    "csr-counts-shape": ("csr", _set("row_counts", lambda v: v[:-1]), M + r": row_counts has shape \[31\]"),
    "csr-cols-shape": ("csr", _set("cols", lambda v: v[:-1]), M + r": cols has shape"),
    "csr-cols-dtype": ("csr", _set("cols", lambda v: v.float()), M + r": cols has dtype torch\.float32"),
    "csr-col-range": ("csr", _setitem("cols", 0, 48), M + r": indices out of range for shape \(32, 48\): 1 of"),
    "csr-col-repeated": ("csr", _csr_repeat_col, M + r": repeated indices: 1 duplicates"),
    "extra-tensor": (
        "bitmask",
        lambda t: t.__setitem__("model.layers.1.mlp.down_proj.values", torch.zeros(3, dtype=torch.float16)),
        r"holds tensors the config does not describe: \['model\.layers\.1\.mlp\.down_proj\.values'\]",
    ),
}


@pytest.mark.parametrize("sha", ["stale", "null", "fresh"])
@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_corrupt_tensors(tmp_path, llama_held, case, sha):
    encoding, mutate, match = TENSOR_CASES[case]
    folder = tmp_path / "p"
    saved_patch(folder, encoding)
    edit_tensors(folder, mutate)
    set_sha(folder, sha)
    if sha == "stale":  # the file no longer has the hash the config recorded
        match = re.escape(WEIGHTS_NAME) + r" does not match patch_config\.json \(sha256 differs\)"
    with pytest.raises(PatchFormatError, match=match):
        EditPatch.from_pretrained(folder)
    with pytest.raises(PatchFormatError, match=match):
        llama_held.pm.load_patch(folder, "second")
    with pytest.raises(PatchFormatError, match=match):
        PatchedModel.from_pretrained(llama_held.pm, folder, "second")
    llama_held.assert_untouched()


def _header_file(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


RAW_WEIGHTS = {
    "truncated-half": lambda b: b[: len(b) // 2],
    "truncated-header": lambda b: b[:20],
    "truncated-last-byte": lambda b: b[:-1],
    "empty": lambda b: b"",
    "garbage": lambda b: bytes((i * 131 + 7) % 256 for i in range(len(b))),
    "huge-header-length": lambda b: b"\xff" * 8 + b[8:],
    "header-not-json": lambda b: struct.pack("<Q", 5) + b"abcde",
    "header-offsets-past-end": lambda b: _header_file(
        {f"{DOWN0}.values": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 4
    ),
    "header-unknown-dtype": lambda b: _header_file(
        {f"{DOWN0}.values": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "pickle-instead": lambda b: pickle.dumps({"a": 1}),
}


@pytest.mark.parametrize("sha", ["stale", "null"])
@pytest.mark.parametrize("case", list(RAW_WEIGHTS))
def test_corrupt_weights_file(tmp_path, llama_held, case, sha):
    folder = tmp_path / "p"
    saved_patch(folder, "bitmask")
    path = folder / WEIGHTS_NAME
    path.write_bytes(RAW_WEIGHTS[case](path.read_bytes()))
    set_sha(folder, sha)
    if sha == "stale":
        match = r"sha256 differs.*corrupt, truncated"
    else:
        match = re.escape(WEIGHTS_NAME) + r" is not a readable safetensors file"
    with pytest.raises(PatchFormatError, match=match):
        EditPatch.from_pretrained(folder)
    with pytest.raises(PatchFormatError, match=match):
        llama_held.pm.load_patch(folder, "second")
    llama_held.assert_untouched()


def _record(fn):
    def mutate(d):
        fn(d["modules"][DOWN0])

    return mutate


def _add_module(d):
    d["modules"][DOWN1] = dict(d["modules"][DOWN0])


CONFIG_CASES = {
    # id: (encoding, mutation of the JSON dict, exception, regex)
    "nnz-minus-one": ("bitmask", _record(lambda r: r.__setitem__("nnz", r["nnz"] - 1)), M + r": values has shape"),
    "nnz-plus-one-coo": ("coo", _record(lambda r: r.__setitem__("nnz", r["nnz"] + 1)), M + r": values has shape"),
    "shape-bitmask": ("bitmask", _record(lambda r: r.__setitem__("shape", [32, 40])), M + r": mask has shape"),
    "shape-csr": ("csr", _record(lambda r: r.__setitem__("shape", [30, 48])), M + r": row_counts has shape"),
    "shape-coo": ("coo", _record(lambda r: r.__setitem__("shape", [2, 2])), M + r": indices out of range"),
    "value-dtype": ("bitmask", lambda d: d.__setitem__("value_dtype", "float32"), M + r": values has dtype"),
    "encoding-swap": ("bitmask", _record(lambda r: r.__setitem__("encoding", "coo")), M + r".*\.indices' is missing"),
    "module-not-in-file": ("bitmask", _add_module, mod(DOWN1) + r".*is missing from the file"),
    "module-not-in-config": (
        "bitmask",
        lambda d: d.__setitem__("modules", {}),
        r"holds tensors the config does not describe: \['" + re.escape(DOWN0),
    ),
    "record-missing-shape": (
        "bitmask",
        _record(lambda r: r.pop("shape")),
        allof(re.escape(DOWN0), r"missing a required key"),
    ),
    "record-not-object": (
        "bitmask",
        lambda d: d["modules"].__setitem__(DOWN0, [32, 48]),
        allof(re.escape(DOWN0), r"must be a JSON object"),
    ),
    # record-level checks: the message must name the module, as every other bad-input error does
    "unknown-encoding": (
        "bitmask",
        _record(lambda r: r.__setitem__("encoding", "zstd")),
        allof(re.escape(DOWN0), r"unknown encoding 'zstd'", "upgrade"),
    ),
    "bad-layout": ("bitmask", _record(lambda r: r.__setitem__("layout", "dense")), allof(re.escape(DOWN0), "layout")),
    "bad-shape": ("bitmask", _record(lambda r: r.__setitem__("shape", [0, 48])), allof(re.escape(DOWN0), "shape")),
    "shape-3d": ("bitmask", _record(lambda r: r.__setitem__("shape", [2, 16, 48])), allof(re.escape(DOWN0), "shape")),
    "nnz-too-big": ("bitmask", _record(lambda r: r.__setitem__("nnz", 10**6)), allof(re.escape(DOWN0), "nnz")),
    "nnz-negative": ("bitmask", _record(lambda r: r.__setitem__("nnz", -1)), allof(re.escape(DOWN0), "nnz")),
    "bad-weight-dtype": (
        "bitmask",
        _record(lambda r: r.__setitem__("weight_dtype", "int8")),
        allof(re.escape(DOWN0), "weight_dtype"),
    ),
    "bad-fingerprint": (
        "bitmask",
        _record(lambda r: r.__setitem__("fingerprint", "md5:00")),
        allof(re.escape(DOWN0), "fingerprint"),
    ),
    # top-level fields
    "format-version-2": (
        "bitmask",
        lambda d: d.__setitem__("format_version", 2),
        r"format version 2; hf_edit_patch .* reads up to 1: upgrade hf_edit_patch",
    ),
    "format-version-str": ("bitmask", lambda d: d.__setitem__("format_version", "1"), r"format_version must be"),
    "patch-type": ("bitmask", lambda d: d.__setitem__("patch_type", "LORA"), r"not an edit patch"),
    "modules-list": ("bitmask", lambda d: d.__setitem__("modules", [DOWN0]), r"modules must be a mapping"),
    "value-dtype-bad": ("bitmask", lambda d: d.__setitem__("value_dtype", "int8"), r"value_dtype must be one of"),
    "keep-ratio-str": ("bitmask", lambda d: d.__setitem__("keep_ratio", "0.4"), r"keep_ratio must be a number"),
    "regularizer-bad": ("bitmask", lambda d: d.__setitem__("regularizer", "l1"), r"regularizer must be one of"),
    "requests-not-list": ("bitmask", lambda d: d.__setitem__("requests", {}), r"requests must be a list"),
    "sha-wrong": (
        "bitmask",
        lambda d: d.__setitem__("tensors_sha256", "sha256:" + "0" * 64),
        r"sha256 differs",
    ),
    # a content hash that the tensors do not have is a config that disagrees with the tensors
    "content-hash-wrong": (
        "bitmask",
        lambda d: d.__setitem__("content_hash", "sha256:" + "0" * 64),
        r"content_hash",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_disagrees(tmp_path, llama_held, case):
    encoding, mutate, match = CONFIG_CASES[case]
    folder = tmp_path / "p"
    saved_patch(folder, encoding)
    edit_config(folder, mutate)
    with pytest.raises(PatchFormatError, match=match):
        EditPatch.from_pretrained(folder)
    with pytest.raises(PatchFormatError, match=match):
        llama_held.pm.load_patch(folder, "second")
    llama_held.assert_untouched()


RAW_CONFIGS = {
    "truncated": (lambda b: b[: len(b) // 2], r"is not valid JSON.*truncated or corrupt"),
    "empty": (lambda b: b"", r"is not valid JSON.*truncated or corrupt"),
    "garbage-bytes": (lambda b: b"\xff\xfe\x00\x81garbage", r"is not valid JSON.*truncated or corrupt"),
    "trailing-junk": (lambda b: b + b"}}", r"is not valid JSON.*truncated or corrupt"),
    "json-list": (lambda b: b"[1, 2]", r"patch_config\.json must hold a JSON object, got list"),
    "json-null": (lambda b: b"null", r"patch_config\.json must hold a JSON object, got NoneType"),
}


@pytest.mark.parametrize("case", list(RAW_CONFIGS))
def test_corrupt_config_file(tmp_path, llama_held, case):
    damage, match = RAW_CONFIGS[case]
    folder = tmp_path / "p"
    saved_patch(folder, "bitmask")
    path = folder / CONFIG_NAME
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(PatchFormatError, match=match):
        EditPatch.from_pretrained(folder)
    with pytest.raises(PatchFormatError, match=match):
        PatchedModel.from_pretrained(llama_held.pm, folder, "second")
    llama_held.assert_untouched()


def test_unknown_keys_from_newer_version_warn_and_load(tmp_path):
    folder = tmp_path / "p"
    patch = saved_patch(folder, "bitmask")

    def add_keys(d):
        d["quantum_sparsity"] = {"level": 3}
        d["modules"][DOWN0]["zstd_level"] = 9

    edit_config(folder, add_keys)
    with pytest.warns(UserWarning, match=r"newer version.*upgrade hf_edit_patch") as record:
        loaded = EditPatch.from_pretrained(folder)
    messages = " ".join(str(w.message) for w in record)
    assert "quantum_sparsity" in messages and "zstd_level" in messages and DOWN0 in messages
    assert loaded.deltas[DOWN0].equal(patch.deltas[DOWN0])
    assert loaded.config.content_hash == patch.config.content_hash


def test_missing_config_file(tmp_path, llama_held):
    folder = tmp_path / "p"
    saved_patch(folder, "bitmask")
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(PatchNotFoundError, match=re.escape(CONFIG_NAME)):
        EditPatch.from_pretrained(folder)
    with pytest.raises(PatchNotFoundError, match=re.escape(CONFIG_NAME)):
        llama_held.pm.load_patch(folder, "second")
    llama_held.assert_untouched()


def test_missing_config_file_patched_model_names_it(tmp_path, llama_held):
    """A folder with a safetensors file but no patch_config.json: the error must name patch_config.json."""
    folder = tmp_path / "p"
    saved_patch(folder, "bitmask")
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(PatchNotFoundError, match=re.escape(CONFIG_NAME)):
        PatchedModel.from_pretrained(llama_held.pm, folder, "second")
    llama_held.assert_untouched()


def test_missing_weights_file(tmp_path, llama_held):
    folder = tmp_path / "p"
    saved_patch(folder, "bitmask")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(PatchNotFoundError, match=re.escape(WEIGHTS_NAME)):
        EditPatch.from_pretrained(folder)
    with pytest.raises(PatchNotFoundError, match=re.escape(WEIGHTS_NAME)):
        PatchedModel.from_pretrained(llama_held.pm, folder, "second")
    llama_held.assert_untouched()


def test_empty_folder_and_nonexistent_paths(tmp_path, llama_held):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchNotFoundError, match=re.escape(CONFIG_NAME)):
        EditPatch.from_pretrained(tmp_path / "empty")
    missing = tmp_path / "no" / "such" / "patch"
    with pytest.raises(PatchNotFoundError, match=r"neither an existing local folder nor a valid Hub repo id"):
        EditPatch.from_pretrained(missing)
    with pytest.raises(PatchNotFoundError, match=re.escape(repr(str(missing)))):
        PatchedModel.from_pretrained(llama_held.pm, missing, "second")
    with pytest.raises(PatchNotFoundError, match=r"'no-such-user-xyz/no-such-patch'.*not in the local cache"):
        EditPatch.from_pretrained("no-such-user-xyz/no-such-patch")
    llama_held.assert_untouched()


def test_path_to_a_file_is_not_a_patch(tmp_path):
    folder = tmp_path / "p"
    saved_patch(folder, "bitmask")
    with pytest.raises(PatchNotFoundError):
        EditPatch.from_pretrained(folder / CONFIG_NAME)


# ---------------------------------------------------------------------------------------------------- stacks
def saved_stack(folder) -> None:
    model = make_llama()
    a, b = make_patch(model, [DOWN0], seed=2), make_patch(model, [DOWN1], seed=3)
    pm = PatchedModel(model)
    pm.add_patch(a, "a").add_patch(b, "b")
    pm.save_pretrained(folder)


def test_stack_with_corrupt_member(tmp_path, llama_held):
    folder = tmp_path / "stack"
    saved_stack(folder)
    path = folder / "b" / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PatchFormatError, match=r"sha256 differs"):
        PatchedModel.from_pretrained(llama_held.pm, folder)
    llama_held.assert_untouched()


def test_stack_member_that_does_not_fit_rolls_back(tmp_path, llama_held):
    folder = tmp_path / "stack"
    saved_stack(folder)
    make_patch(make_llama(intermediate_size=40), [DOWN1]).save_pretrained(folder / "b")
    with pytest.raises(PatchValidationError, match=mod(DOWN1) + r".*shape \[32, 48\].*\[32, 40\]"):
        PatchedModel.from_pretrained(llama_held.pm, folder)
    llama_held.assert_untouched()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"patches": ["a", "b"', r"not a valid patch stack"),
        (b'{"patches": "a"}', r"not a valid patch stack"),
        (b'{"stack": ["a"]}', r"not a valid patch stack"),
        (b'["a", "b"]', r"not a valid patch stack"),
        (b"\xff\xfe\x00\x81garbage", r"not a valid patch stack"),
    ],
    ids=["truncated", "not-a-list", "no-key", "json-list", "garbage-bytes"],
)
def test_corrupt_stack_file(tmp_path, llama_held, content, match):
    folder = tmp_path / "stack"
    saved_stack(folder)
    (folder / STACK_NAME).write_bytes(content)
    with pytest.raises(PatchFormatError, match=match):
        PatchedModel.from_pretrained(llama_held.pm, folder)
    llama_held.assert_untouched()


def test_stack_duplicate_and_clashing_names(tmp_path, llama_held):
    folder = tmp_path / "stack"
    saved_stack(folder)
    (folder / STACK_NAME).write_text(json.dumps({"patches": ["a", "a"]}))
    with pytest.raises(PatchError, match=r"lists a patch name twice: \['a', 'a'\]"):
        PatchedModel.from_pretrained(llama_held.pm, folder)
    (folder / "held").mkdir()
    make_patch(make_llama(), [DOWN0]).save_pretrained(folder / "held")
    (folder / STACK_NAME).write_text(json.dumps({"patches": ["held"]}))
    with pytest.raises(PatchError, match=r"'held' is already attached"):
        PatchedModel.from_pretrained(llama_held.pm, folder)
    llama_held.assert_untouched()


def test_stack_invalid_name_rejected_before_reading(tmp_path, llama_held):
    """A stack naming '../nope' is a bad config: a ValueError about the name, raised before any file is read."""
    folder = tmp_path / "stack"
    saved_stack(folder)
    (folder / STACK_NAME).write_text(json.dumps({"patches": ["a", "../nope"]}))
    with pytest.raises(ValueError, match=r"patch_name must be.*'\.\./nope'"):
        PatchedModel.from_pretrained(llama_held.pm, folder)
    llama_held.assert_untouched()


# ---------------------------------------------------------------------------------------------------- no pickle
class _Trap:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _forbid_pickle(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("hf_edit_patch tried to unpickle something")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    folder = tmp_path / "p"
    patch = saved_patch(folder, "bitmask")
    sentinel = tmp_path / "unpickled.txt"
    trap = pickle.dumps(_Trap(str(sentinel)))
    for name in ("pytorch_model.bin", "patch_model.bin", "adapter_model.bin", "patch_model.pt", "patch_model.pkl"):
        (folder / name).write_bytes(trap)
    _forbid_pickle(monkeypatch)

    loaded = EditPatch.from_pretrained(folder)
    assert loaded.deltas[DOWN0].equal(patch.deltas[DOWN0])
    model = make_llama()
    base = snapshot(model)
    pm = PatchedModel.from_pretrained(model, folder)
    assert pm.active_patches == ["default"]
    assert not torch.equal(model.get_submodule(DOWN0).weight, base[f"{DOWN0}.weight"])
    pm.unload()
    assert_same(model, base)
    assert not sentinel.exists()


def test_pickle_only_folder_is_not_loaded(tmp_path, monkeypatch):
    folder = tmp_path / "p"
    saved_patch(folder, "bitmask")
    (folder / WEIGHTS_NAME).unlink()
    sentinel = tmp_path / "unpickled.txt"
    (folder / "patch_model.bin").write_bytes(pickle.dumps(_Trap(str(sentinel))))
    _forbid_pickle(monkeypatch)
    with pytest.raises(PatchNotFoundError, match=re.escape(WEIGHTS_NAME)):
        EditPatch.from_pretrained(folder)
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------------- atomic saves
def _half_then_fail(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def _two_patches():
    model = make_llama()
    return make_patch(model, [DOWN0], seed=4), make_patch(model, [DOWN0, DOWN1], seed=5, keep_ratio=0.1)


def _assert_previous_save_intact(folder, before: dict[str, bytes], previous: EditPatch) -> None:
    assert leftovers(folder) == []
    assert folder_bytes(folder) == before
    loaded = EditPatch.from_pretrained(folder)
    assert loaded.config.content_hash == previous.config.content_hash
    assert all(loaded.deltas[n].equal(d) for n, d in previous.deltas.items())


def test_failed_weights_write_keeps_previous_save(tmp_path, monkeypatch):
    a, b = _two_patches()
    folder = tmp_path / "p"
    a.save_pretrained(folder)
    before = folder_bytes(folder)
    monkeypatch.setattr(patch_module, "save_file", _half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        b.save_pretrained(folder)
    _assert_previous_save_intact(folder, before, a)


def test_failed_weights_write_into_new_folder_leaves_nothing(tmp_path, monkeypatch):
    a, _ = _two_patches()
    monkeypatch.setattr(patch_module, "save_file", _half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        a.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == []


def test_failed_config_write_keeps_previous_save(tmp_path, monkeypatch):
    a, b = _two_patches()
    folder = tmp_path / "p"
    a.save_pretrained(folder)
    before = folder_bytes(folder)
    real_fsync = fileio.os.fsync
    calls = []

    def fail_on_config(fd):  # the weights are written first, the config second
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fail_on_config)
    with pytest.raises(OSError, match="No space left"):
        b.save_pretrained(folder)
    monkeypatch.undo()
    _assert_previous_save_intact(folder, before, a)


def test_failed_config_serialization_keeps_previous_save(tmp_path, monkeypatch):
    a, b = _two_patches()
    folder = tmp_path / "p"
    a.save_pretrained(folder)
    before = folder_bytes(folder)

    def fail(self):
        raise RuntimeError("boom while serializing the config")

    monkeypatch.setattr(PatchConfig, "to_json_string", fail)
    with pytest.raises(RuntimeError, match="boom"):
        b.save_pretrained(folder)
    monkeypatch.undo()
    _assert_previous_save_intact(folder, before, a)


def test_save_into_a_file_path(tmp_path):
    a, _ = _two_patches()
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    with pytest.raises(ValueError, match=r"is a file; give a folder path"):
        a.save_pretrained(target)
    assert target.read_text() == "keep me"
