"""`ShardedTaskRunner`: the task runner's batches split over the processes of torch.distributed.

A `TaskRunner` sorts a call's prompts by length and runs them in batches of `batch_size`. The sharded runner forms
the very same batches, runs batch `i` on rank `i mod N` (through `TaskRunner` itself, one batch per call, which then
forms exactly that batch) and gathers the outputs, so every process returns what one process returns, in the same
order, and the tasks score the whole data on every process.

Example:
    ```python
    >>> from hf_edit_patch.distributed import current_processes
    >>> procs = current_processes()  # doctest: +SKIP
    >>> runner = ShardedTaskRunner(model, tokenizer, 16, None, context_window(model), procs=procs)  # doctest: +SKIP
    >>> runner.generate(prompts, max_new_tokens=5)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ...batching import target_token_ids
from ...distributed import Processes, current_processes, gather_owned
from .runner import TaskRunner

__all__ = ["ShardedTaskRunner"]


@dataclass
class ShardedTaskRunner(TaskRunner):
    """A `TaskRunner` whose batches run on the processes of a torch.distributed group (see the module docstring).

    Args:
        procs: the processes (default: the initialized default group); every one of them must make the same calls.
    """

    procs: Processes | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.procs is None:
            self.procs = current_processes()

    def _lengths(self, prompts: Sequence[str], budget: int | None) -> list[int]:
        """The prompts' token counts after `encode` drops the middle of those over `budget`."""
        rows = self.tokenizer(list(prompts))["input_ids"]
        return [len(r) if budget is None else min(len(r), budget) for r in rows]

    def _batches(self, n: int, length: Sequence[int]) -> list[list[int]]:
        """The batches `TaskRunner` forms: longest first (a stable sort), `batch_size` at a time."""
        order = sorted(range(n), key=lambda i: -length[i])
        return [order[s : s + self.batch_size] for s in range(0, n, self.batch_size)]

    def _others_done(self, batches: list[list[int]]) -> None:
        if self.bar is not None:
            mine = set(self.procs.owned(len(batches)))
            self.bar.update(sum(len(b) for i, b in enumerate(batches) if i not in mine))

    @contextlib.contextmanager
    def _fixed_budget(self, budget: int | None) -> Iterator[None]:
        """Inside, a call truncates prompts to `budget` whatever its own options (as the whole call would)."""
        saved = self.max_length
        self.max_length = budget if budget is not None else saved
        try:
            yield
        finally:
            self.max_length = saved

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """`TaskRunner.generate`, each batch on one process; every process returns all continuations."""
        prompts = list(prompts)
        batches = self._batches(len(prompts), self._lengths(prompts, self.budget(max_new_tokens)))
        mine = {
            b: TaskRunner.generate(self, [prompts[i] for i in batches[b]], max_new_tokens)
            for b in self.procs.owned(len(batches))
        }
        texts = [""] * len(prompts)
        for batch, outputs in zip(batches, gather_owned(mine, len(batches), self.procs), strict=True):
            for i, text in zip(batch, outputs, strict=True):
                texts[i] = text
        self._others_done(batches)
        return texts

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """`TaskRunner.option_logprobs`, each batch of (prompt, option) rows on one process."""
        prompts, options = list(prompts), [list(o) for o in options]
        continuations = [[target_token_ids(self.tokenizer, o) for o in opts] for opts in options]
        budget = self.budget(max(len(c) for cs in continuations for c in cs))
        prompt_length = self._lengths(prompts, budget)
        pairs = [(i, k) for i, cs in enumerate(continuations) for k in range(len(cs))]
        batches = self._batches(len(pairs), [prompt_length[i] + len(continuations[i][k]) - 1 for i, k in pairs])
        mine = {}
        with self._fixed_budget(budget):
            for b in self.procs.owned(len(batches)):
                rows = [pairs[j] for j in batches[b]]
                scored = TaskRunner.option_logprobs(
                    self, [prompts[i] for i, _ in rows], [[options[i][k]] for i, k in rows]
                )
                mine[b] = [s[0] for s in scored]
        scores = [[0.0] * len(cs) for cs in continuations]
        for batch, values in zip(batches, gather_owned(mine, len(batches), self.procs), strict=True):
            for j, value in zip(batch, values, strict=True):
                i, k = pairs[j]
                scores[i][k] = value
        self._others_done(batches)
        return scores
