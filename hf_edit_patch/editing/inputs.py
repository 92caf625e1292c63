"""What the entry point gives an editor, as its `EditorNeeds` declare: key statistics (cached or computed), null-space
projections, the parent requests of a `PatchedModel`, a saved editor network (loaded from a folder or the Hub).

Example:
    ```python
    >>> from hf_edit_patch.editing.inputs import parent_requests
    >>> [r.subject for r in parent_requests(patched_model)]  # doctest: +SKIP
    ['The Eiffel Tower']
    ```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..editors.registry import EditorInputs, EditorNeeds
from ..hub.corpora import TextSource
from ..hub.mend import load_mend_editor
from ..requests import EditRequest
from .statistics import get_second_moments, null_space_projections

__all__ = ["StatsOptions", "parent_requests", "provide_inputs"]


@dataclass(frozen=True)
class StatsOptions:
    """Where key statistics come from (the `stats_*` arguments of `edit`)."""

    stats_dataset: str | os.PathLike | None = None
    text_field: str = "text"
    allow_model_sampled: bool = False
    cache: Any = None

    def source(self) -> str:
        """How the patch records the statistics' source: a local file by its name and content hash
        (`file:corpus.jsonl@sha256:...`), a dataset by id, configuration and split, never a local path."""
        if self.stats_dataset is None:
            return "model-sampled text"
        source = self.stats_dataset
        if not isinstance(source, TextSource):
            source = TextSource(source, text_field=self.text_field)
        return source.fingerprint()


def parent_requests(model: nn.Module) -> list[EditRequest]:
    """The requests recorded in the active patches of a `PatchedModel` (none for another model), deduplicated."""
    if not getattr(model, "is_patched_model", False):
        return []
    seen, out = set(), []
    for patch in model.patches.values():
        for record in patch.config.requests:
            try:
                req = EditRequest.from_dict(record)
            except (ValueError, TypeError):
                continue
            ident = (req.prompt, req.subject)
            if ident not in seen:
                seen.add(ident)
                out.append(req)
    return out


def provide_inputs(
    needs: EditorNeeds,
    model: nn.Module,
    base: nn.Module,
    tokenizer: Any,
    stats: StatsOptions,
    *,
    show_progress: bool | None = None,
) -> EditorInputs:
    """The `EditorInputs` an editor declared; `model` is the model edited (maybe a `PatchedModel`), `base` the
    module the editor runs on (unwrapped from PEFT and `PatchedModel`)."""
    second_moments = projections = None
    wanted = needs.statistics
    if wanted is not None:
        options = {
            "stats_dataset": stats.stats_dataset,
            "text_field": stats.text_field,
            "sample_count": wanted.sample_count,
            "max_length": wanted.max_length,
            "cache": stats.cache,
            "allow_model_sampled": stats.allow_model_sampled,
            "show_progress": show_progress,
        }
        modules = list(wanted.modules)
        if wanted.nullspace_threshold is None:
            second_moments = get_second_moments(base, tokenizer, modules, **options)
        else:
            projections = null_space_projections(
                base, tokenizer, modules, threshold=wanted.nullspace_threshold, **options
            )
    saved = needs.saved_editor
    return EditorInputs(
        second_moments=second_moments,
        projections=projections,
        parent_requests=parent_requests(model) if needs.parent_requests else [],
        saved_editor=load_mend_editor(saved.path_or_repo_id, revision=saved.revision) if saved is not None else None,
    )
