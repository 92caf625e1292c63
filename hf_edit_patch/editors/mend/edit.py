"""A MEND edit: the fine-tuning gradient factors of the requests at the edited matrices, turned into ΔW by a trained
`MendEditor`. Registered as `method="mend"`; the entry point loads an editor given by folder or Hub id.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ...batching import model_device, pad_batch, pad_id, target_token_ids
from ...requests import EditRequest
from ..arch_spec import ArchSpec
from ..hooks import btd, frozen_weights
from ..hparams import MendHParams
from ..registry import EditorInputs, EditorNeeds, EditorOutput, EditorSpec, SavedEditor, register_editor
from .network import MendEditor, MendError

logger = logging.getLogger(__name__)

__all__ = ["edit_gradients", "mean_nll", "mend_deltas", "teacher_forced"]


def teacher_forced(
    tokenizer, texts: list[str], targets: list[str]
) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
    """Rows `text + target[:-1]` and, per row, `(start, target ids)` where the target's predictions are."""
    rows, slices = [], []
    for text, target in zip(texts, targets, strict=True):
        ids = tokenizer(text).input_ids
        target_ids = target_token_ids(tokenizer, target)
        rows.append(ids + target_ids[:-1])
        slices.append((len(ids) - 1, target_ids))
    return rows, slices


def mean_nll(logits: torch.Tensor, slices: list[tuple[int, list[int]]]) -> torch.Tensor:
    """Mean over sequences of the mean NLL of each one's target tokens."""
    nll = []
    for i, (start, target) in enumerate(slices):
        logp = torch.log_softmax(logits[i, start : start + len(target)].float(), dim=-1)
        nll.append(-logp.gather(-1, torch.tensor(target, device=logp.device)[:, None]).mean())
    return torch.stack(nll).mean()


def edit_gradients(
    model: nn.Module, tokenizer, requests: list[EditRequest], modules: list[str]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """`({module: (u, δ)}, loss)`: the input u `[T, d_in]` and output gradient δ `[T, d_out]` (float32) of each module
    at the tokens where δ ≠ 0, for the mean NLL of each request's `target_new` after its prompt."""
    device = model_device(model)
    rows, slices = teacher_forced(tokenizer, [r.text for r in requests], [r.target_new for r in requests])
    batch = pad_batch(rows, pad_id(tokenizer), device)
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name: str):
        def hook(_module, args, output):
            zero = torch.zeros_like(output, requires_grad=True)
            store[name] = (args[0].detach(), zero)
            return output + zero

        return hook

    handles = [model.get_submodule(name).register_forward_hook(capture(name)) for name in modules]
    try:
        with frozen_weights(model), torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            loss = mean_nll(logits, slices)
            grads = torch.autograd.grad(loss, [store[name][1] for name in modules])
    finally:
        for handle in handles:
            handle.remove()
    mask = batch.attention_mask.bool().reshape(-1)
    out = {}
    for name, grad in zip(modules, grads, strict=True):
        u = btd(store[name][0], len(rows))
        u = u.reshape(-1, u.shape[-1]).float()
        d = btd(grad, len(rows))
        d = d.reshape(-1, d.shape[-1]).float()
        keep = mask & (d != 0).any(-1) & (u != 0).any(-1)
        out[name] = (u[keep], d[keep])
    return out, float(loss.detach())


def mend_deltas(
    model: nn.Module, tokenizer, requests: list[EditRequest], editor: MendEditor
) -> dict[str, torch.Tensor]:
    """The editor's dense float32 ΔW (module layout) for the requests, edited as one batch."""
    editor.check(model)
    device = model_device(model)
    if next(editor.parameters()).device != device:
        editor.to(device)
    was_training = editor.training
    editor.eval()
    try:
        grads, loss = edit_gradients(model, tokenizer, requests, editor.config.modules)
        with torch.no_grad():
            deltas = {
                name: editor.delta_weight(i, *grads[name]).float() for i, name in enumerate(editor.config.modules)
            }
    finally:
        editor.train(was_training)
    logger.info("MEND: fine-tuning NLL before the edit %.4f", loss)
    return deltas


def _needs(model: nn.Module, hp: MendHParams, spec: ArchSpec) -> EditorNeeds:
    if isinstance(hp.editor, str):
        return EditorNeeds(saved_editor=SavedEditor(hp.editor, hp.revision))
    return EditorNeeds()


def _compute(model, tokenizer, requests, hp: MendHParams, spec, inputs: EditorInputs, *, show_progress=None):
    editor: Any = inputs.saved_editor if inputs.saved_editor is not None else hp.editor
    if not isinstance(editor, MendEditor):
        raise MendError(
            f"hparams['editor'] must be a MendEditor or the folder / Hub repo id of one, got {type(editor).__name__}"
        )
    return EditorOutput(mend_deltas(model, tokenizer, requests, editor), editor.describe())


register_editor(EditorSpec("mend", MendHParams, _compute, needs=_needs))
