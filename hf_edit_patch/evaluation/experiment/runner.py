"""`run_experiment`: runs (or resumes) an experiment, one regularizer after another, saving after every checkpoint.

Sequential runs save each edit as a patch under `<output_dir>/patches/<run>/` and re-attach the saved patches on a
rerun; single runs compute each group's whole update once and apply every regularizer to it.

Example:
    ```python
    config = ExperimentConfig(data="zsre_eval.json", method="rome", regularizers=["none", "rect:0.4"],
                              checkpoints=[10, 50], drift_texts="neutral.jsonl", tasks=[])
    results = run_experiment(config, "out/exp")
    print(summary_table(results))
    ```
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...editing import compute_update, edit, regularize_update
from ...hub.default_model import load_default_model
from ...hub.stats_cache import StatsCache
from ...patch.edit_patch import EditPatch
from ...patched_model import PatchedModel
from ...progress import progress_bar
from ..counterfactuals import unstated_counterfactuals
from ..scoring import locality_reference
from .config import ExperimentConfig, edit_settings, load_zsre, neutral_texts, parse_regularizer
from .inputs import data_sha256, kept_reference, kept_requests
from .measures import Measures
from .plots import plot_results
from .results import ResultsFile, average_points, point_summary

logger = logging.getLogger(__name__)

__all__ = ["ExperimentRunner", "run_experiment"]


class ExperimentRunner:
    """Runs one configuration into `output_dir`; `run()` returns the results (also written to `results.json`)."""

    def __init__(
        self, config: ExperimentConfig, output_dir: Path, show_progress: bool | None, model: Any, tokenizer: Any
    ) -> None:
        self.config = config
        self.model, self.tokenizer = model, tokenizer
        self.out = output_dir
        self.show = show_progress
        self.results_file = ResultsFile(output_dir)
        self.results = self.results_file.load_or_start(config.to_dict())

    def save(self) -> None:
        """Writes the results, merged with what other runners sharing the folder saved (see `ResultsFile.save`)."""
        self.results_file.save(self.results)

    # ------------------------------------------------------------------ model and data
    def setup(self) -> None:
        """Loads the requests, the model (unless given), the neutral texts, and the editing arguments."""
        c = self.config
        if self.model is None:
            self.model, self.tokenizer = load_default_model(c.model)
        self.model.eval()
        self.requests = self.load_requests()
        self.measures = Measures(c, self.tokenizer, neutral_texts(c), self.show)
        self.updates: dict[tuple[int, ...], tuple[Any, float]] = {}  # single runs: whole updates, seconds
        self.edit_kwargs: dict[str, Any] = {
            "hparams": c.hparams or None,
            "stats_cache": StatsCache(),
            "stats_text_field": c.stats_text_field,
        }
        if c.stats_dataset:
            self.edit_kwargs["stats_dataset"] = c.stats_dataset
        else:
            self.edit_kwargs["allow_model_sampled_stats"] = True

    def load_requests(self) -> list[Any]:
        """The first `max(checkpoints)` requests: ZsRE records, then (`counterfactuals="fill"`) generated
        counterfactuals the model does not already state, or (`"only"`) generated ones alone; the seed orders both.
        Kept in the output folder (`inputs.kept_requests`) for runners that resume or share it."""
        c = self.config
        n = max(c.checkpoints)
        data = None if c.counterfactuals == "only" else c.data
        key = {"n": n, "data_sha256": data_sha256(data), "seed": c.seed, "counterfactuals": c.counterfactuals,
               "model": c.model}  # fmt: skip
        return kept_requests(self.out, key, lambda: self._make_requests(n))

    def _make_requests(self, n: int) -> list[Any]:
        c = self.config
        records: list[Any] = []
        if c.counterfactuals != "only":
            records = load_zsre(c.data, None if c.counterfactuals == "fill" else n, c.seed)[:n]
        if len(records) < n:
            subjects = [r.subject for r in records]
            extra = unstated_counterfactuals(self.model, self.tokenizer, n - len(records), seed=c.seed,
                                             exclude_subjects=subjects)  # fmt: skip
            logger.info("%d ZsRE requests and %d generated counterfactuals", len(records), len(extra))
            records += extra
        return records

    def measure_base(self) -> None:
        """The base model's point (or the measures it lacks), and the locality reference of every request."""
        m = self.measures
        m.reference = kept_reference(
            self.out, self.requests, self.config.model,
            lambda: locality_reference(self.model, self.tokenizer, self.requests),
        )  # fmt: skip
        base = self.results.get("base")
        if base is not None:
            missing = m.missing(base)
            if missing:
                m.complete(base, self.model, missing)
                self.save()
            return
        t0 = time.perf_counter()
        pm = PatchedModel(self.model)
        base = {"drift": m.drift(pm), "tasks": m.tasks(self.model), "probes": m.probes(self.model)}
        pm.unload()
        base["editing"] = m.editing(self.model, self.requests)
        base["seconds"] = time.perf_counter() - t0
        self.results["base"] = base
        self.save()

    # ------------------------------------------------------------------ editing
    def tasks_at(self, n: int) -> bool:
        """Whether the general tasks run at checkpoint `n`."""
        return self.config.task_checkpoints is None or n in self.config.task_checkpoints

    def edit(self, pm: Any, requests: Sequence[Any], spec: str) -> Any:
        """The patch of `spec` for `requests`, edited on top of `pm`'s active patches."""
        return edit(
            pm,
            self.tokenizer,
            list(requests),
            method=self.config.method,
            show_progress=self.show,
            **edit_settings(spec),
            **self.edit_kwargs,
        )

    def edit_from_base(self, pm: Any, indices: Sequence[int], spec: str) -> tuple[Any, float]:
        """Single editing: the patch of `spec` for the requests at `indices`, edited from the unedited model.

        The whole update is computed once per group and kept, so every regularizer sparsifies the same ΔW. Returns
        the patch and the seconds it took, counting the update's own time for each regularizer.
        """
        key = tuple(indices)
        if key not in self.updates:
            t0 = time.perf_counter()
            update = compute_update(
                pm,
                self.tokenizer,
                [self.requests[i] for i in indices],
                method=self.config.method,
                show_progress=self.show,
                **self.edit_kwargs,
            )
            self.updates[key] = (update, time.perf_counter() - t0)
        update, seconds = self.updates[key]
        t0 = time.perf_counter()
        patch = regularize_update(pm, self.tokenizer, update, **edit_settings(spec))
        return patch, seconds + time.perf_counter() - t0

    def weight_names(self, patch: Any) -> dict[str, Any]:
        """Copies of the weights `patch` edits, by parameter name (taken before it is attached)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        names = {f"{m}.weight" for m in patch.target_modules}
        return {n: params[n].detach().clone() for n in sorted(names) if n in params}

    # ------------------------------------------------------------------ runs
    def run_sequential(self, spec: str) -> None:
        """Edits the requests one group after another on top of each other, measuring at every checkpoint."""
        c = self.config
        run_name = c.run_name(spec)
        run = self.results["runs"].setdefault(run_name, {"regularizer": spec, "checkpoints": {}})
        step = c.batch_size if c.unit == "batch" else 1
        todo = [n for n in c.checkpoints if str(n) not in run["checkpoints"]]
        fill = {}  # finished checkpoints that lack a measure asked for now
        for key, point in run["checkpoints"].items():
            missing = self.measures.missing(point, tasks=self.tasks_at(int(key)))
            if missing:
                fill[int(key)] = missing
        if not todo and not fill:
            return
        last = max(todo + list(fill))
        patch_dir = self.out / "patches" / run_name
        name, value = parse_regularizer(spec)
        stack_keep = value if name == "stack" else None
        pm = PatchedModel(self.model)
        base_weights: dict[str, Any] = {}
        # seconds each saved patch took to compute, by folder: a resumed run sums them over the patches it reloads;
        # a patch saved without its time (an older run) leaves the checkpoints after it without an editing time
        patch_seconds = run.setdefault("patch_seconds", {})
        edit_seconds: float | None = 0.0
        try:
            bar = progress_bar(total=last, desc=run_name, unit="request", show_progress=self.show)
            done = 0
            while done < last:
                group = self.requests[done : done + step]
                folder = patch_dir / f"{done + len(group):05d}"
                t0 = time.perf_counter()
                if (folder / "patch_config.json").exists():
                    patch = EditPatch.from_pretrained(folder)
                    if patch.config.requests != [r.to_dict() for r in group]:
                        raise ValueError(f"{folder} holds a patch for other requests; delete it to recompute")
                    seconds = patch_seconds.get(folder.name)
                else:
                    patch = self.edit(pm, group, spec)
                    patch.save_pretrained(folder)
                    seconds = patch_seconds[folder.name] = time.perf_counter() - t0
                    self.save()
                edit_seconds = None if edit_seconds is None or seconds is None else edit_seconds + seconds
                if not base_weights:
                    base_weights = self.weight_names(patch)
                pm.add_patch(patch, f"edit{done}")
                if stack_keep is not None:
                    pm.compact(keep_ratio=stack_keep)
                done += len(group)
                bar.update(len(group))
                if done in todo:
                    point = self.measures.point(
                        pm, self.requests[:done], base_weights, edit_seconds, tasks=self.tasks_at(done)
                    )
                    run["checkpoints"][str(done)] = point
                    self.save()
                    logger.info("%s @ %d: %s", run_name, done, point_summary(point))
                elif done in fill:
                    self.measures.complete(run["checkpoints"][str(done)], pm, fill[done])
                    self.save()
                    logger.info("%s @ %d: added %s", run_name, done, sorted(fill[done]))
            bar.close()
        finally:
            pm.unload()

    def run_single(self, spec: str) -> None:
        """Edits every group from the unedited model; a checkpoint averages the measures of its first edits."""
        c = self.config
        run_name = c.run_name(spec)
        run = self.results["runs"].setdefault(run_name, {"regularizer": spec, "checkpoints": {}})
        for n in c.checkpoints:
            done = run["checkpoints"].get(str(n))
            missing = self.measures.missing(done, tasks=self.tasks_at(n)) if done is not None else None
            if done is not None and not missing:
                continue
            pm = PatchedModel(self.model)
            try:
                groups = [list(range(n))] if c.unit == "batch" else [[i] for i in range(n)]
                if done is not None:  # only the first edit is measured in full; add what it lacks
                    patch, _ = self.edit_from_base(pm, groups[0], spec)
                    pm.add_patch(patch, "edit")
                    self.measures.complete(done, pm, missing)
                    pm.remove_patch("edit")
                    self.save()
                    continue
                points, edit_seconds = [], 0.0
                for i, indices in enumerate(groups):
                    group = [self.requests[j] for j in indices]
                    patch, seconds = self.edit_from_base(pm, indices, spec)
                    edit_seconds += seconds
                    weights = self.weight_names(patch) if i < c.single_task_edits else {}  # before the edit
                    pm.add_patch(patch, "edit")
                    if i < c.single_task_edits:
                        points.append(self.measures.point(pm, group, weights, edit_seconds, tasks=self.tasks_at(n)))
                    else:
                        points.append({"editing": self.measures.editing(pm, group)})
                    pm.remove_patch("edit")
                run["checkpoints"][str(n)] = average_points(points)
                self.save()
            finally:
                pm.unload()

    def run(self) -> dict[str, Any]:
        """Measures the base model, then runs every regularizer of the configuration; returns the results."""
        self.setup()
        self.measure_base()
        for spec in self.config.regularizers:
            if self.config.setting == "sequential":
                self.run_sequential(spec)
            else:
                self.run_single(spec)
        return self.results


def run_experiment(
    config: ExperimentConfig,
    output_dir: str | os.PathLike,
    *,
    model: Any = None,
    tokenizer: Any = None,
    show_progress: bool | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Runs (or resumes) an experiment and returns its results (also in `<output_dir>/results.json`).

    `model` and `tokenizer` default to loading `config.model` (the default model when None); pass them to run on
    a model already in memory (`config.model` is then only recorded).
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    out = Path(output_dir)
    runner = ExperimentRunner(config, out, show_progress, model, tokenizer)
    results = runner.run()
    if plots:
        plot_results(results, out)
    return results
