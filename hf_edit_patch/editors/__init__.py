"""Editing methods. Each computes ΔW for a few modules against the model's current weights and leaves the model
unchanged; `hf_edit_patch.edit` turns the result into an `EditPatch`."""
