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
from .auto import auto_keep_ratio
from .update import EditUpdate, compute_update


def edit(
    model: nn.Module,
    tokenizer: Any,
    requests: Any,
    *,
    method: str = "rome",
    keep_ratio: float | str | None = None,
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
        keep_ratio: the regularizer's fraction of ΔW entries to keep; None keeps the whole update. "auto" picks,
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
            file (with `stats_text_field`); cached statistics are reused.
        allow_model_sampled_stats: without a corpus, compute the statistics from text the model samples itself
            (recorded as such in the patch); otherwise that case is an error saying how to provide one.
        templates: module templates (`ArchSpec` or a dict) for an architecture the registry does not know.

    Returns:
        An `EditPatch` recording the method, its hyperparameters, the regularizer and the requests.
    """
    reg_kwargs = _regularizer_settings(keep_ratio, regularizer, norm_budget, regularizer_kwargs)
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
    return _to_patch(model, tokenizer, update, keep_ratio, regularizer, reg_kwargs, value_dtype)


def regularize_update(
    model: nn.Module,
    tokenizer: Any,
    update: EditUpdate,
    *,
    keep_ratio: float | str | None = None,
    regularizer: str | None = "rect",
    norm_budget: float | None = None,
    regularizer_kwargs: dict[str, Any] | None = None,
    value_dtype: str | torch.dtype = "auto",
) -> EditPatch:
    """The patch of an `EditUpdate` under a regularizer (arguments as in `edit`; `model` is the one edited)."""
    if not isinstance(update, EditUpdate):
        raise TypeError(f"update must be an EditUpdate from compute_update, got {type(update).__name__}")
    reg_kwargs = _regularizer_settings(keep_ratio, regularizer, norm_budget, regularizer_kwargs)
    return _to_patch(model, tokenizer, update, keep_ratio, regularizer, reg_kwargs, value_dtype)


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
) -> EditPatch:
    common: dict[str, Any] = {
        "regularizer": regularizer,
        "regularizer_kwargs": reg_kwargs or None,
        "value_dtype": value_dtype,
        "editor": update.method,
        "requests": update.requests,
    }
    if keep_ratio == "auto":
        return auto_keep_ratio(model, tokenizer, update, common)
    return EditPatch.from_deltas(update.deltas, model, keep_ratio=keep_ratio, editor_hparams=update.record, **common)


PatchedModel.register_edit_function(edit)
