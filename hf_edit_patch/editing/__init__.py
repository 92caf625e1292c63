"""The editing entry point: `edit()` computes an editor's update, regularizes it and wraps it as an `EditPatch`."""

from .update import AUTO_KEEP_RATIOS, METHODS, EditUpdate, compute_update, edit, regularize_update

__all__ = ["AUTO_KEEP_RATIOS", "METHODS", "EditUpdate", "compute_update", "edit", "regularize_update"]
