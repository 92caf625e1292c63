"""Jinja templates of the model cards hf_edit_patch writes, rendered with huggingface_hub's `ModelCard.from_template`.

Installed as `hf_edit_patch.model_cards` (package data); `hf_edit_patch.cards` fills them.

- `patch_card.md`: the README.md that `EditPatch.save_pretrained` writes next to a patch.
- `evaluation_card.md`: the card of an evaluation (editing metrics and general-task scores before and after the
  patch); embedded as a section of the patch card when a patch is pushed with its evaluation.
"""
