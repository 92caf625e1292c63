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

from .editors import ft, memit, rome
from .editors.architectures import default_rome_layer, get_arch, mlp_width
from .editors.hparams import FTHParams, MemitHParams, RomeHParams
from .editors.stats import get_second_moments
from .errors import PatchError
from .modules import unwrap_peft
from .patch import EditPatch
from .requests import as_requests

logger = logging.getLogger(__name__)

METHODS = ("rome", "memit", "ft")


def edit(
    model: nn.Module,
    tokenizer: Any,
    requests: Any,
    *,
    method: str = "rome",
    keep_ratio: float | None = None,
    regularizer: str | None = "rect",
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
        method: "rome" (one rank-one update per fact), "memit" (a batch spread over several layers) or "ft"
            (constrained fine-tuning of one layer).
        keep_ratio: the regularizer's fraction of ΔW entries to keep; None keeps the whole update.
        regularizer: "rect" (top-k by |ΔW/W|), "random" or "pca".
        hparams: the method's hyperparameters (`RomeHParams`, `MemitHParams`, `FTHParams`, or a dict of fields).
        stats_dataset: corpus for the key statistics of ROME/MEMIT: a `datasets` id or a local .txt/.json/.jsonl
            file (with `stats_text_field`); cached statistics are reused.
        allow_model_sampled_stats: without a corpus, compute the statistics from text the model samples itself
            (recorded as such in the patch); otherwise that case is an error saying how to provide one.
        templates: module templates (`ArchSpec` or a dict) for an architecture the registry does not know.

    Returns:
        An `EditPatch` recording the method, its hyperparameters, the regularizer and the requests.
    """
    if method not in METHODS:
        raise PatchError(f"unknown editing method {method!r}; accepted: {METHODS}")
    reqs = as_requests(requests)
    # a PEFT model is edited through its inner model, adapter layers in place: the edit sees the effective model
    # (LoRA active) and its ΔW targets the base weights under the adapters
    base = unwrap_peft(model.base_model if getattr(model, "is_patched_model", False) else model)
    spec = get_arch(base, templates=templates)
    hp_cls = {"rome": RomeHParams, "memit": MemitHParams, "ft": FTHParams}[method]
    hp = hp_cls.from_any(hparams)
    if method == "memit":  # record the layers and λ actually used
        if hp.layers is None:
            hp = dataclasses.replace(hp, layers=memit.edited_layers(base, hp, spec))
        if hp.mom2_update_weight is None:
            hp = dataclasses.replace(hp, mom2_update_weight=float(mlp_width(base, spec)))
    elif method != "memit" and hp.layer is None:
        hp = dataclasses.replace(hp, layer=default_rome_layer(base, spec))
    was_training = base.training
    base.eval()
    try:
        if method == "ft":
            deltas = ft.ft_deltas(base, tokenizer, reqs, hp, spec, show_progress=show_progress)
            stats_source = None
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
    record = hp.to_dict()
    if stats_source is not None:
        record["stats_dataset"] = stats_source
    return EditPatch.from_deltas(
        deltas,
        model,
        keep_ratio=keep_ratio,
        regularizer=regularizer,
        value_dtype=value_dtype,
        editor=method,
        editor_hparams=record,
        requests=reqs,
    )
