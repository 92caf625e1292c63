"""Evaluation helpers for edited models.

`metrics` holds the text metrics used to score edited models on downstream tasks: SQuAD-style exact match,
averaged ROUGE, entity-level F1 and GSM8K answer checking. It is pure Python and imports neither torch nor
transformers; ROUGE needs the optional `rouge-score` package (``pip install "hf_edit_patch[eval]"``).
"""

from __future__ import annotations

from . import metrics

__all__ = ["metrics"]
