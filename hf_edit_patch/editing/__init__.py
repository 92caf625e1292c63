"""The editing entry point: `edit()` computes an editor's update, regularizes it and wraps it as an `EditPatch`.

- `update.py`: `compute_update`, the editor's whole ΔW for some requests (statistics provided, model unchanged);
- `inputs.py`: what an editor declares it needs, provided (statistics, parent requests, a saved editor);
- `entry.py`: `edit` and `regularize_update`, the update turned into a patch by a regularizer;
- `auto.py`: `keep_ratio="auto"`, the smallest budget that keeps every request working.
"""

from .auto import AUTO_KEEP_RATIOS
from .entry import DEFAULT_KEEP_RATIO, edit, regularize_update
from .update import METHODS, EditUpdate, compute_update

__all__ = [
    "AUTO_KEEP_RATIOS",
    "DEFAULT_KEEP_RATIO",
    "METHODS",
    "EditUpdate",
    "compute_update",
    "edit",
    "regularize_update",
]
