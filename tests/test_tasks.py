"""The eight general-ability tasks on tiny files and a tiny random Llama: parsers, prompts, label mapping and
scoring (through canned generations), argument checks before any model work, batching, option scoring, and what
the run leaves behind (training flags, tokenizer, PatchedModel)."""

from __future__ import annotations

import json
import logging
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TARGETS
from helpers import random_patch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hf_edit_patch as hep
from hf_edit_patch.evaluation import run_general_tasks
from hf_edit_patch.evaluation import tasks as T
from hf_edit_patch.evaluation.tasks.data import DATA_FILES, HUB_SOURCES, load_task
from hf_edit_patch.evaluation.tasks.parsing import detokenize, iob_entities, parse_conll, parse_entities
from hf_edit_patch.evaluation.tasks.prompts import (
    ENTITY_TYPES,
    MAX_NEW_TOKENS,
    PROMPTS,
    REASONING_ANSWER_TOKENS,
    TASKS,
    first_label,
)
from hf_edit_patch.evaluation.tasks.runner import TaskRunner

SHARED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"

GSM8K = [
    {"question": "Tom has 9 apples and buys 9 more. How many?", "answer": "9 + 9 = 18\n#### 18"},
    {"question": "Ann has 5 pens and loses 2. How many?", "answer": "5 - 2 = 3\n#### 3"},
    {"question": "A box has 4 cats. How many cats?", "answer": "#### 4"},
]
RTE = [
    ("0", 'He said "yes" to Paris.', "He spoke.", "entailment"),
    ("1", "The cat sat on the mat.", "The dog sat.", "not_entailment"),
    ("2", "John lives in Paris.", "John lives in France.", "entailment"),
]
NQ = [
    {"question": "who won the prize?", "answer": ["Wilhelm Conrad Röntgen", "Röntgen"], "output": ["Röntgen won."]},
    {"question": "when was it?", "answer": ["May 18 , 2018"], "output": "It was in May 2018."},
]
BOOLQ = [
    {"question": "is paris in france", "title": "Paris", "answer": True, "passage": "Paris is in France."},
    {"question": "is the sea dry", "title": "Sea", "answer": False, "passage": "The sea is wet."},
    {"question": "is the sun hot", "title": "Sun", "answer": True, "passage": "The sun is hot."},
]
MUTUAL = [
    {
        "answers": "B",
        "options": ["m : no .", "m : yes , good .", "m : red .", "m : blue ."],
        "article": "f : is it good ? m : yes .",
        "id": "dev_1",
    },
    {
        "answers": "D",
        "options": ["m : one .", "m : two .", "m : three .", "m : good good ."],
        "article": "f : how many ? m : two .",
        "id": "dev_2",
    },
]
SAMSUM = [
    {"id": "1", "dialogue": "A: Hi Tom!\r\nB: Hi Ann.", "summary": "Ann and Tom say hi."},
    {"id": "2", "dialogue": "A: Lunch?\r\nB: Yes.", "summary": "They will have lunch."},
]
CONLL = """-DOCSTART- -X- -X- O

John NNP B-NP B-PER
Smith NNP I-NP I-PER
visited VBD B-VP O
New NNP B-NP I-LOC
York NNP I-NP I-LOC
with IN B-PP O
IBM NNP B-NP B-ORG
Corp. NNP I-NP I-ORG
. . O O

Germany NNP B-NP B-LOC
German JJ B-NP I-MISC
Paris NNP B-NP B-LOC
Lyon NNP I-NP B-LOC
. . O O

-DOCSTART- -X- -X- O

Nothing NN B-NP O
here RB O O
"""
SST2 = [("it 's a charming journey . ", "1"), ("bleak and desperate ", "0"), ("a good film ", "1")]


def write_task_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    (folder / "rte.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join("\t".join(r) + "\n" for r in RTE))
    (folder / "nq_open.jsonl").write_text("".join(json.dumps(r) + "\n" for r in NQ))
    (folder / "boolq_dev.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in BOOLQ))  # blank lines are skipped
    (folder / "mutual_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MUTUAL))
    (folder / "samsum_test.json").write_text(json.dumps(SAMSUM))
    (folder / "conll03_dev.txt").write_text(CONLL)
    (folder / "sst2_dev.tsv").write_text("sentence\tlabel\n" + "".join("\t".join(r) + "\n" for r in SST2))
    return folder


def make_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer knowing every word of the task files and prompts (as Whitespace pre-tokenizes)."""
    text = " ".join(p.read_text() for p in sorted(folder.iterdir())) + " ".join(PROMPTS.values())
    text += " true false yes no positive negative Person Location Organization Miscellaneous Entity good"
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text)))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=0.5,  # peaked, varied next-token distributions: greedy outputs differ between prompts
    )
    return LlamaForCausalLM(cfg).eval()


def make_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """Learned absolute positions: left padding works only if generate derives positions from the mask."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=vocab_size,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.5,
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_task_files(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tok(data_dir):
    return make_tokenizer(data_dir)


@pytest.fixture
def model(tok):
    return make_model(len(tok))


FAST = {"reasoning": 8, "summarization": 8, "ner": 6, "open_qa": 6}


# ------------------------------------------------------------------------------------------------ parsers
def test_parse_conll_skips_docstart_and_splits_sentences():
    sentences = list(parse_conll(CONLL.splitlines()))
    assert [tokens for tokens, _ in sentences] == [
        ["John", "Smith", "visited", "New", "York", "with", "IBM", "Corp.", "."],
        ["Germany", "German", "Paris", "Lyon", "."],
        ["Nothing", "here"],
    ]
    assert sentences[1][1] == ["B-LOC", "I-MISC", "B-LOC", "B-LOC", "O"]
    # a file without a trailing blank line still yields its last sentence; DOCSTART mid-stream ends one too
    assert list(parse_conll(["a x y O", "-DOCSTART- -X- -X- O", "b x y B-PER"])) == [
        (["a"], ["O"]),
        (["b"], ["B-PER"]),
    ]


@pytest.mark.parametrize("line", ["lonely", "word NNP B-NP B-FOO", "word NNP B-NP X-PER"])
def test_parse_conll_rejects_malformed_lines(line):
    with pytest.raises(ValueError, match=r"f\.txt:2: expected 'token POS chunk NER'"):
        list(parse_conll(["a x y O", line], "f.txt"))


def test_iob_entities_handles_b_and_i_transitions():
    tokens, tags = next(parse_conll(CONLL.splitlines()))
    # I-LOC after O opens an entity (IOB1); B-/I- of one type join
    assert iob_entities(tokens, tags) == [("PER", "John Smith"), ("LOC", "New York"), ("ORG", "IBM Corp.")]
    # I- of another type opens a new entity; B- after the same type opens a new one
    assert iob_entities(["Germany", "German", "Paris", "Lyon"], ["B-LOC", "I-MISC", "B-LOC", "B-LOC"]) == [
        ("LOC", "Germany"),
        ("MISC", "German"),
        ("LOC", "Paris"),
        ("LOC", "Lyon"),
    ]
    assert iob_entities(["a", "b", "c"], ["I-PER", "I-PER", "I-PER"]) == [("PER", "a b c")]
    assert iob_entities(["a", "b"], ["O", "O"]) == []
    assert detokenize(["Hello", ",", "New", "York", "."]) == "Hello, New York."


def test_tsv_files_are_read_unquoted_with_typed_labels(data_dir):
    rte = load_task("nli", data_dir, None)
    assert rte[0] == {"sentence1": 'He said "yes" to Paris.', "sentence2": "He spoke.", "label": "entailment"}
    assert [r["label"] for r in rte] == ["entailment", "not_entailment", "entailment"]
    sst = load_task("sentiment", data_dir, None)
    assert sst == [
        {"sentence": "it 's a charming journey .", "label": 1},
        {"sentence": "bleak and desperate", "label": 0},
        {"sentence": "a good film", "label": 1},
    ]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("rte.tsv", "index\tsentence1\tlabel\n0\ta\tentailment\n", r"rte\.tsv: header .* lacks"),
        ("rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "entailment or not_entailment"),
        ("rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\n", r"rte\.tsv:2: 3 columns"),
        ("sst2_dev.tsv", "sentence\tlabel\ngood\t2\n", r"sst2_dev\.tsv:2: label must be 1 \(positive\) or 0"),
        ("boolq_dev.jsonl", '{"question": "q", "passage": "p", "answer": "yes"}\n', "'answer' must be bool"),
        ("boolq_dev.jsonl", '{"question": "q"\n', r"boolq_dev\.jsonl:1: not valid JSON"),
        ("mutual_dev.jsonl", '{"article": "a", "options": ["x"], "answers": "A"}\n', "list of 4 str"),
        ("gsm8k_test.jsonl", '{"question": "q", "answer": "42"}\n', r"no '#### <number>'"),
        ("nq_open.jsonl", '{"question": "q", "output": "p"}\n', r"nq_open\.jsonl:1: missing 'answer'"),
        ("samsum_test.json", '{"dialogue": "d"}', "expected a JSON list"),
    ],
)
def test_malformed_files_name_the_place_and_format(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    task = next(t for t, f in DATA_FILES.items() if f == name)
    with pytest.raises(ValueError, match=match):
        load_task(task, tmp_path, None)


def test_parse_entities():
    assert parse_entities(" John Smith, 'Mary'; none.\nText: more") == ["John Smith", "Mary"]
    assert parse_entities(" U.S., (IBM Corp.) Text: John") == ["U.S", "IBM Corp"]
    assert parse_entities(" Paris Entity: Lyon") == ["Paris"]
    assert parse_entities("\n\n Berlin\n Rome") == ["Berlin"]
    assert parse_entities(" None") == parse_entities("") == parse_entities(" , ;") == []


def test_first_label_takes_the_first_whole_label_word():
    assert first_label(" False. But true", "nli") == "not_entailment"
    assert first_label(" TRUE", "nli") == "entailment"
    assert first_label(" yesterday, not now", "closed_qa") is None  # "yes"/"no" only as whole words
    assert first_label(" No.", "closed_qa") is False
    assert first_label(" it is positive, not negative", "sentiment") == 1
    assert first_label(" neutral", "sentiment") is None


# ------------------------------------------------------------------------------------------------ scoring
def canned(outputs: dict[str, str]):
    """A `_Runner.generate` answering each prompt with the output of the first key found in it ('' if none)."""
    calls = []

    def generate(self, prompts, max_new_tokens):
        calls.append((list(prompts), max_new_tokens))
        self.bar.update(len(prompts))
        return [next((out for key, out in outputs.items() if key in p), "") for p in prompts]

    generate.calls = calls
    return generate


def test_prompts_label_mapping_and_scores(monkeypatch, model, tok, data_dir):
    fake = canned(
        {
            "He spoke. True or False? answer:": " True, it is",  # entailment: right
            "The dog sat. True or False? answer:": " maybe",  # no label word: wrong
            "John lives in France. True or False? answer:": " false",  # wrong
            "is paris in france. answer:": " Yes",
            "is the sea dry. answer:": " no, the sea",
            "is the sun hot. answer:": " noon",  # not a label word
            "charming journey . answer:": " positive",
            "desperate answer:": " positive",
            "good film answer:": " negative then positive",
            "won the prize?": " It was Wilhelm Conrad Röntgen, who",  # a run of words matching a gold: right
            "when was it?": "\nAnswer: May 2018",  # text after "Answer:" is "May 2018", not "May 18, 2018": wrong
            "Hi Ann.\nTL;DR:": "\n Ann and Tom say hi.\nA: more",
            "Yes.\nTL;DR:": "",
        }
    )
    monkeypatch.setattr(TaskRunner, "generate", fake)
    tasks = ["nli", "closed_qa", "sentiment", "open_qa", "summarization"]
    scores, details = run_general_tasks(model, tok, tasks, data_dir=data_dir, return_details=True)
    assert list(scores) == tasks
    assert scores["nli"] == pytest.approx(1 / 3)
    assert scores["closed_qa"] == pytest.approx(2 / 3)
    assert scores["sentiment"] == pytest.approx(1 / 3)
    assert scores["open_qa"] == pytest.approx(1 / 2)
    assert scores["summarization"] == pytest.approx(1 / 2)  # an exact summary, then an empty one
    assert [d["prediction"] for d in details["nli"]] == ["entailment", None, "not_entailment"]
    assert [d["prediction"] for d in details["closed_qa"]] == [True, False, None]
    assert details["summarization"][0]["prediction"] == "Ann and Tom say hi."
    # the paper's prompts, with the fixes the module docstring lists
    assert details["nli"][0]["prompt"] == 'He said "yes" to Paris. entails the He spoke. True or False? answer:'
    assert details["closed_qa"][0]["prompt"] == (
        "Please answer the given question based on the passage. The answer should be exact 'yes' or 'no'. "
        "passage: Paris is in France. question: is paris in france. answer:"
    )
    assert details["sentiment"][1]["prompt"] == (
        "For each snippet of text, label the sentiment of the text as positive or negative. The answer should be "
        "exact 'positive' or 'negative'. text: bleak and desperate answer:"
    )
    assert details["open_qa"][1]["prompt"] == (
        "Refer to the passage below and answer the following question. Passage: It was in May 2018. "
        "Question: when was it?"
    )
    assert details["summarization"][0]["prompt"] == "A: Hi Tom!\nB: Hi Ann.\nTL;DR:"
    budgets = [n for _, n in fake.calls]
    assert budgets == [MAX_NEW_TOKENS[t] for t in tasks]


def test_reasoning_two_stages(monkeypatch, model, tok, data_dir):
    fake = canned(
        {
            "Therefore, the answer (arabic numerals) is:": " 18 apples.\nQ: Then 3",  # stage 2 of the first problem
            "9 more. How many? A: Let's think step by step.": " 9 + 9 = 18.\nQ: Another question? 7",
            "loses 2. How many? A: Let's think step by step.": "",
        }
    )
    monkeypatch.setattr(TaskRunner, "generate", fake)
    scores, details = run_general_tasks(
        model, tok, "reasoning", data_dir=data_dir, limit=2, return_details=True, max_new_tokens={"reasoning": 99}
    )
    (stage1, n1), (stage2, n2) = fake.calls
    assert (n1, n2) == (99, REASONING_ANSWER_TOKENS)
    assert stage1[0] == "Q: Tom has 9 apples and buys 9 more. How many? A: Let's think step by step."
    assert stage2[0] == stage1[0] + " 9 + 9 = 18. Therefore, the answer (arabic numerals) is:"  # cut at "Q:"
    assert stage2[1] == stage1[1] + " Therefore, the answer (arabic numerals) is:"  # empty rationale
    assert [d["correct"] for d in details["reasoning"]] == [True, False]  # "18 apples." (first number) vs "#### 3"
    assert scores == {"reasoning": 0.5}


def test_ner_prompts_and_corpus_level_f1(monkeypatch, model, tok, data_dir):
    fake = canned(
        {
            "Person Entity from the given text. Text: John": " John Smith, Mary",  # 1 right, 1 wrong
            "Location Entity from the given text. Text: John": " New York",  # right
            "Organization Entity from the given text. Text: John": " IBM Corp.\nText: x",  # right (periods dropped)
            "Location Entity from the given text. Text: Germany": " Paris; Lyon; Germany, Berlin",  # 3 right, 1 wrong
            "Person Entity from the given text. Text: Nothing": " John Smith",  # wrong: not in this sentence
        }
    )
    monkeypatch.setattr(TaskRunner, "generate", fake)
    scores, details = run_general_tasks(model, tok, ["ner"], data_dir=data_dir, return_details=True)
    prompts = fake.calls[0][0]
    assert len(prompts) == 3 * 4
    assert prompts[0] == (
        "Please identify Person Entity from the given text. Text: John Smith visited New York with IBM Corp.. Entity:"
    )
    assert [p.split(" Entity from")[0].rsplit(" ", 1)[1] for p in prompts[:4]] == list(ENTITY_TYPES.values())
    ner = details["ner"]
    assert ner[0]["gold"] == [("Person", "John Smith"), ("Location", "New York"), ("Organization", "IBM Corp")]
    assert ner[2]["gold"] == [] and ner[2]["prediction"] == [("Person", "John Smith")]
    # corpus level: 7 gold, 9 predicted, 6 true positives (summed over sentences, not averaged)
    assert scores["ner"] == pytest.approx(2 * 6 / (9 + 7))
    assert ner[0]["f1"] == pytest.approx(2 * 3 / (4 + 3))


def test_dialogue_picks_the_option_the_model_prefers(tok, data_dir):
    class Unigram(torch.nn.Module):
        """Every position predicts the same distribution, which strongly favours the word 'good'."""

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(1, len(tok))
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.fill_(-5.0)
                self.head.bias[tok.convert_tokens_to_ids("good")] = 5.0

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return types.SimpleNamespace(logits=self.head(torch.ones(*input_ids.shape, 1)))

        def generate(self, **kwargs):
            raise AssertionError("dialogue is scored, not generated")

    scores, details = run_general_tasks(Unigram(), tok, ["dialogue"], data_dir=data_dir, return_details=True)
    assert [d["prediction"] for d in details["dialogue"]] == ["B", "D"]  # the options with the most 'good' per token
    assert scores == {"dialogue": 1.0}
    assert details["dialogue"][0]["prompt"] == (
        "Q: f : is it good ? m : yes . Which choice is correct? Answer Choices: (A) m : no . (B) m : yes , good . "
        "(C) m : red . (D) m : blue . A: Among A through D, the answer is"
    )


def test_option_scores_are_mean_token_logprobs(model, tok):
    runner = TaskRunner(model, tok, batch_size=3, max_length=None, window=None)
    prompts = ["f : is it good ?", "f : how many ? m : two ."]
    options = [["m : no .", "m : yes , good ."], ["good", "m : three ."]]
    with torch.inference_mode():  # as run_general_tasks calls it
        scores = runner.option_logprobs(prompts, options)
    for prompt, opts, got in zip(prompts, options, scores, strict=True):
        for option, value in zip(opts, got, strict=True):
            ids = tok(prompt).input_ids
            target = tok(" " + option, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + target])).logits[0, len(ids) - 1 : -1]
            expected = torch.log_softmax(logits, -1)[torch.arange(len(target)), target].mean()
            assert value == pytest.approx(float(expected), abs=1e-5)


# ------------------------------------------------------------------------------------------------ the run
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_left_padding_matches_batch_size_one(arch, tok, data_dir):
    model = make_model(len(tok)) if arch == "llama" else make_gpt2(len(tok))
    tasks = ["nli", "open_qa", "summarization", "ner", "dialogue"]
    kwargs = {"data_dir": data_dir, "return_details": True, "max_new_tokens": FAST}
    s1, d1 = run_general_tasks(model, tok, tasks, batch_size=1, **kwargs)
    s3, d3 = run_general_tasks(model, tok, tasks, batch_size=3, **kwargs)
    assert s1 == s3
    for task in tasks:
        for a, b in zip(d1[task], d3[task], strict=True):
            if task == "dialogue":
                assert a["option_scores"] == pytest.approx(b["option_scores"], abs=1e-5)
            else:
                assert a["outputs" if task == "ner" else "output"] == b["outputs" if task == "ner" else "output"]
    # the random model writes something: the comparison is not between empty strings
    assert any(d["output"].strip() for d in d1["summarization"])


def test_patched_model_all_tasks_restores_flags_and_tokenizer(model, tok, data_dir):
    pm = hep.PatchedModel.from_pretrained(model, random_patch(model, LLAMA_TARGETS))
    pm.train()
    pm.base_model.model.layers[0].eval()  # a mixed state must come back as it was
    flags = {name: m.training for name, m in pm.named_modules()}
    side = tok.padding_side
    seen = []
    handle = pm.base_model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        scores = run_general_tasks(pm, tok, data_dir=data_dir, limit=2, batch_size=4, max_new_tokens=FAST)
    finally:
        handle.remove()
    assert list(scores) == list(TASKS)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in scores.values()), scores
    assert seen and not any(seen)  # eval mode during the run
    assert {name: m.training for name, m in pm.named_modules()} == flags
    assert tok.padding_side == side
    assert pm.active_patches == ["default"]


def test_limit_takes_the_first_examples(monkeypatch, model, tok, data_dir):
    monkeypatch.setattr(TaskRunner, "generate", canned({}))
    _, details = run_general_tasks(model, tok, ["sentiment", "ner"], data_dir=data_dir, limit=2, return_details=True)
    assert [d["prompt"].split("text: ")[1] for d in details["sentiment"]] == [
        "it 's a charming journey . answer:",
        "bleak and desperate answer:",
    ]
    assert [d["sentence"] for d in details["ner"]] == [
        "John Smith visited New York with IBM Corp..",
        "Germany German Paris Lyon.",
    ]


def test_long_prompts_lose_their_middle(model, tok, caplog):
    runner = TaskRunner(model, tok, batch_size=2, max_length=8, window=None, task="nli")
    prompt = "Person Location Organization Miscellaneous Entity good " * 2  # 12 tokens
    ids = tok(prompt).input_ids
    with caplog.at_level(logging.WARNING, logger=T.__name__):
        rows = runner.encode([prompt, "good"], runner.budget(5))
    assert rows == [ids[:2] + ids[-6:], tok("good").input_ids]
    assert "nli: 1 of 2 prompts are longer than 8 tokens" in caplog.text
    windowed = TaskRunner(model, tok, batch_size=2, max_length=None, window=100)
    assert (windowed.budget(20), windowed.budget(256)) == (80, 50)


# ------------------------------------------------------------------------------------------------ arguments
@pytest.fixture
def untouchable(model):
    """The tiny model, failing the test if it is ever run."""

    def boom(*args, **kwargs):
        raise AssertionError("the model ran before the arguments were checked")

    model.generate = boom
    model.register_forward_pre_hook(boom)
    return model


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tasks": ["nli", "poetry"]}, ValueError, r"unknown task\(s\) 'poetry'; accepted: reasoning, nli, open_qa"),
        ({"tasks": []}, TypeError, "non-empty sequence of task names"),
        ({"tasks": ["nli", 3]}, TypeError, "non-empty sequence of task names"),
        ({"limit": 0}, ValueError, "limit must be a positive int or None, got 0"),
        ({"limit": 2.0}, ValueError, "limit must be a positive int or None"),
        ({"limit": True}, ValueError, "limit must be a positive int or None"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
        ({"max_length": -1}, ValueError, "max_length must be a positive int or None"),
        ({"max_new_tokens": {"nli": 0}}, ValueError, r"max_new_tokens\['nli'\] must be a positive int"),
        ({"max_new_tokens": {"dialogue": 3}}, ValueError, "generates nothing"),
        ({"max_new_tokens": {"chess": 3}}, ValueError, "unknown task 'chess'; accepted: reasoning"),
        ({"max_new_tokens": 5}, TypeError, "max_new_tokens must be a dict"),
    ],
)
def test_bad_arguments_are_rejected_before_model_work(untouchable, tok, data_dir, kwargs, error, match):
    kwargs = {"tasks": ["nli"], "data_dir": data_dir, **kwargs}
    with pytest.raises(error, match=match):
        run_general_tasks(untouchable, tok, **kwargs)


def test_data_problems_are_found_before_model_work(untouchable, tok, data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_dir .*nowhere.* is not a folder; .*rte\.tsv"):
        run_general_tasks(untouchable, tok, ["nli"], data_dir=tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "rte.tsv").write_text((data_dir / "rte.tsv").read_text())
    with pytest.raises(FileNotFoundError, match=r"sentiment: .*sst2_dev\.tsv does not exist; expected a tab-sep"):
        run_general_tasks(untouchable, tok, ["nli", "sentiment"], data_dir=partial)
    (partial / "sst2_dev.tsv").write_text("sentence\tlabel\nfine\t1\nbad\tx\n")  # the last row of the last task
    with pytest.raises(ValueError, match=r"sst2_dev\.tsv:3: label must be"):
        run_general_tasks(untouchable, tok, ["nli", "sentiment"], data_dir=partial)
    (partial / "sst2_dev.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match=r"sentiment: no examples in .*sst2_dev\.tsv"):
        run_general_tasks(untouchable, tok, ["nli", "sentiment"], data_dir=partial)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module with a generate method"):
        run_general_tasks(object(), tok, ["nli"], data_dir=data_dir)


# ------------------------------------------------------------------------------------------------ the Hub
def test_without_data_dir_or_datasets_the_error_says_what_to_do(monkeypatch, untouchable, tok):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install datasets .*'nyu-mll/glue'.*data_dir=.*rte\.tsv"):
        run_general_tasks(untouchable, tok, ["nli"])
    with pytest.raises(FileNotFoundError, match=r"open_qa: .*pass data_dir=, a folder holding nq_open\.jsonl"):
        run_general_tasks(untouchable, tok, ["open_qa"])


def test_public_datasets_are_converted(monkeypatch, untouchable, tok):
    rows = {
        "rte": [
            {"sentence1": "a b", "sentence2": "c", "label": 1, "idx": 0},
            {"sentence1": "d", "sentence2": "e", "label": 0, "idx": 1},
        ],
        "conll2003": [{"tokens": ["John", "Smith", "in", "Paris"], "ner_tags": [1, 2, 0, 5]}] * 3,
        "sst2": [{"sentence": "fine ", "label": 1, "idx": 0}],
    }
    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        if path == "offline/none":
            raise ConnectionError("no network")
        return rows[name]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_task("nli", None, None) == [
        {"sentence1": "a b", "sentence2": "c", "label": "not_entailment"},
        {"sentence1": "d", "sentence2": "e", "label": "entailment"},
    ]
    ner = load_task("ner", None, 2)
    assert len(ner) == 2 and ner[0] == {
        "tokens": ["John", "Smith", "in", "Paris"],
        "tags": ["B-PER", "I-PER", "O", "B-LOC"],
    }
    assert load_task("sentiment", None, None) == [{"sentence": "fine", "label": 1}]
    assert calls == [
        ("nyu-mll/glue", "rte", "train", None),
        ("eriktks/conll2003", "conll2003", "validation", "refs/convert/parquet"),
        ("nyu-mll/glue", "sst2", "validation", None),
    ]
    monkeypatch.setitem(HUB_SOURCES, "nli", ("offline/none", None, "train", None))
    with pytest.raises(OSError, match=r"could not load 'offline/none' .*ConnectionError: no network.*rte\.tsv"):
        run_general_tasks(untouchable, tok, ["nli"])


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.slow
def test_real_task_files_limit_2(tok):
    if not SHARED_TASKS.is_dir():
        pytest.skip(f"{SHARED_TASKS} is absent (the shared evaluation data is not part of a fresh clone)")
    model = make_model(len(tok))
    scores, details = run_general_tasks(
        model, tok, data_dir=SHARED_TASKS, limit=2, max_length=96, max_new_tokens=FAST, return_details=True
    )
    assert list(scores) == list(TASKS)
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
    assert all(len(details[t]) == 2 for t in TASKS)
    assert details["ner"][0]["gold"] == [("Organization", "LEICESTERSHIRE")]
    assert details["reasoning"][0]["gold"].endswith("#### 18")
