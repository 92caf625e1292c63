"""`edit()`: run an editing method on a model and return its update as an `EditPatch` (the model is unchanged).

Example:
    ```python
    import hf_edit_patch as hep

    req = hep.EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                          target_new="Rome", target_true="Paris")
    patch = hep.edit(model, tokenizer, [req], method="rome", keep_ratio=0.4, stats_dataset="wikitext")
    pm = hep.PatchedModel.from_pretrained(model, patch)
    ```
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn

from ..editors import alphaedit, ft, kn, memit, mend, rome
from ..editors.architectures import default_rome_layer, get_arch, mlp_width
from ..editors.hparams import AlphaEditHParams, FTHParams, KNHParams, MemitHParams, MendHParams, RomeHParams
from ..editors.stats import get_second_moments
from ..errors import PatchError
from ..modules import unwrap_peft
from ..patch.edit_patch import EditPatch
from ..requests import as_requests

logger = logging.getLogger(__name__)

METHODS = ("rome", "memit", "ft", "kn", "mend", "alphaedit")
HPARAMS = {
    "rome": RomeHParams,
    "memit": MemitHParams,
    "ft": FTHParams,
    "kn": KNHParams,
    "mend": MendHParams,
    "alphaedit": AlphaEditHParams,
}


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


@dataclasses.dataclass(frozen=True)
class EditUpdate:
    """An editor's whole update before any regularizer: `{module: ΔW}`, the requests and the editor's record.

    `compute_update` returns one and `regularize_update` turns it into a patch; `edit` is the two in a row. Keeping
    the update lets several regularizers be compared on the same ΔW without running the editor again.
    """

    method: str
    deltas: dict[str, torch.Tensor]
    requests: list[Any]
    record: dict[str, Any]


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


def compute_update(
    model: nn.Module,
    tokenizer: Any,
    requests: Any,
    *,
    method: str = "rome",
    hparams: Any = None,
    stats_dataset: str | os.PathLike | None = None,
    stats_text_field: str = "text",
    allow_model_sampled_stats: bool = False,
    stats_cache: Any = None,
    templates: Any = None,
    show_progress: bool | None = None,
) -> EditUpdate:
    """Runs an editing method and returns its whole update, unregularized (arguments as in `edit`)."""
    if method not in METHODS:
        raise PatchError(f"unknown editing method {method!r}; accepted: {METHODS}")
    reqs = as_requests(requests)
    # a PEFT model is edited through its inner model, adapter layers in place: the edit sees the effective model
    # (LoRA active) and its ΔW targets the base weights under the adapters
    base = unwrap_peft(model.base_model if getattr(model, "is_patched_model", False) else model)
    spec = get_arch(base, templates=templates)
    hp = HPARAMS[method].from_any(hparams)
    if method in ("memit", "alphaedit"):  # record the layers and λ actually used
        if hp.layers is None:
            hp = dataclasses.replace(hp, layers=memit.edited_layers(base, hp, spec))
        if method == "memit" and hp.mom2_update_weight is None:
            hp = dataclasses.replace(hp, mom2_update_weight=float(mlp_width(base, spec)))
    elif method == "kn" and hp.layers is None:
        hp = dataclasses.replace(hp, layers=kn.attributed_layers(base, hp, spec))
    elif method in ("rome", "ft") and hp.layer is None:
        hp = dataclasses.replace(hp, layer=default_rome_layer(base, spec))
    was_training = base.training
    base.eval()
    try:
        stats_source, extra = None, {}
        if method == "ft":
            deltas = ft.ft_deltas(base, tokenizer, reqs, hp, spec, show_progress=show_progress)
        elif method == "kn":
            deltas, extra["neurons"] = kn.kn_deltas(base, tokenizer, reqs, hp, spec, show_progress=show_progress)
        elif method == "mend":
            deltas, editor = mend.mend_deltas(base, tokenizer, reqs, hp, spec)
            extra = editor.describe()
        elif method == "alphaedit":
            projections = alphaedit.null_space_projections(
                base,
                tokenizer,
                alphaedit.target_modules(base, hp, spec),
                threshold=hp.nullspace_threshold,
                stats_dataset=stats_dataset,
                text_field=stats_text_field,
                sample_count=hp.mom2_n_samples,
                max_length=hp.mom2_max_length,
                cache=stats_cache,
                allow_model_sampled=allow_model_sampled_stats,
                show_progress=show_progress,
            )
            stats_source = str(stats_dataset) if stats_dataset is not None else "model-sampled text"
            previous = alphaedit.parent_requests(model) if hp.preserve_parent_keys else []
            deltas = alphaedit.alphaedit_deltas(
                base, tokenizer, reqs, hp, spec, projections, previous=previous, show_progress=show_progress
            )
            extra["preserved_requests"] = len(previous)
        else:
            modules = (rome if method == "rome" else memit).target_modules(base, hp, spec)
            moments, stats_source = None, None
            if hp.mom2_adjustment or method == "memit":
                moments = get_second_moments(
                    base,
                    tokenizer,
                    modules,
                    stats_dataset=stats_dataset,
                    text_field=stats_text_field,
                    sample_count=hp.mom2_n_samples,
                    max_length=hp.mom2_max_length,
                    cache=stats_cache,
                    allow_model_sampled=allow_model_sampled_stats,
                    show_progress=show_progress,
                )
                stats_source = str(stats_dataset) if stats_dataset is not None else "model-sampled text"
            compute = rome.rome_deltas if method == "rome" else memit.memit_deltas
            deltas = compute(base, tokenizer, reqs, hp, spec, moments, show_progress=show_progress)
    finally:
        base.train(was_training)
    record = {**hp.to_dict(), **extra}
    if stats_source is not None:
        record["stats_dataset"] = stats_source
    return EditUpdate(method, deltas, reqs, record)


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
        return _auto_keep_ratio(model, tokenizer, update.deltas, update.requests, update.record, common)
    return EditPatch.from_deltas(update.deltas, model, keep_ratio=keep_ratio, editor_hparams=update.record, **common)


AUTO_KEEP_RATIOS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)


def _auto_keep_ratio(
    model: nn.Module, tokenizer: Any, deltas: dict[str, Any], reqs: list[Any], record: dict, common: dict
) -> EditPatch:
    """The patch at the smallest ratio of `AUTO_KEEP_RATIOS` that does as well as the whole update, per request.

    Binary search over the ratios (more entries never make an edit much worse); each probe attaches the candidate
    to the model, scores the requests' prompts and paraphrases, and takes it off again.
    """
    from ..evaluation.editing import score_edits
    from ..patched_model import PatchedModel

    def accuracies(patch: EditPatch) -> list[tuple[float | None, float | None]]:
        pm = model if getattr(model, "is_patched_model", False) else PatchedModel(model)
        name = next(
            f"_auto_keep_ratio{i}"
            for i in range(len(pm.active_patches) + 1)
            if f"_auto_keep_ratio{i}" not in pm.active_patches
        )
        pm.add_patch(patch, name)
        try:
            _, details = score_edits(pm, tokenizer, reqs, return_details=True)
        finally:
            pm.remove_patch(name)
            if pm is not model:
                pm.unload()
        return [(d["reliability"], d["generalization"]) for d in details]

    def as_good(got: list, want: list) -> bool:
        return all(
            g_rel >= w_rel and (w_gen is None or g_gen >= w_gen)
            for (g_rel, g_gen), (w_rel, w_gen) in zip(got, want, strict=True)
        )

    full = EditPatch.from_deltas(
        deltas, model, keep_ratio=None, editor_hparams=record, **{**common, "regularizer": None}
    )
    want = accuracies(full)
    checked: dict[str, bool] = {}
    passing = full  # the patch at hi
    lo, hi = 0, len(AUTO_KEEP_RATIOS)  # invariant: every ratio below lo fails; the one at hi passes (hi = whole)
    while lo < hi:
        mid = (lo + hi) // 2
        ratio = AUTO_KEEP_RATIOS[mid]
        candidate = EditPatch.from_deltas(deltas, model, keep_ratio=ratio, editor_hparams=record, **common)
        checked[str(ratio)] = as_good(accuracies(candidate), want)
        if checked[str(ratio)]:
            hi, passing = mid, candidate
        else:
            lo = mid + 1
    chosen = AUTO_KEEP_RATIOS[hi] if hi < len(AUTO_KEEP_RATIOS) else None
    auto = {"ratios": list(AUTO_KEEP_RATIOS), "checked": checked, "chosen": chosen, "whole_update": want}
    logger.info("keep_ratio='auto': chose %s after checking %s", chosen, checked)
    # the search's own patch, with the search recorded (the content hash depends on the deltas only)
    config = dataclasses.replace(passing.config, editor_hparams=dict(record, keep_ratio_auto=auto))
    return EditPatch(passing.deltas, config)
