"""What an experiment runs: `ExperimentConfig` (editor, regularizers, setting, checkpoints, what is measured), the
regularizer specs ("rect:0.4", "norm:0.9", "stack:0.05", ...), the ZsRE requests and the neutral texts for drift.

Plain Python: the command line builds its parser from these names without loading torch.

Example:
    ```python
    config = ExperimentConfig(data="zsre_eval.json", regularizers=["none", "rect:0.4"], checkpoints=[10, 50],
                              drift_texts="neutral.jsonl")
    config.run_names()  # ['rome-sequential-instance-none-seed0', 'rome-sequential-instance-rect0.4-seed0']
    ```
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

from ...requests import EditRequest, EditRequestError
from ..tasks.prompts import PROBE_TASKS, TASKS

__all__ = [
    "ADDED_FIELDS",
    "COUNTERFACTUALS",
    "MEASUREMENT_FIELDS",
    "REGULARIZERS",
    "SETTINGS",
    "STACK_REGULARIZERS",
    "UNITS",
    "ExperimentConfig",
    "edit_settings",
    "load_zsre",
    "neutral_texts",
    "parse_regularizer",
]

SETTINGS = ("sequential", "single")
UNITS = ("instance", "batch")
REGULARIZERS = ("none", "rect", "random", "pca", "norm", "auto", "stack", "prune", "anchor")
# stack-level regularizers applied to every edit (`edit(..., stack_regularizer=...)`): spec name -> (registered name,
# setting the spec's number sets)
STACK_REGULARIZERS = {"prune": ("prune", "threshold"), "anchor": ("norm_anchor", "alpha")}
COUNTERFACTUALS = ("none", "fill", "only")
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
    "first_edits",
)
# config fields added after results files were first written, with the value an older file's lack of them means
ADDED_FIELDS = {"counterfactuals": "none"}


def parse_regularizer(spec: str) -> tuple[str, float | None]:
    """Regularizer specs of a run.

    "none" (the whole update), "rect:K" / "random:K" / "pca:K" (keep ratio K), "norm:F" (RECT keeping the fewest
    entries that carry F of each update's squared norm), "auto" (RECT with `keep_ratio="auto"`), "stack:K"
    (sequential editing: whole updates, the stack re-sparsified with RECT at K after every edit), and the stack-level
    regularizers applied to every edit, whole updates computed so that the stack with them satisfies a bound:
    "prune:T" (singular values of the accumulated update above T · σ_max(W) compressed) and "anchor:A"
    (‖ΔW_acc‖_F ≤ A · ‖W‖_F); "prune" and "anchor" alone use their defaults.
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
    if name in STACK_REGULARIZERS:
        if not ratio:
            return name, None
        try:
            value = float(ratio)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"the number of {spec!r} must be positive, e.g. '{name}:0.5'")
        return name, value
    try:
        keep = float(ratio)
    except ValueError:
        raise ValueError(f"regularizer {spec!r} needs a keep ratio in (0, 1], e.g. '{name}:0.4'") from None
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratio of {spec!r} must be in (0, 1]")
    return name, keep


def edit_settings(spec: str) -> dict[str, Any]:
    """The `hf_edit_patch.edit` arguments of a regularizer spec."""
    name, value = parse_regularizer(spec)
    if name in ("none", "stack"):
        return {"keep_ratio": None}
    if name in STACK_REGULARIZERS:
        registered, setting = STACK_REGULARIZERS[name]
        settings = {setting: value} if value is not None else {}
        return {"keep_ratio": None, "stack_regularizer": registered, "stack_regularizer_kwargs": settings}
    if name == "norm":
        return {"regularizer": "rect", "norm_budget": value}
    if name == "auto":
        return {"regularizer": "rect", "keep_ratio": "auto"}
    return {"regularizer": name, "keep_ratio": value}


@dataclass
class ExperimentConfig:
    """What to run. Every field is recorded in the results; a resumed run must match it (except the
    `MEASUREMENT_FIELDS`)."""

    data: str | None
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
    counterfactuals: str = "none"
    first_edits: int = 50

    def __post_init__(self) -> None:
        from ...editing import METHODS  # here, not above: the command line reads this module without torch

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; accepted: {METHODS}")
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; accepted: {SETTINGS}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}; accepted: {UNITS}")
        if self.counterfactuals not in COUNTERFACTUALS:
            raise ValueError(f"unknown counterfactuals {self.counterfactuals!r}; accepted: {COUNTERFACTUALS}")
        if self.data is None and self.counterfactuals != "only":
            raise ValueError("data (a ZsRE file) is needed unless counterfactuals='only'")
        if isinstance(self.first_edits, bool) or not isinstance(self.first_edits, int) or self.first_edits < 1:
            raise ValueError(f"first_edits must be a positive integer, got {self.first_edits!r}")
        for spec in self.regularizers:
            if parse_regularizer(spec)[0] == "stack" and self.setting != "sequential":
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


def load_zsre(path: str | os.PathLike, n: int | None, seed: int = 0) -> list[Any]:
    """The first `n` usable ZsRE records as `EditRequest`s: distinct subjects, no record that cannot be a request.

    `seed` 0 keeps the file order; another seed shuffles the records first (a different record order). `n=None`
    returns every usable record.
    """
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
    if n is None:
        return out
    raise ValueError(f"{path} has only {len(out)} usable records with distinct subjects; {n} were asked for")


def neutral_texts(config: ExperimentConfig) -> list[str]:
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
