"""The accumulated update of a stack of edits, per edited matrix: its norm and spectrum against the weight's.

Long runs of edits degrade a model through the sum of the updates: its norm grows and the edited matrix becomes
ill-conditioned (PRUNE, Ma et al. 2024; norm growth in lifelong editing). `accumulated_update_stats` measures, for
each matrix, ΔW_acc = W_now − W_before:

- `fro`, `rel_fro`: ‖ΔW_acc‖_F, and over ‖W_before‖_F;
- `spectral`, `rel_spectral`: σ_max(ΔW_acc), and over σ_max(W_before);
- `rank`: the numerical rank of ΔW_acc (singular values above max(m, n) · ε · σ_max, in float64);
- `cond_update`: σ_max / σ_min of ΔW_acc over its numerical rank;
- `cond_before`, `cond_edited`: the condition numbers σ_max / σ_min of W_before and of W_now.

Example:
    ```python
    from hf_edit_patch.evaluation.accumulated import accumulated_update_stats

    before = {"model.layers.5.mlp.down_proj.weight": w.detach().clone()}
    ...  # edits stacked on the model
    accumulated_update_stats(before, pm)["model.layers.5.mlp.down_proj.weight"]["cond_edited"]
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["accumulated_update_stats", "stack_update_stats"]


def _cond(s: torch.Tensor) -> float | None:
    return float(s[0] / s[-1]) if s.numel() and float(s[-1]) > 0 else None


def accumulated_update_stats(before: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, dict[str, Any]]:
    """Norms, rank and condition numbers of W_now − W_before for every matrix named in `before`.

    Args:
        before: `{parameter name: weight before the edits}` (2-D tensors), as in `model.named_parameters()`.
        model: the edited model, or a `PatchedModel` (its wrapped model, as currently patched).

    Raises:
        KeyError: a name of `before` that is not a parameter of `model`.
    """
    if getattr(model, "is_patched_model", False):
        model = model.base_model
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, dict[str, Any]] = {}
    for name, w0 in before.items():
        if name not in params:
            raise KeyError(f"{name!r} is not a parameter of the model")
        out[name] = _update_stats(w0, params[name])
    return out


def stack_update_stats(pm: Any) -> dict[str, dict[str, Any]]:
    """`accumulated_update_stats` of a `PatchedModel`'s active patches, per module they change, against the weights
    under the stack (read from its undo data, bit for bit; the model is not touched).

    Keyed by module name (`model.layers.5.mlp.down_proj`), in the order the patches first change them.

    Example:
        ```python
        >>> stack_update_stats(pm)["model.layers.5.mlp.down_proj"]["rel_fro"]  # doctest: +SKIP
        1.79
        ```
    """
    from ..modules import resolve_weight
    from ..patched_model.consolidate import weights_under
    from ..patched_model.stack import stack_of

    if not getattr(pm, "is_patched_model", False):
        raise TypeError(f"stack_update_stats takes a PatchedModel, got {type(pm).__name__}")
    modules = list(dict.fromkeys(m for patch in pm.patches.values() for m in patch.deltas))
    with pm.lock:
        under = weights_under(pm.base_model, stack_of(pm.base_model), modules, 0)
        return {m: _update_stats(under[m], resolve_weight(pm.base_model, m)[1]) for m in modules}


def _update_stats(w0: torch.Tensor, now: torch.Tensor) -> dict[str, Any]:
    now = now.detach().to(torch.float64)
    w0 = w0.detach().to(now.device, torch.float64)
    delta = now - w0
    s_delta = torch.linalg.svdvals(delta)
    s_before = torch.linalg.svdvals(w0)
    s_now = torch.linalg.svdvals(now)
    tol = max(delta.shape) * torch.finfo(torch.float64).eps * float(s_delta[0]) if s_delta.numel() else 0.0
    kept = s_delta[s_delta > tol]
    fro, fro_before = float(torch.linalg.vector_norm(delta)), float(torch.linalg.vector_norm(w0))
    return {
        "fro": fro,
        "rel_fro": fro / fro_before if fro_before else None,
        "spectral": float(s_delta[0]),
        "rel_spectral": float(s_delta[0] / s_before[0]) if float(s_before[0]) else None,
        "rank": int(kept.numel()),
        "cond_update": _cond(kept),
        "cond_before": _cond(s_before),
        "cond_edited": _cond(s_now),
    }
