"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update, projected onto the null space of the preserved knowledge.

Keys, target values and the spreading of the residual over the layers are MEMIT's (`spread.py`). What changes is the
solve. With C = E[k kᵀ] the second moment of the layer's keys over a text corpus (the preserved knowledge K₀K₀ᵀ up to
a scale), its eigenvectors Û whose eigenvalues are below `nullspace_threshold` span the directions no preserved key
uses, and P = Û Ûᵀ projects onto them. Layer by layer, with K `[n, d_in]` the requests' keys, R `[n, d_out]` the
residual share of the layer and K_p the keys of previously edited facts,

    ΔW = Rᵀ K P (K_pᵀ K_p P + Kᵀ K P + l2·I)⁻¹      (the paper's Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + I)⁻¹)

which equals (P (K_pᵀ K_p + Kᵀ K) + l2·I)⁻¹ P Kᵀ R transposed, AlphaEdit's implementation. Because
(A P + l2·I)⁻¹ and P commute through (P A + l2·I)⁻¹ P = P (A P + l2·I)⁻¹, ΔW = Rᵀ Vᵀ with V = P (A P + l2·I)⁻¹ Kᵀ
`[d_in, n]`: every row of ΔW lies in P's range, so ΔW k₀ = 0 for every key k₀ in the span of the preserved keys.

Sequential editing stores nothing global: on a `PatchedModel`, K_p holds the keys of the requests recorded in its
active patches, recomputed on the current weights (`preserve_parent_keys`; the entry point provides those requests);
on a plain model K_p is empty.

The eigendecomposition of C (`eigendecompose`) does not depend on the threshold; `projection` turns it into P.
`hf_edit_patch.editing.statistics.null_space_projections` caches the eigendecomposition next to the statistics it
comes from, so another threshold needs no recomputation.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from ..errors import StatsError
from ..requests import EditRequest
from .arch_spec import ArchSpec
from .hparams import AlphaEditHParams
from .layers import mlp_out_name
from .memit import edited_layers
from .registry import EditorInputs, EditorNeeds, EditorOutput, EditorSpec, KeyStatistics, register_editor
from .spread import LayerStep, spread_over_layers

logger = logging.getLogger(__name__)

__all__ = [
    "alphaedit_deltas",
    "eigendecompose",
    "projection",
    "target_modules",
]


def target_modules(model: nn.Module, hp: AlphaEditHParams, spec: ArchSpec) -> list[str]:
    return [mlp_out_name(spec, layer) for layer in edited_layers(model, hp, spec)]


# --------------------------------------------------------------------------------------------------------------------
# The projection
# --------------------------------------------------------------------------------------------------------------------


def eigendecompose(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(eigenvalues, eigenvectors)` of a symmetric second moment, ascending (float64 solve, float32 vectors)."""
    c = second_moment.detach().to("cpu", torch.float64)
    values, vectors = torch.linalg.eigh((c + c.T) / 2)
    return values, vectors.float()


def projection(values: torch.Tensor, vectors: torch.Tensor, threshold: float, *, name: str = "") -> torch.Tensor:
    """P = Û Ûᵀ (float64) over the eigenvectors whose eigenvalue is below `threshold`."""
    keep = values < threshold
    if not bool(keep.any()):
        raise StatsError(
            f"no eigenvalue of the key statistics of {name or 'the module'} is below nullspace_threshold="
            f"{threshold:g} (the smallest is {float(values.min()):.3g}): the null space is empty and AlphaEdit "
            "could not change anything; raise nullspace_threshold"
        )
    if bool(keep.all()):
        logger.warning(
            "every eigenvalue of the key statistics of %s is below nullspace_threshold=%g: P = I and AlphaEdit "
            "protects nothing (the largest eigenvalue is %.3g)",
            name,
            threshold,
            float(values.max()),
        )
    u = vectors[:, keep].double()
    logger.info("%s: null space of dimension %d of %d", name, int(keep.sum()), values.numel())
    return u @ u.T


# --------------------------------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------------------------------


def alphaedit_deltas(
    model: nn.Module,
    tokenizer: Any,
    requests: list[EditRequest],
    hp: AlphaEditHParams,
    spec: ArchSpec,
    projections: dict[str, torch.Tensor],
    *,
    previous: list[EditRequest] | None = None,
    show_progress: bool | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (U, V)}` with ΔW = U Vᵀ in each module's own layout; `previous` gives K_p (see the module doc)."""
    previous = list(previous or [])
    logger.info("AlphaEdit: |K_p| = %d", len(previous))

    def solve(step: LayerStep) -> torch.Tensor:
        keys = step.keys.double()  # [n, d_in]
        p = projections[step.module].to(device=keys.device, dtype=torch.float64)
        a = keys.T @ keys
        if previous:
            k_p = step.keys_of(previous).double()
            a = a + k_p.T @ k_p
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return p @ torch.linalg.solve(a @ p + hp.l2 * eye, keys.T)  # [d_in, n]

    layers = edited_layers(model, hp, spec)
    return spread_over_layers(
        model, tokenizer, requests, hp, spec, layers, solve, desc="AlphaEdit", show_progress=show_progress
    )


def _resolve(model: nn.Module, hp: AlphaEditHParams, spec: ArchSpec) -> AlphaEditHParams:
    return dataclasses.replace(hp, layers=edited_layers(model, hp, spec))


def _needs(model: nn.Module, hp: AlphaEditHParams, spec: ArchSpec) -> EditorNeeds:
    modules = tuple(target_modules(model, hp, spec))
    statistics = KeyStatistics(modules, hp.mom2_n_samples, hp.mom2_max_length, hp.nullspace_threshold)
    return EditorNeeds(statistics=statistics, parent_requests=hp.preserve_parent_keys)


def _compute(model, tokenizer, requests, hp: AlphaEditHParams, spec, inputs: EditorInputs, *, show_progress=None):
    previous = inputs.parent_requests
    deltas = alphaedit_deltas(
        model, tokenizer, requests, hp, spec, inputs.projections, previous=previous, show_progress=show_progress
    )
    return EditorOutput(deltas, {"preserved_requests": len(previous)})


register_editor(EditorSpec("alphaedit", AlphaEditHParams, _compute, needs=_needs, resolve=_resolve))
