"""Did the edit take, does it generalize, and did it leave the rest alone: reliability, generalization, locality
of a model as it stands (`score_edits`), against the base model's `locality_reference`.

Two scoring rules, as in the literature:

- `metric="accuracy"` (ZsRE, as in MEND/ROME/EasyEdit): token-level teacher-forced accuracy. The target's tokens
  are appended to the prompt and the score is the fraction of them that the model predicts as its argmax.
  Reliability reads the edit prompt, generalization its paraphrases. Locality reads the neighborhood prompts:
  the base model's own greedy continuation of each (`locality_tokens` tokens, computed before any edit) is
  teacher-forced through the edited model and the score is the fraction of those tokens it still predicts.
  An unedited model scores exactly 1.0 on locality.
- `metric="probability"` (CounterFact, as in ROME): a prompt counts as a success when the mean token
  log-probability of `target_new` beats that of `target_true`; for neighborhood prompts (other subjects sharing
  the true attribute) success is the opposite, `target_true` beating `target_new`. Needs `target_true`.

Scores are means over requests of per-request means (over paraphrases, neighborhood prompts, target tokens), so
every request weighs the same. A request without paraphrases (or neighborhood prompts) does not count towards
generalization (or locality); a metric no request can measure is `None`.

Example:
    ```python
    from hf_edit_patch.evaluation import locality_reference, score_edits

    reference = locality_reference(model, tokenizer, requests)  # before editing
    pm = PatchedModel.from_pretrained(model, "out/eiffel")
    scores = score_edits(pm, tokenizer, requests, reference=reference)
    scores["reliability"], scores["generalization"], scores["locality"]
    ```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batching import model_device, pad_batch, pad_id, target_token_ids
from ..distributed import Processes, current_processes, gather_owned
from ..requests import EditRequest, as_requests
from .checks import check_choice, check_int

__all__ = ["METRICS", "METRIC_KEYS", "LocalityReference", "locality_reference", "mean_or_none", "score_edits"]

METRICS = ("accuracy", "probability")
METRIC_KEYS = ("reliability", "generalization", "locality")


@dataclass(frozen=True)
class LocalityReference:
    """The base model's greedy continuations of the neighborhood prompts, keyed by prompt."""

    tokens: dict[str, tuple[int, ...]]


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text).input_ids)
    if not ids:
        raise ValueError(f"the prompt {text!r} tokenizes to nothing")
    return ids


def _teacher_forced(
    model: nn.Module,
    tokenizer: Any,
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int,
    procs: Processes | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (context ids, continuation ids): the argmax token and the log-probability of each continuation token.

    Rows are right-padded (positions stay those of an unpadded run), so results do not depend on `batch_size`. With
    `procs`, batch `b` runs on rank `b mod N` and every process returns all results, in order.
    """
    pad = pad_id(tokenizer)
    device = model_device(model)
    starts = range(0, len(pairs), batch_size)
    mine: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    with torch.no_grad():
        for b in procs.owned(len(starts)) if procs is not None else range(len(starts)):
            chunk = pairs[starts[b] : starts[b] + batch_size]
            rows = [ctx + cont[:-1] for ctx, cont in chunk]
            batch = pad_batch(rows, pad, device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            mine[b] = []
            for i, (ctx, cont) in enumerate(chunk):
                picked = logits[i, len(ctx) - 1 : len(ctx) - 1 + len(cont)].float()
                logp = torch.log_softmax(picked, dim=-1)
                target = torch.tensor(cont, device=logp.device)
                mine[b].append((picked.argmax(-1).cpu(), logp.gather(-1, target[:, None])[:, 0].cpu()))
    parts = gather_owned(mine, len(starts), procs) if procs is not None else [mine[b] for b in range(len(starts))]
    return [result for part in parts for result in part]


def _neighborhood(requests: Sequence[EditRequest]) -> list[str]:
    return sorted({p for r in requests for p in r.neighborhood})


def locality_reference(
    model: nn.Module,
    tokenizer: Any,
    requests: Any,
    *,
    locality_tokens: int = 5,
    batch_size: int = 16,
    distributed: bool = False,
) -> LocalityReference:
    """Greedy continuations of the requests' neighborhood prompts by `model` (call it before editing).

    With `distributed=True` the batches are split over the processes of the initialized torch.distributed group
    (all must call this alike) and every process returns the whole reference, as one process computes it.
    """
    reqs = as_requests(requests)
    check_int("locality_tokens", locality_tokens, 1)
    check_int("batch_size", batch_size, 1)
    procs = current_processes() if distributed else None
    prompts = _neighborhood(reqs)
    contexts = {p: _prompt_ids(tokenizer, p) for p in prompts}
    tokens: dict[str, list[int]] = {p: [] for p in prompts}
    # Greedy decoding by repeated teacher forcing: exactly the argmax path, with no generation settings involved.
    for _ in range(locality_tokens):
        pairs = [(contexts[p] + tokens[p], [0]) for p in prompts]
        for p, (argmax, _) in zip(prompts, _teacher_forced(model, tokenizer, pairs, batch_size, procs), strict=True):
            tokens[p].append(int(argmax[0]))
    return LocalityReference({p: tuple(t) for p, t in tokens.items()})


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of `values`, or None when there are none (a metric no request can measure)."""
    return sum(values) / len(values) if values else None


def score_edits(
    model: nn.Module,
    tokenizer: Any,
    requests: Any,
    *,
    metric: str = "accuracy",
    reference: LocalityReference | None = None,
    batch_size: int = 16,
    return_details: bool = False,
    distributed: bool = False,
) -> dict[str, float | None] | tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Scores `model` on the requests as they stand now (no editing); see the module docstring for the rules.

    Args:
        model: the (edited) model.
        tokenizer: its tokenizer.
        requests: `EditRequest`s or dicts.
        metric: "accuracy" (ZsRE) or "probability" (CounterFact; every request needs `target_true`).
        reference: for `metric="accuracy"`, the base model's `locality_reference` for these requests; without
            it locality is `None`.
        batch_size: sequences per forward pass.
        return_details: also return one dict of per-request scores per request.
        distributed: split the batches over the processes of the initialized torch.distributed group (all must call
            this alike, with the same model); every process returns the scores one process computes.

    Returns:
        `{"reliability", "generalization", "locality"}`, each a fraction in [0, 1] or None when no request has
        the prompts it needs.
    """
    reqs = as_requests(requests)
    check_choice("metric", metric, METRICS)
    check_int("batch_size", batch_size, 1)
    if metric == "probability":
        missing = [i for i, r in enumerate(reqs) if not r.target_true]
        if missing:
            raise ValueError(
                f"metric='probability' compares target_new with target_true, but request {missing[0]} has no "
                "target_true; set it or use metric='accuracy'"
            )
    if reference is not None and not isinstance(reference, LocalityReference):
        raise TypeError(f"reference must come from locality_reference(), got {type(reference).__name__}")
    if reference is not None:
        absent = [p for p in _neighborhood(reqs) if p not in reference.tokens]
        if absent:
            raise ValueError(f"the locality reference has no continuation for the neighborhood prompt {absent[0]!r}")

    # One list of teacher-forced sequences for all requests, scored in shared batches.
    pairs: list[tuple[list[int], list[int]]] = []
    slots: list[tuple[int, str, str]] = []  # (request, kind, target)
    for i, r in enumerate(reqs):
        targets = {"new": target_token_ids(tokenizer, r.target_new)}
        groups = [("reliability", [r.text]), ("generalization", r.paraphrases)]
        if metric == "probability":
            targets["true"] = target_token_ids(tokenizer, r.target_true)
            groups.append(("locality", r.neighborhood))
        for kind, texts in groups:
            for text in texts:
                ids = _prompt_ids(tokenizer, text)
                for t, target_ids in targets.items():
                    pairs.append((ids, target_ids))
                    slots.append((i, kind, t))
        if metric == "accuracy" and reference is not None:
            for text in r.neighborhood:
                pairs.append((_prompt_ids(tokenizer, text), list(reference.tokens[text])))
                slots.append((i, "locality", "ref"))

    was_training = model.training
    model.eval()
    try:
        procs = current_processes() if distributed else None
        results = _teacher_forced(model, tokenizer, pairs, batch_size, procs)
    finally:
        model.train(was_training)

    per_request: list[dict[str, list[float]]] = [{k: [] for k in METRIC_KEYS} for _ in reqs]
    if metric == "accuracy":
        for (i, kind, _), (argmax, _), (_, cont) in zip(slots, results, pairs, strict=True):
            per_request[i][kind].append(float((argmax == torch.tensor(cont)).float().mean()))
    else:  # consecutive (new, true) slots of one prompt
        for j in range(0, len(slots), 2):
            (i, kind, _), (_, lp_new), (_, lp_true) = slots[j], results[j], results[j + 1]
            new_wins = float(lp_new.mean()) > float(lp_true.mean())
            per_request[i][kind].append(float(new_wins if kind != "locality" else not new_wins))

    details = [{k: mean_or_none(v) for k, v in d.items()} for d in per_request]
    scores = {k: mean_or_none([d[k] for d in details if d[k] is not None]) for k in METRIC_KEYS}
    return (scores, details) if return_details else scores
