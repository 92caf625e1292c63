"""`PatchedModel`: edit patches attached to a model in place, stacked, and taken off exactly.

- `model.py`: the `PatchedModel` wrapper and its public API (attach, stack, remove, disable, edit, compact, unload,
  merge);
- `writes.py`: validating a patch against the weights, writing it with the sparse-add kernel, restoring the saved
  values;
- `stack.py`: the stack stored on the model, shared by every wrapper, and its lock;
- `persistence.py`: saving, loading and pushing a whole stack.
"""

from .model import PatchedModel

__all__ = ["PatchedModel"]
