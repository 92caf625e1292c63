"""The paper's experiments: edit a model step by step and measure what each step costs.

Settings (Gu et al. 2024): *single* editing starts every edit from the unedited model, *sequential* editing stacks
each edit on the previous ones; an edit holds one request (*instance*) or `batch_size` requests (*batch*). Each
run is one editor × regularizer × setting over the first `max(checkpoints)` requests; at every checkpoint (number
of edited requests) it records:

- editing metrics on the requests edited so far (`score_edits`: reliability, generalization, locality),
- next-token drift against the base model on neutral text (`drift`: KL, perplexity),
- the paper's weight statistics (`weight_change_stats`) and a pooled |ΔW| map of the first edited matrix,
- the eight general-ability tasks (`run_general_tasks`), when `tasks` is not empty,
- label probes on SST-2, RTE and BoolQ (`probes.label_probes`: answer-format adherence and label-likelihood AUC),
  when `probe_tasks` is not empty.

Results go to `<output_dir>/results.json`, rewritten atomically after every checkpoint. Sequential runs save each
edit as a patch under `<output_dir>/patches/<run>/`; a rerun with the same configuration skips finished
checkpoints and re-attaches the saved patches (stacking is exact) instead of recomputing them. The measurement
settings (`MEASUREMENT_FIELDS`: tasks, probes, regularizers and checkpoints) may change between reruns: a finished
checkpoint that lacks a measure now asked for gets it added (sequential runs re-attach their saved patches to do
so; single runs edit again). Single runs compute each group's whole update once and apply every regularizer to
it (`editing.compute_update` / `regularize_update`), so regularizers are compared on the same ΔW. Plots are
written as PNG by `plot_results`.

Usage:
    ```bash
    python scripts/run_experiment.py --data ../shared/data/editing/zsre_eval.json --method rome \\
        --regularizers none rect:0.4 random:0.4 pca:0.4 --checkpoints 10 20 30 --output-dir out/exp
    hf-edit-patch experiment --help        # the same, from the command line tool
    ```
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ExperimentConfig", "load_zsre", "main", "plot_results", "run_experiment", "summary_table", "tasks_table"]

SETTINGS = ("sequential", "single")
UNITS = ("instance", "batch")
REGULARIZERS = ("none", "rect", "random", "pca", "norm", "auto", "stack")
RESULTS_FILE = "results.json"
HEATMAP_SIZE = 64
TASKS = ("reasoning", "nli", "open_qa", "closed_qa", "dialogue", "summarization", "ner", "sentiment")
PROBE_TASKS = ("sentiment", "nli", "closed_qa")
# config fields that only say what is measured: they may differ on a rerun (missing measures are then added)
MEASUREMENT_FIELDS = (
    "regularizers",
    "checkpoints",
    "tasks",
    "task_limit",
    "task_batch_size",
    "task_data_dir",
    "task_checkpoints",
    "probe_tasks",
    "probe_limit",
    "probe_max_length",
)


def _parse_regularizer(spec: str) -> tuple[str, float | None]:
    """Regularizer specs of a run.

    "none" (the whole update), "rect:K" / "random:K" / "pca:K" (keep ratio K), "norm:F" (RECT keeping the fewest
    entries that carry F of each update's squared norm), "auto" (RECT with `keep_ratio="auto"`), and "stack:K"
    (sequential editing: whole updates, the stack re-sparsified with RECT at K after every edit).
    Returns (name, number or None).
    """
    if not isinstance(spec, str):
        raise ValueError(f"a regularizer is a string like 'rect:0.4' or 'none', got {spec!r}")
    name, _, ratio = spec.partition(":")
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r} in {spec!r}; accepted: {REGULARIZERS} (e.g. 'rect:0.4')")
    if name in ("none", "auto"):
        if ratio:
            raise ValueError(f"{name!r} takes no keep ratio, got {spec!r}")
        return name, None
    try:
        keep = float(ratio)
    except ValueError:
        raise ValueError(f"regularizer {spec!r} needs a keep ratio in (0, 1], e.g. '{name}:0.4'") from None
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratio of {spec!r} must be in (0, 1]")
    return name, keep


def _edit_settings(spec: str) -> dict[str, Any]:
    """The `hf_edit_patch.edit` arguments of a regularizer spec."""
    name, value = _parse_regularizer(spec)
    if name in ("none", "stack"):
        return {"keep_ratio": None}
    if name == "norm":
        return {"regularizer": "rect", "norm_budget": value}
    if name == "auto":
        return {"regularizer": "rect", "keep_ratio": "auto"}
    return {"regularizer": name, "keep_ratio": value}


@dataclass
class ExperimentConfig:
    """What to run. Every field is recorded in the results; a resumed run must match it."""

    data: str
    method: str = "rome"
    regularizers: list[str] = field(default_factory=lambda: ["none", "rect:0.4"])
    setting: str = "sequential"
    unit: str = "instance"
    batch_size: int = 10
    checkpoints: list[int] = field(default_factory=lambda: [1, 10, 50, 100])
    seed: int = 0
    model: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    task_limit: int | None = 50
    task_batch_size: int = 16
    task_data_dir: str | None = None
    drift_texts: str | None = None
    drift_text_field: str = "passage"
    drift_n: int = 32
    drift_max_length: int = 64
    task_checkpoints: list[int] | None = None
    stats_dataset: str | None = None
    stats_text_field: str = "text"
    single_task_edits: int = 1
    probe_tasks: list[str] = field(default_factory=list)
    probe_limit: int = 32
    probe_max_length: int = 160

    def __post_init__(self) -> None:
        from ..editing.update import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; accepted: {METHODS}")
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; accepted: {SETTINGS}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}; accepted: {UNITS}")
        for spec in self.regularizers:
            if _parse_regularizer(spec)[0] == "stack" and self.setting != "sequential":
                raise ValueError(f"{spec!r} re-sparsifies a stack of edits: it needs setting='sequential'")
        if len(set(self.regularizers)) != len(self.regularizers):
            raise ValueError(f"regularizers repeat: {self.regularizers}")
        if not self.checkpoints or any(not isinstance(c, int) or c < 1 for c in self.checkpoints):
            raise ValueError(f"checkpoints must be positive integers, got {self.checkpoints}")
        self.checkpoints = sorted(set(self.checkpoints))
        if self.unit == "batch":
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
            if self.setting == "sequential" and any(c % self.batch_size for c in self.checkpoints):
                raise ValueError(
                    f"sequential batch editing edits {self.batch_size} requests at a time: every checkpoint must be "
                    f"a multiple of batch_size, got {self.checkpoints}"
                )
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; accepted: {TASKS}")
        unknown = [t for t in self.probe_tasks if t not in PROBE_TASKS]
        if unknown:
            raise ValueError(f"unknown probe tasks {unknown}; accepted: {PROBE_TASKS}")
        if self.probe_limit < 1 or self.probe_max_length < 2:
            raise ValueError(
                f"probe_limit must be >= 1 and probe_max_length >= 2, got {self.probe_limit}, {self.probe_max_length}"
            )
        if self.task_limit is not None and self.task_limit < 1:
            raise ValueError(f"task_limit must be >= 1 or None, got {self.task_limit}")
        if self.drift_n < 1 or self.single_task_edits < 1 or self.drift_max_length < 2:
            raise ValueError("drift_n and single_task_edits must be >= 1, drift_max_length >= 2")
        if self.task_checkpoints is not None:
            extra = sorted(set(self.task_checkpoints) - set(self.checkpoints))
            if extra:
                raise ValueError(f"task_checkpoints {extra} are not checkpoints {self.checkpoints}")
            self.task_checkpoints = sorted(set(self.task_checkpoints))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_names(self) -> list[str]:
        return [self.run_name(spec) for spec in self.regularizers]

    def run_name(self, spec: str) -> str:
        return f"{self.method}-{self.setting}-{self.unit}-{spec.replace(':', '')}-seed{self.seed}"


def load_zsre(path: str | os.PathLike, n: int, seed: int = 0) -> list[Any]:
    """The first `n` usable ZsRE records as `EditRequest`s: distinct subjects, no record that cannot be a request.

    `seed` 0 keeps the file order; another seed shuffles the records first (a different record order).
    """
    import random

    from ..requests import EditRequest, EditRequestError

    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of ZsRE records")
    if seed:
        random.Random(seed).shuffle(records)
    out, subjects = [], set()
    for record in records:
        try:
            req = EditRequest.from_zsre(record)
        except EditRequestError:
            continue
        if req.subject.lower() in subjects:
            continue
        subjects.add(req.subject.lower())
        out.append(req)
        if len(out) == n:
            return out
    raise ValueError(f"{path} has only {len(out)} usable records with distinct subjects; {n} were asked for")


def _neutral_texts(config: ExperimentConfig) -> list[str]:
    """Texts for drift: the last `drift_n` records of a local file (the statistics read its first ones)."""
    path = config.drift_texts
    if path is None:
        raise ValueError("drift needs neutral texts: pass drift_texts (a .txt, .json or .jsonl file)")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        elif path.endswith(".json"):
            rows = json.load(f)
        else:
            rows = [line.strip() for line in f if line.strip()]
    texts = [r if isinstance(r, str) else r[config.drift_text_field] for r in rows]
    if len(texts) < config.drift_n:
        raise ValueError(f"{path} has {len(texts)} texts; drift_n={config.drift_n}")
    return texts[-config.drift_n :]


def _atomic_json(path: Path, data: Any) -> None:
    from ..hub.files import atomic_write

    atomic_write(str(path), json.dumps(data, indent=1, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _pooled_abs(delta: Any, size: int = HEATMAP_SIZE) -> list[list[float]]:
    """Mean |ΔW| over a `size`×`size` grid of blocks (a picture of where the update lands)."""
    import torch.nn.functional as F

    d = delta.detach().float().abs()[None, None]
    return F.adaptive_avg_pool2d(d, (min(size, d.shape[2]), min(size, d.shape[3])))[0, 0].tolist()


class _Runner:
    def __init__(
        self, config: ExperimentConfig, output_dir: Path, show_progress: bool | None, model: Any, tokenizer: Any
    ) -> None:
        self.config = config
        self.model, self.tokenizer = model, tokenizer
        self.out = output_dir
        self.show = show_progress
        self.results_path = output_dir / RESULTS_FILE
        self.results = self._load_or_start()

    # ------------------------------------------------------------------ results file
    def _load_or_start(self) -> dict[str, Any]:
        config = self.config.to_dict()
        if self.results_path.exists():
            with open(self.results_path, encoding="utf-8") as f:
                results = json.load(f)
            old = dict(results.get("config", {}))
            new = dict(config)
            for key in MEASUREMENT_FIELDS:  # what is measured may change between runs
                old.pop(key, None)
                new.pop(key, None)
            if old != new:
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise ValueError(
                    f"{self.results_path} holds results of a different configuration (differs in {changed}); "
                    "use another --output-dir, or delete the file to start over"
                )
            results["config"] = config
            return results
        return {"config": config, "base": None, "runs": {}}

    def _save(self) -> None:
        """Writes the results, merged into what is on disk: runners of other regularizers may share the folder.

        Under an exclusive lock on `results.json.lock`, the file is read again and what only it holds (another
        process's runs or measures) is added to this runner's results; where both hold a value, this runner's wins.
        """
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.results_path.with_name(RESULTS_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.results_path.exists():
                    with open(self.results_path, encoding="utf-8") as f:
                        on_disk = json.load(f)
                    _add_missing(self.results, on_disk)
                _atomic_json(self.results_path, self.results)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ model and data
    def setup(self) -> None:
        from ..editors.stats import StatsCache
        from ..hub.default_model import load_default_model

        c = self.config
        self.requests = load_zsre(c.data, max(c.checkpoints), seed=c.seed)
        if self.model is None:
            self.model, self.tokenizer = load_default_model(c.model)
        self.model.eval()
        self.neutral = _neutral_texts(c)
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

    def _tasks(self, model: Any, only: Sequence[str] | None = None) -> dict[str, float]:
        tasks = [t for t in self.config.tasks if only is None or t in only]
        if not tasks:
            return {}
        from .tasks import run_general_tasks

        return run_general_tasks(
            model,
            self.tokenizer,
            tasks=tuple(tasks),
            limit=self.config.task_limit,
            data_dir=self.config.task_data_dir,
            batch_size=self.config.task_batch_size,
            show_progress=self.show,
        )

    def _probes(self, model: Any, only: Sequence[str] | None = None) -> dict[str, Any]:
        tasks = [t for t in self.config.probe_tasks if only is None or t in only]
        if not tasks:
            return {}
        from .probes import label_probes

        return label_probes(
            model,
            self.tokenizer,
            tasks,
            limit=self.config.probe_limit,
            data_dir=self.config.task_data_dir,
            batch_size=self.config.task_batch_size,
            max_length=self.config.probe_max_length,
        )

    def _missing(self, point: dict[str, Any], tasks: bool = True) -> dict[str, list[str]]:
        """The measures a finished point lacks: {"tasks": [...], "probes": [...]} (only non-empty entries)."""
        have_tasks, have_probes = point.get("tasks") or {}, point.get("probes") or {}
        missing = {
            "tasks": [t for t in self.config.tasks if t not in have_tasks] if tasks else [],
            "probes": [t for t in self.config.probe_tasks if t not in have_probes],
        }
        return {k: v for k, v in missing.items() if v}

    def _complete(self, point: dict[str, Any], model: Any, missing: dict[str, list[str]]) -> None:
        """Adds the missing measures to a finished point."""
        t0 = time.perf_counter()
        if missing.get("tasks"):
            point["tasks"] = {**(point.get("tasks") or {}), **self._tasks(model, missing["tasks"])}
        if missing.get("probes"):
            point["probes"] = {**(point.get("probes") or {}), **self._probes(model, missing["probes"])}
        point["measure_seconds"] = point.get("measure_seconds", 0.0) + time.perf_counter() - t0

    def _drift(self, pm: Any) -> dict[str, Any]:
        from .divergence import drift

        return drift(None, pm, self.tokenizer, self.neutral, max_length=self.config.drift_max_length)

    def measure_base(self) -> None:
        from ..patched_model import PatchedModel
        from .editing import locality_reference, score_edits

        self.reference = locality_reference(self.model, self.tokenizer, self.requests)
        base = self.results.get("base")
        if base is not None:
            missing = self._missing(base)
            if missing:
                self._complete(base, self.model, missing)
                self._save()
            return
        t0 = time.perf_counter()
        pm = PatchedModel(self.model)
        base = {
            "drift": self._drift(pm),
            "tasks": self._tasks(self.model),
            "probes": self._probes(self.model),
        }
        pm.unload()
        base["editing"] = score_edits(self.model, self.tokenizer, self.requests, reference=self.reference)
        base["seconds"] = time.perf_counter() - t0
        self.results["base"] = base
        self._save()

    # ------------------------------------------------------------------ measurements
    def _measure(
        self, pm: Any, edited: Sequence[Any], base_weights: dict[str, Any], seconds: float, tasks: bool = True
    ) -> dict:
        from .editing import score_edits
        from .weights import weight_change_stats

        t0 = time.perf_counter()
        point: dict[str, Any] = {
            "editing": score_edits(pm, self.tokenizer, list(edited), reference=self.reference),
            "drift": self._drift(pm),
        }
        stats = weight_change_stats(base_weights, pm) if base_weights else None
        if stats is not None:
            stats["frac_rel_change_gt"] = {str(k): v for k, v in stats["frac_rel_change_gt"].items()}
            point["weights"] = stats
            first = sorted(base_weights)[0]
            current = dict(pm.base_model.named_parameters())[first]
            point["heatmap"] = {"module": first, "abs_delta": _pooled_abs(current.detach() - base_weights[first])}
            point["nnz"] = sum(p.nnz for p in pm.patches.values())
        point["tasks"] = self._tasks(pm) if tasks else {}
        point["probes"] = self._probes(pm)
        point["edit_seconds"] = seconds
        point["measure_seconds"] = time.perf_counter() - t0
        return point

    def _tasks_at(self, n: int) -> bool:
        return self.config.task_checkpoints is None or n in self.config.task_checkpoints

    def _edit(self, pm: Any, requests: Sequence[Any], spec: str) -> Any:
        from ..editing.update import edit

        return edit(
            pm,
            self.tokenizer,
            list(requests),
            method=self.config.method,
            show_progress=False,
            **_edit_settings(spec),
            **self.edit_kwargs,
        )

    def _edit_from_base(self, pm: Any, indices: Sequence[int], spec: str) -> tuple[Any, float]:
        """Single editing: the patch of `spec` for the requests at `indices`, edited from the unedited model.

        The whole update is computed once per group and kept, so every regularizer sparsifies the same ΔW. Returns
        the patch and the seconds it took, counting the update's own time for each regularizer.
        """
        from ..editing.update import compute_update, regularize_update

        key = tuple(indices)
        if key not in self.updates:
            t0 = time.perf_counter()
            update = compute_update(
                pm,
                self.tokenizer,
                [self.requests[i] for i in indices],
                method=self.config.method,
                show_progress=False,
                **self.edit_kwargs,
            )
            self.updates[key] = (update, time.perf_counter() - t0)
        update, seconds = self.updates[key]
        t0 = time.perf_counter()
        patch = regularize_update(pm, self.tokenizer, update, **_edit_settings(spec))
        return patch, seconds + time.perf_counter() - t0

    def _weight_names(self, patch: Any) -> dict[str, Any]:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        names = {f"{m}.weight" for m in patch.target_modules}
        return {n: params[n].detach().clone() for n in sorted(names) if n in params}

    # ------------------------------------------------------------------ runs
    def run_sequential(self, spec: str) -> None:
        from ..patch.edit_patch import EditPatch
        from ..patched_model import PatchedModel

        c = self.config
        run_name = c.run_name(spec)
        run = self.results["runs"].setdefault(run_name, {"regularizer": spec, "checkpoints": {}})
        step = c.batch_size if c.unit == "batch" else 1
        todo = [n for n in c.checkpoints if str(n) not in run["checkpoints"]]
        fill = {}  # finished checkpoints that lack a measure asked for now
        for key, point in run["checkpoints"].items():
            missing = self._missing(point, tasks=self._tasks_at(int(key)))
            if missing:
                fill[int(key)] = missing
        if not todo and not fill:
            return
        last = max(todo + list(fill))
        patch_dir = self.out / "patches" / run_name
        name, value = _parse_regularizer(spec)
        stack_keep = value if name == "stack" else None
        pm = PatchedModel(self.model)
        base_weights: dict[str, Any] = {}
        edit_seconds = 0.0
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=last, desc=run_name, unit="request", disable=(self.show is False) or None)
            done = 0
            while done < last:
                group = self.requests[done : done + step]
                folder = patch_dir / f"{done + len(group):05d}"
                t0 = time.perf_counter()
                if (folder / "patch_config.json").exists():
                    patch = EditPatch.from_pretrained(folder)
                    if patch.config.requests != [r.to_dict() for r in group]:
                        raise ValueError(f"{folder} holds a patch for other requests; delete it to recompute")
                else:
                    patch = self._edit(pm, group, spec)
                    patch.save_pretrained(folder)
                    edit_seconds += time.perf_counter() - t0
                if not base_weights:
                    base_weights = self._weight_names(patch)
                pm.add_patch(patch, f"edit{done}")
                if stack_keep is not None:
                    pm.compact(keep_ratio=stack_keep)
                done += len(group)
                bar.update(len(group))
                if done in todo:
                    point = self._measure(
                        pm, self.requests[:done], base_weights, edit_seconds, tasks=self._tasks_at(done)
                    )
                    run["checkpoints"][str(done)] = point
                    self._save()
                    logger.info("%s @ %d: %s", run_name, done, _summary(point))
                elif done in fill:
                    self._complete(run["checkpoints"][str(done)], pm, fill[done])
                    self._save()
                    logger.info("%s @ %d: added %s", run_name, done, sorted(fill[done]))
            bar.close()
        finally:
            pm.unload()

    def run_single(self, spec: str) -> None:
        from ..patched_model import PatchedModel

        c = self.config
        run_name = c.run_name(spec)
        run = self.results["runs"].setdefault(run_name, {"regularizer": spec, "checkpoints": {}})
        for n in c.checkpoints:
            done = run["checkpoints"].get(str(n))
            missing = self._missing(done, tasks=self._tasks_at(n)) if done is not None else None
            if done is not None and not missing:
                continue
            pm = PatchedModel(self.model)
            try:
                groups = [list(range(n))] if c.unit == "batch" else [[i] for i in range(n)]
                if done is not None:  # only the first edit is measured in full; add what it lacks
                    patch, _ = self._edit_from_base(pm, groups[0], spec)
                    pm.add_patch(patch, "edit")
                    self._complete(done, pm, missing)
                    pm.remove_patch("edit")
                    self._save()
                    continue
                points, edit_seconds = [], 0.0
                for i, indices in enumerate(groups):
                    group = [self.requests[j] for j in indices]
                    patch, seconds = self._edit_from_base(pm, indices, spec)
                    edit_seconds += seconds
                    weights = self._weight_names(patch) if i < c.single_task_edits else {}  # before the edit
                    pm.add_patch(patch, "edit")
                    if i < c.single_task_edits:
                        points.append(self._measure(pm, group, weights, edit_seconds, tasks=self._tasks_at(n)))
                    else:
                        from .editing import score_edits

                        points.append({"editing": score_edits(pm, self.tokenizer, group, reference=self.reference)})
                    pm.remove_patch("edit")
                run["checkpoints"][str(n)] = _average_points(points)
                self._save()
            finally:
                pm.unload()

    def run(self) -> dict[str, Any]:
        self.setup()
        self.measure_base()
        for spec in self.config.regularizers:
            if self.config.setting == "sequential":
                self.run_sequential(spec)
            else:
                self.run_single(spec)
        return self.results


def _add_missing(mine: dict[str, Any], other: dict[str, Any]) -> None:
    """Adds to `mine`, in place and recursively, what only `other` holds; where both hold a value, `mine` wins."""
    for key, value in other.items():
        if key not in mine:
            mine[key] = value
        elif isinstance(mine[key], dict) and isinstance(value, dict):
            _add_missing(mine[key], value)


def _average_points(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of numeric leaves over the points that have them (single editing averages its edits)."""

    def merge(values: list[Any]) -> Any:
        if all(isinstance(v, dict) for v in values):
            keys = {k for v in values for k in v}
            return {k: merge([v[k] for v in values if k in v]) for k in keys}
        nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums and len(nums) == len(values):
            return sum(nums) / len(nums)
        return values[0]

    out = merge(points)
    out["n_edits_averaged"] = len(points)
    return out


def _summary(point: dict[str, Any]) -> str:
    e, d = point["editing"], point["drift"]
    parts = [f"{k} {v:.3f}" for k, v in e.items() if v is not None]
    parts.append(f"KL {d['kl']:.4f}, ppl {d['ppl_edited']:.2f}")
    return ", ".join(parts)


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
    runner = _Runner(config, out, show_progress, model, tokenizer)
    results = runner.run()
    if plots:
        plot_results(results, out)
    return results


# ---------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


PROBE_NAMES = {"sentiment": "SST-2", "nli": "RTE", "closed_qa": "BoolQ"}


def _points(results: dict[str, Any]) -> list[dict[str, Any]]:
    base = [results["base"]] if results.get("base") else []
    return base + [p for run in results["runs"].values() for p in run["checkpoints"].values()]


def summary_table(results: dict[str, Any]) -> str:
    """A Markdown table of every run's checkpoints (and the base model): editing metrics, drift, weight change."""
    probe_tasks = [t for t in PROBE_TASKS if any(t in (p.get("probes") or {}) for p in _points(results))]
    probes_head = "".join(f" {PROBE_NAMES[t]} format / AUC |" for t in probe_tasks)
    head = (
        "| run | edits | reliability | generalization | locality | KL | perplexity |"
        + probes_head
        + " stored entries | δ > 0.077 | δ > 0.171 | Manhattan |\n|---|---|---|---|---|---|---|"
        + "---|" * (len(probe_tasks) + 4)
    )

    def probes(point: dict[str, Any]) -> str:
        found = point.get("probes") or {}
        cells = [
            f" {_fmt(found[t]['adherence'], '.2f')} / {_fmt(found[t]['auc'], '.2f')} |" if t in found else " – |"
            for t in probe_tasks
        ]
        return "".join(cells)

    rows = [head]
    base = results.get("base")
    if base is not None:
        e, d = base["editing"], base["drift"]
        rows.append(
            f"| base | 0 | {_fmt(e['reliability'])} | {_fmt(e['generalization'])} | {_fmt(e['locality'])} | 0 "
            f"| {_fmt(d['ppl_base'], '.2f')} |{probes(base)} 0 | 0 | 0 | 0 |"
        )
    for run in results["runs"].values():
        for n, p in sorted(run["checkpoints"].items(), key=lambda kv: int(kv[0])):
            e, d, w = p["editing"], p["drift"], p.get("weights") or {}
            frac = w.get("frac_rel_change_gt", {})
            rows.append(
                f"| {run['regularizer']} | {n} | {_fmt(e['reliability'])} | {_fmt(e['generalization'])} "
                f"| {_fmt(e['locality'])} | {_fmt(d['kl'], '.4f')} | {_fmt(d['ppl_edited'], '.2f')} |{probes(p)}"
                f" {_fmt(p.get('nnz'), ',')} | {_fmt(frac.get('0.077'), '.1%')} | {_fmt(frac.get('0.171'), '.1%')} "
                f"| {_fmt(w.get('manhattan'), '.1f')} |"
            )
    return "\n".join(rows)


def tasks_table(results: dict[str, Any]) -> str:
    """A Markdown table of the general-task scores of the base model and of every checkpoint that ran them."""
    lines = []
    base = results.get("base") or {}
    points = [("base", 0, base.get("tasks") or {})]
    for run in results["runs"].values():
        for n, p in sorted(run["checkpoints"].items(), key=lambda kv: int(kv[0])):
            if p.get("tasks"):
                points.append((run["regularizer"], int(n), p["tasks"]))
    tasks = sorted({t for _, _, s in points for t in s})
    if not tasks:
        return ""
    lines.append("| run | edits | " + " | ".join(tasks) + " | mean |")
    lines.append("|---|---|" + "---|" * (len(tasks) + 1))
    for label, n, scores in points:
        if not scores:
            continue
        mean = sum(scores[t] for t in tasks) / len(tasks)
        lines.append(f"| {label} | {n} | " + " | ".join(_fmt(scores.get(t)) for t in tasks) + f" | {_fmt(mean)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots


def _series(results: dict[str, Any], getter: Any) -> dict[str, tuple[list[int], list[float]]]:
    """{regularizer: (edits, values)} including the base model at 0 edits where the getter applies to it."""
    out = {}
    base = results.get("base")
    for run in results["runs"].values():
        xs, ys = [], []
        if base is not None:
            try:
                xs.append(0)
                ys.append(getter(base))
            except (KeyError, TypeError):
                xs.pop()
        for n, point in sorted(run["checkpoints"].items(), key=lambda kv: int(kv[0])):
            try:
                y = getter(point)
            except (KeyError, TypeError):
                continue
            if y is not None:
                xs.append(int(n))
                ys.append(y)
        out[run["regularizer"]] = (xs, ys)
    return out


def plot_results(results: dict[str, Any], output_dir: str | os.PathLike) -> list[str]:
    """Writes `scores.png` (editing metrics, drift, label probes and task scores vs number of edits, one line per
    regularizer) and `heatmap.png` (pooled |ΔW| of the first edited matrix at the last checkpoint); returns their
    paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('plots need matplotlib: pip install "hf_edit_patch[eval]"') from exc

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels: list[tuple[str, Any]] = [
        ("reliability", lambda p: p["editing"]["reliability"]),
        ("generalization", lambda p: p["editing"]["generalization"]),
        ("locality", lambda p: p["editing"]["locality"]),
        ("KL(base‖edited), nats", lambda p: p["drift"]["kl"]),
        ("perplexity", lambda p: p["drift"]["ppl_edited"]),
        ("entries with |ΔW/W| > 0.077", lambda p: p["weights"]["frac_rel_change_gt"]["0.077"]),
    ]
    probed = {t for p in _points(results) for t in (p.get("probes") or {})}
    for t in (t for t in PROBE_TASKS if t in probed):
        panels += [
            (f"{PROBE_NAMES[t]} answer format", lambda p, t=t: p["probes"][t]["adherence"]),
            (f"{PROBE_NAMES[t]} label AUC", lambda p, t=t: p["probes"][t]["auc"]),
        ]
    tasks = sorted({t for run in results["runs"].values() for p in run["checkpoints"].values() for t in p["tasks"]})
    panels += [(f"task: {t}", lambda p, t=t: p["tasks"][t]) for t in tasks]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.1 * rows), squeeze=False)
    for ax, (title, getter) in zip(axes.flat, panels, strict=False):
        for label, (xs, ys) in _series(results, getter).items():
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    config = results.get("config", {})
    fig.suptitle(
        f"{config.get('method', '')} {config.get('setting', '')} × {config.get('unit', '')} on "
        f"{config.get('model') or 'SmolLM2-135M-Instruct'}",
        fontsize=12,
    )
    fig.tight_layout()
    paths = [str(out / "scores.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    # one checkpoint for every map, the largest all runs reached, so that the maps compare like with like
    with_maps = [
        (run["regularizer"], {n: p["heatmap"] for n, p in run["checkpoints"].items() if "heatmap" in p})
        for run in results["runs"].values()
    ]
    with_maps = [(label, m) for label, m in with_maps if m]
    common = set.intersection(*(set(m) for _, m in with_maps)) if with_maps else set()
    maps = []
    for label, m in with_maps:
        n = max(common, key=int) if common else max(m, key=int)
        maps.append((label, n, m[n]))
    if maps:
        import numpy as np

        vmax = max(float(np.max(m["abs_delta"])) for _, _, m in maps) or 1.0
        fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 3.6), squeeze=False)
        for ax, (label, n, m) in zip(axes.flat, maps, strict=True):
            im = ax.imshow(np.asarray(m["abs_delta"]), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
            ax.set_title(f"{label}, {n} edits", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="mean |ΔW| per block")
        fig.suptitle(f"|ΔW| of {maps[0][2]['module']}", fontsize=11)
        paths.append(str(out / "heatmap.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------- command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description="Edit a model step by step and measure what it costs.")
    p.add_argument("--data", required=True, help="ZsRE records (a JSON list, e.g. zsre_eval.json)")
    p.add_argument("--output-dir", required=True, help="results.json, patches and plots go here (resumable)")
    p.add_argument(
        "--method",
        default="rome",
        choices=("rome", "memit", "ft", "alphaedit", "kn", "mend"),
        help="editor (mend needs --hparams '{\"editor\": PATH}', a trained MEND editor)",
    )
    p.add_argument(
        "--regularizers",
        nargs="+",
        default=["none", "rect:0.4"],
        help="none, rect:K, random:K, pca:K (K the keep ratio), norm:F (RECT norm budget), auto (RECT with "
        "keep_ratio='auto'), stack:K (sequential: the stack re-sparsified to K) (default: none rect:0.4)",
    )
    p.add_argument("--setting", default="sequential", choices=SETTINGS)
    p.add_argument("--unit", default="instance", choices=UNITS, help="one request per edit, or --batch-size")
    p.add_argument("--batch-size", type=int, default=10, help="requests per edit with --unit batch (default: 10)")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[1, 10, 50, 100], help="edits to measure at")
    p.add_argument("--seed", type=int, default=0, help="record order: 0 keeps the file's order")
    p.add_argument("--model", default=None, help="model id or folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--hparams", default=None, help="editor hyperparameters as JSON (e.g. '{\"layer\": 5}')")
    p.add_argument("--tasks", nargs="*", default=list(TASKS), help=f"general tasks (default: all of {TASKS})")
    p.add_argument("--task-limit", type=int, default=50, help="examples per task (default: 50; 0 for all)")
    p.add_argument("--task-batch-size", type=int, default=16)
    p.add_argument(
        "--task-checkpoints", type=int, nargs="*", default=None, help="checkpoints that run the tasks (default: all)"
    )
    p.add_argument("--task-data-dir", default=None, help="folder with the task files (else `datasets` by name)")
    p.add_argument("--drift-texts", required=True, help="neutral texts for drift (.txt, .json or .jsonl)")
    p.add_argument("--drift-text-field", default="passage", help="field of a JSON record holding the text")
    p.add_argument("--drift-n", type=int, default=32, help="texts for drift (the file's last ones; default 32)")
    p.add_argument("--drift-max-length", type=int, default=64, help="tokens per drift text (default 64)")
    p.add_argument("--stats-dataset", default=None, help="corpus for the key statistics (else model-sampled text)")
    p.add_argument("--stats-text-field", default="text")
    p.add_argument("--single-task-edits", type=int, default=1, help="single editing: edits measured in full")
    p.add_argument(
        "--probes",
        nargs="*",
        default=[],
        choices=PROBE_TASKS,
        help="label probes (answer-format adherence, label-likelihood AUC) on these tasks; data from --task-data-dir",
    )
    p.add_argument("--probe-limit", type=int, default=32, help="examples per probe task (default 32)")
    p.add_argument("--probe-max-length", type=int, default=160, help="tokens per probe prompt (default 160)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    try:
        hparams = json.loads(args.hparams) if args.hparams else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--hparams is not valid JSON: {exc}") from exc
    if not isinstance(hparams, dict):
        raise ValueError(f"--hparams must be a JSON object, got {args.hparams!r}")
    return ExperimentConfig(
        data=args.data,
        method=args.method,
        regularizers=list(args.regularizers),
        setting=args.setting,
        unit=args.unit,
        batch_size=args.batch_size,
        checkpoints=list(args.checkpoints),
        seed=args.seed,
        model=args.model,
        hparams=hparams,
        tasks=list(args.tasks),
        task_limit=args.task_limit or None,
        task_batch_size=args.task_batch_size,
        task_data_dir=args.task_data_dir,
        drift_texts=args.drift_texts,
        drift_text_field=args.drift_text_field,
        drift_n=args.drift_n,
        drift_max_length=args.drift_max_length,
        task_checkpoints=args.task_checkpoints,
        stats_dataset=args.stats_dataset,
        stats_text_field=args.stats_text_field,
        single_task_edits=args.single_task_edits,
        probe_tasks=list(args.probes),
        probe_limit=args.probe_limit,
        probe_max_length=args.probe_max_length,
    )


def main(argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
        for path, what in ((config.data, "--data"), (config.drift_texts, "--drift-texts")):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{what}: no such file {path!r}")
        results = run_experiment(config, args.output_dir, plots=not args.no_plots)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(summary_table(results) + "\n\n")
    table = tasks_table(results)
    if table:
        sys.stdout.write(table + "\n\n")
    sys.stdout.write(f"Results in {Path(args.output_dir) / RESULTS_FILE}\n")
    return 0
