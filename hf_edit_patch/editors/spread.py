"""An update spread over several MLP output projections, as MEMIT and AlphaEdit make it; only the solve differs.

For each request a target z for the residual stream at the last edited layer (the subject's last token) is found by
the value optimization (`value.optimize_values`, all requests together in batched chunks). Then, layer by layer from
the first, with K the requests' keys at that layer and R the remaining residual gap z − h split evenly over the layers
left, the method's solve gives V `[d_in, n]` and the layer's update is ΔW = Rᵀ Vᵀ. Each layer's update is applied
(through hooks; the model is never modified) before the next layer's keys and gaps are measured (one batched pass per
layer, in chunks of about `v_batch_tokens` tokens). Updates are returned factored (rank ≤ number of requests).

Example:
    ```python
    >>> from hf_edit_patch.editors.spread import spread_over_layers
    >>> def solve(step):  # plain least squares: ΔW K ≈ R
    ...     k = step.keys.double()
    ...     return torch.linalg.pinv(k).float()
    >>> deltas = spread_over_layers(model, tokenizer, requests, hp, spec, [4, 5, 6], solve)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..progress import progress_bar
from ..requests import EditRequest
from .arch_spec import ArchSpec
from .hooks import Edits, low_rank_edit
from .hparams import ValueOptHParams
from .layers import mlp_out_name
from .prompts import context_templates, subject_activations
from .value import optimize_values

logger = logging.getLogger(__name__)

__all__ = ["LayerStep", "spread_over_layers"]


@dataclass(frozen=True)
class LayerStep:
    """What a layer's solve sees.

    Args:
        layer: the layer index.
        module: the edited matrix, e.g. `"model.layers.5.mlp.down_proj"`.
        keys: the requests' keys at `module`, `[n, d_in]` float32, with the earlier layers' updates applied.
        gap: the layer's share of the residual gap, `[n, d_out]` float32.
        keys_of: the keys of other requests at `module`, measured the same way (`[m, d_in]` float32).
    """

    layer: int
    module: str
    keys: torch.Tensor
    gap: torch.Tensor
    keys_of: Callable[[list[EditRequest]], torch.Tensor]


def spread_over_layers(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    hp: ValueOptHParams,
    spec: ArchSpec,
    layers: list[int],
    solve: Callable[[LayerStep], torch.Tensor],
    *,
    desc: str = "MEMIT",
    show_progress: bool | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (U, V)}` with ΔW = U Vᵀ in each module's own layout; `solve(step)` gives V `[d_in, n]` per layer.

    Args:
        model, tokenizer: the model edited (never modified) and its tokenizer.
        requests: the edit requests.
        hp: the value optimization's settings (and the context sampling's).
        spec: the model's `ArchSpec`.
        layers: the edited layers, ascending; the targets are found at the last one.
        solve: the method's solve for one layer, V such that ΔW = step.gapᵀ Vᵀ.
        desc: the method's name, for progress bars and logs.
        show_progress: `False` hides the progress bars.
    """
    block = f"{spec.layers}.{layers[-1]}"
    contexts = context_templates(model, tokenizer, hp.n_context_templates, hp.context_length, hp.seed)
    _, targets = optimize_values(
        model, tokenizer, requests, block, contexts, hp, show_progress=show_progress, desc=f"{desc} targets"
    )  # [n, d]
    edits: Edits = {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    bar = progress_bar(layers, desc=f"{desc} layers", unit="layer", show_progress=show_progress, min_items=2)
    for i, layer in enumerate(bar):
        name = mlp_out_name(spec, layer)

        def keys_of(reqs: list[EditRequest], name: str = name) -> torch.Tensor:
            acts = subject_activations(
                model, tokenizer, reqs, contexts, keys=[name], edits=edits, batch_tokens=hp.v_batch_tokens
            )
            return acts[name]

        acts = subject_activations(
            model,
            tokenizer,
            requests,
            contexts,
            keys=[name],
            outputs=[block],
            edits=edits,
            batch_tokens=hp.v_batch_tokens,
        )
        keys, current = acts[name], acts[block]
        gap = (targets - current) / (len(layers) - i)  # [n, d_out]
        v_in = solve(LayerStep(layer=layer, module=name, keys=keys, gap=gap, keys_of=keys_of)).float()  # [d_in, n]
        u_out = gap.T.float()  # ΔW = gapᵀ Vᵀ: [d_out, d_in]
        edits[name] = low_rank_edit(u_out, v_in)
        out[name] = (v_in, u_out) if spec.layout == "conv1d" else (u_out, v_in)
        logger.info("%s layer %d: mean residual gap %.3f", desc, layer, float(gap.norm(dim=1).mean()))
    return out
