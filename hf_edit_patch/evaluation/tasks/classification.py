"""The tasks answered with a label or a choice: nli (RTE), closed_qa (BoolQ) and sentiment (SST-2) read the first
label word of a short greedy answer; dialogue (MuTual) picks the option of highest mean token log-probability.

Example:
    ```python
    runner = TaskRunner(model, tokenizer, batch_size=16, max_length=None, window=None)
    accuracy, details = run_classification("sentiment")(records, runner, 5, None)
    ```
"""

from __future__ import annotations

from typing import Any

from .prompts import GOLD_FIELDS, PROMPTS, classification_prompt, first_label
from .runner import Details, TaskFn, TaskRunner

__all__ = ["run_classification", "run_dialogue"]


def _classification(
    task: str, prompts: list[str], golds: list[Any], runner: TaskRunner, new: int
) -> tuple[float, Details]:
    outputs = runner.generate(prompts, new)
    details = []
    for prompt, output, gold in zip(prompts, outputs, golds, strict=True):
        prediction = first_label(output, task)
        details.append(
            {"prompt": prompt, "output": output, "prediction": prediction, "gold": gold, "correct": prediction == gold}
        )
    return sum(d["correct"] for d in details) / len(details), details


def run_classification(task: str) -> TaskFn:
    """The runner of a classification task ("nli", "closed_qa" or "sentiment"): accuracy of the first label word."""

    def run(records: list[dict[str, Any]], runner: TaskRunner, new: int, _scorer: Any) -> tuple[float, Details]:
        prompts = [classification_prompt(task, r) for r in records]
        return _classification(task, prompts, [r[GOLD_FIELDS[task]] for r in records], runner, new)

    return run


def run_dialogue(records: list[dict[str, Any]], runner: TaskRunner, _new: int, _scorer: Any) -> tuple[float, Details]:
    """Recall4@1: the option of highest mean token log-probability after the prompt is the gold one."""
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
