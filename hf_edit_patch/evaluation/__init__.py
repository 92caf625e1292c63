"""Evaluation helpers for edited models.

`metrics` holds the text metrics used to score edited models on downstream tasks: SQuAD-style exact match,
averaged ROUGE, entity-level F1 and GSM8K answer checking. It is pure Python and imports neither torch nor
transformers; ROUGE needs the optional `rouge-score` package (``pip install "hf_edit_patch[eval]"``).

`evaluate_edits` (`edit_runs`) edits a model, scores reliability, generalization and locality, and restores the
model; `score_edits` and `locality_reference` (`scoring`) score a model as it stands, without editing.

`weight_change_stats` (Manhattan distance and fractions of large relative weight changes) and `drift` (next-token
KL divergence and perplexity change on ordinary text) compare an edited model with its base. They need torch and
are imported on first use, so importing this package stays cheap.

`run_general_tasks` scores a model (or a `PatchedModel`) zero-shot on the eight general-ability tasks of the RECT
paper (reasoning, NLI, open- and closed-domain QA, dialogue, summarization, NER, sentiment) with the paper's prompts,
from local files or the public datasets. It needs torch and is imported on first use too. `label_probes` reads
the next token after the SST-2, RTE and BoolQ prompts: answer-format adherence and label-likelihood AUC.

Also here: `report` (evaluate a patch, write `eval.json` and its card), `experiment` (the paper's experiments:
edit step by step, measure every checkpoint), `study` (many experiment folders read together), and `checks` (the
argument checks the modules share).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from . import metrics

_LAZY = {
    "weight_change_stats": "weights",
    "drift": "divergence",
    "evaluate_edits": "edit_runs",
    "score_edits": "scoring",
    "locality_reference": "scoring",
    "run_general_tasks": "tasks.run",
    "label_probes": "probes",
}

__all__ = [
    "drift",
    "evaluate_edits",
    "label_probes",
    "locality_reference",
    "score_edits",
    "metrics",
    "run_general_tasks",
    "weight_change_stats",
]

if TYPE_CHECKING:
    from .divergence import drift
    from .edit_runs import evaluate_edits
    from .probes import label_probes
    from .scoring import locality_reference, score_edits
    from .tasks.run import run_general_tasks
    from .weights import weight_change_stats


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
