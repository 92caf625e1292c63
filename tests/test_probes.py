"""Label probes (answer-format adherence and label-likelihood AUC) against a per-prompt reference on a tiny model."""

from __future__ import annotations

import itertools
import random
import types

import pytest
import torch
from test_tasks import make_model, make_tokenizer, write_task_files

from hf_edit_patch.evaluation.probes import PROBE_TASKS, label_probes, label_token_ids, roc_auc
from hf_edit_patch.evaluation.tasks.data import load_task
from hf_edit_patch.evaluation.tasks.prompts import PROMPTS


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_files(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tok(data_dir):
    return make_tokenizer(data_dir)


def pairwise_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_equals_the_pairwise_definition_with_ties():
    rng = random.Random(0)
    for n in (2, 3, 7, 30):
        for _ in range(20):
            scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
            labels = [rng.random() < 0.5 for _ in range(n)]
            if all(labels) or not any(labels):
                assert roc_auc(scores, labels) is None
            else:
                assert roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels))
    assert roc_auc([3.0, 2.0, 1.0], [False, True, True]) == 0.0
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        roc_auc([1, 2, 3], [True, False])


def prompt_for(task, record):
    if task == "sentiment":
        return PROMPTS["sentiment"].format(sentence=record["sentence"])
    if task == "nli":
        return PROMPTS["nli"].format(sentence1=record["sentence1"], sentence2=record["sentence2"].rstrip(".").rstrip())
    return PROMPTS["closed_qa"].format(passage=record["passage"], question=record["question"])


GOLD = {
    "sentiment": lambda r: r["label"] == 1,
    "nli": lambda r: r["label"] == "entailment",
    "closed_qa": lambda r: bool(r["answer"]),
}
WORDS = {"sentiment": ("positive", "negative"), "nli": ("true", "false"), "closed_qa": ("yes", "no")}


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_probes_match_a_prompt_by_prompt_reference(tok, data_dir, batch_size):
    model = make_model(len(tok), seed=3)
    model.train()  # the flag is restored after
    scores, details = label_probes(
        model, tok, data_dir=data_dir, batch_size=batch_size, max_length=None, return_details=True
    )
    assert model.training and all(m.training for m in model.modules())
    assert list(scores) == list(PROBE_TASKS)
    model.eval()
    for task in PROBE_TASKS:
        records = load_task(task, data_dir, None)
        pos = sorted(label_token_ids(tok, WORDS[task][0]))
        neg = sorted(label_token_ids(tok, WORDS[task][1]))
        expected = []
        for record in records:
            ids = tok(prompt_for(task, record)).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
            expected.append(
                {
                    "gold": GOLD[task](record),
                    "logp_pos": float(torch.logsumexp(logp[pos], 0)),
                    "logp_neg": float(torch.logsumexp(logp[neg], 0)),
                    "greedy_is_label": int(logp.argmax()) in pos + neg,
                    "label_mass": float(logp[pos + neg].exp().sum()),
                }
            )
        got = details[task]
        assert [d["gold"] for d in got] == [e["gold"] for e in expected]
        assert [d["greedy_is_label"] for d in got] == [e["greedy_is_label"] for e in expected]
        for g, e in zip(got, expected, strict=True):
            for key in ("logp_pos", "logp_neg", "label_mass"):
                assert g[key] == pytest.approx(e[key], abs=1e-5)
        margins = [e["logp_pos"] - e["logp_neg"] for e in expected]
        assert scores[task]["auc"] == pytest.approx(pairwise_auc(margins, [e["gold"] for e in expected]), abs=1e-6)
        assert scores[task]["adherence"] == sum(e["greedy_is_label"] for e in expected) / len(expected)
        assert scores[task]["n"] == len(records)


class Constant(torch.nn.Module):
    """Predicts the same next-token distribution everywhere, peaked on `word`."""

    def __init__(self, tok, word):
        super().__init__()
        self.head = torch.nn.Linear(1, len(tok))
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.fill_(-5.0)
            self.head.bias[tok.convert_tokens_to_ids(word)] = 5.0

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return types.SimpleNamespace(logits=self.head(torch.ones(*input_ids.shape, 1)))


def test_a_model_that_always_says_positive_adheres_but_ranks_nothing(tok, data_dir):
    scores = label_probes(Constant(tok, "positive"), tok, ["sentiment", "nli"], data_dir=data_dir)
    assert scores["sentiment"]["adherence"] == 1.0
    assert scores["sentiment"]["auc"] == 0.5  # the same margin for every example: all ties
    assert scores["sentiment"]["label_mass"] > 0.9
    assert scores["nli"]["adherence"] == 0.0  # "positive" is not an RTE answer
    assert scores["nli"]["label_mass"] < 0.01


def test_limit_and_prompt_truncation(tok, data_dir):
    model = make_model(len(tok))
    scores = label_probes(model, tok, "closed_qa", data_dir=data_dir, limit=2, max_length=8)
    assert list(scores) == ["closed_qa"] and scores["closed_qa"]["n"] == 2


def test_bad_input_is_clear(tok, data_dir, tmp_path):
    model = make_model(len(tok))
    with pytest.raises(ValueError, match=r"unknown probe tasks \['ner'\]; accepted"):
        label_probes(model, tok, ["sentiment", "ner"], data_dir=data_dir)
    with pytest.raises(ValueError, match="limit"):
        label_probes(model, tok, data_dir=data_dir, limit=0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        label_probes(object(), tok, data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        label_probes(model, tok, data_dir=tmp_path / "nowhere")
    # a tokenizer without the label words cannot tell the answers apart
    other = write_task_files(tmp_path / "other")
    (other / "sst2_dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    small = make_tokenizer(other)
    vocab = {w: i for w, i in small.get_vocab().items() if w not in ("negative",)}
    assert "negative" not in vocab
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel(dict(sorted(vocab.items(), key=lambda kv: kv[1])), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    missing = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    with pytest.raises(ValueError, match="no token for the label word 'negative'"):
        label_probes(make_model(len(small)), missing, ["sentiment"], data_dir=other)


def test_label_tokens_cover_case_and_leading_space(tok):
    ids = label_token_ids(tok, "yes")
    assert tok.convert_tokens_to_ids("yes") in ids
    assert tok.unk_token_id not in label_token_ids(tok, "Positive")  # unknown spellings are left out


def test_the_runner_accepts_every_probe_task():
    from hf_edit_patch.evaluation.experiment import ExperimentConfig

    assert ExperimentConfig(data="zsre.json", probe_tasks=list(PROBE_TASKS)).probe_tasks == list(PROBE_TASKS)
