"""Text metrics for scoring model outputs: exact match, ROUGE, entity F1 and GSM8K answer checking.

Everything here is pure Python and cheap to import: no torch, no transformers. `rouge_avg` needs the optional
`rouge-score` package, imported only when a scorer is built.

Example:
    >>> from hf_edit_patch.evaluation import metrics
    >>> metrics.exact_match("The Eiffel Tower!", ["eiffel tower", "Tour Eiffel"])
    1.0
    >>> metrics.entity_f1([("PER", "John")], [("per", "john"), ("LOC", "Paris")])
    0.6666666666666666
    >>> metrics.gsm8k_solved("So she pays $1,000.", "500 + 500 = 1000\\n#### 1000")
    True
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "entity_f1",
    "exact_match",
    "gsm8k_solved",
    "make_rouge_scorer",
    "normalize_answer",
    "rouge_avg",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ROUGE_INSTALL_HINT = 'pip install "hf_edit_patch[eval]" (or pip install rouge-score)'

# A number as written in a model's answer: an optional sign (ASCII or Unicode minus) and/or dollar sign, digits with
# optional comma thousands separators, an optional decimal part. It must not start inside a word or another number,
# so "18-7" gives 18 and 7 and "x2" gives nothing.
_NUMBER_RE = re.compile(
    r"(?<![\w.])"
    r"(?P<sign>[-+\u2212]?)\$?(?P<sign2>[-+\u2212]?)"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)
# Where a model states its final answer: "#### 42", "The answer is 42", "Answer: 42".
_GSM8K_MARKER = "####"
_ANSWER_PHRASE_RE = re.compile(r"\banswer\s+is\b|\banswer\s*:", re.IGNORECASE)


def _check_str(value: Any, name: str, func: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{func}: {name} must be a str, got {type(value).__name__} ({value!r:.80})")
    return value


def normalize_answer(text: str) -> str:
    """Normalizes an answer the way the official SQuAD evaluation script does.

    Lowercases, removes ASCII punctuation (`string.punctuation`), removes the articles "a", "an" and "the" as
    whole words, and collapses runs of whitespace to single spaces (stripping both ends).

    Args:
        text: The answer to normalize.

    Returns:
        The normalized answer; "" when nothing but punctuation, articles and whitespace was given.

    Raises:
        ValueError: If `text` is not a str.

    Example:
        >>> normalize_answer("  The  Quick, brown FOX! ")
        'quick brown fox'
    """
    _check_str(text, "text", "normalize_answer")
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, golds: str | Sequence[str]) -> float:
    """Scores a prediction 1.0 if it matches any gold answer after SQuAD normalization, else 0.0.

    Args:
        pred: The predicted answer.
        golds: One gold answer, or a non-empty sequence of acceptable gold answers.

    Returns:
        1.0 if `normalize_answer(pred)` equals `normalize_answer(g)` for some gold `g`, else 0.0.

    Raises:
        ValueError: If `pred` is not a str, `golds` is neither a str nor a sequence of str, or `golds` is empty.

    Example:
        >>> exact_match("the Beatles.", ["Beatles", "The Rolling Stones"])
        1.0
        >>> exact_match("Beatles", "Rolling Stones")
        0.0
    """
    _check_str(pred, "pred", "exact_match")
    if isinstance(golds, str):
        gold_list = [golds]
    elif isinstance(golds, (bytes, bytearray)) or not isinstance(golds, Iterable):
        raise ValueError(
            f"exact_match: golds must be a str or a sequence of str, got {type(golds).__name__} ({golds!r:.80})"
        )
    else:
        gold_list = list(golds)
    if not gold_list:
        raise ValueError("exact_match: golds is empty; give at least one gold answer (a str or a sequence of str)")
    for i, gold in enumerate(gold_list):
        if not isinstance(gold, str):
            raise ValueError(
                f"exact_match: golds[{i}] must be a str, got {type(gold).__name__} ({gold!r:.80}); "
                "golds must be a str or a sequence of str"
            )
    normalized_pred = normalize_answer(pred)
    return float(any(normalized_pred == normalize_answer(gold) for gold in gold_list))


def make_rouge_scorer() -> Any:
    """Builds a new ROUGE scorer for ROUGE-1, ROUGE-2 and ROUGE-L with Porter stemming.

    Building a scorer has a cost; callers scoring many pairs should build one and pass it to `rouge_avg`.

    Returns:
        A new `rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)`.

    Raises:
        ImportError: If the `rouge-score` package is not installed.

    Example:
        >>> scorer = make_rouge_scorer()
        >>> rouge_avg("a cat sat on the mat", "a cat sat on the mat", scorer=scorer)
        1.0
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError(f"rouge_avg needs the rouge-score package: {_ROUGE_INSTALL_HINT}") from err
    return rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)


def rouge_avg(pred: str, ref: str, *, scorer: Any = None) -> float:
    """Averages the ROUGE-1, ROUGE-2 and ROUGE-L F-measures of a prediction against one reference.

    The texts are tokenized by `rouge_score`'s default tokenizer: lowercased, split on anything that is not an
    ASCII letter or digit, and Porter-stemmed. So text with no ASCII letters or digits scores 0.0, and a
    one-token text has no bigrams: its ROUGE-2 is 0.0 even against itself, so it scores at most 2/3.

    Args:
        pred: The predicted text.
        ref: The reference text.
        scorer: A scorer from `make_rouge_scorer()` to reuse across calls; None builds a new one.

    Returns:
        The mean of the three F-measures, in [0, 1]. An empty (or whitespace-only) prediction or reference gives
        0.0.

    Raises:
        ValueError: If `pred` or `ref` is not a str, or `scorer` has no `score` method or does not compute
            rouge1, rouge2 and rougeL.
        ImportError: If `scorer` is None and the `rouge-score` package is not installed.

    Example:
        >>> rouge_avg("the cat sat on the mat", "the cat sat on the mat")
        1.0
        >>> rouge_avg("", "the cat sat on the mat")
        0.0
    """
    _check_str(pred, "pred", "rouge_avg")
    _check_str(ref, "ref", "rouge_avg")
    if scorer is None:
        scorer = make_rouge_scorer()
    elif not callable(getattr(scorer, "score", None)):
        raise ValueError(
            f"rouge_avg: scorer must be a rouge_score RougeScorer (see make_rouge_scorer()) or None, "
            f"got {type(scorer).__name__}"
        )
    if not pred.strip() or not ref.strip():
        return 0.0
    scores = scorer.score(ref, pred)  # rouge_score's order: (target, prediction)
    missing = [name for name in _ROUGE_TYPES if name not in scores]
    if missing:
        raise ValueError(
            f"rouge_avg: scorer does not compute {', '.join(missing)}; it must compute rouge1, rouge2 and rougeL "
            "(build it with make_rouge_scorer())"
        )
    return sum(float(scores[name].fmeasure) for name in _ROUGE_TYPES) / len(_ROUGE_TYPES)


def _entity_counter(pairs: Iterable[Sequence[str]], name: str) -> Counter[tuple[str, str]]:
    if isinstance(pairs, (str, bytes, bytearray)) or not isinstance(pairs, Iterable):
        raise ValueError(
            f"entity_f1: {name} must be an iterable of (type, text) pairs of str, got {type(pairs).__name__} "
            f"({pairs!r:.80})"
        )
    counter: Counter[tuple[str, str]] = Counter()
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ValueError(
                f"entity_f1: {name}[{i}] must be a (type, text) tuple or list of two str, got {pair!r:.80}"
            )
        entity_type, text = pair
        counter[(entity_type.strip().casefold(), " ".join(text.split()).casefold())] += 1
    return counter


def entity_f1(pred_pairs: Iterable[Sequence[str]], gold_pairs: Iterable[Sequence[str]]) -> float:
    """Entity-level F1 between predicted and gold (type, text) pairs, counting duplicates.

    Pairs are compared as a multiset: an entity the gold lists twice must be predicted twice to be fully
    recalled, and an entity predicted twice but listed once in the gold counts one false positive. Types are
    compared case-insensitively (ends stripped); texts after collapsing whitespace and case-folding.

    Args:
        pred_pairs: The predicted entities, each a `(type, text)` tuple or list of two str.
        gold_pairs: The gold entities, in the same form.

    Returns:
        `2 * tp / (len(pred_pairs) + len(gold_pairs))`, i.e. the harmonic mean of precision and recall, where
        `tp` is the size of the multiset intersection. 1.0 when both are empty (nothing to find, nothing
        wrongly found); 0.0 when exactly one is empty.

    Raises:
        ValueError: If either argument is not an iterable of pairs, or a pair is not a tuple or list of two str.

    Example:
        >>> entity_f1([("PER", "John")], [("PER", "John"), ("PER", "john")])
        0.6666666666666666
        >>> entity_f1([], [])
        1.0
    """
    pred = _entity_counter(pred_pairs, "pred_pairs")
    gold = _entity_counter(gold_pairs, "gold_pairs")
    n_pred, n_gold = sum(pred.values()), sum(gold.values())
    if n_pred == 0 and n_gold == 0:
        return 1.0
    true_positives = sum((pred & gold).values())
    return 2.0 * true_positives / (n_pred + n_gold)


def _parse_number(match: re.Match[str]) -> Decimal:
    signs = match["sign"] + match["sign2"]
    negative = "-" in signs or "\u2212" in signs
    try:
        value = Decimal(match["num"].replace(",", ""))
    except InvalidOperation as err:  # unreachable with _NUMBER_RE; kept as a guard
        raise ValueError(f"cannot parse number {match.group(0)!r}") from err
    return -value if negative else value


def _first_number(text: str) -> Decimal | None:
    match = _NUMBER_RE.search(text)
    return None if match is None else _parse_number(match)


def _last_number(text: str) -> Decimal | None:
    matches = list(_NUMBER_RE.finditer(text))
    return _parse_number(matches[-1]) if matches else None


def _predicted_number(text: str) -> Decimal | None:
    # 1) the first number after the last "####" that is followed by one
    parts = text.split(_GSM8K_MARKER)
    for tail in reversed(parts[1:]):
        number = _first_number(tail)
        if number is not None:
            return number
    # 2) the first number after the last "the answer is" / "answer:" that is followed by one
    for marker in reversed(list(_ANSWER_PHRASE_RE.finditer(text))):
        number = _first_number(text[marker.end() :])
        if number is not None:
            return number
    # 3) the last number anywhere
    return _last_number(text)


def gsm8k_solved(pred_text: str, gold_answer: str) -> bool:
    """Checks whether a model's answer to a GSM8K problem gives the gold final number.

    The gold number is the first number after the last "####" of `gold_answer` (GSM8K's format), or, if there
    is no "####", the last number in it. The predicted number is, in order of preference: the first number after
    the last "####" in `pred_text`; the first number after the last "answer is" (as in "The answer is") or
    "answer:" (case-insensitive); the last number in `pred_text`. Numbers may carry a sign, a leading "$", comma
    thousands separators and a decimal part; they are compared exactly as decimals, so "1,000" equals "1000" and
    "5.0" equals "5".

    Args:
        pred_text: The model's generated answer.
        gold_answer: The GSM8K gold answer (the full solution ending in "#### <number>", or just the number).

    Returns:
        True if the predicted number equals the gold number; False otherwise, including when `pred_text` has no
        number.

    Raises:
        ValueError: If either argument is not a str, `gold_answer` contains no number, or it has a "####" with
            no number after it.

    Example:
        >>> gsm8k_solved("She earns 9 * 2 = 18 dollars. The answer is $18.", "9 * 2 = 18\\n#### 18")
        True
        >>> gsm8k_solved("#### 17", "#### 18")
        False
    """
    _check_str(pred_text, "pred_text", "gsm8k_solved")
    _check_str(gold_answer, "gold_answer", "gsm8k_solved")
    if _GSM8K_MARKER in gold_answer:
        tail = gold_answer.rsplit(_GSM8K_MARKER, 1)[1]
        gold = _first_number(tail)
        if gold is None:
            raise ValueError(
                f"gsm8k_solved: gold_answer has no number after its last '####' ({tail.strip()!r:.80}); "
                "expected a GSM8K answer ending in '#### <number>', or text containing a number"
            )
    else:
        gold = _last_number(gold_answer)
        if gold is None:
            raise ValueError(
                f"gsm8k_solved: gold_answer contains no number ({gold_answer!r:.80}); expected a GSM8K answer "
                "ending in '#### <number>', or text containing a number"
            )
    predicted = _predicted_number(pred_text)
    return predicted is not None and predicted == gold
