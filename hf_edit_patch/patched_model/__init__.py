"""`PatchedModel`: edit patches attached to a model in place, stacked, and taken off exactly.

- `model.py`: the `PatchedModel` wrapper and its public API (attach, stack, remove, disable, edit, consolidate,
  conflicts, compact, unload, merge);
- `consolidate.py`: the accumulated update of a stack: a run of patches consolidated into one, an edit regularized
  against the stack;
- `writes.py`: validating a patch against the weights, writing it with the sparse-add kernel, restoring the saved
  values;
- `stack.py`: the stack stored on the model, shared by every wrapper, and its lock;
- `persistence.py`: saving, loading and pushing a whole stack (a series: manifest, one card, append commits).
"""

from .model import PatchedModel

__all__ = ["PatchedModel"]
