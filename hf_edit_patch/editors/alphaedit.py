"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update, projected onto the null space of the preserved knowledge.

Keys, target values and the spreading of the residual over the layers are MEMIT's (`memit.py`). What changes is the
solve. With C = E[k kᵀ] the second moment of the layer's keys over a text corpus (the preserved knowledge K₀K₀ᵀ up to
a scale), its eigenvectors Û whose eigenvalues are below `nullspace_threshold` span the directions no preserved key
uses, and P = Û Ûᵀ projects onto them. Layer by layer, with K `[n, d_in]` the requests' keys, R `[n, d_out]` the
residual share of the layer and K_p the keys of previously edited facts,

    ΔW = Rᵀ K P (K_pᵀ K_p P + Kᵀ K P + l2·I)⁻¹      (the paper's Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + I)⁻¹)

which equals (P (K_pᵀ K_p + Kᵀ K) + l2·I)⁻¹ P Kᵀ R transposed, AlphaEdit's implementation. Because
(A P + l2·I)⁻¹ and P commute through (P A + l2·I)⁻¹ P = P (A P + l2·I)⁻¹, ΔW = Rᵀ Vᵀ with V = P (A P + l2·I)⁻¹ Kᵀ
`[d_in, n]`: every row of ΔW lies in P's range, so ΔW k₀ = 0 for every key k₀ in the span of the preserved keys.

Sequential editing stores nothing global: on a `PatchedModel`, K_p holds the keys of the requests recorded in its
active patches, recomputed on the current weights (`preserve_parent_keys`); on a plain model K_p is empty.

The eigendecomposition of C is cached next to the statistics it comes from (`<stats cache>/nullspace/`, one
safetensors file per module, under the statistics' own `StatsKey`), so another threshold needs no recomputation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hub.files import atomic_path
from ..modules import weight_layout
from ..requests import EditRequest
from .architectures import ArchSpec, mlp_out_name
from .common import Edits, context_templates, input_output_at, keys_at, optimize_value
from .hparams import AlphaEditHParams
from .memit import edited_layers, low_rank_edit
from .stats import StatsCache, StatsError, StatsKey, get_second_moments, stats_keys

logger = logging.getLogger(__name__)

__all__ = [
    "NULLSPACE_DIR",
    "alphaedit_deltas",
    "eigendecompose",
    "null_space_projections",
    "parent_requests",
    "projection",
    "target_modules",
]

NULLSPACE_DIR = "nullspace"
_FORMAT = "hf_edit_patch.nullspace"
_FORMAT_VERSION = "1"


def target_modules(model: nn.Module, hp: AlphaEditHParams, spec: ArchSpec) -> list[str]:
    return [mlp_out_name(spec, layer) for layer in edited_layers(model, hp, spec)]


# --------------------------------------------------------------------------------------------------------------------
# The projection and its cache
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


def _nullspace_path(cache: StatsCache, key: StatsKey) -> Path:
    return cache.cache_dir / NULLSPACE_DIR / key.filename()


def _load_eigen(cache: StatsCache, key: StatsKey, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    from safetensors import safe_open

    path = _nullspace_path(cache, key)
    if not path.is_file():
        return None
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            values, vectors = f.get_tensor("eigenvalues"), f.get_tensor("eigenvectors")
    except Exception as exc:  # safetensors raises its own error type for malformed files
        logger.warning("ignoring the unreadable null-space file %s (it will be recomputed): %s", path, exc)
        return None
    ok = (
        metadata.get("format") == _FORMAT
        and metadata.get("format_version") == _FORMAT_VERSION
        and metadata.get("key") == json.dumps(key.to_dict(), sort_keys=True)
        and values.shape == (width,)
        and vectors.shape == (width, width)
        and bool(torch.isfinite(values).all())
        and bool(torch.isfinite(vectors).all())
    )
    if not ok:
        logger.warning("ignoring %s: it does not hold the eigendecomposition of %s (recomputing it)", path, key)
        return None
    logger.info("using the cached eigendecomposition of %s (%s)", key.module, path)
    return values, vectors


def _save_eigen(cache: StatsCache, key: StatsKey, values: torch.Tensor, vectors: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path = _nullspace_path(cache, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "key": json.dumps(key.to_dict(), sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file({"eigenvalues": values.contiguous(), "eigenvectors": vectors.contiguous()}, tmp, metadata=metadata)


def null_space_projections(
    model: nn.Module,
    tokenizer: Any,
    module_names: list[str],
    *,
    threshold: float,
    stats_dataset: str | os.PathLike | None = None,
    text_field: str = "text",
    sample_count: int = 1000,
    max_length: int = 256,
    cache: StatsCache | None = None,
    allow_model_sampled: bool = False,
    show_progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """
    AlphaEdit's projection P (float64 `[d, d]`) of each module, from cached eigendecompositions when there are some.

    Missing ones are computed from the key statistics (themselves cached or computed by `get_second_moments`, with
    the same arguments) and cached. A model without an id caches nothing, as for the statistics.

    Example:

    ```python
    >>> from hf_edit_patch.editors.alphaedit import null_space_projections
    >>> P = null_space_projections(model, tokenizer, ["model.layers.5.mlp.down_proj"], threshold=1e-2,
    ...                            stats_dataset="corpus.jsonl")  # doctest: +SKIP
    >>> P["model.layers.5.mlp.down_proj"].shape  # doctest: +SKIP
    torch.Size([1536, 1536])
    ```
    """
    options = {
        "stats_dataset": stats_dataset,
        "text_field": text_field,
        "sample_count": sample_count,
        "max_length": max_length,
        "allow_model_sampled": allow_model_sampled,
    }
    cache = cache if cache is not None else StatsCache()
    keys = stats_keys(model, module_names, **options)
    eigen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, key in keys.items():
        module = model.get_submodule(name)
        width = module.weight.shape[1 if weight_layout(module) == "linear" else 0]
        found = _load_eigen(cache, key, width)
        if found is not None:
            eigen[name] = found
    missing = [name for name in module_names if name not in eigen]
    if missing:
        moments = get_second_moments(model, tokenizer, missing, cache=cache, show_progress=show_progress, **options)
        for name in missing:
            eigen[name] = eigendecompose(moments[name])
            if name in keys:
                _save_eigen(cache, keys[name], *eigen[name])
    return {name: projection(*eigen[name], threshold, name=name) for name in module_names}


# --------------------------------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------------------------------


def parent_requests(model: nn.Module) -> list[EditRequest]:
    """The requests recorded in the active patches of a `PatchedModel` (none for another model), deduplicated."""
    if not getattr(model, "is_patched_model", False):
        return []
    seen, out = set(), []
    for patch in model.patches.values():
        for record in patch.config.requests:
            try:
                req = EditRequest.from_dict(record)
            except (ValueError, TypeError):
                continue
            ident = (req.prompt, req.subject)
            if ident not in seen:
                seen.add(ident)
                out.append(req)
    return out


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
    layers = edited_layers(model, hp, spec)
    block = f"{spec.layers}.{layers[-1]}"
    contexts = context_templates(model, tokenizer, hp.n_context_templates, hp.context_length, hp.seed)
    quiet = show_progress is False
    targets = torch.stack(
        [
            optimize_value(model, tokenizer, req, block, contexts, hp, desc=repr(req.target_new))[1]
            for req in tqdm(requests, desc="AlphaEdit targets", unit="edit", disable=quiet or len(requests) < 2)
        ]
    )  # [n, d]
    previous = list(previous or [])

    def layer_keys(name: str, reqs: list[EditRequest], edits: Edits) -> torch.Tensor:
        return torch.stack(
            [
                keys_at(model, tokenizer, name, [c.format(r.prompt) for c in contexts], r.subject, edits).mean(0)
                for r in reqs
            ]
        )

    edits: Edits = {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(tqdm(layers, desc="AlphaEdit layers", unit="layer", disable=quiet)):
        name = mlp_out_name(spec, layer)
        keys = layer_keys(name, requests, edits).double()  # [n, d_in]
        current = torch.stack(
            [input_output_at(model, tokenizer, block, r.prompt, r.subject, edits)[1] for r in requests]
        )
        gap = (targets - current) / (len(layers) - i)  # [n, d_out]
        p = projections[name].to(device=keys.device, dtype=torch.float64)
        a = keys.T @ keys
        if previous:
            k_p = layer_keys(name, previous, edits).double()
            a = a + k_p.T @ k_p
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        v_in = (p @ torch.linalg.solve(a @ p + hp.l2 * eye, keys.T)).float()  # [d_in, n]
        u_out = gap.T.float()  # [d_out, n]
        edits[name] = low_rank_edit(u_out, v_in)
        out[name] = (v_in, u_out) if spec.layout == "conv1d" else (u_out, v_in)
        logger.info(
            "AlphaEdit layer %d: mean residual gap %.3f, |K_p| = %d",
            layer,
            float(gap.norm(dim=1).mean()),
            len(previous),
        )
    return out
