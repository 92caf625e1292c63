"""Independent reference for what the weights must be: base + patches applied in order, computed densely."""

from __future__ import annotations

import torch

import hf_edit_patch as hep


def random_patch(model, targets, keep_ratio=0.4, scale=0.05, seed=0, regularizer="rect", value_dtype="auto"):
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in targets:
        w = model.get_submodule(name).weight
        deltas[name] = torch.randn(w.shape, generator=gen, dtype=torch.float32) * scale
    return hep.EditPatch.from_deltas(
        deltas, model, keep_ratio=keep_ratio, regularizer=regularizer, value_dtype=value_dtype
    )


def expected_weights(base_state: dict[str, torch.Tensor], patches: list[hep.EditPatch], model) -> dict:
    """`base_state` with each patch applied in order as cast(float32(W) + float32(ΔW)) on its entries."""
    state = {k: v.clone() for k, v in base_state.items()}
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for patch in patches:
        for module, delta in patch.deltas.items():
            key = param_names[id(model.get_submodule(module).weight)]
            w = state[key]
            mask = torch.zeros(w.numel(), dtype=torch.bool)
            mask[delta.flat_indices] = True
            mask = mask.view(w.shape)
            summed = (w.to(torch.float32) + delta.to_dense(torch.float32)).to(w.dtype)
            state[key] = torch.where(mask, summed, w)
    return state
