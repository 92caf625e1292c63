"""Regularizers: what an edit keeps of its ΔW.

Per matrix (`matrix.py`): RECT (top-k by |ΔW/W|, or the fewest entries carrying a share of the norm) and the
paper's random-k and PCA-k baselines. Importing this package registers them under the names `regularizer=`
takes ("rect", "random", "pca"; see `hf_edit_patch.patch.sparsifiers`).

Stack level (`stack.py`): constraints on the accumulated update of a stack of patches: a condition-number
restraint ("prune"), a norm anchor ("norm_anchor") and RECT on the accumulated update ("rect"), registered under the
names `PatchedModel.consolidate(regularizer=...)` and `edit(..., stack_regularizer=...)` take (see
`hf_edit_patch.patch.stack_regularizers`).
"""

from .matrix import keep_count, norm_budget_count, pca_sparsify, random_sparsify, rect_sparsify
from .stack import norm_anchor, prune_restrain, rect_accumulated

__all__ = [
    "keep_count",
    "norm_anchor",
    "norm_budget_count",
    "pca_sparsify",
    "prune_restrain",
    "random_sparsify",
    "rect_accumulated",
    "rect_sparsify",
]
