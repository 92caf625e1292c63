"""Regularizers: what an edit keeps of its ΔW.

Per matrix (`matrix.py`): RECT (top-k by |ΔW/W|, or the fewest entries carrying a share of the norm) and the
paper's random-k and PCA-k baselines. Importing this package registers them under the names `regularizer=`
takes ("rect", "random", "pca"; see `hf_edit_patch.patch.sparsifiers`). The stack-level regularizer, RECT on the
accumulated update of a stack, is `PatchedModel.compact`.
"""

from .matrix import keep_count, norm_budget_count, pca_sparsify, random_sparsify, rect_sparsify

__all__ = ["keep_count", "norm_budget_count", "pca_sparsify", "random_sparsify", "rect_sparsify"]
