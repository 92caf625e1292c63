"""Reading the tasks' text: CoNLL columns and IOB tags into entities, and a model's answers into what is scored
(the entities it listed, its first line, a span that matches a gold answer).

Example:
    >>> iob_entities(["John", "Smith", "visited", "Paris"], ["B-PER", "I-PER", "O", "B-LOC"])
    [('PER', 'John Smith'), ('LOC', 'Paris')]
    >>> parse_entities(" John Smith, none")
    ['John Smith']
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from ..metrics import normalize_answer
from .prompts import ENTITY_TYPES

__all__ = [
    "clean_entity",
    "detokenize",
    "first_line",
    "iob_entities",
    "parse_conll",
    "parse_entities",
    "span_match",
]

_NO_ENTITY = frozenset({"none", "no", "n/a", "na", "null", "nothing", "no entity", "no entities", "-"})
_ENTITY_STRIP = " \t\"'`“”‘’[](){}<>*"


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


def clean_entity(text: str) -> str:
    """An entity's text without surrounding quotes or brackets and trailing periods."""
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
    items = (clean_entity(item) for item in re.split(r"[,;]", line))
    return [item for item in items if item and item.casefold() not in _NO_ENTITY]


def first_line(text: str) -> str:
    """The first line of a generated text, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def span_match(prediction: str, golds: Sequence[str]) -> bool:
    """True if some run of the prediction's normalized words equals a normalized gold answer."""
    words = normalize_answer(prediction).split()
    for gold in golds:
        target = normalize_answer(gold).split()
        n = len(target)
        if n and any(words[i : i + n] == target for i in range(len(words) - n + 1)):
            return True
    return False
