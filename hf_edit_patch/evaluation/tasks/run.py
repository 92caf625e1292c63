"""`run_general_tasks`: a model scored zero-shot on the eight general-ability tasks (see the package docstring).

Example:
    ```python
    from hf_edit_patch.evaluation import run_general_tasks

    scores = run_general_tasks(model, tokenizer, ["nli", "sentiment"], data_dir="data/tasks", limit=100)
    ```
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...distributed import current_processes
from ...progress import progress_bar
from ..checks import check_positive_int
from ..metrics import make_rouge_scorer
from .classification import run_classification, run_dialogue
from .data import DATA_FILES, load_task
from .generation import run_ner, run_open_qa, run_reasoning, run_summarization
from .prompts import ENTITY_TYPES, MAX_NEW_TOKENS, TASKS
from .runner import Details, TaskFn, TaskRunner, context_window
from .sharded import ShardedTaskRunner

logger = logging.getLogger(__name__)

__all__ = ["RUNNERS", "run_general_tasks"]


RUNNERS: dict[str, TaskFn] = {
    "reasoning": run_reasoning,
    "nli": run_classification("nli"),
    "open_qa": run_open_qa,
    "closed_qa": run_classification("closed_qa"),
    "dialogue": run_dialogue,
    "summarization": run_summarization,
    "ner": run_ner,
    "sentiment": run_classification("sentiment"),
}
_CALLS_PER_EXAMPLE = {"reasoning": 2, "ner": len(ENTITY_TYPES), "dialogue": 4}


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
        check_positive_int(f"max_new_tokens[{task!r}]", value)
    return {**MAX_NEW_TOKENS, **max_new_tokens}


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
    distributed: bool = False,
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
        distributed: split the work over the processes of the initialized torch.distributed group (all must call
            this with the same arguments): each runs its share of every call's batches, the batches being the ones
            one process forms, and the outputs are gathered, so every process returns one process's scores and
            details (`ShardedTaskRunner`). Progress bars show on rank 0 only.

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
    check_positive_int("limit", limit, allow_none=True)
    check_positive_int("batch_size", batch_size)
    check_positive_int("max_length", max_length, allow_none=True)
    budgets = _check_max_new_tokens(max_new_tokens)
    folder = None
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"data_dir {str(folder)!r} is not a folder; it must hold the task files: "
                + ", ".join(DATA_FILES[t] for t in names)
            )
    data = {task: load_task(task, folder, limit) for task in names}
    scorer = make_rouge_scorer() if "summarization" in names else None

    flags = [(module, module.training) for module in model.modules()]
    scores: dict[str, float] = {}
    details: dict[str, Details] = {}
    if distributed:
        procs = current_processes()
        runner: TaskRunner = ShardedTaskRunner(
            model, tokenizer, batch_size, max_length, context_window(model), procs=procs
        )
        show_progress = show_progress if procs.is_main else False
    else:
        runner = TaskRunner(model, tokenizer, batch_size, max_length, context_window(model))
    model.eval()
    try:
        with torch.inference_mode():
            for task in names:
                total = len(data[task]) * _CALLS_PER_EXAMPLE.get(task, 1)
                with progress_bar(total=total, desc=task, unit="prompt", show_progress=show_progress) as bar:
                    runner.bar, runner.task = bar, task
                    score, details[task] = RUNNERS[task](data[task], runner, budgets.get(task, 0), scorer)
                scores[task] = float(score)
                logger.info("%s: %.4f on %d examples", task, scores[task], len(data[task]))
    finally:
        for module, flag in flags:
            module.training = flag
    return (scores, details) if return_details else scores
