"""Model calls for the tasks: greedy batched generation and option scoring, with prompt truncation.

`TaskRunner` left-pads its prompts itself (the tokenizer is not modified), sorts them by length, and drops the middle
of a prompt longer than the token budget (the first quarter and the last three quarters of the budget are kept, so
that the instruction and the answer cue survive).

Example:
    ```python
    runner = TaskRunner(model, tokenizer, batch_size=16, max_length=None, window=context_window(model))
    runner.generate(["The capital of France is"], max_new_tokens=5)
    ```
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...batching import head_only_at, model_device, pad_batch, pad_id, target_token_ids

logger = logging.getLogger(__name__)

__all__ = ["Details", "TaskFn", "TaskRunner", "context_window"]

# per-example prompts, outputs, predictions and golds of one task
Details = list[dict[str, Any]]


@dataclass
class TaskRunner:
    """Greedy batched generation and option scoring for one model, with prompt truncation and a progress bar."""

    model: nn.Module
    tokenizer: Any
    batch_size: int
    max_length: int | None
    window: int | None
    bar: Any = None
    task: str = ""
    device: torch.device = field(init=False)
    pad: int = field(init=False)
    stop_ids: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.device = model_device(self.model)
        self.pad = pad_id(self.tokenizer)
        eos: set[int] = set()
        for value in (
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            eos.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
        self.stop_ids = frozenset(eos)

    def budget(self, new_tokens: int) -> int | None:
        """The longest prompt in tokens: max_length, else the context window less the new tokens (at least half)."""
        if self.max_length is not None:
            return self.max_length
        if self.window is None:
            return None
        return max(self.window - new_tokens, self.window // 2)

    def encode(self, prompts: Sequence[str], budget: int | None) -> list[list[int]]:
        """Token ids of the prompts; those longer than `budget` lose their middle (None: no limit)."""
        rows = [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        if budget is None:
            return rows
        long = [i for i, r in enumerate(rows) if len(r) > budget]
        if long:
            logger.warning(
                "%s: %d of %d prompts are longer than %d tokens; their middle is dropped",
                self.task,
                len(long),
                len(rows),
                budget,
            )
            head = budget // 4
            for i in long:
                rows[i] = rows[i][:head] + rows[i][len(rows[i]) - (budget - head) :]
        return rows

    def _decode(self, ids: list[int]) -> str:
        for j, token in enumerate(ids):
            if token in self.stop_ids:
                ids = ids[:j]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of the prompts (special tokens and everything after the first EOS removed)."""
        rows = self.encode(prompts, self.budget(max_new_tokens))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first: out-of-memory shows early
        texts = [""] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[r, width - len(rows[i]) :] = torch.tensor(rows[i], dtype=torch.long)
                mask[r, width - len(rows[i]) :] = 1
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad,
            )
            for r, i in enumerate(chunk):
                texts[i] = self._decode(out[r, width:].tolist())
            if self.bar is not None:
                self.bar.update(len(chunk))
        return texts

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """Mean log-probability of each option's tokens (with a leading space) following its prompt."""
        continuations = [[target_token_ids(self.tokenizer, o) for o in opts] for opts in options]
        longest = max(len(c) for cs in continuations for c in cs)
        prompt_rows = self.encode(prompts, self.budget(longest))
        pairs = [(i, k) for i, cs in enumerate(continuations) for k in range(len(cs))]
        rows = {p: prompt_rows[p[0]] + continuations[p[0]][p[1]][:-1] for p in pairs}
        order = sorted(pairs, key=lambda p: -len(rows[p]))
        scores = [[0.0] * len(cs) for cs in continuations]
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = pad_batch([rows[p] for p in chunk], self.pad, self.device)
            row_idx, col_idx, targets = [], [], []
            for r, (i, k) in enumerate(chunk):  # the positions that predict the option's tokens
                first = len(prompt_rows[i]) - 1
                target = continuations[i][k]
                row_idx += [r] * len(target)
                col_idx += range(first, first + len(target))
                targets += target
            rows_t = torch.tensor(row_idx, device=self.device)
            cols_t = torch.tensor(col_idx, device=self.device)
            if head is not None:  # only the option positions go through the output head
                with head_only_at(self.model, rows_t, cols_t):
                    logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0]
            else:
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                logits = logits[rows_t, cols_t]
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp[torch.arange(len(targets), device=logp.device), torch.tensor(targets, device=logp.device)]
            for (i, k), values in zip(chunk, picked.split([len(continuations[i][k]) for i, k in chunk]), strict=True):
                scores[i][k] = float(values.mean())
            if self.bar is not None:
                self.bar.update(len(chunk))
        return scores


# a task: (records, runner, new tokens, ROUGE scorer) -> (score, details)
TaskFn = Callable[[list[dict[str, Any]], TaskRunner, int, Any], tuple[float, Details]]


def context_window(model: nn.Module) -> int | None:
    """The model's context window in tokens, as its config names it; None if it names none."""
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
