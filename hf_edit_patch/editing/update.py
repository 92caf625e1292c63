"""`compute_update`: run a registered editing method (`hf_edit_patch.editors.registry`) on a model and return its
whole update, unregularized, as an `EditUpdate` (the model is unchanged). Importing the editors registers them all.

Example:
    ```python
    from hf_edit_patch.editing import compute_update, regularize_update

    update = compute_update(model, tokenizer, [req], method="memit", stats_dataset="wikitext")
    patch = regularize_update(model, tokenizer, update, keep_ratio=0.4)
    ```
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn

from ..editors.architectures import get_arch
from ..editors.registry import get_editor, registered_editors
from ..hub.corpora import EDIT_OPTION_NAMES, corpus_option_names
from ..modules import unwrap_peft
from ..patch.conflicts import request_contradictions
from ..requests import as_requests
from .inputs import StatsOptions, provide_inputs

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "EditUpdate", "compute_update"]

METHODS = registered_editors()
"""The names of the editing methods (`hf_edit_patch.editors.registry`), e.g. `"rome"`, `"memit"`."""


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


def _warn_contradictions(requests: list[Any]) -> None:
    """Warns (once per call) when requests ask for different targets for one subject and relation."""
    pairs = request_contradictions(requests) if len(requests) > 1 else []
    if not pairs:
        return
    i, j = pairs[0]
    a, b = requests[i], requests[j]
    logger.warning(
        "%d pair(s) of requests ask for different targets for the same subject and relation, e.g. requests %d and %d "
        "(%r: %r, %r); one update cannot state both, so expect lower reliability on them. Edit them in separate "
        "patches (the later one holds) or keep one.",
        len(pairs),
        i,
        j,
        a.subject,
        a.target_new,
        b.target_new,
    )


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
    """Runs an editing method and returns its whole update, unregularized (arguments as in `edit`).

    The method is looked up in the editor registry; its hyperparameters get the defaults that depend on the model
    (layers, λ), so the patch records what was used; the inputs it declares (key statistics, null-space projections,
    a `PatchedModel`'s parent requests, a saved editor) are provided; the record is the hyperparameters, what the
    editor reports, and where the statistics came from.
    """
    editor = get_editor(method)
    reqs = as_requests(requests)
    _warn_contradictions(reqs)
    # a PEFT model is edited through its inner model, adapter layers in place: the edit sees the effective model
    # (LoRA active) and its ΔW targets the base weights under the adapters
    base = unwrap_peft(model.base_model if getattr(model, "is_patched_model", False) else model)
    spec = get_arch(base, templates=templates)
    hp = editor.resolve(base, editor.hparams.from_any(hparams), spec)
    stats = StatsOptions(stats_dataset, stats_text_field, allow_model_sampled_stats, stats_cache)
    was_training = base.training
    base.eval()
    try:
        needs = editor.needs(base, hp, spec)
        with corpus_option_names(EDIT_OPTION_NAMES):  # errors name edit()'s options, or the CLI's flags
            inputs = provide_inputs(needs, model, base, tokenizer, stats, show_progress=show_progress)
            record_source = stats.source() if needs.statistics is not None else None
        output = editor.compute(base, tokenizer, reqs, hp, spec, inputs, show_progress=show_progress)
    finally:
        base.train(was_training)
    record = {**hp.to_dict(), **output.record}
    if record_source is not None:
        record["stats_dataset"] = record_source
    return EditUpdate(method, output.deltas, reqs, record)
