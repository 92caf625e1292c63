"""RECT budgets beyond a fixed keep ratio: the norm budget, keep_ratio="auto", and stack-level compaction."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_equal, snapshot
from helpers import random_patch
from test_editors import llama4, tiny_tokenizer

import hf_edit_patch as hep
from hf_edit_patch.errors import PatchError
from hf_edit_patch.evaluation.scoring import score_edits
from hf_edit_patch.regularizers.matrix import norm_budget_count, rect_sparsify

REQ = hep.EditRequest(
    prompt="{} is located in the city of",
    subject="the eiffel tower",
    target_new="rome",
    target_true="paris",
    paraphrases=["the eiffel tower is in"],
)
FT = {"norm_constraint": 0.2, "lr": 0.02}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def brute_force_count(delta, weight, budget):
    d, w = delta.double().reshape(-1), weight.double().reshape(-1)
    ratio = torch.where(w == 0, torch.where(d == 0, 0.0, float("inf")), (d / w).abs())
    order = sorted(range(d.numel()), key=lambda i: (-float(ratio[i]), i))
    total = float(d.square().sum())
    acc = 0.0
    for k, i in enumerate(order, 1):
        acc += float(d[i]) ** 2
        if acc >= budget * total:
            return k
    return d.numel()


@pytest.mark.parametrize("budget", [0.05, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(7, 13), (33, 5)])
def test_norm_budget_count_is_the_shortest_prefix(budget, shape):
    gen = torch.Generator().manual_seed(shape[0])
    delta = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) ** 4
    weight = torch.randn(shape, generator=gen)
    weight[0, :3] = 0.0
    delta[1, :2] = 0.0
    k = norm_budget_count(delta, weight, budget)
    assert k == brute_force_count(delta, weight, budget)
    kept = rect_sparsify(delta, weight, None, norm_budget=budget)
    energy = float(kept.values.double().square().sum()) / float(delta.double().square().sum())
    assert energy >= budget - 1e-12
    assert kept.nnz <= k
    assert kept.nnz == min(k, int(torch.count_nonzero(delta)))


def test_norm_budget_matches_the_same_count_as_a_keep_ratio():
    gen = torch.Generator().manual_seed(0)
    delta, weight = torch.randn(40, 30, generator=gen), torch.randn(40, 30, generator=gen)
    k = norm_budget_count(delta, weight, 0.8)
    by_budget = rect_sparsify(delta, weight, None, norm_budget=0.8)
    by_ratio = rect_sparsify(delta, weight, k / delta.numel())
    assert torch.equal(by_budget.flat_indices, by_ratio.flat_indices)


def test_norm_budget_arguments_are_checked():
    d, w = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(PatchError, match="not both"):
        rect_sparsify(d, w, 0.4, norm_budget=0.9)
    with pytest.raises(PatchError, match="needs a keep_ratio"):
        rect_sparsify(d, w, None)
    with pytest.raises(PatchError, match=r"norm_budget must be in \(0, 1\]"):
        rect_sparsify(d, w, None, norm_budget=1.5)


def test_patch_records_a_norm_budget(tok):
    model = llama4(tok)
    name = "model.layers.1.mlp.down_proj"
    delta = torch.randn(model.get_submodule(name).weight.shape, generator=torch.Generator().manual_seed(1))
    patch = hep.EditPatch.from_deltas({name: delta}, model, regularizer_kwargs={"norm_budget": 0.5})
    assert patch.config.regularizer == "rect" and patch.config.keep_ratio is None
    assert patch.config.regularizer_kwargs == {"norm_budget": 0.5}
    assert patch.nnz == norm_budget_count(delta, model.get_submodule(name).weight, 0.5) < delta.numel() // 2
    with pytest.raises(PatchError, match="norm_budget is a RECT setting"):
        hep.EditPatch.from_deltas({name: delta}, model, regularizer="random", regularizer_kwargs={"norm_budget": 0.5})


def test_edit_with_a_norm_budget(tok):
    model = llama4(tok)
    patch = hep.edit(model, tok, [REQ], method="ft", hparams=FT, norm_budget=0.9)
    assert patch.config.regularizer_kwargs == {"norm_budget": 0.9}
    with pytest.raises(PatchError, match="not both"):
        hep.edit(model, tok, [REQ], method="ft", hparams=FT, norm_budget=0.9, keep_ratio=0.4)
    with pytest.raises(PatchError, match="'auto'"):
        hep.edit(model, tok, [REQ], method="ft", hparams=FT, keep_ratio="half")


def accuracy_with(model, tok, patch):
    pm = hep.PatchedModel(model)
    pm.add_patch(patch)
    try:
        return score_edits(pm, tok, [REQ])
    finally:
        pm.unload()


def test_auto_keep_ratio_picks_the_smallest_ratio_that_keeps_the_edit(tok):
    model = llama4(tok)
    before = snapshot(model)
    patch = hep.edit(model, tok, [REQ], method="ft", hparams=FT, keep_ratio="auto")
    assert_state_equal(model, before)
    auto = patch.config.editor_hparams["keep_ratio_auto"]
    chosen = auto["chosen"]
    assert chosen is not None and patch.config.keep_ratio == chosen
    whole = hep.edit(model, tok, [REQ], method="ft", hparams=FT, keep_ratio=None)
    want = accuracy_with(model, tok, whole)
    assert want["reliability"] == 1.0
    got = accuracy_with(model, tok, patch)
    assert got["reliability"] >= want["reliability"] and got["generalization"] >= want["generalization"]
    ratios = hep.editing.AUTO_KEEP_RATIOS
    below = ratios.index(chosen) - 1
    if below >= 0:  # the next smaller ratio fails (the search is exact on this model)
        smaller = hep.edit(model, tok, [REQ], method="ft", hparams=FT, keep_ratio=ratios[below])
        worse = accuracy_with(model, tok, smaller)
        assert worse["reliability"] < want["reliability"] or worse["generalization"] < want["generalization"]
    assert_state_equal(model, before)


def test_compact_bounds_the_stack_and_removes_exactly(tok):
    model = llama4(tok)
    base = snapshot(model)
    pm = hep.PatchedModel(model)
    names = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    for seed in range(3):
        pm.add_patch(random_patch(model, names[: 1 + seed % 2], keep_ratio=0.3, seed=seed), f"p{seed}")
    stacked = snapshot(model)
    merged = pm.compact()  # whole combined update
    assert pm.active_patches == ["stack"]
    for key, value in snapshot(model).items():
        torch.testing.assert_close(value, stacked[key], rtol=0, atol=1e-6)
    assert [c["name"] for c in merged.config.editor_hparams["compacted"]] == ["p0", "p1", "p2"]
    small = pm.compact(keep_ratio=0.1)
    for name, delta in small.deltas.items():
        assert delta.nnz <= round(0.1 * model.get_submodule(name).weight.numel())
    assert small.nnz < merged.nnz
    pm.unload()
    assert_state_equal(model, base)


def test_compact_failure_leaves_the_stack(tok, monkeypatch):
    model = llama4(tok)
    pm = hep.PatchedModel(model)
    pm.add_patch(random_patch(model, ["model.layers.1.mlp.down_proj"], seed=1), "a")
    pm.add_patch(random_patch(model, ["model.layers.1.mlp.down_proj"], seed=2), "b")
    stacked = snapshot(model)

    def boom(*args, **kwargs):
        raise RuntimeError("attach failed")

    monkeypatch.setattr(hep.PatchedModel, "add_patch", boom)
    with pytest.raises(RuntimeError, match="attach failed"):
        pm.compact(keep_ratio=0.2)
    monkeypatch.undo()
    assert pm.active_patches == ["a", "b"]
    assert_state_equal(model, stacked)
    with pytest.raises(PatchError, match="no active patches"):
        hep.PatchedModel(llama4(tok)).compact()
