"""What an experiment records at a checkpoint: editing metrics against the base model's locality reference (and on the
first `first_edits` requests again: forgetting), drift on neutral text, weight statistics with a pooled |ΔW| map,
the norms and condition numbers of the accumulated update per edited matrix, and (when configured) general tasks
and label probes.

Example:
    ```python
    measures = Measures(config, tokenizer, neutral_texts(config), show_progress=False)
    measures.reference = locality_reference(model, tokenizer, requests)
    point = measures.point(pm, requests[:10], base_weights, seconds=12.5)
    point["editing"]["reliability"], point["drift"]["kl"]
    ```
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F

from ..accumulated import accumulated_update_stats
from ..divergence import drift
from ..probes import label_probes
from ..scoring import LocalityReference, score_edits
from ..tasks.run import run_general_tasks
from ..weights import weight_change_stats
from .config import ExperimentConfig

__all__ = ["HEATMAP_SIZE", "Measures", "pooled_abs"]

HEATMAP_SIZE = 64


def pooled_abs(delta: Any, size: int = HEATMAP_SIZE) -> list[list[float]]:
    """Mean |ΔW| over a `size`×`size` grid of blocks (a picture of where the update lands)."""
    d = delta.detach().float().abs()[None, None]
    return F.adaptive_avg_pool2d(d, (min(size, d.shape[2]), min(size, d.shape[3])))[0, 0].tolist()


class Measures:
    """The measures of one experiment's configuration; `reference` must be set before `editing` or `point`."""

    def __init__(
        self, config: ExperimentConfig, tokenizer: Any, neutral: Sequence[str], show_progress: bool | None
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.neutral = list(neutral)
        self.show = show_progress
        self.reference: LocalityReference | None = None

    def tasks(self, model: Any, only: Sequence[str] | None = None) -> dict[str, float]:
        """The configured general tasks (those in `only`, if given); {} when there are none."""
        tasks = [t for t in self.config.tasks if only is None or t in only]
        if not tasks:
            return {}
        return run_general_tasks(
            model,
            self.tokenizer,
            tasks=tuple(tasks),
            limit=self.config.task_limit,
            data_dir=self.config.task_data_dir,
            batch_size=self.config.task_batch_size,
            show_progress=self.show,
        )

    def probes(self, model: Any, only: Sequence[str] | None = None) -> dict[str, Any]:
        """The configured label probes (those in `only`, if given); {} when there are none."""
        tasks = [t for t in self.config.probe_tasks if only is None or t in only]
        if not tasks:
            return {}
        return label_probes(
            model,
            self.tokenizer,
            tasks,
            limit=self.config.probe_limit,
            data_dir=self.config.task_data_dir,
            batch_size=self.config.task_batch_size,
            max_length=self.config.probe_max_length,
        )

    def drift(self, pm: Any) -> dict[str, Any]:
        """Drift of a `PatchedModel` against its base (patches disabled) on the neutral texts."""
        return drift(
            None,
            pm,
            self.tokenizer,
            self.neutral,
            max_length=self.config.drift_max_length,
            show_progress=self.show,
        )

    def editing(self, model: Any, requests: Sequence[Any]) -> dict[str, Any]:
        """Reliability, generalization and locality of `model` on `requests`."""
        return score_edits(model, self.tokenizer, list(requests), reference=self.reference)

    def missing(self, point: dict[str, Any], tasks: bool = True) -> dict[str, list[str]]:
        """The measures a finished point lacks: {"tasks": [...], "probes": [...]} (only non-empty entries)."""
        have_tasks, have_probes = point.get("tasks") or {}, point.get("probes") or {}
        missing = {
            "tasks": [t for t in self.config.tasks if t not in have_tasks] if tasks else [],
            "probes": [t for t in self.config.probe_tasks if t not in have_probes],
        }
        return {k: v for k, v in missing.items() if v}

    def complete(self, point: dict[str, Any], model: Any, missing: dict[str, list[str]]) -> None:
        """Adds the missing measures to a finished point."""
        t0 = time.perf_counter()
        if missing.get("tasks"):
            point["tasks"] = {**(point.get("tasks") or {}), **self.tasks(model, missing["tasks"])}
        if missing.get("probes"):
            point["probes"] = {**(point.get("probes") or {}), **self.probes(model, missing["probes"])}
        point["measure_seconds"] = point.get("measure_seconds", 0.0) + time.perf_counter() - t0

    def point(
        self, pm: Any, edited: Sequence[Any], base_weights: dict[str, Any], seconds: float, tasks: bool = True
    ) -> dict[str, Any]:
        """Everything measured at a checkpoint of `pm` (a `PatchedModel`), after `edited` requests.

        `base_weights` maps the edited weights' names to their values before the edits (empty: no weight
        statistics); `seconds` is the editing time so far; `tasks=False` skips the general tasks.
        """
        t0 = time.perf_counter()
        point: dict[str, Any] = {"editing": self.editing(pm, edited), "drift": self.drift(pm)}
        first = self.config.first_edits
        if len(edited) > first:  # forgetting: the first edits, measured again after all that came after them
            point["first_edits"] = {"n": first, **self.editing(pm, edited[:first])}
        if base_weights:
            point["accumulated"] = accumulated_update_stats(base_weights, pm)
        stats = weight_change_stats(base_weights, pm) if base_weights else None
        if stats is not None:
            stats["frac_rel_change_gt"] = {str(k): v for k, v in stats["frac_rel_change_gt"].items()}
            point["weights"] = stats
            first = sorted(base_weights)[0]
            current = dict(pm.base_model.named_parameters())[first]
            point["heatmap"] = {"module": first, "abs_delta": pooled_abs(current.detach() - base_weights[first])}
            point["nnz"] = sum(p.nnz for p in pm.patches.values())
        point["tasks"] = self.tasks(pm) if tasks else {}
        point["probes"] = self.probes(pm)
        point["edit_seconds"] = seconds
        point["measure_seconds"] = time.perf_counter() - t0
        return point
