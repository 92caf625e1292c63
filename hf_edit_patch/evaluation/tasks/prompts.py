"""What each general task asks: the task names, the paper's prompts, the new-token budgets, the NER entity types,
and the label words of the classification tasks with the field holding their gold label.

Plain Python (no torch): the experiment configuration and the command line read the task names from here.

Example:
    >>> classification_prompt("nli", {"sentence1": "A cat sat.", "sentence2": "An animal sat."})
    'A cat sat. entails the An animal sat. True or False? answer:'
    >>> first_label(" Positive!", "sentiment")
    1
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ENTITY_TYPES",
    "GOLD_FIELDS",
    "LABEL_WORDS",
    "MAX_NEW_TOKENS",
    "PROBE_TASKS",
    "PROMPTS",
    "REASONING_ANSWER_TOKENS",
    "TASKS",
    "classification_prompt",
    "first_label",
]

TASKS = ("reasoning", "nli", "open_qa", "closed_qa", "dialogue", "summarization", "ner", "sentiment")

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
REASONING_ANSWER_TOKENS = 16

# CoNLL-2003 entity types, as the NER prompt names them (in the order the prompts are asked).
ENTITY_TYPES = {"PER": "Person", "LOC": "Location", "ORG": "Organization", "MISC": "Miscellaneous"}

LABEL_WORDS: dict[str, dict[str, Any]] = {
    "nli": {"true": "entailment", "false": "not_entailment"},
    "closed_qa": {"yes": True, "no": False},
    "sentiment": {"positive": 1, "negative": 0},
}
_LABEL_RES = {
    task: re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE) for task, words in LABEL_WORDS.items()
}

# the field holding each classification task's gold label
GOLD_FIELDS = {"nli": "label", "closed_qa": "answer", "sentiment": "label"}

# the classification tasks the label probes read, in the order they are reported (SST-2, RTE, BoolQ)
PROBE_TASKS = ("sentiment", "nli", "closed_qa")


def first_label(text: str, task: str) -> Any:
    """The label of the first label word in a generated answer (whole word, any case), or None if there is none.

    Example:
        >>> first_label(" False. The first sentence", "nli")
        'not_entailment'
        >>> first_label(" not sure", "closed_qa") is None
        True
    """
    match = _LABEL_RES[task].search(text)
    return None if match is None else LABEL_WORDS[task][match.group(1).lower()]


def classification_prompt(task: str, record: Mapping[str, Any]) -> str:
    """The paper's prompt for one record of a classification task ("nli", "closed_qa" or "sentiment")."""
    if task == "nli":
        return PROMPTS["nli"].format(sentence1=record["sentence1"], sentence2=record["sentence2"].rstrip(".").rstrip())
    if task == "closed_qa":
        return PROMPTS["closed_qa"].format(passage=record["passage"], question=record["question"])
    return PROMPTS["sentiment"].format(sentence=record["sentence"])
