"""FT-L: fine-tuning one MLP output projection on the new targets, each ΔW entry clamped to ±norm_constraint.

The baseline of the paper's comparisons: a dense ΔW that the regularizers then sparsify. The weight itself is not
modified: the trainable ΔW acts through a forward hook.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..batching import model_device, pad_batch, pad_id, target_token_ids
from ..progress import progress_bar
from ..requests import EditRequest
from .arch_spec import ArchSpec
from .hooks import applying, frozen_weights
from .hparams import FTHParams
from .layers import default_rome_layer, mlp_out_name
from .registry import EditorInputs, EditorOutput, EditorSpec, register_editor

logger = logging.getLogger(__name__)


def target_modules(model: nn.Module, hp: FTHParams, spec: ArchSpec) -> list[str]:
    return [mlp_out_name(spec, hp.layer if hp.layer is not None else default_rome_layer(model, spec))]


def ft_deltas(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    hp: FTHParams,
    spec: ArchSpec,
    *,
    show_progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """`{module: ΔW}` (dense, the module's own layout) minimizing the targets' NLL under the entry-wise clamp."""
    (name,) = target_modules(model, hp, spec)
    weight = model.get_submodule(name).weight
    device = model_device(model)
    delta = torch.zeros(weight.shape, dtype=torch.float32, device=device, requires_grad=True)
    rows, slices = [], []
    for req in requests:
        ids = tokenizer(req.text).input_ids
        target = target_token_ids(tokenizer, req.target_new)
        rows.append(ids + target[:-1])
        slices.append((len(ids) - 1, torch.tensor(target, device=device)))
    batch = pad_batch(rows, pad_id(tokenizer), device)

    def add(output, inputs):
        x = inputs.to(torch.float32)
        update = x @ delta.T if spec.layout == "linear" else x @ delta
        return output + update.to(output.dtype)

    optimizer = torch.optim.Adam([delta], lr=hp.lr)
    with frozen_weights(model):
        for _ in progress_bar(range(hp.num_steps), desc="FT", unit="step", leave=False, show_progress=show_progress):
            optimizer.zero_grad()
            with applying(model, {name: add}):
                logp = torch.log_softmax(
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float(), dim=-1
                )
            nll = torch.stack(
                [-logp[i, a : a + len(t)].gather(-1, t[:, None]).mean() for i, (a, t) in enumerate(slices)]
            ).mean()
            if nll.item() < hp.early_stop_loss:
                break
            nll.backward()
            optimizer.step()
            with torch.no_grad():
                delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
    logger.info("FT on %s: target NLL %.4f", name, nll.item())
    return {name: delta.detach()}


def _resolve(model: nn.Module, hp: FTHParams, spec: ArchSpec) -> FTHParams:
    return hp if hp.layer is not None else dataclasses.replace(hp, layer=default_rome_layer(model, spec))


def _compute(model, tokenizer, requests, hp: FTHParams, spec, inputs: EditorInputs, *, show_progress=None):
    return EditorOutput(ft_deltas(model, tokenizer, requests, hp, spec, show_progress=show_progress))


register_editor(EditorSpec("ft", FTHParams, _compute, resolve=_resolve))
