from __future__ import annotations

import pytest
import torch
from conftest import GPT2_TARGETS, LLAMA_TARGETS, assert_state_equal, make_gpt2, make_llama, snapshot
from helpers import expected_weights, random_patch

import hf_edit_patch as hep

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ARCHS = {"llama": (make_llama, LLAMA_TARGETS), "gpt2": (make_gpt2, GPT2_TARGETS)}


def _model(arch, dtype):
    make, targets = ARCHS[arch]
    return make(dtype=dtype), targets


@pytest.mark.filterwarnings("ignore:the weights of")  # stacked patches computed on the base: expected
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_stack_remove_disable_unload_are_exact(arch, dtype):
    model, targets = _model(arch, dtype)
    base = snapshot(model)
    p1 = random_patch(model, targets, keep_ratio=0.5, seed=1)
    p2 = random_patch(model, targets[:2], keep_ratio=0.5, seed=2)  # overlaps p1 on many entries
    p3 = random_patch(model, targets[1:], keep_ratio=0.3, seed=3)
    overlap = set(p1.deltas[targets[1]].flat_indices.tolist()) & set(p2.deltas[targets[1]].flat_indices.tolist())
    assert overlap, "the test needs patches that touch the same entries"

    pm = hep.PatchedModel.from_pretrained(model, p1)
    assert pm.base_model is model
    pm.add_patch(p2, "p2")
    pm.add_patch(p3, "p3")
    assert pm.active_patches == ["default", "p2", "p3"]
    assert_state_equal(model, expected_weights(base, [p1, p2, p3], model))
    assert not all(torch.equal(v, base[k]) for k, v in model.state_dict().items())

    with pm.disable_patches():
        assert_state_equal(model, base)
        assert pm.active_patches == ["default", "p2", "p3"]
    assert_state_equal(model, expected_weights(base, [p1, p2, p3], model))

    assert pm.remove_patch("p2") is p2  # from the middle
    assert pm.active_patches == ["default", "p3"]
    assert_state_equal(model, expected_weights(base, [p1, p3], model))

    pm.remove_patch("p3")  # from the top
    assert_state_equal(model, expected_weights(base, [p1], model))

    assert pm.unload() is model
    assert pm.active_patches == []
    assert_state_equal(model, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attach_writes_cast_of_fp32_sum_on_stored_entries_only(dtype):
    model, targets = _model("gpt2", dtype)
    name = targets[0]
    w0 = model.get_submodule(name).weight.detach().clone()
    patch = random_patch(model, [name], keep_ratio=0.25, scale=0.3)
    delta = patch.deltas[name]
    hep.PatchedModel(model).add_patch(patch)
    w1 = model.get_submodule(name).weight.detach()
    flat = delta.flat_indices
    want = (w0.view(-1)[flat].float() + delta.values.float()).to(dtype)
    assert torch.equal(w1.view(-1)[flat], want)
    untouched = torch.ones(w0.numel(), dtype=torch.bool)
    untouched[flat] = False
    assert torch.equal(w1.view(-1)[untouched], w0.view(-1)[untouched])
    assert delta.shape == tuple(w0.shape)  # Conv1D layout [in, out], not transposed


def test_forward_and_generate_delegate_and_match_merged_model(llama):
    base = snapshot(llama)
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    before = llama(input_ids=ids).logits
    patch = random_patch(llama, LLAMA_TARGETS, keep_ratio=0.4, scale=0.5)
    pm = hep.PatchedModel.from_pretrained(llama, patch)
    patched = pm(input_ids=ids).logits
    assert not torch.allclose(patched, before)
    gen = pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)
    assert pm.config is llama.config  # attribute delegation
    merged = pm.merge_and_unload()
    assert merged is llama and pm.active_patches == []
    assert torch.equal(merged(input_ids=ids).logits, patched)
    assert not torch.equal(llama.model.layers[0].mlp.down_proj.weight, base["model.layers.0.mlp.down_proj.weight"])


def test_attached_patch_adds_nothing_to_the_forward_pass(llama):
    modules_before = [(n, type(m)) for n, m in llama.named_modules()]
    pm = hep.PatchedModel.from_pretrained(llama, random_patch(llama, LLAMA_TARGETS))
    assert [(n, type(m)) for n, m in llama.named_modules()] == modules_before
    hooks = [m for m in llama.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks
    assert not list(pm.buffers()) or all(b is not None for b in pm.buffers())
    assert sum(p.numel() for p in pm.parameters()) == sum(p.numel() for p in llama.parameters())


def test_disable_patches_restores_on_error_and_blocks_changes(llama):
    base = snapshot(llama)
    patch = random_patch(llama, LLAMA_TARGETS)
    pm = hep.PatchedModel.from_pretrained(llama, patch)
    patched = snapshot(llama)
    with pytest.raises(RuntimeError, match="boom"), pm.disable_patches():
        assert_state_equal(llama, base)
        raise RuntimeError("boom")
    assert_state_equal(llama, patched)
    with pm.disable_patches():
        with pm.disable_patches():  # nested: still base, and the outer exit re-applies once
            assert_state_equal(llama, base)
        assert_state_equal(llama, base)
        with pytest.raises(ValueError, match="inside disable_patches"):
            pm.add_patch(random_patch(llama, LLAMA_TARGETS[:1], seed=9), "x")
        with pytest.raises(ValueError, match="inside disable_patches"):
            pm.remove_patch("default")
    assert_state_equal(llama, patched)


def test_remove_unknown_name_and_bad_names(llama):
    pm = hep.PatchedModel.from_pretrained(llama, random_patch(llama, LLAMA_TARGETS))
    with pytest.raises(ValueError, match=r"no patch named 'nope'; active patches: \['default'\]"):
        pm.remove_patch("nope")
    for bad in ["", "a/b", "../x", ".hidden", 3]:
        with pytest.raises(ValueError, match="patch_name must be"):
            pm.add_patch(random_patch(llama, LLAMA_TARGETS[:1], seed=5), bad)
    assert pm.active_patches == ["default"]


def test_from_deltas_leaves_model_unchanged_and_records_provenance(gpt2):
    base = snapshot(gpt2)
    name = GPT2_TARGETS[0]
    w = gpt2.get_submodule(name).weight
    u, v = torch.randn(w.shape[0]), torch.randn(w.shape[1])
    patch = hep.EditPatch.from_deltas(
        {name: (u, v)}, gpt2, keep_ratio=0.4, editor="synthetic", requests=[{"prompt": "{} is", "subject": "x"}]
    )
    assert_state_equal(gpt2, base)
    cfg = patch.config
    rec = cfg.modules[name]
    assert rec.layout == "conv1d" and rec.shape == tuple(w.shape) and rec.weight_dtype == "float32"
    assert rec.fingerprint == hep.fingerprint(w)
    assert cfg.editor == "synthetic" and cfg.regularizer == "rect" and cfg.keep_ratio == 0.4
    assert cfg.requests == [{"prompt": "{} is", "subject": "x"}]
    assert cfg.model_type == "gpt2" and cfg.library_version == hep.__version__
    assert patch.nnz == round(0.4 * w.numel())
    dense = torch.outer(u, v)
    expected = hep.rect_sparsify(dense, w, 0.4)
    assert torch.equal(patch.deltas[name].flat_indices, expected.flat_indices)


def test_sequential_patches_record_their_parents(llama):
    pm = hep.PatchedModel.from_pretrained(llama, random_patch(llama, LLAMA_TARGETS, seed=1))
    pm.add_patch(random_patch(pm, LLAMA_TARGETS[:1], seed=2), "second")
    child = random_patch(pm, LLAMA_TARGETS[1:], seed=3)
    assert [p["name"] for p in child.config.parent_patches] == ["default", "second"]
    assert child.config.parent_patches[1]["content_hash"] == pm.patches["second"].config.content_hash
    # the fingerprint is of the patched weights the child was computed on
    assert child.config.modules[LLAMA_TARGETS[1]].fingerprint == hep.fingerprint(
        llama.model.layers[1].mlp.down_proj.weight
    )


def test_stack_save_and_reload_reproduces_weights(llama, tmp_path):
    p1 = random_patch(llama, LLAMA_TARGETS, seed=1)
    pm = hep.PatchedModel.from_pretrained(llama, p1, patch_name="first")
    pm.add_patch(random_patch(pm, LLAMA_TARGETS[:2], seed=2), "second")
    patched = snapshot(llama)
    pm.save_pretrained(tmp_path / "stack")
    # one subfolder per patch, the order, and one card listing every edit of the series
    saved = sorted(p.name for p in (tmp_path / "stack").iterdir())
    assert saved == ["README.md", "first", "patch_stack.json", "second"]
    base = pm.unload()

    pm2 = hep.PatchedModel.from_pretrained(base, tmp_path / "stack")
    assert pm2.active_patches == ["first", "second"]
    assert_state_equal(llama, patched)
    pm2.unload()
    single = hep.PatchedModel.from_pretrained(llama, tmp_path / "stack" / "first", patch_name="only")
    assert single.active_patches == ["only"]
    assert single.patches["only"].deltas[LLAMA_TARGETS[0]].equal(p1.deltas[LLAMA_TARGETS[0]])


def test_load_patch_from_folder(llama, tmp_path):
    base = snapshot(llama)
    patch = random_patch(llama, LLAMA_TARGETS)
    patch.save_pretrained(tmp_path / "p")
    pm = hep.PatchedModel(llama)
    pm.load_patch(tmp_path / "p", patch_name="loaded")
    assert_state_equal(llama, expected_weights(base, [patch], llama))


def test_model_on_meta_device_change_warns_but_restores(llama):
    base = snapshot(llama)
    pm = hep.PatchedModel.from_pretrained(llama, random_patch(llama, LLAMA_TARGETS))
    llama.to(torch.float64)
    with pytest.warns(UserWarning, match="changed dtype"):
        pm.unload()
    llama.to(torch.float32)
    assert_state_equal(llama, base)  # fp32 -> fp64 -> fp32 is lossless


@pytest.mark.filterwarnings("ignore:the weights of")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernels_give_the_same_bits_as_the_reference(triton_kernels, dtype):
    """The whole attach / stack / remove / unload cycle and RECT through the Triton kernels (interpreter on CPU)."""
    model, targets = _model("llama", dtype)
    base = snapshot(model)
    p1 = random_patch(model, targets, keep_ratio=0.5, seed=1, scale=0.5)
    p2 = random_patch(model, targets[:2], keep_ratio=0.3, seed=2, scale=0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_EDIT_PATCH_KERNELS", "reference")
        assert random_patch(model, targets, keep_ratio=0.5, seed=1, scale=0.5).config.content_hash == (
            p1.config.content_hash
        )
    pm = hep.PatchedModel.from_pretrained(model, p1)
    pm.add_patch(p2, "p2")
    assert_state_equal(model, expected_weights(base, [p1, p2], model))
    pm.remove_patch("default")
    assert_state_equal(model, expected_weights(base, [p2], model))
    pm.unload()
    assert_state_equal(model, base)


def test_forcing_triton_where_it_cannot_run_is_a_clear_error(llama, monkeypatch):
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = snapshot(llama)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        hep.rect_sparsify(torch.randn(8, 8), torch.randn(8, 8), 0.5)
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "reference")
    patch = random_patch(llama, LLAMA_TARGETS)
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        hep.PatchedModel(llama).add_patch(patch)
    assert_state_equal(llama, base)
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "magic")
    with pytest.raises(ValueError, match="HF_EDIT_PATCH_KERNELS must be one of"):
        hep.PatchedModel(llama).add_patch(patch)
    assert_state_equal(llama, base)
