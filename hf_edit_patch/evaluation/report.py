"""Evaluate an edit patch against its base model and write the result: `eval.json`, a plot and an evaluation card.

`evaluate_patch` scores the base model, attaches the patch, scores again and takes the patch off (the model ends
exactly as it began): editing metrics on the patch's own requests (`score_edits`: reliability, generalization,
locality) and, when `tasks` are named, the general-ability tasks (`run_general_tasks`). `write_evaluation` writes
the results as `eval.json`, `scores.png` (with matplotlib) and a `README.md` evaluation card whose `model-index`
holds every score before and after; `hf_edit_patch.evaluation.publish.push_patch_folder` uploads them with the patch.

Example:
    ```python
    import hf_edit_patch as hep
    from hf_edit_patch.evaluation.report import evaluate_patch, write_evaluation

    model, tokenizer = hep.load_default_model()
    patch = hep.EditPatch.from_pretrained("out/eiffel")
    results = evaluate_patch(model, tokenizer, patch, tasks=["nli", "sentiment"], task_limit=50,
                             task_data_dir="data/tasks", source="out/eiffel")
    write_evaluation(results, "out/eiffel/evaluation", patch=patch)
    ```
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import EvaluationFormatError
from ..hub.cards import EDITING_METRICS, TASK_CARDS, evaluation_card, write_card
from ..hub.files import atomic_write
from ..modules import model_source
from ..patch.edit_patch import EditPatch
from ..patched_model import PatchedModel
from ..requests import EditRequest, as_requests
from ..schema import AnyJSON, Int, List, Map, Nullable, Number, Object, Str, read_json, shorten, validate
from ..version import __version__
from .scoring import locality_reference, score_edits
from .tasks.run import run_general_tasks

logger = logging.getLogger(__name__)

__all__ = ["EVAL_FILE", "evaluate_patch", "load_evaluation", "plot_evaluation", "write_evaluation"]

EVAL_FILE = "eval.json"
PLOT_FILE = "scores.png"
CARD_FILE = "README.md"
EVAL_FORMAT = "hf_edit_patch.evaluation"
EVAL_FORMAT_VERSION = 1
_SCORES = Map(Nullable(Number()), max_length=1024)
_BEFORE_AFTER = Object({"base": _SCORES, "patched": _SCORES}, extra="keep")
# The declared schema of eval.json: what the card, the plot and publishing read; other keys are kept as they are.
EVAL_SCHEMA = Object(
    {
        "format": Str(max_length=64),
        "format_version": Int(1, EVAL_FORMAT_VERSION),
        "library_version": Str(max_length=64),
        "base_model": Object(
            {"name_or_path": Nullable(Str(max_length=4096)), "revision": Nullable(Str(max_length=1024))}, extra="keep"
        ),
        "patch": Object(
            {
                "source": Nullable(Str(max_length=4096)),
                "content_hash": Nullable(Str(max_length=71)),
                "editor": Nullable(Str(max_length=256)),
                "regularizer": Nullable(Str(max_length=64)),
                "keep_ratio": Nullable(Number()),
                "modules": List(Str(max_length=1024), max_length=100_000),
                "nnz": Nullable(Int(0)),
                "base_model": Nullable(Str(max_length=4096)),
            },
            extra="keep",
        ),
        "settings": Map(AnyJSON(), max_length=256),
        "editing": _BEFORE_AFTER,
        "tasks": _BEFORE_AFTER,
        "plots": List(List(Str(max_length=1024), min_length=2, max_length=2), max_length=100),
        "seconds": Nullable(Number()),
    },
    required=("format", "format_version"),
    extra="keep",
)


def evaluate_patch(
    model: nn.Module,
    tokenizer: Any,
    patch: EditPatch,
    *,
    requests: Any = None,
    metric: str = "accuracy",
    tasks: Sequence[str] = (),
    task_limit: int | None = None,
    task_data_dir: str | os.PathLike | None = None,
    task_batch_size: int = 16,
    locality_tokens: int = 5,
    batch_size: int = 16,
    strict: bool = False,
    source: str | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Scores `model` without and with `patch`; the model is left exactly as it was.

    Args:
        model: the base model, or a `PatchedModel` (the patch is then stacked on its active patches, which count
            as the base, and removed again).
        tokenizer: its tokenizer.
        patch: the patch to evaluate.
        requests: the requests to score (`EditRequest`s or dicts); defaults to the patch's own. Without any, the
            editing metrics are skipped.
        metric: "accuracy" (ZsRE token accuracy; locality against the base model's own continuations) or
            "probability" (CounterFact comparison; needs `target_true`).
        tasks: general-ability tasks to run before and after (see `hf_edit_patch.evaluation.tasks.prompts.TASKS`).
        task_limit, task_data_dir, task_batch_size: as `limit`, `data_dir` and `batch_size` of `run_general_tasks`.
        locality_tokens, batch_size: as in `score_edits` / `locality_reference`.
        strict: raise instead of warning when the patch's fingerprints do not match the model's weights.
        source: where the patch came from (a folder or Hub id), recorded in the results.

    Returns:
        A JSON-serializable dict: `editing` and `tasks`, each `{"base": {...}, "patched": {...}}`, with `settings`,
        `base_model`, `patch` (source, content hash, editor, regularizer, ...), `library_version` and `seconds`.

    Example:
        ```python
        >>> results = evaluate_patch(model, tokenizer, patch, tasks=["sentiment"], task_limit=20)
        >>> results["editing"]["patched"]["reliability"]
        1.0
        ```
    """
    if not isinstance(patch, EditPatch):
        raise TypeError(f"patch must be an EditPatch, got {type(patch).__name__}")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if requests is not None:
        reqs = as_requests(requests)
    else:
        reqs = [EditRequest.from_dict(r) for r in patch.config.requests]
    if not reqs:
        logger.warning("the patch records no edit requests and none were given: editing metrics are skipped")
    pm = model if getattr(model, "is_patched_model", False) else PatchedModel(model)
    if patch.config.parent_patches:
        parents = [p.get("content_hash") for p in patch.config.parent_patches]
        active = [p.config.content_hash for p in pm.patches.values()]
        if parents != active:
            logger.warning(
                "the patch was computed on top of %d parent patch(es) that are not the active patches of the model; "
                "its scores are those of the patch on the model as given",
                len(parents),
            )
    t0 = time.perf_counter()

    def editing_scores(reference: Any) -> dict[str, float | None]:
        return score_edits(pm, tokenizer, reqs, metric=metric, reference=reference, batch_size=batch_size)

    def task_scores() -> dict[str, float]:
        if not tasks:
            return {}
        return run_general_tasks(
            pm,
            tokenizer,
            tasks=tasks,
            limit=task_limit,
            data_dir=task_data_dir,
            batch_size=task_batch_size,
            show_progress=show_progress,
        )

    reference = None
    if reqs and metric == "accuracy":
        reference = locality_reference(pm, tokenizer, reqs, locality_tokens=locality_tokens, batch_size=batch_size)
    base_editing = editing_scores(reference) if reqs else {}
    base_tasks = task_scores()
    name = next(f"evaluated{i}" for i in range(len(pm.active_patches) + 1) if f"evaluated{i}" not in pm.patches)
    pm.add_patch(patch, name, strict=strict)
    try:
        patched_editing = editing_scores(reference) if reqs else {}
        patched_tasks = task_scores()
    finally:
        pm.remove_patch(name)

    model_id, revision = model_source(pm.base_model)
    cfg = patch.config
    return {
        "format": EVAL_FORMAT,
        "format_version": EVAL_FORMAT_VERSION,
        "library_version": __version__,
        "base_model": {"name_or_path": model_id, "revision": revision},
        "patch": {
            "source": source,
            "content_hash": cfg.content_hash,
            "editor": cfg.editor,
            "regularizer": cfg.regularizer,
            "keep_ratio": cfg.keep_ratio,
            "modules": list(cfg.modules),
            "nnz": patch.nnz,
            "base_model": cfg.base_model_name_or_path,
        },
        "settings": {
            "metric": metric,
            "requests": len(reqs),
            "locality_tokens": locality_tokens,
            "tasks": tasks,
            "task_limit": task_limit,
            "task_data_dir": os.fspath(task_data_dir) if task_data_dir is not None else None,
        },
        "editing": {"base": base_editing, "patched": patched_editing},
        "tasks": {"base": base_tasks, "patched": patched_tasks},
        "plots": [],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def plot_evaluation(results: dict[str, Any], path: str | os.PathLike) -> str | None:
    """Bar charts of the scores before and after the patch (editing metrics, tasks) as a PNG; None without
    matplotlib or without scores."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning('no plot: it needs matplotlib (pip install "hf-edit-patch[eval]")')
        return None
    panels = []
    for key, title, labels in (
        ("editing", "Editing metrics", {m: m for m in EDITING_METRICS}),
        ("tasks", "General abilities", {t: TASK_CARDS[t][0] if t in TASK_CARDS else t for t in TASK_CARDS}),
    ):
        base, patched = (results.get(key) or {}).get("base") or {}, (results.get(key) or {}).get("patched") or {}
        names = [n for n in dict.fromkeys([*base, *patched]) if base.get(n) is not None or patched.get(n) is not None]
        if names:
            panels.append((title, [labels.get(n, n) for n in names], [base.get(n) for n in names],
                           [patched.get(n) for n in names]))  # fmt: skip
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 3.6), squeeze=False)
    for ax, (title, names, base, patched) in zip(axes.flat, panels, strict=True):
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [v or 0.0 for v in base], width=0.4, label="base model")
        ax.bar([x + 0.2 for x in xs], [v or 0.0 for v in patched], width=0.4, label="with the patch")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_evaluation(
    results: dict[str, Any],
    output_dir: str | os.PathLike,
    *,
    patch: EditPatch | None = None,
    plots: bool = True,
    overwrite_card: bool = False,
) -> dict[str, str]:
    """Writes `eval.json`, `scores.png` (when `plots` and matplotlib is installed) and the `README.md` evaluation
    card into `output_dir` (created if needed); a card a person edited is kept unless `overwrite_card`.

    Returns `{"eval": path, "plot": path, "card": path}` for what was written.
    """
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    written: dict[str, str] = {}
    results["plots"] = []
    if plots and plot_evaluation(results, os.path.join(output_dir, PLOT_FILE)):
        results["plots"] = [["Scores without and with the patch", PLOT_FILE]]
        written["plot"] = os.path.join(output_dir, PLOT_FILE)
    written["eval"] = os.path.join(output_dir, EVAL_FILE)
    atomic_write(written["eval"], json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    card = evaluation_card(results, patch=patch)
    if write_card(os.path.join(output_dir, CARD_FILE), str(card), overwrite=overwrite_card, write=atomic_write):
        written["card"] = os.path.join(output_dir, CARD_FILE)
    return written


def load_evaluation(path: str | os.PathLike) -> dict[str, Any]:
    """Reads `eval.json` (or the folder holding it) written by `write_evaluation`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, EVAL_FILE)
    try:
        results = read_json(path, error=EvaluationFormatError)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise EvaluationFormatError(f"{path} is not a readable evaluation ({exc})") from exc
    if not isinstance(results, dict) or results.get("format") != EVAL_FORMAT:
        raise EvaluationFormatError(f"{path} is not an evaluation written by hf_edit_patch (format {EVAL_FORMAT!r})")
    version = results.get("format_version")
    if type(version) is not int or version > EVAL_FORMAT_VERSION:
        raise EvaluationFormatError(
            f"{path} has evaluation format version {shorten(version)}; this hf_edit_patch reads up to "
            f"{EVAL_FORMAT_VERSION}: upgrade hf_edit_patch"
        )
    return validate(EVAL_SCHEMA, results, source=path, error=EvaluationFormatError)
