"""Edge cases of the text metrics in `hf_edit_patch.evaluation.metrics`."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer

from hf_edit_patch.evaluation import metrics
from hf_edit_patch.evaluation.metrics import (
    entity_f1,
    exact_match,
    gsm8k_solved,
    make_rouge_scorer,
    normalize_answer,
    rouge_avg,
)


@pytest.fixture(scope="module")
def scorer():
    return make_rouge_scorer()


# --- module ---------------------------------------------------------------------------------------------------------


def test_docstring_examples_run():
    result = doctest.testmod(metrics, verbose=False)
    assert result.attempted >= 10
    assert result.failed == 0


def test_import_is_cheap():
    code = (
        "import sys; import hf_edit_patch.evaluation.metrics; "
        "heavy = [m for m in ('torch', 'transformers', 'rouge_score') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- normalize_answer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat", "cat"),
        ("  An   apple,\ta pear\n", "apple pear"),
        ("Hello, World!!!", "hello world"),
        ("the", ""),
        ("...", ""),
        ("", ""),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("rock'n'roll", "rocknroll"),
        ("A-team", "ateam"),  # punctuation goes before articles are removed: "ateam" is no article
        ("THE a AN", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_answer_rejects_non_str():
    with pytest.raises(ValueError, match="text must be a str"):
        normalize_answer(None)  # type: ignore[arg-type]


# --- exact_match ----------------------------------------------------------------------------------------------------


def test_exact_match_normalizes_punctuation_articles_case():
    assert exact_match("The  Beatles!", "beatles") == 1.0
    assert exact_match("an Apple.", "APPLE") == 1.0


def test_exact_match_is_not_substring_match():
    assert exact_match("The Beatles band", "Beatles") == 0.0
    assert exact_match("Beatles", "The Beatles band") == 0.0


def test_exact_match_multiple_golds():
    golds = ["Paris", "City of Light"]
    assert exact_match("the city of light", golds) == 1.0
    assert exact_match("paris", golds) == 1.0
    assert exact_match("London", golds) == 0.0
    assert exact_match("paris", ("London", "Paris")) == 1.0
    assert exact_match("paris", (g for g in ["London", "Paris"])) == 1.0


def test_exact_match_returns_float():
    assert isinstance(exact_match("x", "x"), float)
    assert isinstance(exact_match("x", "y"), float)


def test_exact_match_empty_pred_matches_only_empty_gold():
    assert exact_match("", ["the", "x"]) == 1.0  # "the" normalizes to ""
    assert exact_match("", ["x"]) == 0.0


@pytest.mark.parametrize("golds", [[], ()])
def test_exact_match_empty_golds(golds):
    with pytest.raises(ValueError, match="golds is empty"):
        exact_match("x", golds)


@pytest.mark.parametrize(
    ("pred", "golds", "message"),
    [
        (None, "x", "pred must be a str"),
        ("x", ["a", 3], r"golds\[1\] must be a str"),
        ("x", 3, "golds must be a str or a sequence of str"),
        ("x", b"x", "golds must be a str or a sequence of str"),
    ],
)
def test_exact_match_bad_input(pred, golds, message):
    with pytest.raises(ValueError, match=message):
        exact_match(pred, golds)


# --- rouge_avg ------------------------------------------------------------------------------------------------------


def test_rouge_identical_is_one(scorer):
    text = "The quick brown fox jumps over the lazy dog."
    assert rouge_avg(text, text, scorer=scorer) == pytest.approx(1.0)
    assert rouge_avg(text, text) == pytest.approx(1.0)  # builds its own scorer


def test_rouge_disjoint_is_zero(scorer):
    assert rouge_avg("alpha beta gamma", "delta epsilon zeta", scorer=scorer) == 0.0


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("the cat sat on the mat", "the cat lay on the red mat"),
        ("Paris is the capital of France", "The capital of France is Paris"),
        ("running dogs", "the dog runs quickly"),  # stemming: run/run, dog/dog
    ],
)
def test_rouge_partial_overlap_is_mean_of_f_measures(scorer, pred, ref):
    value = rouge_avg(pred, ref, scorer=scorer)
    assert 0.0 < value < 1.0
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
    expected = (direct["rouge1"].fmeasure + direct["rouge2"].fmeasure + direct["rougeL"].fmeasure) / 3
    assert value == pytest.approx(expected, abs=1e-12)


def test_rouge_uses_all_three_components(scorer):
    # with uneven lengths the three F-measures differ, so dropping or repeating one would change the mean
    pred, ref = "a b c d e f", "a b x"
    direct = scorer.score(ref, pred)
    assert direct["rouge1"].fmeasure != direct["rouge2"].fmeasure
    assert rouge_avg(pred, ref, scorer=scorer) == pytest.approx(sum(s.fmeasure for s in direct.values()) / 3)


def test_rouge_single_token_has_no_bigrams(scorer):
    assert rouge_avg("cat", "cat", scorer=scorer) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("pred", "ref"), [("", "the cat"), ("the cat", ""), ("   ", "the cat"), ("", "")])
def test_rouge_empty_is_zero(scorer, pred, ref):
    assert rouge_avg(pred, ref, scorer=scorer) == 0.0


def test_rouge_bad_input(scorer):
    with pytest.raises(ValueError, match="pred must be a str"):
        rouge_avg(None, "x", scorer=scorer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ref must be a str"):
        rouge_avg("x", 1, scorer=scorer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scorer must be a rouge_score RougeScorer"):
        rouge_avg("x", "x", scorer=object())
    with pytest.raises(ValueError, match="does not compute rouge2, rougeL"):
        rouge_avg("a b", "a b", scorer=rouge_scorer.RougeScorer(["rouge1"]))


def test_make_rouge_scorer_returns_new_scorers():
    first, second = make_rouge_scorer(), make_rouge_scorer()
    assert first is not second
    assert isinstance(first, rouge_scorer.RougeScorer)


def test_rouge_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # makes `import rouge_score` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "hf_edit_patch\[eval\]"'):
        make_rouge_scorer()
    with pytest.raises(ImportError, match="rouge-score"):
        rouge_avg("a b", "a b")


# --- entity_f1 ------------------------------------------------------------------------------------------------------


def test_entity_f1_perfect_and_disjoint():
    gold = [("PER", "John Smith"), ("LOC", "Paris")]
    assert entity_f1(list(reversed(gold)), gold) == 1.0
    assert entity_f1([("ORG", "ACME")], gold) == 0.0


def test_entity_f1_duplicates_count():
    # gold lists John twice, pred once: precision 1, recall 1/2
    assert entity_f1([("PER", "John")], [("PER", "John"), ("PER", "John")]) == pytest.approx(2 / 3)
    # pred lists John twice, gold once: precision 1/2, recall 1
    assert entity_f1([("PER", "John"), ("PER", "John")], [("PER", "John")]) == pytest.approx(2 / 3)
    # a set-based F1 would give 1.0 for both; and matching duplicates give 1.0
    assert entity_f1([("PER", "John")] * 2, [("PER", "John")] * 2) == 1.0


def test_entity_f1_is_precision_recall_harmonic_mean():
    pred = [("PER", "John"), ("LOC", "Paris"), ("ORG", "ACME")]
    gold = [("PER", "John"), ("LOC", "Paris"), ("LOC", "Rome"), ("MISC", "x")]
    precision, recall = 2 / 3, 2 / 4
    assert entity_f1(pred, gold) == pytest.approx(2 * precision * recall / (precision + recall))


def test_entity_f1_normalization():
    assert entity_f1([("per", "  john   SMITH ")], [("PER", "John Smith")]) == 1.0
    assert entity_f1([["Per", "john\tsmith"]], [("PER", "John Smith")]) == 1.0  # lists are pairs too
    # the type must match: same text, different type is a miss
    assert entity_f1([("LOC", "John Smith")], [("PER", "John Smith")]) == 0.0
    # text is not punctuation-normalized
    assert entity_f1([("PER", "John Smith.")], [("PER", "John Smith")]) == 0.0


def test_entity_f1_empty_cases():
    assert entity_f1([], []) == 1.0
    assert entity_f1([("PER", "John")], []) == 0.0
    assert entity_f1([], [("PER", "John")]) == 0.0
    assert entity_f1(iter([]), ()) == 1.0


@pytest.mark.parametrize(
    ("pred", "gold", "message"),
    [
        ([("PER",)], [], r"pred_pairs\[0\] must be a \(type, text\) tuple or list of two str"),
        ([], [("PER", "John", "x")], r"gold_pairs\[0\]"),
        ([("PER", "John"), ("PER", 3)], [], r"pred_pairs\[1\]"),
        ([("PER", None)], [], r"pred_pairs\[0\]"),
        (["PE"], [], r"pred_pairs\[0\]"),  # a 2-char str is not a pair
        (("PER", "John"), [], r"pred_pairs\[0\]"),  # a single pair instead of a list of pairs
        ("PER John", [], "pred_pairs must be an iterable of"),
        ([], None, "gold_pairs must be an iterable of"),
    ],
)
def test_entity_f1_bad_pairs(pred, gold, message):
    with pytest.raises(ValueError, match=message):
        entity_f1(pred, gold)


# --- gsm8k_solved ---------------------------------------------------------------------------------------------------

GOLD_18 = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
)


def test_gsm8k_with_hashes():
    assert gsm8k_solved("9 * 2 = 18\n#### 18", GOLD_18) is True
    assert gsm8k_solved("9 * 2 = 18\n#### 17", GOLD_18) is False
    # the number after '####' wins over a later number
    assert gsm8k_solved("#### 18\nThat is 3 more than 15.", GOLD_18) is True
    assert gsm8k_solved("#### 17\nWait, 18.", GOLD_18) is False
    # the last '####' followed by a number is used
    assert gsm8k_solved("#### 12\nNo: #### 18", GOLD_18) is True
    assert gsm8k_solved("####18", GOLD_18) is True


def test_gsm8k_with_answer_phrase():
    assert gsm8k_solved("She makes 9 * 2 = 18. The answer is 18.", GOLD_18) is True
    assert gsm8k_solved("The answer is 18, since 9 + 9 = 18 and she has 3 left.", GOLD_18) is True
    assert gsm8k_solved("THE ANSWER IS 18 because she sold 9 eggs for 2 each, 3 left", GOLD_18) is True
    assert gsm8k_solved("Answer: 18 (not 20)", GOLD_18) is True
    assert gsm8k_solved("The answer is 20, not 18", GOLD_18) is False
    # '####' is preferred over the phrase
    assert gsm8k_solved("The answer is 20.\n#### 18", GOLD_18) is True


def test_gsm8k_last_number_fallback():
    assert gsm8k_solved("16 - 7 = 9 eggs, 9 * 2 = 18", GOLD_18) is True
    assert gsm8k_solved("She makes 18 dollars from 9 eggs", GOLD_18) is False


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("The answer is 1,000.", "#### 1000"),
        ("The answer is 1000", "#### 1,000"),
        ("The answer is $1,234,567.", "#### 1234567"),
        ("It costs $5.00 in total", "#### 5"),
        ("#### 5.0", "#### 5"),
        ("#### 2.50", "#### 2.5"),
        ("#### .5", "#### 0.5"),
        ("#### 1,000.50", "#### 1000.5"),
        ("Answer: +7", "#### 7"),
    ],
)
def test_gsm8k_number_formats_match(pred, gold):
    assert gsm8k_solved(pred, gold) is True


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("#### 5.01", "#### 5"),
        ("#### 10000", "#### 1,000"),
        ("#### 100", "#### 1,000"),
        ("#### 5", "#### -5"),
    ],
)
def test_gsm8k_number_formats_differ(pred, gold):
    assert gsm8k_solved(pred, gold) is False


def test_gsm8k_negative_numbers():
    assert gsm8k_solved("The temperature drops to -5 degrees.", "#### -5") is True
    assert gsm8k_solved("The answer is -$3.", "#### -3") is True
    assert gsm8k_solved("The answer is $-3.", "#### -3") is True
    assert gsm8k_solved("The answer is \u22123.", "#### -3") is True
    # a hyphen between numbers is subtraction, not a sign
    assert gsm8k_solved("20-5", "#### 5") is True
    assert gsm8k_solved("20-5", "#### -5") is False


def test_gsm8k_no_number_in_prediction():
    assert gsm8k_solved("I do not know.", GOLD_18) is False
    assert gsm8k_solved("", GOLD_18) is False
    assert gsm8k_solved("The answer is eighteen. ####", GOLD_18) is False


def test_gsm8k_gold_without_hashes_uses_last_number():
    assert gsm8k_solved("#### 18", "9 * 2 = 18") is True
    assert gsm8k_solved("#### 9", "9 * 2 = 18") is False
    assert gsm8k_solved("42", "42") is True


@pytest.mark.parametrize(
    ("gold", "message"),
    [
        ("no number here", "gold_answer contains no number"),
        ("", "gold_answer contains no number"),
        ("she makes 18 dollars\n#### ", "no number after its last '####'"),
    ],
)
def test_gsm8k_gold_without_number(gold, message):
    with pytest.raises(ValueError, match=message):
        gsm8k_solved("#### 18", gold)


def test_gsm8k_bad_types():
    with pytest.raises(ValueError, match="pred_text must be a str"):
        gsm8k_solved(18, GOLD_18)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gold_answer must be a str"):
        gsm8k_solved("18", 18)  # type: ignore[arg-type]


def test_reachable_from_the_package_root():
    import hf_edit_patch as hep

    assert hep.evaluation.metrics.exact_match("Paris.", "paris") == 1.0
    assert "evaluation" in dir(hep)
