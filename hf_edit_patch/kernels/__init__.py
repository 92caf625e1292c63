"""Triton kernels, each `X.py` beside its pure-torch twin `X_reference.py`, and the dispatch between them.

- `rect_select.py` / `rect_select_reference.py`: RECT selection, the k entries of ΔW with the largest |ΔW / W|.
- `sparse_add.py` / `sparse_add_reference.py`: the exact in-place sparse add (`sparse_add_`) and its undo
  (`restore_`).

Beside the twins: `dispatch.py` picks the compiled kernel, Triton's interpreter or the reference; `topk.py` holds the
RECT keys and the exact top-k over integer keys (used by the reference selection and the regularizers);
`sparse_add_checks.py` the argument checks and dtype tables both sparse add paths validate with.
"""
