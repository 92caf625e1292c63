"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection per fact.

For a request, the key k* is the projection's input at the subject's last token, averaged over short prefix
contexts; the value v* is the output that makes the model produce the new target (see
`common.optimize_value`). With C = E[k kᵀ] over a text corpus (the second-moment adjustment), the update

    ΔW = (v* − W k) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k),   k, W k: input and output on the bare prompt,

maps k to v* while disturbing other keys as little as possible in C's metric. Several requests are edited one
after the other, each on the model as the earlier ones left it (applied through hooks; the model itself is never
modified), and the rank-one updates are returned factored, summed only when a regularizer needs ΔW dense.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..requests import EditRequest
from .architectures import ArchSpec, default_rome_layer, mlp_out_name
from .common import Edits, compose, context_templates, input_output_at, keys_at, optimize_value
from .hparams import RomeHParams

logger = logging.getLogger(__name__)


def rank_one_edit(u_out: torch.Tensor, v_in: torch.Tensor):
    """An output edit adding (input · v_in) u_out, i.e. the effect of ΔW = u_out v_inᵀ on a module."""

    def edit(output, inputs):
        return output + (inputs.to(torch.float32) @ v_in)[..., None].to(output.dtype) * u_out.to(output.dtype)

    return edit


def solve_left(second_moment: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """C⁻¹ k (float64 solve), or k itself without the second-moment adjustment; normalized."""
    if second_moment is None:
        left = key.double()
    else:
        c = second_moment.to(device=key.device, dtype=torch.float64)
        ridge = 1e-6 * c.diagonal().mean().clamp_min(1e-12)  # C is a sample moment: keep the solve well posed
        left = torch.linalg.solve(c + ridge * torch.eye(c.shape[0], dtype=c.dtype, device=c.device), key.double())
    return (left / left.norm()).float()


def rome_deltas(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    hp: RomeHParams,
    spec: ArchSpec,
    second_moments: dict[str, torch.Tensor] | None,
    *,
    show_progress: bool | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (U, V)}` with ΔW = U Vᵀ in the module's own layout (one rank-one term per request)."""
    layer = hp.layer if hp.layer is not None else default_rome_layer(model, spec)
    name = mlp_out_name(spec, layer)
    contexts = context_templates(model, tokenizer, hp.n_context_templates, hp.context_length, hp.seed)
    c = (second_moments or {}).get(name) if hp.mom2_adjustment else None
    outs, ins = [], []
    edits: Edits = {}
    for req in tqdm(requests, desc="ROME", unit="edit", disable=show_progress is False or len(requests) < 2):
        key = keys_at(model, tokenizer, name, [c.format(req.prompt) for c in contexts], req.subject).mean(0)
        left = solve_left(c, key)
        _, v_star = optimize_value(model, tokenizer, req, name, contexts, hp, edits=edits, desc=repr(req.target_new))
        cur_in, cur_out = input_output_at(model, tokenizer, name, req.prompt, req.subject, edits)
        right = (v_star - cur_out) / left.dot(cur_in)
        outs.append(right)
        ins.append(left)
        step = rank_one_edit(right, left)
        edits[name] = compose(edits[name], step) if name in edits else step
    u_out, v_in = torch.stack(outs, 1), torch.stack(ins, 1)  # [d_out, n], [d_in, n]
    if spec.layout == "conv1d":  # weight is [in, out]
        return {name: (v_in, u_out)}
    return {name: (u_out, v_in)}


def target_modules(model: nn.Module, hp: RomeHParams, spec: ArchSpec) -> list[str]:
    return [mlp_out_name(spec, hp.layer if hp.layer is not None else default_rome_layer(model, spec))]
