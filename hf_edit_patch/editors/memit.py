"""MEMIT (Meng et al. 2023): many facts at once, the update spread over several MLP output projections.

Targets, keys and the spreading of the residual over the layers are `spread.spread_over_layers`. MEMIT's solve, with
K the requests' keys at a layer and R that layer's share of the residual gap,

    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹,

where C_l = E[k kᵀ] over a text corpus and λ = `mom2_update_weight` (default: the MLP width / 16, chosen on ZsRE
records 0-299 with SmolLM2-135M; see docs/results.md, "MEMIT reliability: the figure a user gets").
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..requests import EditRequest
from .arch_spec import ArchSpec
from .hparams import MemitHParams
from .layers import default_memit_layers, mlp_out_name, mlp_width
from .registry import EditorInputs, EditorNeeds, EditorOutput, EditorSpec, KeyStatistics, register_editor
from .spread import LayerStep, spread_over_layers

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LAMBDA_PER_WIDTH", "default_lambda", "edited_layers", "memit_deltas", "target_modules"]

DEFAULT_LAMBDA_PER_WIDTH = 1 / 16
"""λ when `mom2_update_weight` is None, per unit of MLP width (SmolLM2-135M: 1536 / 16 = 96)."""


def default_lambda(width: int) -> float:
    """The default λ for an MLP of this width."""
    return float(width) * DEFAULT_LAMBDA_PER_WIDTH


def edited_layers(model: nn.Module, hp: MemitHParams, spec: ArchSpec) -> list[int]:
    """`hp.layers`, else the architecture's default MEMIT layers for this model."""
    return list(hp.layers) if hp.layers is not None else list(default_memit_layers(model, spec))


def target_modules(model: nn.Module, hp: MemitHParams, spec: ArchSpec) -> list[str]:
    return [mlp_out_name(spec, layer) for layer in edited_layers(model, hp, spec)]


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

    def solve(step: LayerStep) -> torch.Tensor:
        c = second_moments[step.module].to(device=step.keys.device, dtype=torch.float64)
        k64 = step.keys.double()  # [n, d_in]
        lam = hp.mom2_update_weight if hp.mom2_update_weight is not None else default_lambda(c.shape[0])
        return torch.linalg.solve(lam * c + k64.T @ k64, k64.T)  # [d_in, n]

    layers = edited_layers(model, hp, spec)
    return spread_over_layers(
        model, tokenizer, requests, hp, spec, layers, solve, desc="MEMIT", show_progress=show_progress
    )


def _resolve(model: nn.Module, hp: MemitHParams, spec: ArchSpec) -> MemitHParams:
    """The layers and λ actually used, so that the patch records them."""
    weight = (
        hp.mom2_update_weight if hp.mom2_update_weight is not None else default_lambda(mlp_width(model, spec))
    )
    return dataclasses.replace(hp, layers=edited_layers(model, hp, spec), mom2_update_weight=weight)


def _needs(model: nn.Module, hp: MemitHParams, spec: ArchSpec) -> EditorNeeds:
    modules = tuple(target_modules(model, hp, spec))
    return EditorNeeds(statistics=KeyStatistics(modules, hp.mom2_n_samples, hp.mom2_max_length))


def _compute(model, tokenizer, requests, hp: MemitHParams, spec, inputs: EditorInputs, *, show_progress=None):
    deltas = memit_deltas(model, tokenizer, requests, hp, spec, inputs.second_moments, show_progress=show_progress)
    return EditorOutput(deltas)


register_editor(EditorSpec("memit", MemitHParams, _compute, needs=_needs, resolve=_resolve))
