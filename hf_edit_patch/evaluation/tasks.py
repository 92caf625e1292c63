"""The eight general-ability tasks of Gu et al. (2024), "Model Editing Harms General Abilities of Large Language
Models: Regularization to the Rescue" (Table 2), run zero-shot with the paper's prompts.

`run_general_tasks(model, tokenizer)` scores a causal LM (or a `PatchedModel`) on each task and returns
`{task: score in [0, 1]}`; comparing the scores of a base model and of the same model with an edit patch attached
measures what the edit cost in general abilities.

Tasks, data (the file expected in `data_dir`), prompt (`PROMPTS`) and score:

- reasoning: GSM8K test (`gsm8k_test.jsonl`); `Q: {question} A: Let's think step by step.`, then
  `... {rationale} Therefore, the answer (arabic numerals) is:`; solve rate.
- nli: RTE (`rte.tsv`); `{sentence1} entails the {sentence2}. True or False? answer:`; accuracy.
- open_qa: NQ-open with a passage (`nq_open.jsonl`); `Refer to the passage below and answer the following
  question. Passage: {passage} Question: {question}`; exact match.
- closed_qa: BoolQ dev (`boolq_dev.jsonl`); `Please answer the given question based on the passage. The answer
  should be exact 'yes' or 'no'. passage: {passage} question: {question}. answer:`; exact match.
- dialogue: MuTual dev (`mutual_dev.jsonl`); `Q: {article} Which choice is correct? Answer Choices: (A) {A}
  (B) {B} (C) {C} (D) {D} A: Among A through D, the answer is`; Recall4@1.
- summarization: SAMSum test (`samsum_test.json`); `{dialogue}\nTL;DR:`; mean of ROUGE-1/2/L F-measures.
- ner: CoNLL-2003 dev (`conll03_dev.txt`); `Please identify {type} Entity from the given text. Text: {sentence}
  Entity:` for each type of Person, Location, Organization, Miscellaneous; entity-level F1.
- sentiment: SST-2 dev (`sst2_dev.tsv`); `For each snippet of text, label the sentiment of the text as positive
  or negative. The answer should be exact 'positive' or 'negative'. text: {sentence} answer:`; accuracy.

The prompts are those of the paper's code release (JasonForJoy/Model-Editing-Hurt, `test-task-code/`), with
missing spaces after punctuation restored ("A:Let's", "text,label", "(A)option"), the typo "Chioces" fixed, and
the final period of RTE's `sentence2` dropped (the template adds one). Where this module departs from that code:

- reasoning: the release fills `{hint}` with GSM8K's gold rationale and reads 5 tokens; here, as in the
  zero-shot chain of thought the prompt comes from (Kojima et al., 2022), the model writes the rationale itself
  (up to 256 tokens, cut where it starts a new "Q:"), then answers after the answer cue (16 tokens). The first
  number of the answer's first line is checked against the gold with `metrics.gsm8k_solved`.
- nli, closed_qa, sentiment: a few tokens are generated greedily and the first label word found (true/false,
  yes/no, positive/negative, whole words, any case) is the prediction; no label word counts as wrong.
- open_qa: the continuation (after its last "Answer:", if the model writes one) is SQuAD-normalized and scores
  1 if some run of its words equals a normalized gold answer, as the release scores it (the prompt has no answer
  cue, so a whole-continuation match would almost never happen).
- dialogue: nothing is generated. Each option is scored by the mean log-probability of its tokens (a leading
  space added) after the prompt; the mean, not the sum, so that longer options are not penalized for their
  length. A hit is when the gold option scores highest (ties go to the earlier option).
- summarization: the first non-empty line of the continuation is the summary (64 tokens at most).
- ner: one prompt per sentence and entity type. The answer's first line (cut before any echoed "Text:" or
  "Entity:") is split on commas and semicolons; "none"-like items are dropped. Gold entities come from the IOB
  tags (IOB1 or IOB2: `B-X` always opens an entity, `I-X` continues one of type X and otherwise opens one).
  Entity texts on both sides lose surrounding quotes/brackets and trailing periods, and are compared
  case-insensitively by `metrics.entity_f1`. The score is corpus-level F1, 2·TP / (#predicted + #gold) over all
  sentences: each pair is qualified by its sentence's index before one `entity_f1` call, so an entity counts
  only in its own sentence.

Prompts longer than the token budget (`max_length`) lose their middle (usually part of a passage or dialogue):
the first quarter and the last three quarters of the budget are kept, so the instruction and the answer cue
survive. Generation is greedy, batched with left padding built here (the tokenizer is not modified), with the
prompts sorted by length; results do not depend on `batch_size` beyond floating-point noise.

Example:
    ```python
    from hf_edit_patch.evaluation import run_general_tasks

    base = run_general_tasks(model, tokenizer, data_dir="data/tasks", limit=200)
    pm = PatchedModel.from_pretrained(model, "out/eiffel")
    edited = run_general_tasks(pm, tokenizer, data_dir="data/tasks", limit=200)
    {task: edited[task] - base[task] for task in base}
    ```
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batching import head_only_at, model_device, pad_batch, pad_id, target_token_ids
from .metrics import entity_f1, gsm8k_solved, make_rouge_scorer, normalize_answer, rouge_avg

logger = logging.getLogger(__name__)

__all__ = ["DATA_FILES", "DATA_FORMATS", "ENTITY_TYPES", "MAX_NEW_TOKENS", "PROMPTS", "TASKS", "run_general_tasks"]

TASKS = ("reasoning", "nli", "open_qa", "closed_qa", "dialogue", "summarization", "ner", "sentiment")

DATA_FILES = {
    "reasoning": "gsm8k_test.jsonl",
    "nli": "rte.tsv",
    "open_qa": "nq_open.jsonl",
    "closed_qa": "boolq_dev.jsonl",
    "dialogue": "mutual_dev.jsonl",
    "summarization": "samsum_test.json",
    "ner": "conll03_dev.txt",
    "sentiment": "sst2_dev.tsv",
}

DATA_FORMATS = {
    "reasoning": "JSON lines with keys 'question' (str) and 'answer' (str ending in '#### <number>')",
    "nli": "a tab-separated file with header 'index sentence1 sentence2 label', label entailment or not_entailment",
    "open_qa": "JSON lines with keys 'question' (str), 'answer' (list of str) and 'output' (passage: str or list)",
    "closed_qa": "JSON lines with keys 'question' (str), 'passage' (str) and 'answer' (bool)",
    "dialogue": "JSON lines with keys 'article' (str), 'options' (4 str) and 'answers' (a letter A-D)",
    "summarization": "a JSON list of objects with keys 'dialogue' (str) and 'summary' (str)",
    "ner": "CoNLL columns 'token POS chunk NER' (IOB tags), blank lines between sentences, -DOCSTART- lines",
    "sentiment": "a tab-separated file with header 'sentence label', label 1 (positive) or 0 (negative)",
}

# Public datasets loaded with `datasets.load_dataset(path, name, split=split, revision=revision)` when no data_dir is
# given. The script-based ones are read from the Hub's parquet export. NQ-open with the passages the paper used
# (generated ones) is not published as a dataset: open_qa needs data_dir.
_HUB_SOURCES: dict[str, tuple[str, str | None, str, str | None] | None] = {
    "reasoning": ("openai/gsm8k", "main", "test", None),
    "nli": ("nyu-mll/glue", "rte", "train", None),  # the paper's 2,489 RTE pairs are GLUE's train split
    "open_qa": None,
    "closed_qa": ("google/boolq", None, "validation", None),
    "dialogue": ("EleutherAI/mutual", "mutual", "validation", "refs/convert/parquet"),
    "summarization": ("Samsung/samsum", "samsum", "test", "refs/convert/parquet"),
    "ner": ("eriktks/conll2003", "conll2003", "validation", "refs/convert/parquet"),
    "sentiment": ("nyu-mll/glue", "sst2", "validation", None),
}

PROMPTS = {
    "reasoning": "Q: {question} A: Let's think step by step.",
    "reasoning_answer": "Therefore, the answer (arabic numerals) is:",
    "nli": "{sentence1} entails the {sentence2}. True or False? answer:",
    "open_qa": "Refer to the passage below and answer the following question. Passage: {passage} Question: {question}",
    "closed_qa": (
        "Please answer the given question based on the passage. The answer should be exact 'yes' or 'no'. "
        "passage: {passage} question: {question}. answer:"
    ),
    "dialogue": (
        "Q: {article} Which choice is correct? Answer Choices: (A) {a} (B) {b} (C) {c} (D) {d} "
        "A: Among A through D, the answer is"
    ),
    "summarization": "{dialogue}\nTL;DR:",
    "ner": "Please identify {entity_type} Entity from the given text. Text: {sentence} Entity:",
    "sentiment": (
        "For each snippet of text, label the sentiment of the text as positive or negative. "
        "The answer should be exact 'positive' or 'negative'. text: {sentence} answer:"
    ),
}

# New tokens per generated task (the paper's code: reasoning 5 with the gold rationale given, classification 1,
# open_qa 20, summarization 25, ner 10). dialogue is scored by likelihood and generates nothing.
MAX_NEW_TOKENS = {
    "reasoning": 256,
    "nli": 5,
    "open_qa": 20,
    "closed_qa": 5,
    "summarization": 64,
    "ner": 20,
    "sentiment": 5,
}
_REASONING_ANSWER_TOKENS = 16

# CoNLL-2003 entity types, as the NER prompt names them (in the order the prompts are asked).
ENTITY_TYPES = {"PER": "Person", "LOC": "Location", "ORG": "Organization", "MISC": "Miscellaneous"}

_LABEL_WORDS: dict[str, dict[str, Any]] = {
    "nli": {"true": "entailment", "false": "not_entailment"},
    "closed_qa": {"yes": True, "no": False},
    "sentiment": {"positive": 1, "negative": 0},
}
_LABEL_RES = {
    task: re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE) for task, words in _LABEL_WORDS.items()
}
_CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")  # the Hub's ids
_NO_ENTITY = frozenset({"none", "no", "n/a", "na", "null", "nothing", "no entity", "no entities", "-"})
_ENTITY_STRIP = " \t\"'`“”‘’[](){}<>*"


# ---------------------------------------------------------------------------------------------------- parsing
def first_label(text: str, task: str) -> Any:
    """The label of the first label word in a generated answer (whole word, any case), or None if there is none.

    Example:
        >>> first_label(" False. The first sentence", "nli")
        'not_entailment'
        >>> first_label(" not sure", "closed_qa") is None
        True
    """
    match = _LABEL_RES[task].search(text)
    return None if match is None else _LABEL_WORDS[task][match.group(1).lower()]


def detokenize(tokens: Sequence[str]) -> str:
    """CoNLL tokens joined by spaces, with "," and "." attached to the token before them (as the paper does)."""
    text = ""
    for token in tokens:
        text += token if token in {",", "."} and text else (" " + token if text else token)
    return text


def iob_entities(tokens: Sequence[str], tags: Sequence[str]) -> list[tuple[str, str]]:
    """`(type, text)` of each entity of an IOB-tagged sentence (IOB1 or IOB2), in order.

    `B-X` always opens an entity of type X; `I-X` continues the open entity if it is of type X and opens a new
    one otherwise (after `O`, or after an entity of another type); `O` closes the open entity.

    Example:
        >>> iob_entities(["John", "Smith", "visited", "New", "York"], ["B-PER", "I-PER", "O", "I-LOC", "I-LOC"])
        [('PER', 'John Smith'), ('LOC', 'New York')]
    """
    entities: list[tuple[str, list[str]]] = []
    open_type: str | None = None
    for token, tag in zip(tokens, tags, strict=True):
        if tag == "O":
            open_type = None
            continue
        prefix, entity_type = tag.split("-", 1)
        if prefix == "B" or entity_type != open_type:
            entities.append((entity_type, [token]))
            open_type = entity_type
        else:
            entities[-1][1].append(token)
    return [(entity_type, detokenize(words)) for entity_type, words in entities]


def parse_conll(lines: Iterator[str] | Sequence[str], source: str = "<text>") -> Iterator[tuple[list[str], list[str]]]:
    """`(tokens, tags)` per sentence of CoNLL column text: the first column is the token, the last the IOB tag.

    Blank lines end sentences; `-DOCSTART-` lines are skipped (and end a sentence too).

    Raises:
        ValueError: A line has fewer than two columns or a tag is not `O`, `B-X` or `I-X` with X in ENTITY_TYPES.
    """
    tokens: list[str] = []
    tags: list[str] = []
    for lineno, line in enumerate(lines, 1):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if tokens:
                yield tokens, tags
            tokens, tags = [], []
            continue
        tag = columns[-1]
        if len(columns) < 2 or not (tag == "O" or (tag[:2] in ("B-", "I-") and tag[2:] in ENTITY_TYPES)):
            raise ValueError(
                f"{source}:{lineno}: expected 'token POS chunk NER' with an NER tag O, B-X or I-X "
                f"(X in {', '.join(ENTITY_TYPES)}), got {line.rstrip()!r:.120}"
            )
        tokens.append(columns[0])
        tags.append(tag)
    if tokens:
        yield tokens, tags


def _clean_entity(text: str) -> str:
    return text.strip(_ENTITY_STRIP).rstrip(".").strip(_ENTITY_STRIP)


def parse_entities(generated: str) -> list[str]:
    """The entities a model listed after "Entity:": its first line, split on commas and semicolons.

    The line is cut before an echoed "Text:" or "Entity:"; items lose surrounding quotes/brackets and trailing
    periods; empty and "none"-like items are dropped.

    Example:
        >>> parse_entities(" John Smith, 'Mary'; none.\\nText: more")
        ['John Smith', 'Mary']
    """
    line = generated.strip().split("\n", 1)[0]
    for marker in ("Text:", "Entity:"):
        line = line.split(marker, 1)[0]
    items = (_clean_entity(item) for item in re.split(r"[,;]", line))
    return [item for item in items if item and item.casefold() not in _NO_ENTITY]


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def _span_match(prediction: str, golds: Sequence[str]) -> bool:
    """True if some run of the prediction's normalized words equals a normalized gold answer."""
    words = normalize_answer(prediction).split()
    for gold in golds:
        target = normalize_answer(gold).split()
        n = len(target)
        if n and any(words[i : i + n] == target for i in range(len(words) - n + 1)):
            return True
    return False


# ---------------------------------------------------------------------------------------------------- loading
def _expect(value: Any, kind: type, key: str, where: str, task: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(
            f"{where}: {key!r} must be {kind.__name__}, got {type(value).__name__} ({value!r:.80}); "
            f"expected {DATA_FORMATS[task]}"
        )
    return value


def _record(task: str, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checks one raw example (a JSON object, a TSV row or a Hub row in file form) and returns the task's record."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}; expected {DATA_FORMATS[task]}")
    missing = [k for k in _KEYS[task] if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))}; expected {DATA_FORMATS[task]}")
    get = {k: raw[k] for k in _KEYS[task]}
    if task == "reasoning":
        question, answer = (_expect(get[k], str, k, where, task) for k in ("question", "answer"))
        if "####" not in answer:
            raise ValueError(
                f"{where}: 'answer' has no '#### <number>' ({answer!r:.80}); expected {DATA_FORMATS[task]}"
            )
        return {"question": question, "answer": answer}
    if task == "nli":
        label = _expect(get["label"], str, "label", where, task).strip()
        if label not in ("entailment", "not_entailment"):
            raise ValueError(f"{where}: label must be entailment or not_entailment, got {label!r:.80}")
        s1, s2 = (_expect(get[k], str, k, where, task).strip() for k in ("sentence1", "sentence2"))
        return {"sentence1": s1, "sentence2": s2, "label": label}
    if task == "open_qa":
        answers = get["answer"]
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answer' must be a non-empty list of str, got {answers!r:.80}")
        passage = get["output"]
        passage = passage[0] if isinstance(passage, list) and passage else passage
        passage = _expect(passage, str, "output", where, task)
        question = _expect(get["question"], str, "question", where, task)
        return {"question": question, "answers": answers, "passage": passage.strip()}
    if task == "closed_qa":
        question, passage = (_expect(get[k], str, k, where, task) for k in ("question", "passage"))
        return {
            "question": question,
            "passage": passage,
            "answer": _expect(get["answer"], bool, "answer", where, task),
        }
    if task == "dialogue":
        options, letter = get["options"], get["answers"]
        if not (isinstance(options, list) and len(options) == 4 and all(isinstance(o, str) for o in options)):
            raise ValueError(f"{where}: 'options' must be a list of 4 str, got {options!r:.80}")
        if letter not in ("A", "B", "C", "D"):
            raise ValueError(f"{where}: 'answers' must be a letter A-D, got {letter!r:.80}")
        article = _expect(get["article"], str, "article", where, task)
        return {"article": article, "options": options, "answer": "ABCD".index(letter)}
    if task == "summarization":
        dialogue, summary = (_expect(get[k], str, k, where, task) for k in ("dialogue", "summary"))
        return {"dialogue": dialogue.replace("\r\n", "\n").strip(), "summary": summary}
    if task == "sentiment":
        label = get["label"]
        label = int(label) if isinstance(label, str) and label.strip() in ("0", "1") else label
        if label not in (0, 1) or isinstance(label, bool):
            raise ValueError(f"{where}: label must be 1 (positive) or 0 (negative), got {label!r:.80}")
        return {"sentence": _expect(get["sentence"], str, "sentence", where, task).strip(), "label": label}
    raise AssertionError(task)  # ner records come from parse_conll


_KEYS = {
    "reasoning": ("question", "answer"),
    "nli": ("sentence1", "sentence2", "label"),
    "open_qa": ("question", "answer", "output"),
    "closed_qa": ("question", "passage", "answer"),
    "dialogue": ("article", "options", "answers"),
    "summarization": ("dialogue", "summary"),
    "sentiment": ("sentence", "label"),
}


def _read_file(task: str, path: Path) -> Iterator[dict[str, Any]]:
    """The task's records from its file, lazily (so `limit` reads only what it needs)."""
    if task == "ner":
        with path.open(encoding="utf-8") as f:
            for tokens, tags in parse_conll(f, str(path)):
                yield {"tokens": tokens, "tags": tags}
        return
    if task == "summarization":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); expected {DATA_FORMATS[task]}") from err
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected {DATA_FORMATS[task]}, got a JSON {type(rows).__name__}")
        for i, row in enumerate(rows):
            yield _record(task, row, f"{path}[{i}]")
        return
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix == ".tsv":  # GLUE TSVs are unquoted: a '"' is part of the text
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None or any(k not in header for k in _KEYS[task]):
                raise ValueError(f"{path}: header {header!r:.120} lacks {_KEYS[task]}; expected {DATA_FORMATS[task]}")
            for lineno, row in enumerate(reader, 2):
                if len(row) != len(header):
                    raise ValueError(f"{path}:{lineno}: {len(row)} columns, the header has {len(header)}")
                yield _record(task, dict(zip(header, row, strict=True)), f"{path}:{lineno}")
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err}); expected {DATA_FORMATS[task]}") from err
            yield _record(task, row, f"{path}:{lineno}")


def _hub_rows(task: str) -> Iterator[dict[str, Any]]:
    """The task's public dataset from the Hugging Face Hub, as raw rows in the file's form."""
    source = _HUB_SOURCES[task]
    get_it = f"pass data_dir=, a folder holding {DATA_FILES[task]} ({DATA_FORMATS[task]})"
    if source is None:
        raise FileNotFoundError(
            f"{task}: no public dataset holds the NQ-open passages the paper used; {get_it}. The paper's file is "
            "task-data/test-OpenDomainQA.jsonl of github.com/JasonForJoy/Model-Editing-Hurt"
        )
    path, name, split, revision = source
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{task}: no data_dir was given and the `datasets` package is not installed: pip install datasets "
            f"(or hf_edit_patch[eval]) to load {path!r} from the Hugging Face Hub, or {get_it}"
        ) from err
    try:
        ds = datasets.load_dataset(path, name, split=split, revision=revision)
    except Exception as err:  # offline, renamed, gated...: say what to do instead
        raise OSError(
            f"{task}: could not load {path!r} (config {name!r}, split {split!r}) from the Hugging Face Hub "
            f"({type(err).__name__}: {err}); {get_it}"
        ) from err
    if task == "ner":
        try:
            tag_names = list(ds.features["ner_tags"].feature.names)
        except (AttributeError, KeyError, TypeError):
            tag_names = list(_CONLL_TAGS)
    for row in ds:
        row = dict(row)
        if task == "nli" and isinstance(row.get("label"), int):
            row["label"] = ("entailment", "not_entailment")[row["label"]]
        if task == "ner":
            row = {"tokens": list(row["tokens"]), "tags": [tag_names[t] for t in row["ner_tags"]]}
        yield row


def _load(task: str, data_dir: Path | None, limit: int | None) -> list[dict[str, Any]]:
    if data_dir is not None:
        path = data_dir / DATA_FILES[task]
        if not path.is_file():
            raise FileNotFoundError(f"{task}: {path} does not exist; expected {DATA_FORMATS[task]}")
        records = _read_file(task, path)
        source = str(path)
    else:
        source = "the Hub"
        rows = _hub_rows(task)
        records = (row if task == "ner" else _record(task, row, f"{task} row {i}") for i, row in enumerate(rows))
    out = []
    for record in records:
        if limit is not None and len(out) >= limit:
            break
        out.append(record)
    if not out:
        raise ValueError(f"{task}: no examples in {source}; expected {DATA_FORMATS[task]}")
    return out


# ---------------------------------------------------------------------------------------------------- model calls
@dataclass
class _Runner:
    """Greedy batched generation and option scoring for one model, with prompt truncation and a progress bar."""

    model: nn.Module
    tokenizer: Any
    batch_size: int
    max_length: int | None
    window: int | None
    bar: Any = None
    task: str = ""
    device: torch.device = field(init=False)
    pad: int = field(init=False)
    stop_ids: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.device = model_device(self.model)
        self.pad = pad_id(self.tokenizer)
        eos: set[int] = set()
        for value in (
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            eos.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
        self.stop_ids = frozenset(eos)

    def budget(self, new_tokens: int) -> int | None:
        """The longest prompt in tokens: max_length, else the context window less the new tokens (at least half)."""
        if self.max_length is not None:
            return self.max_length
        if self.window is None:
            return None
        return max(self.window - new_tokens, self.window // 2)

    def encode(self, prompts: Sequence[str], budget: int | None) -> list[list[int]]:
        rows = [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        if budget is None:
            return rows
        long = [i for i, r in enumerate(rows) if len(r) > budget]
        if long:
            logger.warning(
                "%s: %d of %d prompts are longer than %d tokens; their middle is dropped",
                self.task,
                len(long),
                len(rows),
                budget,
            )
            head = budget // 4
            for i in long:
                rows[i] = rows[i][:head] + rows[i][len(rows[i]) - (budget - head) :]
        return rows

    def _decode(self, ids: list[int]) -> str:
        for j, token in enumerate(ids):
            if token in self.stop_ids:
                ids = ids[:j]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of the prompts (special tokens and everything after the first EOS removed)."""
        rows = self.encode(prompts, self.budget(max_new_tokens))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first: out-of-memory shows early
        texts = [""] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[r, width - len(rows[i]) :] = torch.tensor(rows[i], dtype=torch.long)
                mask[r, width - len(rows[i]) :] = 1
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad,
            )
            for r, i in enumerate(chunk):
                texts[i] = self._decode(out[r, width:].tolist())
            if self.bar is not None:
                self.bar.update(len(chunk))
        return texts

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """Mean log-probability of each option's tokens (with a leading space) following its prompt."""
        continuations = [[target_token_ids(self.tokenizer, o) for o in opts] for opts in options]
        longest = max(len(c) for cs in continuations for c in cs)
        prompt_rows = self.encode(prompts, self.budget(longest))
        pairs = [(i, k) for i, cs in enumerate(continuations) for k in range(len(cs))]
        rows = {p: prompt_rows[p[0]] + continuations[p[0]][p[1]][:-1] for p in pairs}
        order = sorted(pairs, key=lambda p: -len(rows[p]))
        scores = [[0.0] * len(cs) for cs in continuations]
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = pad_batch([rows[p] for p in chunk], self.pad, self.device)
            row_idx, col_idx, targets = [], [], []
            for r, (i, k) in enumerate(chunk):  # the positions that predict the option's tokens
                first = len(prompt_rows[i]) - 1
                target = continuations[i][k]
                row_idx += [r] * len(target)
                col_idx += range(first, first + len(target))
                targets += target
            rows_t = torch.tensor(row_idx, device=self.device)
            cols_t = torch.tensor(col_idx, device=self.device)
            if head is not None:  # only the option positions go through the output head
                with head_only_at(self.model, rows_t, cols_t):
                    logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0]
            else:
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                logits = logits[rows_t, cols_t]
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp[torch.arange(len(targets), device=logp.device), torch.tensor(targets, device=logp.device)]
            for (i, k), values in zip(chunk, picked.split([len(continuations[i][k]) for i, k in chunk]), strict=True):
                scores[i][k] = float(values.mean())
            if self.bar is not None:
                self.bar.update(len(chunk))
        return scores


# ---------------------------------------------------------------------------------------------------- tasks
Details = list[dict[str, Any]]


def _classification(
    task: str, prompts: list[str], golds: list[Any], runner: _Runner, new: int
) -> tuple[float, Details]:
    outputs = runner.generate(prompts, new)
    details = []
    for prompt, output, gold in zip(prompts, outputs, golds, strict=True):
        prediction = first_label(output, task)
        details.append(
            {"prompt": prompt, "output": output, "prediction": prediction, "gold": gold, "correct": prediction == gold}
        )
    return sum(d["correct"] for d in details) / len(details), details


def _run_reasoning(records: list[dict[str, Any]], runner: _Runner, new: int, _scorer: Any) -> tuple[float, Details]:
    prompts = [PROMPTS["reasoning"].format(question=r["question"].strip()) for r in records]
    # the model's own rationale, cut where it starts inventing the next question
    rationales = [re.split(r"\n\s*Q:", text, maxsplit=1)[0].strip() for text in runner.generate(prompts, new)]
    answer_prompts = [
        " ".join(filter(None, (p, z, PROMPTS["reasoning_answer"]))) for p, z in zip(prompts, rationales, strict=True)
    ]
    answers = [_first_line(text) for text in runner.generate(answer_prompts, _REASONING_ANSWER_TOKENS)]
    details = []
    for record, prompt, rationale, answer in zip(records, answer_prompts, rationales, answers, strict=True):
        # gsm8k_solved reads the first number after "answer is": the number the model wrote after the answer cue
        solved = gsm8k_solved(f"The answer is {answer}", record["answer"])
        details.append(
            {"prompt": prompt, "rationale": rationale, "output": answer, "gold": record["answer"], "correct": solved}
        )
    return sum(d["correct"] for d in details) / len(details), details


# the field holding each classification task's gold label
_GOLD_FIELDS = {"nli": "label", "closed_qa": "answer", "sentiment": "label"}


def classification_prompt(task: str, record: Mapping[str, Any]) -> str:
    """The paper's prompt for one record of a classification task ("nli", "closed_qa" or "sentiment")."""
    if task == "nli":
        return PROMPTS["nli"].format(sentence1=record["sentence1"], sentence2=record["sentence2"].rstrip(".").rstrip())
    if task == "closed_qa":
        return PROMPTS["closed_qa"].format(passage=record["passage"], question=record["question"])
    return PROMPTS["sentiment"].format(sentence=record["sentence"])


def _run_classification(task: str) -> Callable[[list[dict[str, Any]], _Runner, int, Any], tuple[float, Details]]:
    def run(records: list[dict[str, Any]], runner: _Runner, new: int, _scorer: Any) -> tuple[float, Details]:
        prompts = [classification_prompt(task, r) for r in records]
        return _classification(task, prompts, [r[_GOLD_FIELDS[task]] for r in records], runner, new)

    return run


def _run_open_qa(records: list[dict[str, Any]], runner: _Runner, new: int, _scorer: Any) -> tuple[float, Details]:
    prompts = [PROMPTS["open_qa"].format(passage=r["passage"], question=r["question"]) for r in records]
    details = []
    for prompt, output, record in zip(prompts, runner.generate(prompts, new), records, strict=True):
        prediction = output.split("Answer:")[-1].replace("\n", " ").strip()
        details.append(
            {
                "prompt": prompt,
                "output": output,
                "prediction": prediction,
                "gold": record["answers"],
                "correct": _span_match(prediction, record["answers"]),
            }
        )
    return sum(d["correct"] for d in details) / len(details), details


def _run_dialogue(records: list[dict[str, Any]], runner: _Runner, _new: int, _scorer: Any) -> tuple[float, Details]:
    prompts = [
        PROMPTS["dialogue"].format(article=r["article"], **dict(zip("abcd", r["options"], strict=True)))
        for r in records
    ]
    scores = runner.option_logprobs(prompts, [r["options"] for r in records])
    details = []
    for prompt, option_scores, record in zip(prompts, scores, records, strict=True):
        choice = max(range(len(option_scores)), key=option_scores.__getitem__)
        details.append(
            {
                "prompt": prompt,
                "option_scores": option_scores,
                "prediction": "ABCD"[choice],
                "gold": "ABCD"[record["answer"]],
                "correct": choice == record["answer"],
            }
        )
    return sum(d["correct"] for d in details) / len(details), details


def _run_summarization(records: list[dict[str, Any]], runner: _Runner, new: int, scorer: Any) -> tuple[float, Details]:
    prompts = [PROMPTS["summarization"].format(dialogue=r["dialogue"]) for r in records]
    details = []
    for prompt, output, record in zip(prompts, runner.generate(prompts, new), records, strict=True):
        prediction = _first_line(output)
        details.append(
            {
                "prompt": prompt,
                "output": output,
                "prediction": prediction,
                "gold": record["summary"],
                "rouge": rouge_avg(prediction, record["summary"], scorer=scorer),
            }
        )
    return sum(d["rouge"] for d in details) / len(details), details


def _run_ner(records: list[dict[str, Any]], runner: _Runner, new: int, _scorer: Any) -> tuple[float, Details]:
    sentences = [detokenize(r["tokens"]) for r in records]
    names = list(ENTITY_TYPES.values())
    prompts = [PROMPTS["ner"].format(entity_type=name, sentence=s) for s in sentences for name in names]
    outputs = runner.generate(prompts, new)
    details: Details = []
    corpus_pred: list[tuple[str, str]] = []
    corpus_gold: list[tuple[str, str]] = []
    for i, (record, sentence) in enumerate(zip(records, sentences, strict=True)):
        answers = dict(zip(names, outputs[i * len(names) : (i + 1) * len(names)], strict=True))
        pred = [(name, entity) for name in names for entity in parse_entities(answers[name])]
        gold = [(ENTITY_TYPES[t], _clean_entity(text)) for t, text in iob_entities(record["tokens"], record["tags"])]
        # qualified by the sentence's index, the pairs of one entity_f1 call give the corpus-level F1
        corpus_pred += [(f"{i} {name}", text) for name, text in pred]
        corpus_gold += [(f"{i} {name}", text) for name, text in gold]
        details.append(
            {"sentence": sentence, "outputs": answers, "prediction": pred, "gold": gold, "f1": entity_f1(pred, gold)}
        )
    return entity_f1(corpus_pred, corpus_gold), details


_RUNNERS: dict[str, Callable[[list[dict[str, Any]], _Runner, int, Any], tuple[float, Details]]] = {
    "reasoning": _run_reasoning,
    "nli": _run_classification("nli"),
    "open_qa": _run_open_qa,
    "closed_qa": _run_classification("closed_qa"),
    "dialogue": _run_dialogue,
    "summarization": _run_summarization,
    "ner": _run_ner,
    "sentiment": _run_classification("sentiment"),
}
_CALLS_PER_EXAMPLE = {"reasoning": 2, "ner": len(ENTITY_TYPES), "dialogue": 4}


# ---------------------------------------------------------------------------------------------------- entry point
def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive int" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def _check_tasks(tasks: Any) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(names, Sequence) or not names or not all(isinstance(t, str) for t in names):
        raise TypeError(f"tasks must be a non-empty sequence of task names (str), got {tasks!r:.80}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _check_max_new_tokens(max_new_tokens: Any) -> dict[str, int]:
    if max_new_tokens is None:
        return dict(MAX_NEW_TOKENS)
    if not isinstance(max_new_tokens, Mapping):
        raise TypeError(f"max_new_tokens must be a dict of task name to int, got {type(max_new_tokens).__name__}")
    for task, value in max_new_tokens.items():
        if task == "dialogue":
            raise ValueError("max_new_tokens: 'dialogue' is scored by option likelihood and generates nothing")
        if task not in MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens: unknown task {task!r}; accepted: {', '.join(MAX_NEW_TOKENS)}")
        _check_positive_int(f"max_new_tokens[{task!r}]", value)
    return {**MAX_NEW_TOKENS, **max_new_tokens}


def _context_window(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def run_general_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = TASKS,
    *,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    show_progress: bool | None = None,
    max_length: int | None = None,
    max_new_tokens: Mapping[str, int] | None = None,
    return_details: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """Scores a model zero-shot on the eight general-ability tasks of the RECT paper (see the module docstring).

    Arguments are checked and every task's data is loaded (and checked) before the model runs. The model is in
    eval mode during the run and every module's training flag is restored after; everything runs under
    `torch.inference_mode()`. The tokenizer is not modified.

    Args:
        model: a causal LM with `generate` (a transformers model or a `PatchedModel`).
        tokenizer: its tokenizer. Without a pad token, padding uses the EOS id (padded positions are masked).
        tasks: task names, in the order they run: any of "reasoning", "nli", "open_qa", "closed_qa", "dialogue",
            "summarization", "ner", "sentiment" (a single name is accepted; duplicates run once).
        limit: the first `limit` examples of each task (None: all of them).
        data_dir: a folder holding the task files named in `DATA_FILES`, in the formats of `DATA_FORMATS`.
            None loads the public datasets by name with the `datasets` package (needs it and the Hub); open_qa
            always needs a file (its passages are not published as a dataset).
        batch_size: sequences per `generate` or forward call.
        show_progress: a progress bar per task; None shows it when stderr is a terminal.
        max_length: the longest prompt in tokens; longer ones lose their middle. None: the model's context window
            (`config.max_position_embeddings` or `n_positions`) less the task's new tokens (at least half the
            window); no limit if the config names no window.
        max_new_tokens: `{task: new tokens}` overriding `MAX_NEW_TOKENS` (for reasoning, the rationale's budget).
        return_details: also return per-example prompts, outputs, predictions and golds.

    Returns:
        `{task: score}` with scores in [0, 1], in the order of `tasks`; with `return_details=True`,
        `(scores, {task: [per-example dict, ...]})`.

    Raises:
        TypeError: `model` is not a module with `generate`, `tasks` is not a sequence of str, or `max_new_tokens`
            is not a mapping.
        ValueError: an unknown task, a `limit`, `batch_size`, `max_length` or `max_new_tokens` value that is not a
            positive int, a data file that is malformed or empty.
        FileNotFoundError: `data_dir` or a task file in it does not exist (the message names the expected format);
            with no `data_dir`, open_qa.
        ImportError: no `data_dir` and the `datasets` package is not installed (or summarization without
            `rouge-score`).
        OSError: no `data_dir` and a dataset cannot be loaded from the Hub.

    Example:
        ```python
        >>> scores = run_general_tasks(model, tokenizer, ["nli", "sentiment"], data_dir="data/tasks", limit=100)
        >>> sorted(scores)
        ['nli', 'sentiment']
        ```
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(f"model must be a torch.nn.Module with a generate method, got {type(model).__name__}")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    names = _check_tasks(tasks)
    _check_positive_int("limit", limit, allow_none=True)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_length", max_length, allow_none=True)
    budgets = _check_max_new_tokens(max_new_tokens)
    folder = None
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"data_dir {str(folder)!r} is not a folder; it must hold the task files: "
                + ", ".join(DATA_FILES[t] for t in names)
            )
    data = {task: _load(task, folder, limit) for task in names}
    scorer = make_rouge_scorer() if "summarization" in names else None

    flags = [(module, module.training) for module in model.modules()]
    scores: dict[str, float] = {}
    details: dict[str, Details] = {}
    runner = _Runner(model, tokenizer, batch_size, max_length, _context_window(model))
    model.eval()
    try:
        with torch.inference_mode():
            for task in names:
                total = len(data[task]) * _CALLS_PER_EXAMPLE.get(task, 1)
                with tqdm(
                    total=total, desc=task, unit="prompt", disable=None if show_progress is None else not show_progress
                ) as bar:
                    runner.bar, runner.task = bar, task
                    score, details[task] = _RUNNERS[task](data[task], runner, budgets.get(task, 0), scorer)
                scores[task] = float(score)
                logger.info("%s: %.4f on %d examples", task, scores[task], len(data[task]))
    finally:
        for module, flag in flags:
            module.training = flag
    return (scores, details) if return_details else scores
