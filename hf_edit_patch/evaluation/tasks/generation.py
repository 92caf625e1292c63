"""The tasks scored on what the model writes: reasoning (GSM8K, two-stage chain of thought), open_qa (NQ-open, a
span matching a gold answer), summarization (SAMSum, ROUGE) and ner (CoNLL-2003, corpus-level entity F1).

Example:
    ```python
    runner = TaskRunner(model, tokenizer, batch_size=16, max_length=None, window=None)
    solve_rate, details = run_reasoning(records, runner, 256, None)
    ```
"""

from __future__ import annotations

import re
from typing import Any

from ..metrics import entity_f1, gsm8k_solved, rouge_avg
from .parsing import clean_entity, detokenize, first_line, iob_entities, parse_entities, span_match
from .prompts import ENTITY_TYPES, PROMPTS, REASONING_ANSWER_TOKENS
from .runner import Details, TaskRunner

__all__ = ["run_ner", "run_open_qa", "run_reasoning", "run_summarization"]


def run_reasoning(records: list[dict[str, Any]], runner: TaskRunner, new: int, _scorer: Any) -> tuple[float, Details]:
    """Solve rate: the model writes its rationale, then the number after the answer cue is checked."""
    prompts = [PROMPTS["reasoning"].format(question=r["question"].strip()) for r in records]
    # the model's own rationale, cut where it starts inventing the next question
    rationales = [re.split(r"\n\s*Q:", text, maxsplit=1)[0].strip() for text in runner.generate(prompts, new)]
    answer_prompts = [
        " ".join(filter(None, (p, z, PROMPTS["reasoning_answer"]))) for p, z in zip(prompts, rationales, strict=True)
    ]
    answers = [first_line(text) for text in runner.generate(answer_prompts, REASONING_ANSWER_TOKENS)]
    details = []
    for record, prompt, rationale, answer in zip(records, answer_prompts, rationales, answers, strict=True):
        # gsm8k_solved reads the first number after "answer is": the number the model wrote after the answer cue
        solved = gsm8k_solved(f"The answer is {answer}", record["answer"])
        details.append(
            {"prompt": prompt, "rationale": rationale, "output": answer, "gold": record["answer"], "correct": solved}
        )
    return sum(d["correct"] for d in details) / len(details), details


def run_open_qa(records: list[dict[str, Any]], runner: TaskRunner, new: int, _scorer: Any) -> tuple[float, Details]:
    """Exact match: some run of the continuation's normalized words equals a normalized gold answer."""
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
                "correct": span_match(prediction, record["answers"]),
            }
        )
    return sum(d["correct"] for d in details) / len(details), details


def run_summarization(
    records: list[dict[str, Any]], runner: TaskRunner, new: int, scorer: Any
) -> tuple[float, Details]:
    """Mean of ROUGE-1/2/L F-measures of the continuation's first line against the gold summary."""
    prompts = [PROMPTS["summarization"].format(dialogue=r["dialogue"]) for r in records]
    details = []
    for prompt, output, record in zip(prompts, runner.generate(prompts, new), records, strict=True):
        prediction = first_line(output)
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


def run_ner(records: list[dict[str, Any]], runner: TaskRunner, new: int, _scorer: Any) -> tuple[float, Details]:
    """Corpus-level entity F1 over one prompt per sentence and entity type."""
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
        gold = [(ENTITY_TYPES[t], clean_entity(text)) for t, text in iob_entities(record["tokens"], record["tags"])]
        # qualified by the sentence's index, the pairs of one entity_f1 call give the corpus-level F1
        corpus_pred += [(f"{i} {name}", text) for name, text in pred]
        corpus_gold += [(f"{i} {name}", text) for name, text in gold]
        details.append(
            {"sentence": sentence, "outputs": answers, "prediction": pred, "gold": gold, "f1": entity_f1(pred, gold)}
        )
    return entity_f1(corpus_pred, corpus_gold), details
