"""The tasks' data: the file each task reads from a local folder and its format, the public dataset loaded by
name instead, and the checks that turn a raw example into the record a task runs on.

Plain Python (no torch); the `datasets` package is imported only when no folder is given.

Example:
    ```python
    from pathlib import Path

    records = load_task("sentiment", Path("data/tasks"), limit=100)
    records[0]  # {'sentence': '...', 'label': 1}
    ```
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .parsing import parse_conll

__all__ = ["DATA_FILES", "DATA_FORMATS", "HUB_SOURCES", "load_task"]

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
HUB_SOURCES: dict[str, tuple[str, str | None, str, str | None] | None] = {
    "reasoning": ("openai/gsm8k", "main", "test", None),
    "nli": ("nyu-mll/glue", "rte", "train", None),  # the paper's 2,489 RTE pairs are GLUE's train split
    "open_qa": None,
    "closed_qa": ("google/boolq", None, "validation", None),
    "dialogue": ("EleutherAI/mutual", "mutual", "validation", "refs/convert/parquet"),
    "summarization": ("Samsung/samsum", "samsum", "test", "refs/convert/parquet"),
    "ner": ("eriktks/conll2003", "conll2003", "validation", "refs/convert/parquet"),
    "sentiment": ("nyu-mll/glue", "sst2", "validation", None),
}

_CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")  # the Hub's ids


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
    source = HUB_SOURCES[task]
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


def load_task(task: str, data_dir: Path | None, limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` checked records of `task` (None: all), from its file in `data_dir` or, without a folder,
    from its public dataset.

    Raises:
        FileNotFoundError: the task's file is not in `data_dir`; open_qa without `data_dir`.
        ValueError: a malformed example, or no example at all.
        ImportError: no `data_dir` and the `datasets` package is not installed.
        OSError: no `data_dir` and the dataset cannot be loaded from the Hub.
    """
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
