"""Conflicts in a stack: facts edited twice (the later supersedes), contradicting requests, overlapping entries."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA_TARGETS, make_llama

import hf_edit_patch as hep
from hf_edit_patch.cli import main
from hf_edit_patch.errors import PatchError
from hf_edit_patch.patch.conflicts import find_conflicts

DOWN0, DOWN1, _ = LLAMA_TARGETS


def req(subject, target, prompt="{} is located in the city of", true=None, paraphrases=()):
    return hep.EditRequest(prompt=prompt, subject=subject, target_new=target, target_true=true,
                           paraphrases=list(paraphrases))  # fmt: skip


def patch_with(model, requests, rows=(0,), module=DOWN0, value=0.01):
    """A patch changing the given rows of `module` (every column), recording `requests`."""
    weight = model.get_submodule(module).weight
    dense = torch.zeros_like(weight)
    dense[list(rows)] = value
    return hep.EditPatch.from_deltas({module: dense}, model, regularizer=None, requests=requests)


def test_a_later_edit_of_the_same_fact_supersedes_the_earlier_one():
    model = make_llama()
    eiffel = req("The Eiffel Tower", "Rome", true="Paris", paraphrases=["The Eiffel Tower stands in the city of"])
    patches = [
        ("p1", patch_with(model, [eiffel])),
        ("p2", patch_with(model, [req("Big Ben", "Oslo")])),
        ("p3", patch_with(model, [req("the  eiffel tower", "London", prompt="{} is located in the city of.")])),
        ("p4", patch_with(model, [req("The Eiffel Tower", "London", prompt="{} stands in the city of")])),
        ("p5", patch_with(model, [req("The Eiffel Tower", "1889", prompt="{} was built in the year")])),
    ]
    report = find_conflicts(patches)
    pairs = [(s.earlier.patch, s.later.patch, s.same_target) for s in report.superseded]
    assert pairs == [("p1", "p3", False), ("p3", "p4", True)]  # case, spacing, punctuation and paraphrases aside
    assert report.superseded[0].earlier.target_new == "Rome" and report.superseded[0].later.target_new == "London"
    assert not report.contradictions  # p5 asks about another relation of the same subject
    text = str(report)
    assert text.startswith("5 patches: 2 facts edited again, 0 contradictions")
    assert "'the  eiffel tower is located in the city of.': p1 'Rome' -> p3 'London' (now)" in text
    assert "p3 'London' -> p4 'London' (again, same target)" in text


def test_two_targets_for_one_fact_in_one_patch_contradict():
    model = make_llama()
    batch = [req("Big Ben", "Oslo"), req("The Louvre", "Madrid"), req("big ben", "Berlin"), req("Big Ben", "Oslo")]
    report = find_conflicts([("batch", patch_with(model, batch))])
    assert [(c.first.index, c.second.index) for c in report.contradictions] == [(0, 2), (2, 3)]
    assert not report.superseded
    assert "batch: 'Big Ben is located in the city of' -> 'Oslo' (request 0) and 'Berlin' (request 2)" in str(report)


def test_overlapping_entries_per_module_and_pair():
    model = make_llama()
    cols = model.get_submodule(DOWN0).weight.shape[1]
    patches = [
        ("a", patch_with(model, [], rows=(0, 1))),
        ("b", patch_with(model, [], rows=(1, 2))),
        ("c", patch_with(model, [], rows=(1,))),
        ("d", patch_with(model, [], rows=(5,), module=DOWN1)),
    ]
    report = find_conflicts(patches)
    (overlap,) = report.overlaps  # DOWN1 has one patch: nothing to compare
    assert overlap.module == DOWN0 and overlap.patches == ("a", "b", "c")
    assert (overlap.changed, overlap.overlapping, overlap.max_depth) == (3 * cols, cols, 3)
    assert overlap.share == pytest.approx(1 / 3)
    assert [(p.first, p.second, p.shared, p.share) for p in overlap.pairs] == [
        ("a", "b", cols, 0.5), ("a", "c", cols, 1.0), ("b", "c", cols, 1.0)
    ]  # fmt: skip
    assert report and f"{DOWN0}: {cols:,} of {3 * cols:,} changed entries (33.3%) by 3 patches" in str(report)
    json.dumps(report.to_dict())  # serializable as it is

    apart = find_conflicts([("a", patches[0][1]), ("d", patches[3][1])])
    assert not apart and str(apart) == "2 patches: no conflicts"
    with pytest.raises(PatchError, match="patch names repeat"):
        find_conflicts([("a", patches[0][1]), ("a", patches[1][1])])


def test_patched_model_conflicts_and_inspect_on_a_saved_stack(tmp_path, capsys):
    model = make_llama()
    pm = hep.PatchedModel(model)
    pm.add_patch(patch_with(model, [req("Big Ben", "Oslo")], rows=(0, 1)), "first")
    pm.add_patch(patch_with(pm, [req("Big Ben", "Rome")], rows=(1,)), "second")
    report = pm.conflicts()
    assert [(s.earlier.patch, s.later.patch) for s in report.superseded] == [("first", "second")]
    assert report.overlaps[0].overlapping == model.get_submodule(DOWN0).weight.shape[1]
    pm.save_pretrained(tmp_path / "stack")
    pm.unload()

    assert main(["inspect", str(tmp_path / "stack")]) == 0
    out = capsys.readouterr().out
    assert "Stack of 2 patches: 1 fact edited again, 0 contradictions, overlapping entries in 1 module" in out
    assert "'Big Ben is located in the city of': first 'Oslo' -> second 'Rome' (now)" in out
    assert main(["inspect", str(tmp_path / "stack"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [p["subfolder"] for p in info["patches"]] == ["first", "second"]
    assert info["conflicts"]["superseded"][0]["later"]["target_new"] == "Rome"


def test_contradicting_requests_of_one_call_are_found_and_warned_about(caplog):
    from test_editors import REQ, llama4, tiny_tokenizer

    from hf_edit_patch.patch.conflicts import request_contradictions

    batch = [
        req("Big Ben", "Oslo"),
        req("big  ben", "Berlin", prompt="{} is located in the city of."),
        req("Big Ben", "Oslo", prompt="{} was built in the year"),  # another relation
        req("Big Ben", "Madrid", prompt="Where is {}?", paraphrases=["Big Ben is located in the city of"]),
        req("The Louvre", "Madrid"),
    ]
    assert request_contradictions(batch) == [(0, 1), (0, 3), (1, 3)]
    assert request_contradictions([r.to_dict() for r in batch[:3]]) == [(0, 1)]
    assert request_contradictions(batch[2:]) == []

    tok = tiny_tokenizer()
    model = llama4(tok)
    ft = {"method": "ft", "hparams": {"norm_constraint": 0.05, "lr": 0.01}, "keep_ratio": None}
    other = hep.EditRequest(prompt=REQ.prompt, subject=REQ.subject, target_new="paris")
    with caplog.at_level("WARNING", logger="hf_edit_patch.editing.update"):
        hep.edit(model, tok, [REQ, other], **ft)
    assert "1 pair(s) of requests ask for different targets" in caplog.text
    assert "requests 0 and 1 ('the eiffel tower': 'rome', 'paris')" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_edit_patch.editing.update"):
        hep.edit(model, tok, [REQ, REQ], **ft)  # the same target twice: nothing to warn about
    assert "different targets" not in caplog.text
