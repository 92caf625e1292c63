"""Counterfactual requests a model does not already state: the generated facts checked against the model itself.

A counterfactual edit only measures something when the model did not already say the new target. `filter_unstated`
keeps the requests on whose prompt the model prefers `target_true` to `target_new` (the mean token log-probability
of the true object is higher: CounterFact's rule, `score_edits(metric="probability")`), and
`unstated_counterfactuals` draws generated requests (`hf_edit_patch.counterfactuals`) until enough pass.

Example:
    ```python
    from hf_edit_patch.evaluation.counterfactuals import unstated_counterfactuals

    requests = unstated_counterfactuals(model, tokenizer, 200, seed=0)
    ```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..counterfactuals import generate_counterfactuals
from ..requests import EditRequest, as_requests
from .scoring import score_edits

__all__ = ["filter_unstated", "unstated_counterfactuals"]


def filter_unstated(model: nn.Module, tokenizer: Any, requests: Any, *, batch_size: int = 16) -> list[EditRequest]:
    """The requests whose new target `model` does not already state, in their order.

    A request is kept when, on its prompt, the model gives `target_true` a higher mean token log-probability than
    `target_new` (so the edit has something to change). Every request needs a `target_true`.

    Raises:
        ValueError: a request without `target_true`.

    Example:
        ```python
        >>> kept = filter_unstated(model, tokenizer, generate_counterfactuals(50))  # doctest: +SKIP
        ```
    """
    reqs = as_requests(requests)
    bare = [dataclasses.replace(r, paraphrases=[], neighborhood=[]) for r in reqs]  # the prompt is what is checked
    _, details = score_edits(model, tokenizer, bare, metric="probability", return_details=True, batch_size=batch_size)
    return [r for r, d in zip(reqs, details, strict=True) if d["reliability"] == 0.0]


def unstated_counterfactuals(
    model: nn.Module,
    tokenizer: Any,
    n: int,
    *,
    seed: int = 0,
    relations: Sequence[str] | None = None,
    exclude_subjects: Sequence[str] = (),
    batch_size: int = 16,
) -> list[EditRequest]:
    """`n` generated counterfactual requests that `model` does not already state (see `filter_unstated`).

    `generate_counterfactuals(n, seed=seed, relations=relations, exclude_subjects=...)` with the model as its
    `accept` check: candidates are checked in their order and the first `n` that pass are kept, so the same model
    and seed give the same requests. Their neighborhood prompts are drawn among subjects none of them edits.

    Raises:
        EditRequestError: fewer than `n` candidates pass.

    Example:
        ```python
        >>> extra = unstated_counterfactuals(model, tokenizer, 100, exclude_subjects=[r.subject for r in zsre])
        ```
    """

    def accept(candidates: list[EditRequest]) -> list[bool]:
        kept = {id(r) for r in filter_unstated(model, tokenizer, candidates, batch_size=batch_size)}
        return [id(r) in kept for r in candidates]

    return generate_counterfactuals(
        n, seed=seed, relations=relations, exclude_subjects=exclude_subjects, accept=accept
    )
