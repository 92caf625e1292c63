"""Editing methods. Each computes ΔW for a few modules against the model's current weights and leaves the model
unchanged; `hf_edit_patch.edit` turns the result into an `EditPatch`.

Each method is one module (or folder) that registers an `EditorSpec` (`registry.py`) when imported: `rome`, `memit`,
`alphaedit`, `ft`, `kn`, `mend`. Importing this package registers all of them. Shared machinery sits beside them:
`arch_spec`, `architectures` and `layers` (where things are in a model), `tracing` and `hooks` (activations read and
edited through forward hooks), `prompts` and `value` (keys, contexts, the value optimization), `spread` (an update
spread over several layers), `second_moments` and `sampled_text` (key statistics, computed), `hparams`.
"""

from __future__ import annotations

from . import alphaedit, ft, kn, memit, mend, rome

__all__ = ["alphaedit", "ft", "kn", "memit", "mend", "rome"]
