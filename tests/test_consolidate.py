"""Consolidating a run of patches into one, the stack-level regularizers, and edits regularized against a stack."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LLAMA_TARGETS, assert_state_equal, make_llama, snapshot
from helpers import expected_weights, random_patch
from test_editors import llama4, tiny_tokenizer

import hf_edit_patch as hep
from hf_edit_patch.errors import PatchError
from hf_edit_patch.patch.encoding import fingerprint
from hf_edit_patch.patch.stack_regularizers import registered_stack_regularizers, stack_regularize
from hf_edit_patch.patched_model.consolidate import stack_regularized_patch, weights_under
from hf_edit_patch.patched_model.stack import stack_of

DOWN0, DOWN1, UP1 = LLAMA_TARGETS


def stack_of_four(model, dtype_auto=True):
    """p0..p3 on overlapping modules; returns the PatchedModel and the patches in order."""
    pm = hep.PatchedModel(model)
    targets = [LLAMA_TARGETS, (DOWN0, UP1), (DOWN0,), (DOWN1, UP1)]
    for i, t in enumerate(targets):
        pm.add_patch(random_patch(pm, t, keep_ratio=0.5, seed=10 + i, value_dtype="auto" if dtype_auto else "float32"),
                     f"p{i}")  # fmt: skip
    return pm, [pm.patches[f"p{i}"] for i in range(4)]


def param(model, module):
    return model.get_submodule(module).weight


def test_a_middle_run_becomes_one_patch_and_removing_it_restores_what_was_under_it():
    model = make_llama()
    base = snapshot(model)
    pm, (p0, p1, p2, p3) = stack_of_four(model)
    stacked = snapshot(model)
    under = expected_weights(base, [p0], model)

    c = pm.consolidate(["p2", "p1"])  # given in any order: the run is taken in stack order
    assert pm.active_patches == ["p0", "p1-p2", "p3"]
    now = snapshot(model)
    off = sum(int((now[k] != v).sum()) for k, v in stacked.items())
    assert off <= 20  # float32 entries whose sign the run flipped: the last bit (bit for bit in half precision)
    for key, value in now.items():
        torch.testing.assert_close(value, stacked[key], rtol=0, atol=1e-8)
    assert c.config.editor == "stack" and c.config.stack_regularizer is None
    assert c.config.consolidates == [
        {"name": n, "editor": p.config.editor, "content_hash": p.config.content_hash}
        for n, p in (("p1", p1), ("p2", p2))
    ]
    assert c.config.parent_patches == [{"name": "p0", "content_hash": p0.config.content_hash}]
    assert c.config.requests == p1.config.requests + p2.config.requests
    assert set(c.deltas) == {DOWN0, UP1}
    param_names = {id(p): n for n, p in model.named_parameters()}
    for module, rec in c.config.modules.items():  # fingerprints of the weights under the run
        assert rec.fingerprint == fingerprint(under[param_names[id(param(model, module))]])

    pm.remove_patch("p1-p2")  # p3 stays exactly applied on base + p0
    assert_state_equal(model, expected_weights(base, [p0, p3], model))
    pm.remove_patch("p3")
    assert_state_equal(model, under)
    pm.unload()
    assert_state_equal(model, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_without_a_regularizer_half_precision_weights_come_back_bit_for_bit(dtype):
    model = make_llama(dtype=dtype)
    base = snapshot(model)
    pm, _ = stack_of_four(model)
    stacked = snapshot(model)
    pm.consolidate()
    assert pm.active_patches == ["p0-p3"]
    assert_state_equal(model, stacked)
    pm.remove_patch("p0-p3")
    assert_state_equal(model, base)


def test_the_consolidated_patch_saves_loads_and_restacks(tmp_path):
    model = make_llama(dtype=torch.bfloat16)
    pm, _ = stack_of_four(model)
    pm.consolidate(["p0", "p1"], patch_name="c")
    stacked = snapshot(model)
    pm.save_pretrained(tmp_path / "exact")
    again = hep.PatchedModel.from_pretrained(make_llama(dtype=torch.bfloat16), tmp_path / "exact", strict=True)
    assert again.active_patches == ["c", "p2", "p3"]
    assert_state_equal(again.base_model, stacked)

    pm.consolidate(["c"], regularizer="norm_anchor", regularizer_kwargs={"alpha": 0.01}, patch_name="anchored")
    stacked = snapshot(model)
    pm.save_pretrained(tmp_path / "anchored")
    pm.unload()
    loaded = hep.EditPatch.from_pretrained(tmp_path / "anchored", subfolder="anchored")
    assert loaded.config.stack_regularizer == {"name": "norm_anchor", "alpha": 0.01}
    assert [p["name"] for p in loaded.config.consolidates] == ["c"]
    with pytest.warns(UserWarning, match="differ from those the patch was computed on"):  # p2 was computed on p0, p1
        again = hep.PatchedModel.from_pretrained(make_llama(dtype=torch.bfloat16), tmp_path / "anchored")
    assert again.active_patches == ["anchored", "p2", "p3"]
    assert_state_equal(again.base_model, stacked)


def test_norm_anchor_bounds_the_accumulated_update():
    model = make_llama()
    base = snapshot(model)
    pm, _ = stack_of_four(model)
    alpha = 0.02
    pm.consolidate(regularizer="norm_anchor", regularizer_kwargs={"alpha": alpha}, patch_name="all")
    for module in LLAMA_TARGETS:
        key = f"{module}.weight"
        acc = model.state_dict()[key] - base[key]
        bound = alpha * float(base[key].norm())
        assert float(acc.norm()) == pytest.approx(bound, rel=1e-4)  # it was over the bound: scaled down to it


def test_prune_compresses_only_the_singular_values_over_the_threshold():
    model = make_llama()
    weight = param(model, DOWN0).detach().clone()
    sigma_w = float(torch.linalg.matrix_norm(weight, ord=2))
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(weight.shape[0], 2, generator=gen), torch.randn(weight.shape[1], 2, generator=gen)
    u, v = torch.linalg.qr(u)[0], torch.linalg.qr(v)[0]
    sigmas = torch.tensor([3.0 * sigma_w, 0.5 * sigma_w])  # one direction far over the weight's spectrum
    dense = (u * sigmas) @ v.T
    pm = hep.PatchedModel(model)
    pm.add_patch(hep.EditPatch.from_deltas({DOWN0: dense}, model, regularizer=None, value_dtype="float32"), "big")
    c = pm.consolidate(["big"], regularizer="prune", regularizer_kwargs={"threshold": 1.0})
    assert pm.active_patches == ["big"]
    s = torch.linalg.svdvals(c.deltas[DOWN0].to_dense(torch.float32))
    expected = sigma_w * (1.0 + math.log(3.0))  # τ (1 + ln(σ / τ)) with τ = σ_max(W)
    torch.testing.assert_close(s[:2], torch.tensor([expected, 0.5 * sigma_w]), rtol=1e-4, atol=1e-4)
    top = torch.linalg.svd(c.deltas[DOWN0].to_dense(torch.float32))[0][:, 0]
    assert abs(float(top @ u[:, 0])) == pytest.approx(1.0, abs=1e-4)  # the direction is kept
    unchanged = stack_regularize(dense * 0.1, weight, "prune")  # under the threshold: the very same tensor back
    assert torch.equal(unchanged, dense * 0.1)
    pm.unload()


def test_rect_on_the_accumulated_update_bounds_its_entries():
    model = make_llama()
    pm, _ = stack_of_four(model)
    c = pm.consolidate(regularizer="rect", regularizer_kwargs={"keep_ratio": 0.1})
    for module, delta in c.deltas.items():
        assert 0 < delta.nnz <= round(0.1 * param(model, module).numel())
    pm.unload()


def test_bad_requests_leave_the_stack_as_it_was():
    model = make_llama()
    pm, _ = stack_of_four(model)
    stacked = snapshot(model)
    cases = [
        ({"patch_names": ["p0", "p2"]}, "consecutive"),
        ({"patch_names": ["p9"]}, "no patch named 'p9'"),
        ({"patch_names": ["p1", "p1"]}, "repeats"),
        ({"regularizer": "nope"}, r"unknown stack regularizer 'nope'; accepted: \('norm_anchor', 'prune', 'rect'\)"),
        ({"regularizer": "prune", "regularizer_kwargs": {"alpha": 1.0}}, r"takes the settings \('threshold',\)"),
        ({"regularizer_kwargs": {"alpha": 1.0}}, "need a stack regularizer"),
        ({"regularizer": "prune", "regularizer_kwargs": {"threshold": -1}}, "threshold must be a positive"),
        ({"regularizer": "rect"}, "needs keep_ratio"),
        ({"patch_names": ["p1"], "patch_name": "p2"}, "already attached"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PatchError, match=message):
            pm.consolidate(**kwargs)
        assert pm.active_patches == ["p0", "p1", "p2", "p3"]
        assert_state_equal(model, stacked)
    with pm.disable_patches(), pytest.raises(PatchError, match="disable_patches"):
        pm.consolidate()
    assert_state_equal(model, stacked)
    assert set(registered_stack_regularizers()) >= {"prune", "norm_anchor", "rect"}


def test_a_failed_attach_puts_the_run_back(monkeypatch):
    model = make_llama()
    pm, _ = stack_of_four(model)
    stacked = snapshot(model)

    def boom(*args, **kwargs):
        raise RuntimeError("attach failed")

    monkeypatch.setattr(hep.PatchedModel, "add_patch", boom)
    with pytest.raises(RuntimeError, match="attach failed"):
        pm.consolidate(["p1", "p2"])
    monkeypatch.undo()
    assert pm.active_patches == ["p0", "p1", "p2", "p3"]
    assert_state_equal(model, stacked)
    pm.remove_patch("p1")  # the undo data survived: removing a middle patch is still exact
    pm.unload()


def test_a_new_patch_regularized_against_the_stack():
    model = make_llama()
    base = snapshot(model)
    pm = hep.PatchedModel(model)
    pm.add_patch(random_patch(pm, (DOWN0,), keep_ratio=None, regularizer=None, scale=0.05, seed=1), "a")
    new = random_patch(pm, (DOWN0, DOWN1), keep_ratio=None, regularizer=None, scale=0.05, seed=2)
    alpha = 0.05
    key0, key1 = f"{DOWN0}.weight", f"{DOWN1}.weight"
    assert float((model.state_dict()[key0] - base[key0]).norm()) > alpha * float(base[key0].norm())  # over already

    anchored = stack_regularized_patch(pm, new, "norm_anchor", {"alpha": alpha})
    assert anchored.config.stack_regularizer == {"name": "norm_anchor", "alpha": alpha}
    assert [p["name"] for p in anchored.config.parent_patches] == ["a"]
    pm.add_patch(anchored, "b")
    for key in (key0, key1):
        acc = (model.state_dict()[key] - base[key]).float()
        assert float(acc.norm()) <= alpha * float(base[key].norm()) * (1 + 1e-3)

    loose = stack_regularized_patch(pm, new, "norm_anchor", {"alpha": 10.0})  # the bound holds: the patch as it was
    assert loose.config.content_hash == new.config.content_hash
    pm.unload()
    assert_state_equal(model, base)


def test_edit_and_patched_model_edit_take_a_stack_regularizer():
    tok = tiny_tokenizer()
    model = llama4(tok)
    req = hep.EditRequest(prompt="{} is located in the city of", subject="the eiffel tower", target_new="rome")
    ft = {"norm_constraint": 0.2, "lr": 0.02}
    pm = hep.PatchedModel(model)
    base = snapshot(model)
    patch = pm.edit(tok, [req], method="ft", hparams=ft, keep_ratio=None, patch_name="e1",
                    stack_regularizer="norm_anchor", stack_regularizer_kwargs={"alpha": 1e-4})  # fmt: skip
    assert patch.config.stack_regularizer == {"name": "norm_anchor", "alpha": 1e-4}
    for module in patch.deltas:
        key = f"{module}.weight"
        acc = (model.state_dict()[key] - base[key]).float()
        assert float(acc.norm()) <= 1e-4 * float(base[key].norm()) * (1 + 1e-3)
    with pytest.raises(PatchError, match="unknown stack regularizer"):
        hep.edit(pm, tok, [req], method="ft", hparams=ft, stack_regularizer="nope")
    pm.unload()


def test_stack_update_stats_measure_the_whole_stack_against_the_weights_under_it():
    from hf_edit_patch.evaluation.accumulated import accumulated_update_stats, stack_update_stats

    model = make_llama()
    base = snapshot(model)
    pm, patches = stack_of_four(model)
    stacked = snapshot(model)
    stats = stack_update_stats(pm)
    assert list(stats) == [DOWN0, DOWN1, UP1]  # every module a patch changes, in the order they are first changed
    assert_state_equal(model, stacked)  # measured from the undo data, the model untouched
    reference = accumulated_update_stats({f"{m}.weight": base[f"{m}.weight"] for m in stats}, pm)
    for module, st in stats.items():
        assert st == reference[f"{module}.weight"]
        total = sum(p.deltas[module].to_dense(torch.float64) for p in patches if module in p.deltas)
        w = base[f"{module}.weight"].double()
        assert st["rel_fro"] == pytest.approx(float(total.norm() / w.norm()), rel=1e-5)
        assert st["rel_fro"] > 0
    with pm.disable_patches():
        assert all(st["fro"] == 0 for st in stack_update_stats(pm).values())
    with pytest.raises(TypeError, match="takes a PatchedModel"):
        stack_update_stats(model)


def test_a_patch_records_every_setting_of_its_stack_regularizer_defaults_included():
    from hf_edit_patch.patched_model.consolidate import stack_regularizer_record
    from hf_edit_patch.regularizers.stack import DEFAULT_ALPHA, DEFAULT_THRESHOLD

    assert stack_regularizer_record("prune", None) == {"name": "prune", "threshold": DEFAULT_THRESHOLD}
    assert stack_regularizer_record("prune", {"threshold": 2.0}) == {"name": "prune", "threshold": 2.0}
    assert stack_regularizer_record("norm_anchor", {}) == {"name": "norm_anchor", "alpha": DEFAULT_ALPHA}
    assert stack_regularizer_record("rect", {"keep_ratio": 0.4}) == {"name": "rect", "keep_ratio": 0.4}
    assert stack_regularizer_record(None, None) is None

    model = make_llama()
    pm = hep.PatchedModel(model)
    w = param(model, DOWN0).detach().clone()
    big = random_patch(pm, (DOWN0,), keep_ratio=None, regularizer=None, scale=5.0, seed=3)
    pm.add_patch(big, "big")
    c = pm.consolidate(["big"], regularizer="prune")  # the default threshold, applied and recorded
    assert c.config.stack_regularizer == {"name": "prune", "threshold": DEFAULT_THRESHOLD}
    sigma_w = float(torch.linalg.matrix_norm(w.double(), ord=2))
    s = torch.linalg.svdvals(c.deltas[DOWN0].to_dense(torch.float64))
    tau = DEFAULT_THRESHOLD * sigma_w
    s_big = torch.linalg.svdvals(big.deltas[DOWN0].to_dense(torch.float64))
    assert float(s_big[0]) > tau  # so the default bound binds here
    expected = torch.where(s_big > tau, tau * (1 + torch.log(s_big / tau)), s_big)
    torch.testing.assert_close(s, expected, rtol=1e-4, atol=1e-5)
    pm.unload()


def naive_weights_under(model, stack, modules, position):
    """The definition: the current weights with the undo data of every patch above `position` written top first."""
    out = {}
    for module in modules:
        weight = param(model, module).detach().clone()
        for name in reversed(list(stack.patches)[position:]):
            for applied in reversed(stack.applied.get(name, [])):
                if applied.module == module:
                    weight.view(-1)[applied.flat] = applied.original.to(weight.dtype)
        out[module] = weight
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weights_under_any_position_equal_the_undo_data_written_top_first(dtype):
    model = make_llama().to(dtype)
    base = snapshot(model)
    pm = hep.PatchedModel(model)
    targets = [(DOWN0, UP1), (DOWN0,), (DOWN1, UP1), (DOWN0, DOWN1), (UP1,)]
    for i, t in enumerate(targets):  # sparse, overlapping patches, one of them dense
        pm.add_patch(random_patch(pm, t, keep_ratio=1.0 if i == 2 else 0.3, seed=40 + i), f"p{i}")
    stack = stack_of(model)
    for position in range(len(targets) + 1):
        got = weights_under(model, stack, LLAMA_TARGETS, position)
        want = naive_weights_under(model, stack, LLAMA_TARGETS, position)
        for module in LLAMA_TARGETS:
            assert torch.equal(got[module], want[module]), (position, module)
    for module in LLAMA_TARGETS:
        assert torch.equal(weights_under(model, stack, [module], 0)[module], base[f"{module}.weight"])
    with pm.disable_patches():  # nothing applied: the weights as they are
        assert torch.equal(weights_under(model, stack, [DOWN0], 0)[DOWN0], base[f"{DOWN0}.weight"])
    pm.unload()
