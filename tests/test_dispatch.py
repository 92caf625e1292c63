"""Models dispatched with accelerate: a tiny Llama with one layer offloaded to disk and the rest on the CPU.

Patches are written where each weight lives (the offloaded one in an in-memory override the hook loads from, the
offload files untouched), removal is exact, nothing is added to a forward pass, and editors run through the
dispatched model and compute the very edit they compute on an undispatched copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TARGETS, make_gpt2, make_llama
from helpers import random_patch
from test_editors import REQ, WORDS, llama4, tiny_tokenizer

import hf_edit_patch as hep
from hf_edit_patch.editing.memory import edit_memory
from hf_edit_patch.editors.architectures import get_arch
from hf_edit_patch.errors import PatchError, PatchValidationError
from hf_edit_patch.modules import offloaded_weight, resolve_weight
from hf_edit_patch.offload import compute_device, input_device

accelerate = pytest.importorskip("accelerate")

pytestmark = pytest.mark.filterwarnings("ignore:the weights of")  # stacked patches computed on the base


def _device_map(layers: int, on_disk: set[int]) -> dict[str, str]:
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i in on_disk else "cpu" for i in range(layers)}
    return device_map


def _dispatch(model: torch.nn.Module, layers: int, on_disk: set[int], folder: Path) -> torch.nn.Module:
    return accelerate.dispatch_model(model, _device_map(layers, on_disk), offload_dir=str(folder))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _hooks(model: torch.nn.Module) -> list[tuple]:
    """Everything a forward pass could run besides the modules' own code."""
    return [
        (name, id(getattr(m, "_hf_hook", None)), len(m._forward_hooks), len(m._forward_pre_hooks), m.forward)
        for name, m in model.named_modules()
    ]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patches_on_a_disk_offloaded_layer_are_exact_and_cost_nothing(tmp_path, dtype):
    plain, model = make_llama(dtype=dtype), make_llama(dtype=dtype)
    _dispatch(model, 2, {1}, tmp_path)
    offloaded = LLAMA_TARGETS[1]  # model.layers.1.mlp.down_proj; LLAMA_TARGETS[0] stays an ordinary CPU weight
    assert model.get_submodule(offloaded).weight.is_meta
    assert torch.equal(resolve_weight(model, offloaded)[1], plain.get_submodule(offloaded).weight)
    files, hooks = _digest(tmp_path), _hooks(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    base_logits = _logits(model, ids)
    patches = [random_patch(plain, LLAMA_TARGETS, keep_ratio=0.5, seed=s) for s in (1, 2, 3)]

    pm, reference = hep.PatchedModel(model), hep.PatchedModel(plain)
    for i, patch in enumerate(patches):
        pm.add_patch(patch, f"p{i}")
        reference.add_patch(patch, f"p{i}")
    assert torch.equal(_logits(pm, ids), _logits(reference, ids))
    assert not torch.equal(_logits(pm, ids), base_logits)
    home = offloaded_weight(model, offloaded)
    assert home is not None and home.in_memory  # the override the hook loads from
    assert torch.equal(home.read(), plain.get_submodule(offloaded).weight)
    assert _hooks(model) == hooks  # no hook added, none replaced
    assert model.get_submodule(offloaded).weight.is_meta

    pm.remove_patch("p1")  # from the middle
    reference.remove_patch("p1")
    assert torch.equal(_logits(pm, ids), _logits(reference, ids))
    with pm.disable_patches():
        assert torch.equal(_logits(pm, ids), base_logits)
        assert not offloaded_weight(model, offloaded).in_memory  # restored: the file is read again
    assert torch.equal(_logits(pm, ids), _logits(reference, ids))

    pm.unload()
    assert torch.equal(_logits(model, ids), base_logits)
    assert not offloaded_weight(model, offloaded).in_memory
    loader = model.get_submodule(offloaded)._hf_hook.weights_map.dataset
    assert loader.state_dict == {}  # no copy of any weight is left behind
    assert _digest(tmp_path) == files  # the offload files were never written


def test_merge_and_unload_keeps_the_merged_weights_where_the_hook_loads_them(tmp_path):
    plain, model = make_llama(), make_llama()
    _dispatch(model, 2, {1}, tmp_path)
    patch = random_patch(plain, LLAMA_TARGETS, seed=4)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    merged = hep.PatchedModel.from_pretrained(model, patch).merge_and_unload()
    expected = hep.PatchedModel.from_pretrained(plain, patch).merge_and_unload()
    assert merged is model
    assert torch.equal(_logits(merged, ids), _logits(expected, ids))


def test_cpu_offload_writes_into_the_weights_map():
    plain, model = make_llama(), make_llama()
    accelerate.cpu_offload(model, execution_device="cpu")
    name = LLAMA_TARGETS[1]
    held = offloaded_weight(model, name)
    assert held is not None and held.in_memory and model.get_submodule(name).weight.is_meta
    tensor = held.read()
    before = tensor.clone()
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    patch = random_patch(plain, LLAMA_TARGETS, seed=5)
    pm = hep.PatchedModel.from_pretrained(model, patch)
    assert held.read() is tensor and not torch.equal(tensor, before)  # written in place
    assert torch.equal(_logits(pm, ids), _logits(hep.PatchedModel.from_pretrained(plain, patch), ids))
    pm.unload()
    assert torch.equal(tensor, before)


def test_compute_device_of_an_offloaded_module_is_the_hooks_execution_device(tmp_path):
    model = _dispatch(make_llama(), 2, {1}, tmp_path)
    assert compute_device(model, LLAMA_TARGETS[1]) == torch.device("cpu")
    assert input_device(model) == torch.device("cpu") and input_device(make_llama()) is None
    meta = make_llama().to("meta")
    with pytest.raises(PatchValidationError, match="meta device and no accelerate hook"):
        compute_device(meta, LLAMA_TARGETS[1])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (10,), generator=gen)) for _ in range(24)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


FEW_STEPS = {"v_num_grad_steps": 3, "n_context_templates": 0, "mom2_n_samples": 24, "mom2_max_length": 16}


@pytest.mark.parametrize(
    ("method", "hparams"),
    [("rome", {**FEW_STEPS, "mom2_adjustment": True}), ("memit", {**FEW_STEPS, "layers": [1, 2]})],
)
def test_an_edit_on_the_dispatched_model_equals_the_edit_on_the_plain_one(tmp_path, tok, corpus, method, hparams):
    requests = [REQ, hep.EditRequest(prompt="the capital of {} is", subject="japan", target_new="berlin")]
    requests = requests[:1] if method == "rome" else requests
    patches = []
    for dispatched in (False, True):
        model = llama4(tok)
        if dispatched:  # the edited layers live on disk; statistics, tracing and the value optimization run through it
            _dispatch(model, 4, {1, 2}, tmp_path / "offload")
            hooks = _hooks(model)
        patches.append(
            hep.edit(
                model,
                tok,
                requests,
                method=method,
                hparams=hparams,
                keep_ratio=0.5,
                value_dtype="float32",
                stats_dataset=str(corpus),
                show_progress=False,
            )
        )
    plain, dispatched = patches
    assert list(plain.deltas) == list(dispatched.deltas)
    for name, delta in plain.deltas.items():
        assert torch.equal(delta.indices, dispatched.deltas[name].indices)
        assert torch.equal(delta.values, dispatched.deltas[name].values)
        assert plain.config.modules[name].fingerprint == dispatched.config.modules[name].fingerprint
    assert any(resolve_weight(model, n)[1].abs().sum() > 0 for n in dispatched.deltas)
    assert all(model.get_submodule(n).weight.is_meta for n in dispatched.deltas)  # the model was not written
    assert _hooks(model) == hooks  # accelerate's wrappers are in place after the checkpointed value optimization


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_edit_memory_from_the_config_matches_the_model(make):
    model = make()
    spec = get_arch(model)
    layers = [0, 1]
    estimate = edit_memory(model.config, method="memit", hparams={"layers": layers}, dtype="float16")
    names = [spec.mlp_out.format(i) for i in layers]
    assert list(estimate.modules) == names
    assert all(estimate.modules[n] == tuple(model.get_submodule(n).weight.shape) for n in names)
    assert estimate.weights == sum(p.numel() for p in model.parameters()) * 2
    d_in = model.config.intermediate_size if spec.layout == "linear" else 4 * model.config.n_embd
    assert estimate.statistics == len(layers) * d_in**2 * 4
    assert (estimate.passes, estimate.statistics_pass) == (1, 2 * d_in**2 * 8 + d_in**2 * 4)
    split = edit_memory(model, method="memit", hparams={"layers": layers}, dtype=torch.float32, max_bytes=d_in**2 * 4)
    assert (split.passes, split.statistics_pass) == (2, d_in**2 * 8 + d_in**2 * 4)
    assert split.weights == 2 * estimate.weights
    assert "memit on 2 module(s)" in estimate.table()


def test_edit_memory_rejects_what_it_does_not_cover():
    with pytest.raises(
        PatchError, match=r"covers the methods \['alphaedit', 'ft', 'kn', 'memit', 'rome'\], got 'mend'"
    ):
        edit_memory(make_llama().config, method="mend")
    with pytest.raises(PatchError, match="dtype must be a floating point torch dtype"):
        edit_memory(make_llama().config, dtype="int8")


def test_kn_on_a_model_whose_output_head_is_on_disk_equals_kn_on_the_plain_one(tmp_path, tok):
    """KN writes answer embeddings (rows of the output head) into neurons: an offloaded head is read from disk."""
    from test_editors_more import KN_REQ

    patches = []
    for dispatched in (False, True):
        model = llama4(tok)
        if dispatched:
            accelerate.dispatch_model(
                model, {**_device_map(4, {1, 2}), "lm_head": "disk"}, offload_dir=str(tmp_path / "offload")
            )
            assert model.lm_head.weight.is_meta
        kw = {"hparams": {"steps": 8}, "value_dtype": "float32", "keep_ratio": None, "show_progress": False}
        patches.append(hep.edit(model, tok, [KN_REQ], method="kn", **kw))
    plain, dispatched = patches
    assert plain.config.editor_hparams["neurons"] == dispatched.config.editor_hparams["neurons"]
    assert list(plain.deltas) == list(dispatched.deltas) and plain.deltas
    for name, delta in plain.deltas.items():
        assert torch.equal(delta.to_dense(), dispatched.deltas[name].to_dense()), name
