"""`keep_ratio="auto"`: per edit, the smallest RECT budget at which every request still holds.

The search sits above editing and scoring: it attaches each candidate patch to the model, scores the requests'
prompts and paraphrases, and takes the candidate off again.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from torch import nn

from ..evaluation.scoring import score_edits
from ..patch.edit_patch import EditPatch
from ..patched_model import PatchedModel

if TYPE_CHECKING:
    from .update import EditUpdate

logger = logging.getLogger(__name__)

AUTO_KEEP_RATIOS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)


def auto_keep_ratio(model: nn.Module, tokenizer: Any, update: EditUpdate, common: dict[str, Any]) -> EditPatch:
    """The patch at the smallest ratio of `AUTO_KEEP_RATIOS` that does as well as the whole update, per request.

    Binary search over the ratios (more entries never make an edit much worse); each probe attaches the candidate
    to the model, scores the requests' prompts and paraphrases, and takes it off again.
    """
    deltas, reqs, record = update.deltas, update.requests, update.record

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
