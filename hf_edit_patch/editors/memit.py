"""MEMIT (Meng et al. 2023): many facts at once, the update spread over several MLP output projections.

For each request a target z for the residual stream at the last edited layer (subject's last token) is found by
the value optimization. Then, layer by layer from the first, with K the requests' keys at that layer and R the
remaining residual gap z − h split evenly over the layers left,

    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹,

where C_l = E[k kᵀ] over a text corpus and λ = `mom2_update_weight`. Each layer's update is applied (through hooks;
the model is never modified) before the next layer's keys and gaps are measured. Updates are returned factored
(rank ≤ number of requests).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..requests import EditRequest
from .architectures import ArchSpec, default_memit_layers, mlp_out_name
from .common import Edits, context_templates, input_output_at, keys_at, optimize_value
from .hparams import MemitHParams

logger = logging.getLogger(__name__)


def edited_layers(model: nn.Module, hp: MemitHParams, spec: ArchSpec) -> list[int]:
    return list(hp.layers) if hp.layers is not None else list(default_memit_layers(model, spec))


def target_modules(model: nn.Module, hp: MemitHParams, spec: ArchSpec) -> list[str]:
    return [mlp_out_name(spec, layer) for layer in edited_layers(model, hp, spec)]


def low_rank_edit(u_out: torch.Tensor, v_in: torch.Tensor):
    """An output edit adding (input V) Uᵀ: the effect of ΔW = U Vᵀ with U `[d_out, r]`, V `[d_in, r]`."""

    def edit(output, inputs):
        return output + ((inputs.to(torch.float32) @ v_in) @ u_out.T).to(output.dtype)

    return edit


def memit_deltas(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    hp: MemitHParams,
    spec: ArchSpec,
    second_moments: dict[str, torch.Tensor],
    *,
    show_progress: bool | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (U, V)}` with ΔW = U Vᵀ in each module's own layout."""
    layers = edited_layers(model, hp, spec)
    block = f"{spec.layers}.{layers[-1]}"
    contexts = context_templates(model, tokenizer, hp.n_context_templates, hp.context_length, hp.seed)
    quiet = show_progress is False
    targets = torch.stack(
        [
            optimize_value(model, tokenizer, req, block, contexts, hp, desc=repr(req.target_new))[1]
            for req in tqdm(requests, desc="MEMIT targets", unit="edit", disable=quiet or len(requests) < 2)
        ]
    )  # [n, d]
    edits: Edits = {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(tqdm(layers, desc="MEMIT layers", unit="layer", disable=quiet)):
        name = mlp_out_name(spec, layer)
        keys = torch.stack(
            [
                keys_at(model, tokenizer, name, [c.format(r.prompt) for c in contexts], r.subject, edits).mean(0)
                for r in requests
            ]
        )
        current = torch.stack(
            [input_output_at(model, tokenizer, block, r.prompt, r.subject, edits)[1] for r in requests]
        )
        gap = (targets - current) / (len(layers) - i)  # [n, d]
        c = second_moments[name].to(device=keys.device, dtype=torch.float64)
        k64 = keys.double()  # [n, d_in]
        lam = hp.mom2_update_weight if hp.mom2_update_weight is not None else float(c.shape[0])
        adj = torch.linalg.solve(lam * c + k64.T @ k64, k64.T)  # [d_in, n]
        u_out, v_in = gap.T.double().float(), adj.float()  # ΔW = gap.T @ adj.T: [d, d_in]
        edits[name] = low_rank_edit(u_out, v_in)
        out[name] = (v_in, u_out) if spec.layout == "conv1d" else (u_out, v_in)
        logger.info("MEMIT layer %d: mean residual gap %.3f", layer, float(gap.norm(dim=1).mean()))
    return out
