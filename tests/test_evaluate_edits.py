"""Editing metrics: CounterFact/ZsRE request parsing, the two scoring rules against an independent computation, and
`evaluate_edits` restoring the model in every mode (also after a failure)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_equal, snapshot
from test_editors import FAST, llama4, tiny_tokenizer

import hf_edit_patch as hep
from hf_edit_patch.evaluation import edit_runs
from hf_edit_patch.evaluation import scoring as ev
from hf_edit_patch.requests import EditRequestError


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


REQS = [
    hep.EditRequest(
        prompt="{} is located in the city of",
        subject="the eiffel tower",
        target_new="rome",
        target_true="paris",
        paraphrases=["where is the eiffel tower ? in the city of", "the eiffel tower is in"],
        neighborhood=["the louvre is located in the city of", "big ben is in"],
    ),
    hep.EditRequest(
        prompt="{} is the capital of",
        subject="tokyo",
        target_new="italy",
        target_true="japan",
        paraphrases=["tokyo is a city in the country of"],
        neighborhood=["berlin is the capital of"],
    ),
    hep.EditRequest(prompt="{} is in", subject="the colosseum", target_new="london", target_true="rome"),
]


def argmax_path(model, tok, text, cont_ids):
    """Independent teacher-forced argmax, one position at a time, no batching."""
    ids = tok(text).input_ids
    out = []
    with torch.no_grad():
        for j in range(len(cont_ids)):
            logits = model(input_ids=torch.tensor([ids + cont_ids[:j]])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def mean_logprob(model, tok, text, target):
    ids = tok(text).input_ids
    tid = tok(" " + target, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids + tid[:-1]])).logits[0].float(), -1)
    return float(torch.stack([logp[len(ids) - 1 + i, t] for i, t in enumerate(tid)]).mean())


# ---------------------------------------------------------------- requests


def test_from_counterfact_original_format():
    record = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": ["Danielle Darrieux speaks"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    }
    req = hep.EditRequest.from_counterfact(record)
    assert req.text == "The mother tongue of Danielle Darrieux is"
    assert (req.target_new, req.target_true) == ("English", "French")
    assert req.paraphrases == ["Danielle Darrieux speaks"]
    assert req.neighborhood == ["The mother tongue of Léon Blum is"]


def test_from_counterfact_easyedit_format():
    record = {
        "subject": "Danielle Darrieux",
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux speaks",
        "locality_prompt": "The mother tongue of Léon Blum is",
        "locality_ground_truth": "French",
    }
    req = hep.EditRequest.from_counterfact(record)
    assert req.prompt == "The mother tongue of {} is"
    assert req.target_true == "French"
    assert req.paraphrases == ["Danielle Darrieux speaks"]
    assert req.neighborhood == ["The mother tongue of Léon Blum is"]


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"prompt": "x"}, "requested_rewrite"),
        ({"requested_rewrite": {"prompt": "{} is", "subject": "A"}}, "target_new"),
        ({"prompt": "B is", "subject": "A", "target_new": "C"}, "does not occur"),
        ([1, 2], "must be a dict"),
    ],
)
def test_from_counterfact_bad_records(record, match):
    with pytest.raises(EditRequestError, match=match):
        hep.EditRequest.from_counterfact(record)


# ---------------------------------------------------------------- scoring rules


def test_accuracy_matches_an_independent_computation(tok):
    model = llama4(tok, seed=1)
    ref = ev.locality_reference(model, tok, REQS, locality_tokens=3)
    scores, details = ev.score_edits(model, tok, REQS, reference=ref, return_details=True)
    for req, d in zip(REQS, details, strict=True):
        tid = tok(" " + req.target_new, add_special_tokens=False).input_ids
        expect = [
            sum(a == t for a, t in zip(argmax_path(model, tok, text, tid), tid, strict=True)) / len(tid)
            for text in [req.text]
        ]
        assert d["reliability"] == pytest.approx(sum(expect) / len(expect))
        if req.paraphrases:
            acc = [
                sum(a == t for a, t in zip(argmax_path(model, tok, p, tid), tid, strict=True)) / len(tid)
                for p in req.paraphrases
            ]
            assert d["generalization"] == pytest.approx(sum(acc) / len(acc))
        else:
            assert d["generalization"] is None
    # The reference is the model's own greedy path: the unedited model keeps all of it.
    assert scores["locality"] == 1.0
    for p, toks in ref.tokens.items():
        assert list(toks) == argmax_path(model, tok, p, list(toks))
    # Requests without paraphrases do not dilute generalization.
    with_para = [d["generalization"] for d in details if d["generalization"] is not None]
    assert scores["generalization"] == pytest.approx(sum(with_para) / len(with_para))


def test_locality_drops_when_the_model_changes(tok):
    model = llama4(tok, seed=1)
    ref = ev.locality_reference(model, tok, REQS, locality_tokens=4)
    other = llama4(tok, seed=5)
    assert ev.score_edits(other, tok, REQS, reference=ref)["locality"] < 1.0
    assert ev.score_edits(other, tok, REQS)["locality"] is None  # no reference, no locality


def test_scores_do_not_depend_on_the_batch_size(tok):
    model = llama4(tok, seed=2)
    ref = ev.locality_reference(model, tok, REQS, locality_tokens=3, batch_size=1)
    assert ref == ev.locality_reference(model, tok, REQS, locality_tokens=3, batch_size=7)
    a = ev.score_edits(model, tok, REQS, reference=ref, batch_size=1, return_details=True)
    b = ev.score_edits(model, tok, REQS, reference=ref, batch_size=5, return_details=True)
    assert a == b


def test_probability_rule_compares_the_two_targets(tok):
    model = llama4(tok, seed=3)
    scores, details = ev.score_edits(model, tok, REQS, metric="probability", return_details=True)
    for req, d in zip(REQS, details, strict=True):
        wins = [
            mean_logprob(model, tok, req.text, req.target_new) > mean_logprob(model, tok, req.text, req.target_true)
        ]
        assert d["reliability"] == float(wins[0])
        if req.neighborhood:
            keep = [
                mean_logprob(model, tok, p, req.target_true) > mean_logprob(model, tok, p, req.target_new)
                for p in req.neighborhood
            ]
            assert d["locality"] == pytest.approx(sum(keep) / len(keep))
    assert all(0.0 <= v <= 1.0 for v in scores.values() if v is not None)


def test_probability_rule_needs_target_true(tok):
    model = llama4(tok)
    req = hep.EditRequest(prompt="{} is in", subject="tokyo", target_new="rome")
    with pytest.raises(ValueError, match="target_true"):
        ev.score_edits(model, tok, [req], metric="probability")
    with pytest.raises(ValueError, match="target_true"):
        hep.evaluation.evaluate_edits(model, tok, [req], metric="probability")


# ---------------------------------------------------------------- evaluate_edits


FT = {"norm_constraint": 0.2, "lr": 0.02}


@pytest.mark.parametrize("mode", ["single", "sequential", "batch"])
def test_evaluate_edits_edits_scores_and_restores(tok, mode):
    model = llama4(tok, seed=0)
    before = snapshot(model)
    pre = ev.score_edits(model, tok, REQS)
    assert pre["reliability"] == 0.0
    # FT with a loose constraint reliably flips the argmax on a tiny random model (ROME's edits there are weak).
    scores, details = hep.evaluation.evaluate_edits(
        model, tok, REQS, method="ft", hparams=FT, mode=mode, return_details=True
    )
    assert_state_equal(model, before)
    assert set(scores) == {"reliability", "generalization", "locality"}
    assert scores["reliability"] == 1.0
    assert 0.0 <= scores["generalization"] <= 1.0
    assert 0.0 <= scores["locality"] < 1.0  # FT on a random model disturbs the neighbours
    groups = [d["group"] for d in details]
    assert groups == ([0, 0, 0] if mode == "batch" else [0, 1, 2])


def test_evaluate_edits_on_a_patched_model_keeps_its_patches(tok):
    from helpers import random_patch

    model = llama4(tok, seed=0)
    pm = hep.PatchedModel(model)
    pm.add_patch(random_patch(model, ["model.layers.1.mlp.down_proj"], scale=0.01), "mine")
    before = snapshot(model)
    hep.evaluation.evaluate_edits(pm, tok, REQS[:2], hparams=FAST, mode="sequential")
    assert pm.active_patches == ["mine"]
    assert_state_equal(model, before)


def test_a_failing_edit_leaves_the_model_as_it_was(tok, monkeypatch):
    model = llama4(tok, seed=0)
    before = snapshot(model)
    real = edit_runs.edit
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(edit_runs, "edit", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        hep.evaluation.evaluate_edits(model, tok, REQS, hparams=FAST, mode="sequential")
    assert len(calls) == 2
    assert_state_equal(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "stacked"}, "unknown mode"),
        ({"metric": "f1"}, "unknown metric"),
        ({"batch_size": 0}, "batch_size"),
        ({"locality_tokens": 0}, "locality_tokens"),
    ],
)
def test_bad_arguments_are_clear_and_touch_nothing(tok, kwargs, match):
    model = llama4(tok)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        hep.evaluation.evaluate_edits(model, tok, REQS, hparams=FAST, **kwargs)
    assert_state_equal(model, before)
