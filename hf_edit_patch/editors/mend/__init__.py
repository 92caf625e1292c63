"""MEND (Mitchell et al. 2022): a trained editor network that turns the fine-tuning gradient of an edit into ΔW.

For an edited matrix W (an MLP output projection), the gradient of the edit's fine-tuning loss L (the NLL of
`target_new` after the prompt) is a sum of rank-one terms over the tokens t of the edit sequence,
∇_W L = Σ_t δ_t u_tᵀ, with u_t the matrix's input and δ_t = ∂L/∂(W u_t) the gradient at its output. MEND transforms
each pair instead of the gradient: with z_t = [norm(u_t); norm(δ_t)] (each dimension standardized by the mean and
standard deviation measured on the training records),

    h_t = z_t + ReLU(s¹_ℓ ⊙ (U₁V₁ z_t + b₁) + o¹_ℓ),   [ũ_t; δ̃_t] = h_t + s²_ℓ ⊙ (U₂V₂ h_t + b₂) + o²_ℓ,

one network shared by the edited layers (low-rank U V, rank `rank`; U starts at zero so the network starts as the
identity), with a scale s_ℓ and offset o_ℓ per layer ℓ, and

    ΔW_ℓ = −α_ℓ Σ_t δ̃_t ũ_tᵀ,     α_ℓ a learned step size per layer (starting at `edit_lr`).

Training (`train`, `training.py`) keeps the model frozen and optimizes only the editor (`network.py`); the edit
(`edit.py`) is registered as `method="mend"`. Editors are saved, loaded and shared with `hf_edit_patch.hub.mend`.

Example:
    ```python
    import json
    from pathlib import Path
    import hf_edit_patch as hep
    from hf_edit_patch.editors import mend
    from hf_edit_patch.hub.mend import save_mend_editor

    records = json.loads(Path("zsre_eval.json").read_text())
    editor = mend.train(model, tokenizer, records[:200], max_steps=500)
    save_mend_editor(editor, "out/mend-smollm2")        # mend_config.json + mend_model.safetensors + README.md
    patch = hep.edit(model, tokenizer, [hep.EditRequest.from_zsre(records[300])], method="mend",
                     hparams={"editor": "out/mend-smollm2"}, keep_ratio=0.4)
    ```
"""

from __future__ import annotations

from .edit import edit_gradients, mend_deltas
from .network import MendConfig, MendEditor, MendError
from .training import train

__all__ = ["MendConfig", "MendEditor", "MendError", "edit_gradients", "mend_deltas", "train"]
