"""Edit a model with requests and score the edits: instance, sequential and batch editing as in the papers.

`evaluate_edits` runs the editing entry point `edit` (single, sequential or batch), scores reliability,
generalization and locality with `score_edits` (see `scoring` for the rules), and restores the model exactly.

Example:
    ```python
    import json
    import hf_edit_patch as hep

    records = json.load(open("zsre_eval.json"))[:20]
    requests = [hep.EditRequest.from_zsre(r) for r in records]
    scores = hep.evaluation.evaluate_edits(model, tokenizer, requests, method="rome", keep_ratio=0.4,
                                           mode="sequential", stats_dataset="wikitext")
    scores["reliability"], scores["generalization"], scores["locality"]
    ```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..distributed import broadcast_object, current_processes
from ..editing import edit
from ..patched_model import PatchedModel
from ..progress import progress_bar
from ..requests import as_requests
from .checks import check_choice, check_int
from .scoring import METRIC_KEYS, METRICS, locality_reference, mean_or_none, score_edits

logger = logging.getLogger(__name__)

__all__ = ["MODES", "evaluate_edits"]

MODES = ("single", "sequential", "batch")


def _groups(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def evaluate_edits(
    model: nn.Module,
    tokenizer: Any,
    requests: Any,
    *,
    method: str = "rome",
    keep_ratio: float | None = None,
    regularizer: str | None = "rect",
    hparams: Any = None,
    mode: str = "single",
    batch_size: int | None = None,
    metric: str = "accuracy",
    locality_tokens: int = 5,
    eval_batch_size: int = 16,
    return_details: bool = False,
    show_progress: bool | None = None,
    distributed: bool = False,
    **edit_kwargs: Any,
) -> dict[str, float | None] | tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Edits `model` with `requests`, scores the edits, and restores the model exactly.

    Modes (the paper's settings):
        - "single": each group of `batch_size` requests (default 1: instance editing) is edited into the
          unedited model, scored, and taken off again.
        - "batch": as "single" with `batch_size` defaulting to all requests (one batch edit).
        - "sequential": the groups (default 1 request each) are edited one after another, each on top of the
          previous ones; all requests are scored after the last edit.

    Args:
        model: a causal LM or a `PatchedModel` (edits stack on its active patches and are removed afterwards).
        tokenizer: its tokenizer.
        requests: `EditRequest`s or dicts (`EditRequest.from_zsre` / `from_counterfact` build them from records).
        method, keep_ratio, regularizer, hparams: as in `hf_edit_patch.edit`.
        mode: "single", "sequential" or "batch".
        batch_size: requests per edit (see the modes).
        metric: "accuracy" (ZsRE token accuracy) or "probability" (CounterFact comparison).
        locality_tokens: tokens of the base model's continuation compared for locality (metric="accuracy").
        eval_batch_size: sequences per forward pass while scoring.
        return_details: also return per-request scores (with the edit group each request belonged to).
        distributed: run with every process of the initialized torch.distributed group (all must call this alike):
            rank 0 computes each edit and sends the patch to the others, and the scoring batches are split over the
            processes (`score_edits(distributed=True)`); every process returns one process's scores.
        **edit_kwargs: passed to `hf_edit_patch.edit` (e.g. `stats_dataset`, `stats_cache`, `templates`).

    Returns:
        `{"reliability", "generalization", "locality"}` as fractions in [0, 1] (None where no request has the
        prompts a metric needs).
    """
    reqs = as_requests(requests)
    check_choice("mode", mode, MODES)
    check_choice("metric", metric, METRICS)
    check_int("locality_tokens", locality_tokens, 1)
    check_int("eval_batch_size", eval_batch_size, 1)
    if batch_size is None:
        batch_size = len(reqs) if mode == "batch" else 1
    check_int("batch_size", batch_size, 1)
    if metric == "probability" and any(not r.target_true for r in reqs):
        raise ValueError("metric='probability' needs target_true on every request; use metric='accuracy'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a PatchedModel, got {type(model).__name__}")

    procs = current_processes() if distributed else None
    show_progress = show_progress if procs is None or procs.is_main else False
    pm = model if getattr(model, "is_patched_model", False) else PatchedModel(model)
    reference = (
        locality_reference(
            pm,
            tokenizer,
            reqs,
            locality_tokens=locality_tokens,
            batch_size=eval_batch_size,
            distributed=distributed,
        )
        if metric == "accuracy"
        else None
    )
    groups = _groups(len(reqs), batch_size)
    added: list[str] = []
    details: list[dict[str, Any]] = [{} for _ in reqs]
    tag = f"_evaluate_edits_{id(reqs)}"

    def edit_group(g: int, group: range) -> None:
        name = f"{tag}_{g}"
        patch = None
        if procs is None or procs.is_main:
            patch = edit(
                pm,
                tokenizer,
                [reqs[i] for i in group],
                method=method,
                keep_ratio=keep_ratio,
                regularizer=regularizer,
                hparams=hparams,
                show_progress=show_progress,
                **edit_kwargs,
            )
        if procs is not None:  # one edit for all: the processes score the same weights
            patch = broadcast_object(patch, procs)
        pm.add_patch(patch, name)
        added.append(name)

    def score(indices: Sequence[int]) -> None:
        _, per = score_edits(
            pm,
            tokenizer,
            [reqs[i] for i in indices],
            metric=metric,
            reference=reference,
            batch_size=eval_batch_size,
            return_details=True,
            distributed=distributed,
        )
        for i, d in zip(indices, per, strict=True):
            details[i] = {"request": i, "group": i // batch_size, **d}

    bar = progress_bar(groups, desc=f"Editing ({mode})", unit="edit", show_progress=show_progress)
    try:
        for g, group in enumerate(bar):
            edit_group(g, group)
            if mode != "sequential":
                score(group)
                pm.remove_patch(added.pop())
        if mode == "sequential":
            score(range(len(reqs)))
    finally:
        bar.close()
        for name in reversed(added):
            pm.remove_patch(name)

    scores = {k: mean_or_none([d[k] for d in details if d.get(k) is not None]) for k in METRIC_KEYS}
    logger.info(
        "%s edits (%s, %s): reliability %s, generalization %s, locality %s",
        len(reqs),
        method,
        mode,
        *(f"{scores[k]:.3f}" if scores[k] is not None else "n/a" for k in METRIC_KEYS),
    )
    return (scores, details) if return_details else scores
