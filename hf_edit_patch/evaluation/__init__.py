"""Evaluation helpers for edited models.

`metrics` holds the text metrics used to score edited models on downstream tasks: SQuAD-style exact match,
averaged ROUGE, entity-level F1 and GSM8K answer checking. It is pure Python and imports neither torch nor
transformers; ROUGE needs the optional `rouge-score` package (``pip install "hf_edit_patch[eval]"``).

`weight_change_stats` (Manhattan distance and fractions of large relative weight changes) and `drift` (next-token
KL divergence and perplexity change on ordinary text) compare an edited model with its base. They need torch and
are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import metrics

_LAZY = {"weight_change_stats": "weights", "drift": "drift"}

__all__ = ["drift", "metrics", "weight_change_stats"]

if TYPE_CHECKING:
    from .drift import drift
    from .weights import weight_change_stats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
