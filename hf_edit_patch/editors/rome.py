"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection per fact.

For a request, the key k* is the projection's input at the subject's last token, averaged over short prefix
contexts; the value v* is the output that makes the model produce the new target (see
`value.optimize_value`). With C = E[k kᵀ] over a text corpus (the second-moment adjustment), the update

    ΔW = (v* − W k) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k),   k, W k: input and output on the bare prompt,

maps k to v* while disturbing other keys as little as possible in C's metric. Several requests are edited one
after the other, each on the model as the earlier ones left it (applied through hooks; the model itself is never
modified), and the rank-one updates are returned factored, summed only when a regularizer needs ΔW dense.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..progress import progress_bar
from ..requests import EditRequest
from .arch_spec import ArchSpec
from .hooks import Edits, compose, rank_one_edit
from .hparams import RomeHParams
from .layers import default_rome_layer, mlp_out_name
from .prompts import context_templates, input_output_at, subject_key
from .registry import EditorInputs, EditorNeeds, EditorOutput, EditorSpec, KeyStatistics, register_editor
from .value import optimize_value

logger = logging.getLogger(__name__)

__all__ = ["rome_deltas", "solve_left", "target_modules"]


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
    (name,) = target_modules(model, hp, spec)
    contexts = context_templates(model, tokenizer, hp.n_context_templates, hp.context_length, hp.seed)
    c = (second_moments or {}).get(name) if hp.mom2_adjustment else None
    outs, ins = [], []
    edits: Edits = {}
    for req in progress_bar(requests, desc="ROME", unit="edit", show_progress=show_progress, min_items=2):
        left = solve_left(c, subject_key(model, tokenizer, name, req, contexts))
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


def _resolve(model: nn.Module, hp: RomeHParams, spec: ArchSpec) -> RomeHParams:
    return hp if hp.layer is not None else dataclasses.replace(hp, layer=default_rome_layer(model, spec))


def _needs(model: nn.Module, hp: RomeHParams, spec: ArchSpec) -> EditorNeeds:
    if not hp.mom2_adjustment:
        return EditorNeeds()
    modules = tuple(target_modules(model, hp, spec))
    return EditorNeeds(statistics=KeyStatistics(modules, hp.mom2_n_samples, hp.mom2_max_length))


def _compute(model, tokenizer, requests, hp: RomeHParams, spec, inputs: EditorInputs, *, show_progress=None):
    deltas = rome_deltas(model, tokenizer, requests, hp, spec, inputs.second_moments, show_progress=show_progress)
    return EditorOutput(deltas)


register_editor(EditorSpec("rome", RomeHParams, _compute, needs=_needs, resolve=_resolve))
