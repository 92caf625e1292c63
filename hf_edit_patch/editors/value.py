"""The value optimization of the locate-then-edit editors (ROME, MEMIT, AlphaEdit): the output of a module at the
subject's last token that makes the model say the new target.

The model is never modified: edits in progress are applied through forward hooks, and gradients flow only into
the value offset δ (the weights' `requires_grad` flags are switched off for the optimization and restored).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batching import head_only_at, model_device, pad_batch, pad_id, target_token_ids
from ..requests import EditRequest
from .hooks import Edits, applying, btd, checkpointed_from, compose, frozen_weights
from .hparams import ValueOptHParams
from .prompts import input_output_at, subject_last_index

logger = logging.getLogger(__name__)

__all__ = ["optimize_value"]


def optimize_value(
    model: nn.Module,
    tokenizer,
    request: EditRequest,
    module: str,
    contexts: list[str],
    hp: ValueOptHParams,
    *,
    edits: Edits | None = None,
    desc: str = "value",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finds the output of `module` at the subject's last token that makes the model say `target_new`.

    Minimizes the target's NLL over the prompt in every context, plus `kl_factor` · KL to the unedited next-token
    distribution on "{subject} is a" (the subject's essence), plus `v_weight_decay` · ||δ||² / ||v||²; ||δ|| is
    clamped to `clamp_norm_factor` · ||v||. Returns `(v, v + δ)` in float32, v being the unedited output on the bare
    prompt.
    """
    device = model_device(model)
    target = target_token_ids(tokenizer, request.target_new)
    prompts = [c.format(request.prompt) for c in contexts]
    kl_prompts = ["{} is a"]
    rows, index, target_slices = [], [], []
    for p in prompts:
        ids = tokenizer(p.format(request.subject)).input_ids
        rows.append(ids + target[:-1])
        target_slices.append((len(ids) - 1, len(ids) - 1 + len(target)))
        index.append(subject_last_index(tokenizer, p, request.subject))
    for p in kl_prompts:
        rows.append(tokenizer(p.format(request.subject)).input_ids)
        index.append(subject_last_index(tokenizer, p, request.subject))
    batch = pad_batch(rows, pad_id(tokenizer), device)
    n_rewrite = len(prompts)
    target_ids = torch.tensor(target, device=device)
    edits = dict(edits or {})
    _, v = input_output_at(model, tokenizer, module, request.prompt, request.subject, edits)
    delta = torch.zeros_like(v, requires_grad=True)
    rows_idx = torch.arange(len(rows), device=device)
    pos_idx = torch.tensor(index, device=device)

    def add_delta(output, _inputs):
        out = btd(output, len(rows)).clone()
        out[rows_idx, pos_idx] = out[rows_idx, pos_idx] + delta.to(out.dtype)
        return out.view(output.shape)

    # The head runs only where the loss looks: each target token's position, then each KL prompt's subject end.
    target_rows = [i for i, (a, b) in enumerate(target_slices) for _ in range(a, b)]
    target_cols = [t for a, b in target_slices for t in range(a, b)]
    head_rows = torch.tensor(target_rows + list(range(n_rewrite, len(rows))), device=device)
    head_cols = torch.cat([torch.tensor(target_cols, device=device, dtype=torch.long), pos_idx[n_rewrite:]])
    n_target = len(target_cols)
    kl_rows = torch.arange(len(kl_prompts), device=device)
    wanted = target_ids.repeat(n_rewrite)

    with torch.no_grad(), applying(model, edits), head_only_at(model, kl_rows, pos_idx[n_rewrite:]):
        logits = model(
            input_ids=batch.input_ids[n_rewrite:], attention_mask=batch.attention_mask[n_rewrite:], use_cache=False
        ).logits
        kl_init = torch.log_softmax(logits[0].float(), dim=-1)
    step_edits = dict(edits)
    step_edits[module] = compose(edits[module], add_delta) if module in edits else add_delta

    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * v.norm()
    bar = tqdm(range(hp.v_num_grad_steps), desc=f"Optimizing {desc}", leave=False, disable=None)
    with frozen_weights(model):
        for _ in bar:
            optimizer.zero_grad()
            # backward stays inside: checkpointed blocks rerun their forward, edit hooks included
            with (
                applying(model, step_edits),
                head_only_at(model, head_rows, head_cols),
                checkpointed_from(model, module) if hp.checkpoint_blocks else contextlib.nullcontext(),
            ):
                logits = (
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                    .logits[0]
                    .float()
                )
                logp = torch.log_softmax(logits, dim=-1)
                # every prompt has the same target tokens, so this is also the mean of the per-prompt means
                nll = -logp[torch.arange(n_target, device=device), wanted].mean()
                kl = torch.nn.functional.kl_div(logp[n_target:], kl_init, log_target=True, reduction="batchmean")
                decay = delta.norm() ** 2 / v.norm() ** 2
                loss = nll + hp.kl_factor * kl + hp.v_weight_decay * decay
                bar.set_postfix(nll=f"{nll.item():.3f}", kl=f"{kl.item():.3f}")
                if nll.item() < hp.early_stop_loss:
                    break
                loss.backward()
            optimizer.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    logger.info(
        "value optimization for %r: nll %.4f, ||δ||/||v|| %.3f",
        request.target_new,
        nll.item(),
        float(delta.detach().norm() / v.norm()),
    )
    return v, (v + delta).detach()
