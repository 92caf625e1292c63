"""Model cards (rendered from model_cards/ through huggingface_hub's ModelCard), evaluations, and what a push of a
saved folder would send."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import LLAMA_TARGETS, assert_state_equal, make_llama, snapshot
from helpers import random_patch
from huggingface_hub import ModelCard
from test_editors import llama4, tiny_tokenizer

import hf_edit_patch as hep
from hf_edit_patch.evaluation.publish import stage_patch_folder
from hf_edit_patch.evaluation.report import evaluate_patch, load_evaluation, write_evaluation
from hf_edit_patch.hub.cards import evaluation_card, evaluation_results, patch_card

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
EIFFEL = hep.EditRequest(
    prompt="{} is located in the city of", subject="the eiffel tower", target_new="rome", target_true="paris",
    paraphrases=["where is the eiffel tower ? in the city of"], neighborhood=["the capital of japan is"],
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and avoids contention with anything else running."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _patch(model, **kwargs):
    gen = torch.Generator().manual_seed(0)
    deltas = {n: torch.randn(model.get_submodule(n).weight.shape, generator=gen) * 0.05 for n in LLAMA_TARGETS[:2]}
    return hep.EditPatch.from_deltas(deltas, model, editor="rome", requests=[EIFFEL], **kwargs)


RESULTS = {
    "format": "hf_edit_patch.evaluation",
    "format_version": 1,
    "base_model": {"name_or_path": SMOLLM2, "revision": None},
    "patch": {"source": "out/eiffel", "editor": "rome", "regularizer": "rect", "keep_ratio": 0.4},
    "settings": {"metric": "accuracy", "requests": 1, "tasks": ["nli"], "task_limit": 20},
    "editing": {
        "base": {"reliability": 0.25, "generalization": None, "locality": 1.0},
        "patched": {"reliability": 1.0, "generalization": None, "locality": 0.8},
    },
    "tasks": {"base": {"nli": 0.55}, "patched": {"nli": 0.5}},
    "plots": [["Scores", "scores.png"]],
}


def test_patch_card_metadata_parses_back(tmp_path):
    model = make_llama()
    patch = _patch(model, keep_ratio=0.4, base_model_name_or_path=SMOLLM2)
    patch.save_pretrained(tmp_path / "p")
    card = ModelCard.load(tmp_path / "p" / "README.md")
    assert card.data.library_name == "hf-edit-patch"
    assert card.data.base_model == SMOLLM2 and card.data.base_model_relation == "adapter"
    assert card.data.license == "apache-2.0"  # SmolLM2's, known
    assert card.data.tags == ["hf-edit-patch", "model-editing", "knowledge-editing", "rect", "rome"]
    assert card.data.eval_results is None  # no evaluation yet: no model-index
    text = card.text
    assert "| **the eiffel tower** is located in the city of | rome | paris |" in text
    assert "`model.layers.0.mlp.down_proj` | 32×48 | linear |" in text
    assert "| regularizer | rect, keep ratio 0.4 |" in text and "## Limitations" in text
    assert "not regularized" not in text

    patch.save_pretrained(tmp_path / "q", license="mit")
    assert ModelCard.load(tmp_path / "q" / "README.md").data.license == "mit"
    unregularized = _patch(model, keep_ratio=None)  # on a model without a Hub id: no base_model, no license
    data = patch_card(unregularized).data
    assert data.base_model is None and data.license is None and "rect" not in data.tags
    assert "This patch is not regularized" in patch_card(unregularized).text


def test_the_card_snippet_loads_the_patch(tmp_path):
    tok = tiny_tokenizer()
    llama4(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = hep.load_default_model(str(tmp_path / "base"))[0]
    gen = torch.Generator().manual_seed(0)
    name = "model.layers.1.mlp.down_proj"
    patch = hep.EditPatch.from_deltas(
        {name: torch.randn(model.get_submodule(name).weight.shape, generator=gen)}, model, requests=[EIFFEL]
    )
    patch.save_pretrained(tmp_path / "patch", card_repo_id=str(tmp_path / "patch"))
    text = (tmp_path / "patch" / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 (the card's own copy-paste snippet, run as a user would)
    assert scope["out"].shape[1] > len(tok("the eiffel tower is located in the city of").input_ids)
    assert_state_equal(scope["base"], snapshot(model))  # unload() at its end restored the base model


def test_user_edited_cards_are_kept_unless_asked(tmp_path, caplog):
    patch = _patch(make_llama(), keep_ratio=0.4)
    folder = tmp_path / "patch"
    patch.save_pretrained(folder)
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("## Edits", "## Edits\n\nMy own notes."))
    patch.save_pretrained(folder)
    assert "My own notes." in readme.read_text() and "Keeping the existing" in caplog.text

    staged = stage_patch_folder(folder, tmp_path / "staged", repo_id="user/p", evaluation=None)
    assert staged == ["README.md", "patch_config.json", "patch_model.safetensors"]
    assert "My own notes." in (tmp_path / "staged" / "README.md").read_text()
    stage_patch_folder(folder, tmp_path / "fresh", repo_id="user/p", overwrite_card=True)
    assert "My own notes." not in (tmp_path / "fresh" / "README.md").read_text()

    eval_dir = folder / "evaluation"
    write_evaluation(dict(RESULTS), eval_dir, plots=False)
    (eval_dir / "README.md").write_text("# my evaluation notes\n")
    write_evaluation(dict(RESULTS), eval_dir, plots=False)
    assert (eval_dir / "README.md").read_text() == "# my evaluation notes\n"
    write_evaluation(dict(RESULTS), eval_dir, plots=False, overwrite_card=True)
    assert "model-index" in (eval_dir / "README.md").read_text()


def test_evaluation_card_model_index_is_valid():
    card = ModelCard(str(evaluation_card(RESULTS)))  # parsing validates model-index (an invalid one raises)
    index = card.data.to_dict()["model-index"]
    assert [entry["name"] for entry in index] == ["out/eiffel"]
    results = index[0]["results"]
    for result in results:
        assert result["task"]["type"] and result["dataset"]["type"] and result["dataset"]["name"]
        assert all({"type", "value", "name", "config"} <= set(m) for m in result["metrics"])
    editing, nli = results
    assert editing["task"]["name"] == "Knowledge editing"
    assert [(m["type"], m["config"], m["value"]) for m in editing["metrics"]] == [
        ("reliability", "base", 0.25), ("reliability", "patched", 1.0),
        ("locality", "base", 1.0), ("locality", "patched", 0.8),
    ]  # fmt: skip
    assert nli["dataset"] == {"name": "RTE (first 20)", "type": "nyu-mll/glue", "config": "rte", "split": "train"}
    assert card.data.base_model == SMOLLM2 and card.data.library_name == "hf-edit-patch"
    assert "| reliability | 0.2500 | 1.0000 | +0.7500 |" in card.text and "![Scores](scores.png)" in card.text
    assert "generalization" not in {r.metric_type for r in evaluation_results(RESULTS)}  # None is not a score


def test_evaluate_patch_scores_before_and_after_and_restores_the_model(tmp_path):
    tok = tiny_tokenizer()
    model = llama4(tok)
    before = snapshot(model)
    patch = hep.edit(model, tok, [EIFFEL], method="ft", keep_ratio=None, hparams={"norm_constraint": 0.05, "lr": 0.01})
    results = evaluate_patch(model, tok, patch, source="eiffel")
    assert_state_equal(model, before)
    assert results["editing"]["base"]["locality"] == 1.0
    assert results["editing"]["patched"]["reliability"] > results["editing"]["base"]["reliability"]
    assert results["patch"]["content_hash"] == patch.config.content_hash and results["tasks"]["base"] == {}
    written = write_evaluation(results, tmp_path / "ev", patch=patch)
    assert load_evaluation(tmp_path / "ev") == json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(written) >= {"eval", "card"}

    pm = hep.PatchedModel.from_pretrained(model, random_patch(model, LLAMA_TARGETS))
    stacked = snapshot(model)
    with pytest.warns(UserWarning, match="differ from those the patch was computed on"):
        evaluate_patch(pm, tok, patch)  # on a PatchedModel: stacked on top of its patches, then removed again
    assert pm.active_patches == ["default"]
    assert_state_equal(model, stacked)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(hep.PatchFormatError, match="not an evaluation written by hf_edit_patch"):
        load_evaluation(tmp_path / "bad.json")


def test_a_stack_is_staged_with_the_evaluation_card_as_its_readme(tmp_path):
    model = make_llama()
    pm = hep.PatchedModel.from_pretrained(model, random_patch(model, LLAMA_TARGETS, seed=1), patch_name="a")
    pm.add_patch(random_patch(pm, LLAMA_TARGETS[:1], seed=2), "b")
    pm.save_pretrained(tmp_path / "stack")
    pm.unload()
    write_evaluation(dict(RESULTS), tmp_path / "ev")
    files = stage_patch_folder(
        tmp_path / "stack", tmp_path / "staged", repo_id="user/stack", evaluation=tmp_path / "ev"
    )
    assert files == [
        "README.md", "a/README.md", "a/patch_config.json", "a/patch_model.safetensors", "b/README.md",
        "b/patch_config.json", "b/patch_model.safetensors", "evaluation/README.md", "evaluation/eval.json",
        "evaluation/scores.png", "patch_stack.json",
    ]  # fmt: skip
    card = ModelCard.load(tmp_path / "staged" / "README.md")
    assert card.data.model_name == "user/stack" and "(evaluation/scores.png)" in card.text
