"""Label probes: does the model still answer in the task's format, and does it still know the answer?

The greedy-generation scores of `run_general_tasks` sit near chance on small models, so they cannot show what an
edit costs there. Two measures read the next-token distribution right after the answer cue of the paper's
classification prompts (SST-2, RTE and BoolQ; `tasks.prompts.PROMPTS`) and move long before accuracy does:

- **adherence**: the share of prompts whose greedy next token starts a label word (positive/negative,
  true/false, yes/no; lower case or Capitalized, with or without a leading space). An edit that breaks the
  answer format shows here first.
- **auc**: the ROC AUC of `log p(positive label) − log p(negative label)` against the gold labels, where each
  side's probability is summed over its spellings' first tokens. It asks only whether the model ranks the right
  answer higher, whatever it would have generated; 0.5 is chance. Ties count one half.

`label_mass` (the mean probability on all label tokens) is reported too. One forward pass per prompt, batched
with left padding; prompts longer than `max_length` lose their middle, as in `run_general_tasks`.

Example:
    ```python
    from hf_edit_patch.evaluation.probes import label_probes

    before = label_probes(model, tokenizer, data_dir="data/tasks", limit=64)
    # {'sentiment': {'adherence': 0.97, 'auc': 0.81, 'label_mass': 0.62, 'n': 64}, 'nli': {...}, ...}
    ```
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batching import head_only_at, model_device, pad_batch, pad_id
from .checks import check_positive_int
from .tasks.data import load_task
from .tasks.prompts import GOLD_FIELDS, LABEL_WORDS, PROBE_TASKS, classification_prompt
from .tasks.runner import TaskRunner

logger = logging.getLogger(__name__)

__all__ = ["PROBE_TASKS", "label_probes", "label_token_ids", "roc_auc"]


def _answers(task: str) -> tuple[str, str, Any]:
    """The task's positive and negative label words (as `run_general_tasks` reads them) and the positive gold."""
    positive, negative = LABEL_WORDS[task]
    return positive, negative, LABEL_WORDS[task][positive]


def label_token_ids(tokenizer: Any, word: str) -> set[int]:
    """First token ids of a label word's spellings: with and without a leading space, lower case and Capitalized.

    Spellings the tokenizer does not know (the unknown token) are left out.

    (UPPER case is left out: its first token is often a bare letter such as "N" that starts many other words.)
    """
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids = set()
    for form in {word.lower(), word.capitalize()}:
        for text in (form, " " + form):
            tokens = tokenizer(text, add_special_tokens=False).input_ids
            if tokens and tokens[0] != unknown:
                ids.add(int(tokens[0]))
    return ids


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counting ½); None without both classes.

    Example:
        >>> roc_auc([0.9, 0.1, 0.8, 0.3], [True, False, True, False])
        1.0
        >>> roc_auc([1.0, 1.0], [True, False])
        0.5
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    # rank-sum form: O(n log n), average ranks for ties
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def label_probes(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = PROBE_TASKS,
    *,
    limit: int | None = 64,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    max_length: int | None = 256,
    return_details: bool = False,
) -> dict[str, dict[str, Any]] | tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Answer-format adherence and label-likelihood AUC on SST-2, RTE and BoolQ (see the module docstring).

    Args:
        model: a causal LM (or a `PatchedModel`); it runs in eval mode under `torch.inference_mode()` and every
            module's training flag is restored after.
        tokenizer: its tokenizer (not modified).
        tasks: any of "sentiment" (SST-2), "nli" (RTE), "closed_qa" (BoolQ); a single name is accepted.
        limit: the first `limit` examples of each task (None: all).
        data_dir: a folder with the task files of `tasks.data.DATA_FILES`; None loads the public datasets by name.
        batch_size: prompts per forward pass.
        max_length: the longest prompt in tokens (longer ones lose their middle); None: no limit.
        return_details: also return, per task, each example's gold and label log-probabilities.

    Returns:
        `{task: {"adherence", "auc", "label_mass", "n"}}` (`auc` is None when the examples hold one class only);
        with `return_details=True`, `(scores, {task: [{"gold", "logp_pos", "logp_neg", "greedy_is_label"}]})`.

    Raises:
        TypeError: `model` is not a module or `tasks` is not a sequence of task names.
        ValueError: an unknown task; `limit`, `batch_size` or `max_length` not a positive int; a label word the
            tokenizer cannot spell, or whose spellings share a first token with the other label's (the likelihoods
            would not tell them apart).
        FileNotFoundError: a task file is missing from `data_dir`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, Sequence) or not all(isinstance(t, str) for t in tasks):
        raise TypeError(f"tasks must be a sequence of task names, got {tasks!r}")
    unknown = [t for t in tasks if t not in PROBE_TASKS]
    if unknown:
        raise ValueError(f"unknown probe tasks {unknown}; accepted: {PROBE_TASKS}")
    names = list(dict.fromkeys(tasks))
    check_positive_int("limit", limit, allow_none=True)
    check_positive_int("batch_size", batch_size)
    check_positive_int("max_length", max_length, allow_none=True)
    folder = Path(data_dir) if data_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"data_dir {str(folder)!r} is not a folder")
    data = {task: load_task(task, folder, limit) for task in names}
    label_ids = {}
    for task in names:
        pos_word, neg_word, _ = _answers(task)
        pos, neg = label_token_ids(tokenizer, pos_word), label_token_ids(tokenizer, neg_word)
        for word, found in ((pos_word, pos), (neg_word, neg)):
            if not found:
                raise ValueError(f"{task}: the tokenizer has no token for the label word {word!r}")
        if pos & neg:
            raise ValueError(
                f"{task}: the tokenizer starts {pos_word!r} and {neg_word!r} with the same token(s) "
                f"{sorted(pos & neg)}; their likelihoods cannot be told apart"
            )
        label_ids[task] = (sorted(pos), sorted(neg))

    device = model_device(model)
    runner = TaskRunner(model, tokenizer, batch_size, max_length, None)
    pad = pad_id(tokenizer)
    flags = [(module, module.training) for module in model.modules()]
    scores: dict[str, dict[str, Any]] = {}
    details: dict[str, list[dict[str, Any]]] = {}
    model.eval()
    try:
        with torch.inference_mode():
            for task in names:
                records = data[task]
                runner.task = task
                rows = runner.encode([classification_prompt(task, r) for r in records], max_length)
                positive = _answers(task)[2]
                pos_ids = torch.tensor(label_ids[task][0], device=device)
                neg_ids = torch.tensor(label_ids[task][1], device=device)
                both = torch.cat([pos_ids, neg_ids])
                out: list[dict[str, Any]] = [{} for _ in records]
                order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    batch = pad_batch([rows[i] for i in chunk], pad, device)
                    last = batch.attention_mask.sum(dim=1) - 1  # right padding: each prompt's last token
                    picks = torch.arange(len(chunk), device=device)
                    with head_only_at(model, picks, last):
                        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0]
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    greedy = logp.argmax(dim=-1)
                    lp_pos = torch.logsumexp(logp[:, pos_ids], dim=-1)
                    lp_neg = torch.logsumexp(logp[:, neg_ids], dim=-1)
                    mass = logp[:, both].exp().sum(dim=-1)
                    for r, i in enumerate(chunk):
                        out[i] = {
                            "gold": records[i][GOLD_FIELDS[task]] == positive,
                            "logp_pos": float(lp_pos[r]),
                            "logp_neg": float(lp_neg[r]),
                            "greedy_is_label": bool(torch.isin(greedy[r], both)),
                            "label_mass": float(mass[r]),
                        }
                auc = roc_auc([d["logp_pos"] - d["logp_neg"] for d in out], [d["gold"] for d in out])
                scores[task] = {
                    "adherence": sum(d["greedy_is_label"] for d in out) / len(out),
                    "auc": auc,
                    "label_mass": sum(d["label_mass"] for d in out) / len(out),
                    "n": len(out),
                }
                details[task] = out
                logger.info("%s probes: %s", task, scores[task])
    finally:
        for module, flag in flags:
            module.training = flag
    return (scores, details) if return_details else scores
