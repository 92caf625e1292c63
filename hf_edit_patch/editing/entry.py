"""`edit()`: run an editing method on a model and return its update as an `EditPatch` (the model is unchanged).

Example:
    ```python
    import hf_edit_patch as hep

    req = hep.EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                          target_new="Rome", target_true="Paris")
    patch = hep.edit(model, tokenizer, [req], method="rome", keep_ratio=0.4, stats_dataset="wikitext")
    pm = hep.PatchedModel.from_pretrained(model, patch)
    ```

`edit` is `compute_update` (the editor's whole ΔW) followed by `regularize_update` (a regularizer, or the
`keep_ratio="auto"` search, turns it into a patch). Importing this module also makes `PatchedModel.edit` run
`edit` on the patched weights.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import regularizers  # noqa: F401  (registers the built-in regularizers by name)
from ..errors import PatchError
from ..patch.edit_patch import EditPatch
from ..patched_model import PatchedModel
from ..patched_model.consolidate import stack_regularized_patch, stack_regularizer_record
from .auto import auto_keep_ratio
from .update import EditUpdate, compute_update

__all__ = ["DEFAULT_KEEP_RATIO", "edit", "regularize_update"]


class _DefaultKeepRatio(float):
    """The default `keep_ratio`: a float like any other, but `edit` can tell that nobody passed it."""

    def __repr__(self) -> str:
        return float.__repr__(self)


DEFAULT_KEEP_RATIO: float = _DefaultKeepRatio(0.4)
"""RECT keeps 40% of ΔW unless told otherwise (`edit` and `hf-edit-patch edit` alike). On SmolLM2-135M this budget
keeps 95% of the reliability and 98% of the generalization of 50 sequential ROME edits while storing 40% of the
entries; below it (20%) edits stop holding (docs/results.md). A MEMIT batch keeps more of its edits with
`norm_budget=0.9`; `keep_ratio=None` keeps the whole update."""


def edit(
    model: nn.Module,
    tokenizer: Any,
    requests: Any,
    *,
    method: str = "rome",
    keep_ratio: float | str | None = DEFAULT_KEEP_RATIO,
    regularizer: str | None = "rect",
    norm_budget: float | None = None,
    regularizer_kwargs: dict[str, Any] | None = None,
    hparams: Any = None,
    stats_dataset: str | os.PathLike | None = None,
    stats_text_field: str = "text",
    allow_model_sampled_stats: bool = False,
    stats_cache: Any = None,
    templates: Any = None,
    value_dtype: str | torch.dtype = "auto",
    show_progress: bool | None = None,
    stack_regularizer: str | None = None,
    stack_regularizer_kwargs: dict[str, Any] | None = None,
) -> EditPatch:
    """Computes an edit and returns it as a patch; the model's weights are not touched.

    Args:
        model: a causal LM, a PEFT `PeftModel` (the edit is computed with its adapters active and stored against
            the base weights), or a `PatchedModel` of either (the edit is computed on its current, patched weights
            and records its active patches as parents).
        tokenizer: the model's tokenizer.
        requests: `EditRequest`s (or dicts with their fields).
        method: "rome" (one rank-one update per fact), "memit" (a batch spread over several layers), "ft"
            (constrained fine-tuning of one layer), "alphaedit" (MEMIT projected onto the null space of preserved
            keys), "kn" (knowledge neurons: a few neurons' value vectors) or "mend" (a trained MEND editor:
            `hparams={"editor": editor_or_path}`).
        keep_ratio: the regularizer's fraction of ΔW entries to keep, 0.4 by default (`DEFAULT_KEEP_RATIO`: RECT
            at the paper's budget, which keeps 95% of sequential ROME edits on SmolLM2-135M; ignored when
            `norm_budget` is given or `regularizer=None`); None keeps the whole update. "auto" picks,
            for this edit, the smallest ratio of `AUTO_KEEP_RATIOS` at which every request still does as well on its
            prompt and paraphrases (teacher-forced token accuracy of `target_new`) as with the whole update; the
            search is recorded in the patch's `editor_hparams["keep_ratio_auto"]`.
        regularizer: "rect" (top-k by |ΔW/W|), "random" or "pca".
        norm_budget: RECT only, instead of `keep_ratio`: keep the fewest entries (largest |ΔW/W| first) that
            carry this fraction of each ΔW's squared norm.
        regularizer_kwargs: extra regularizer settings (`{"seed": 1}` for random-k, `{"rank": 4}` for PCA-k).
        hparams: the method's hyperparameters (`RomeHParams`, `MemitHParams`, `FTHParams`, `AlphaEditHParams`,
            `KNHParams`, `MendHParams`, or a dict of fields).
        stats_dataset: corpus for the key statistics of ROME/MEMIT: a `datasets` id or a local .txt/.json/.jsonl
            file (with `stats_text_field`); cached statistics are reused. The patch records the corpus by name and
            content hash, never by its local path.
        stats_text_field: the field holding the text in a JSON corpus or a dataset.
        allow_model_sampled_stats: without a corpus, compute the statistics from text the model samples itself
            (recorded as such in the patch); otherwise that case is an error saying how to provide one.
        stats_cache: a `hf_edit_patch.hub.stats_cache.StatsCache` (default: `~/.cache/hf_edit_patch`).
        templates: module templates (`ArchSpec` or a dict) for an architecture the registry does not know.
        value_dtype: "auto", "float16", "bfloat16" or "float32" for the stored values.
        show_progress: progress bars for statistics, sampling, value optimization and sparsifying; None (the
            default) shows them on a terminal only, False never (see `hf_edit_patch.progress`).
        stack_regularizer: a stack-level regularizer ("prune", "norm_anchor", "rect";
            `hf_edit_patch.regularizers.stack`): the patch becomes R(ΔW_acc + ΔW) − ΔW_acc, so that the accumulated
            update of `model`'s active patches with this one on top satisfies R's bound (on a model that is not a
            `PatchedModel`, ΔW_acc is zero). Applied after the per-matrix regularizer.
        stack_regularizer_kwargs: its settings, e.g. `{"threshold": 1.0}` ("prune") or `{"alpha": 0.1}`
            ("norm_anchor").

    Returns:
        An `EditPatch` recording the method, its hyperparameters, the regularizer and the requests.

    Example:
        ```python
        req = hep.EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                              target_new="Rome", target_true="Paris")
        patch = hep.edit(model, tokenizer, [req], method="rome", stats_dataset="corpus.jsonl",
                         stats_text_field="passage")     # RECT keeps 40% of ΔW
        whole = hep.edit(model, tokenizer, [req], method="rome", keep_ratio=None,
                         allow_model_sampled_stats=True)  # the whole update; statistics from sampled text
        ```
    """
    keep_ratio = _given_keep_ratio(keep_ratio, regularizer, norm_budget)
    reg_kwargs = _regularizer_settings(keep_ratio, regularizer, norm_budget, regularizer_kwargs)
    stack_regularizer_record(stack_regularizer, stack_regularizer_kwargs)  # a bad name fails before the editor runs
    update = compute_update(
        model,
        tokenizer,
        requests,
        method=method,
        hparams=hparams,
        stats_dataset=stats_dataset,
        stats_text_field=stats_text_field,
        allow_model_sampled_stats=allow_model_sampled_stats,
        stats_cache=stats_cache,
        templates=templates,
        show_progress=show_progress,
    )
    patch = _to_patch(model, tokenizer, update, keep_ratio, regularizer, reg_kwargs, value_dtype, show_progress)
    return _stack_regularized(model, patch, stack_regularizer, stack_regularizer_kwargs, value_dtype, show_progress)


def regularize_update(
    model: nn.Module,
    tokenizer: Any,
    update: EditUpdate,
    *,
    keep_ratio: float | str | None = DEFAULT_KEEP_RATIO,
    regularizer: str | None = "rect",
    norm_budget: float | None = None,
    regularizer_kwargs: dict[str, Any] | None = None,
    value_dtype: str | torch.dtype = "auto",
    show_progress: bool | None = None,
    stack_regularizer: str | None = None,
    stack_regularizer_kwargs: dict[str, Any] | None = None,
) -> EditPatch:
    """The patch of an `EditUpdate` under a regularizer (arguments as in `edit`; `model` is the one edited).

    Example:
        ```python
        update = compute_update(model, tokenizer, [req], method="rome", allow_model_sampled_stats=True)
        patch = regularize_update(model, tokenizer, update, keep_ratio=0.2)
        ```
    """
    if not isinstance(update, EditUpdate):
        raise TypeError(f"update must be an EditUpdate from compute_update, got {type(update).__name__}")
    keep_ratio = _given_keep_ratio(keep_ratio, regularizer, norm_budget)
    reg_kwargs = _regularizer_settings(keep_ratio, regularizer, norm_budget, regularizer_kwargs)
    stack_regularizer_record(stack_regularizer, stack_regularizer_kwargs)
    patch = _to_patch(model, tokenizer, update, keep_ratio, regularizer, reg_kwargs, value_dtype, show_progress)
    return _stack_regularized(model, patch, stack_regularizer, stack_regularizer_kwargs, value_dtype, show_progress)


def _stack_regularized(
    model: nn.Module,
    patch: EditPatch,
    stack_regularizer: str | None,
    settings: dict[str, Any] | None,
    value_dtype: Any,
    show_progress: bool | None,
) -> EditPatch:
    if stack_regularizer is None:
        return patch
    return stack_regularized_patch(
        model, patch, stack_regularizer, settings, value_dtype=value_dtype, show_progress=show_progress
    )


def _given_keep_ratio(keep_ratio: Any, regularizer: str | None, norm_budget: float | None) -> Any:
    """The keep ratio to use: the default one gives way to a `norm_budget` or to `regularizer=None`."""
    if keep_ratio is DEFAULT_KEEP_RATIO:
        return None if (norm_budget is not None or regularizer is None) else float(keep_ratio)
    return keep_ratio


def _regularizer_settings(
    keep_ratio: Any, regularizer: str | None, norm_budget: float | None, regularizer_kwargs: dict[str, Any] | None
) -> dict[str, Any]:
    if isinstance(keep_ratio, str) and keep_ratio != "auto":
        raise PatchError(f"keep_ratio must be a number in (0, 1], None or 'auto', got {keep_ratio!r}")
    reg_kwargs = dict(regularizer_kwargs or {})
    if norm_budget is not None:
        if keep_ratio is not None:
            raise PatchError("give keep_ratio or norm_budget, not both")
        if regularizer != "rect":
            raise PatchError(f"norm_budget is a RECT setting; got regularizer={regularizer!r}")
        reg_kwargs["norm_budget"] = norm_budget
    if keep_ratio == "auto" and regularizer is None:
        raise PatchError("keep_ratio='auto' needs a regularizer; accepted: 'rect', 'random', 'pca'")
    return reg_kwargs


def _to_patch(
    model: nn.Module,
    tokenizer: Any,
    update: EditUpdate,
    keep_ratio: Any,
    regularizer: str | None,
    reg_kwargs: dict[str, Any],
    value_dtype: Any,
    show_progress: bool | None,
) -> EditPatch:
    common: dict[str, Any] = {
        "regularizer": regularizer,
        "regularizer_kwargs": reg_kwargs or None,
        "value_dtype": value_dtype,
        "editor": update.method,
        "requests": update.requests,
        "show_progress": show_progress,
    }
    if keep_ratio == "auto":
        return auto_keep_ratio(model, tokenizer, update, common)
    return EditPatch.from_deltas(update.deltas, model, keep_ratio=keep_ratio, editor_hparams=update.record, **common)


PatchedModel.register_edit_function(edit)
