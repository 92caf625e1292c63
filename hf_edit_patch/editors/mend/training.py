"""Training a MEND editor: the model stays frozen and only the editor network learns, from edit records.

Per step, on a batch of records: c_edit · L_edit + c_loc · L_loc, where L_edit is the NLL of `target_new` after the
edit prompt and its paraphrases with ΔW applied, and L_loc the KL divergence from the unedited to the edited
next-token distributions over the tokens of a locality prompt (the record's neighborhood prompt, else another
record's prompt). ΔW acts through forward hooks, so gradients reach the editor; the model's weights never change.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...batching import model_device, pad_batch, pad_id
from ...modules import model_source, unwrap_peft
from ...progress import progress_bar
from ...requests import EditRequest
from ..architectures import get_arch
from ..hooks import frozen_weights
from ..layers import mlp_out_name, num_layers
from .edit import edit_gradients, mean_nll, teacher_forced
from .network import MendConfig, MendEditor, MendError

logger = logging.getLogger(__name__)

__all__ = ["train"]


@contextlib.contextmanager
def _applying_factors(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Forward hooks adding x ΔWᵀ = (x Ũᵀ) D to each module's output (differentiable in Ũ and D)."""

    def make(u_t: torch.Tensor, d_t: torch.Tensor):
        def hook(_module, args, output):
            return output + ((args[0].to(u_t.dtype) @ u_t.T) @ d_t).to(output.dtype)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make(*f)) for n, f in factors.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_training_requests(records: Any) -> list[EditRequest]:
    out = []
    for number, record in enumerate(records):
        try:
            if isinstance(record, EditRequest):
                out.append(record)
            elif isinstance(record, dict) and "src" in record and "alt" in record:
                out.append(EditRequest.from_zsre(record))
            elif isinstance(record, dict) and ("requested_rewrite" in record or "ground_truth" in record):
                out.append(EditRequest.from_counterfact(record))
            else:
                out.append(EditRequest.from_dict(record))
        except (ValueError, TypeError) as exc:
            raise MendError(f"training record {number} is not an edit request: {exc}") from exc
    if not out:
        raise MendError("train() needs at least one record (ZsRE records, CounterFact records or EditRequests)")
    return out


def train(
    model: nn.Module,
    tokenizer: Any,
    records: Any,
    *,
    max_steps: int = 200,
    lr: float = 1e-4,
    layers: list[int] | None = None,
    batch_size: int = 1,
    seed: int = 0,
    show_progress: bool | None = None,
    edit_lr: float = 1e-4,
    lr_lr: float = 1e-4,
    rank: int = 1920,
    n_hidden: int = 1,
    c_edit: float = 0.1,
    c_loc: float = 1.0,
    grad_clip: float = 100.0,
    templates: Any = None,
) -> MendEditor:
    """
    Trains a MEND editor for `model` on edit records; the model's weights are not changed.

    Args:
        model: a causal LM (frozen: only the editor trains).
        tokenizer: its tokenizer.
        records: ZsRE records (`src`, `alt`, `rephrase`, `loc`, ...), CounterFact records or `EditRequest`s; their
            paraphrases join the edit loss, their neighborhood prompts the locality loss.
        max_steps: optimization steps (0 gives the untrained editor: the identity network at step size `edit_lr`).
        lr: Adam learning rate of the editor network.
        layers: edited layers (default: the last three, as MEND).
        batch_size: records per step, edited together as one batch.
        seed: seed of the network's initialization and of the record sampling.
        edit_lr: starting step size α; lr_lr: Adam learning rate of the step sizes.
        rank, n_hidden: the network's low-rank width and hidden layers (MEND: 1920, 1).
        c_edit, c_loc: weights of the edit and locality losses (MEND: 0.1, 1.0).
        grad_clip: gradient-norm clip of the editor's parameters (MEND: 100).
        templates: module templates for an architecture the registry does not know (see `hf_edit_patch.edit`).

    Returns:
        The trained `MendEditor` (in eval mode; its config records how it was trained).

    Example:
        ```python
        >>> editor = train(model, tokenizer, records[:200], max_steps=500)  # doctest: +SKIP
        ```
    """
    for name, value, minimum in (("max_steps", max_steps, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise MendError(f"{name} must be an integer >= {minimum}, got {value!r}")
    reqs = _as_training_requests(records)
    base = unwrap_peft(model.base_model if getattr(model, "is_patched_model", False) else model)
    spec = get_arch(base, templates=templates)
    n_layers = num_layers(base, spec)
    layers = sorted(set(layers)) if layers is not None else list(range(max(0, n_layers - 3), n_layers))
    modules = [mlp_out_name(spec, layer) for layer in layers]
    first = base.get_submodule(modules[0])
    d_in, d_out = first.weight.shape[::-1] if spec.layout == "linear" else first.weight.shape
    model_id, revision = model_source(base)
    config = MendConfig(
        modules=modules,
        layout=spec.layout,
        d_in=int(d_in),
        d_out=int(d_out),
        rank=rank,
        n_hidden=n_hidden,
        edit_lr=edit_lr,
        base_model_name_or_path=model_id,
        base_model_revision=revision,
        model_type=getattr(getattr(base, "config", None), "model_type", None),
    )
    device = model_device(base)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        editor = MendEditor(config).to(device)
    editor.check(base)
    was_training = base.training
    base.eval()
    try:
        # input statistics: the (u, δ) of every training edit, measured once (MEND accumulates them online)
        for req in progress_bar(reqs, desc="MEND statistics", unit="record", show_progress=show_progress, leave=False):
            grads, _ = edit_gradients(base, tokenizer, [req], modules)
            for i, name in enumerate(modules):
                editor.update_statistics(i, *grads[name])
        history = _optimize(
            base, tokenizer, reqs, editor, max_steps, lr, lr_lr, batch_size, seed, c_edit, c_loc, grad_clip,
            show_progress,
        )  # fmt: skip
    finally:
        base.train(was_training)
    editor.config.training = {
        "records": len(reqs),
        "max_steps": max_steps,
        "batch_size": batch_size,
        "lr": lr,
        "lr_lr": lr_lr,
        "c_edit": c_edit,
        "c_loc": c_loc,
        "grad_clip": grad_clip,
        "seed": seed,
        **history,
        "edit_lrs": [round(float(x), 8) for x in editor.edit_lrs.detach()],
    }
    return editor.eval()


def _optimize(
    model: nn.Module,
    tokenizer,
    reqs: list[EditRequest],
    editor: MendEditor,
    max_steps: int,
    lr: float,
    lr_lr: float,
    batch_size: int,
    seed: int,
    c_edit: float,
    c_loc: float,
    grad_clip: float,
    show_progress: bool | None,
) -> dict[str, Any]:
    if max_steps == 0:
        return {}
    device = model_device(model)
    modules = editor.config.modules
    network = [p for n, p in editor.named_parameters() if n != "edit_lrs"]
    optimizer = torch.optim.Adam([{"params": network, "lr": lr}, {"params": [editor.edit_lrs], "lr": lr_lr}])
    rng = random.Random(seed)
    n = len(reqs)
    locality = [
        r.neighborhood[0] if r.neighborhood else (reqs[(i + 1) % n].text if n > 1 else None)
        for i, r in enumerate(reqs)
    ]
    if not any(locality):
        logger.warning("MEND training without any locality prompt: the locality loss is off")
    editor.train()
    bar = progress_bar(range(max_steps), desc="Training MEND", unit="step", show_progress=show_progress)
    edit_loss = loc_loss = torch.zeros(())
    for _ in bar:
        picked = rng.sample(range(n), min(batch_size, n))
        batch = [reqs[i] for i in picked]
        grads, _ = edit_gradients(model, tokenizer, batch, modules)
        factors = {name: editor.factors(i, *grads[name]) for i, name in enumerate(modules)}
        texts = [t for r in batch for t in [r.text, *r.paraphrases]]
        targets = [r.target_new for r in batch for _ in [r.text, *r.paraphrases]]
        rows, slices = teacher_forced(tokenizer, texts, targets)
        loc_texts = [locality[i] for i in picked if locality[i]]
        loc_rows = [tokenizer(t).input_ids for t in loc_texts]
        padded = pad_batch(rows + loc_rows, pad_id(tokenizer), device)
        with frozen_weights(model), _applying_factors(model, factors):
            logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, use_cache=False).logits
        edit_loss = mean_nll(logits, slices)
        loss = c_edit * edit_loss
        if loc_texts:
            loc_batch = pad_batch(loc_rows, pad_id(tokenizer), device)
            with torch.no_grad():  # the frozen model's next-token distributions (not cached: 200 KB per token)
                ref_logits = model(
                    input_ids=loc_batch.input_ids, attention_mask=loc_batch.attention_mask, use_cache=False
                ).logits
            kls = []
            for j, row in enumerate(loc_rows):
                ref = torch.log_softmax(ref_logits[j, : len(row)].float(), dim=-1)
                logp = torch.log_softmax(logits[len(rows) + j, : len(row)].float(), dim=-1)
                kls.append((ref.exp() * (ref - logp)).sum(-1).mean())
            loc_loss = torch.stack(kls).mean()
            loss = loss + c_loc * loc_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), grad_clip)
        optimizer.step()
        bar.set_postfix(edit=f"{edit_loss.item():.3f}", loc=f"{loc_loss.item():.4f}")
    bar.close()
    logger.info("MEND training: final edit NLL %.4f, locality KL %.5f", edit_loss.item(), loc_loss.item())
    return {"final_edit_nll": round(edit_loss.item(), 6), "final_loc_kl": round(loc_loss.item(), 6)}
