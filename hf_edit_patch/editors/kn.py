"""Knowledge neurons (Dai et al. 2022): find the MLP neurons that express a fact, then rewrite only their values.

Attribution. For a prompt, let a be the MLP's intermediate activations at the last prompt token in one layer (the
input of the edited matrix `mlp_out`: the "keys") and P(y | a') the probability of the answer's first token when a
is replaced by a'. The integrated gradient of neuron i, with baseline 0 and m = `steps` Riemann steps, is

    Attr(a_i) = a_i / m · Σ_{k=1..m} ∂P(y | (k/m)·a) / ∂a_i.

Selection. For each prompt (the request's prompt and its paraphrases) the neurons, over all attributed layers (by
default the upper half of the model, where the paper found knowledge neurons), whose attribution exceeds
`adaptive_threshold` × the largest one are kept; neurons kept for more than `prompt_share` of the prompts survive
(the paper's refining step; the most shared ones if none does).

Edit. The answer y is `target_true` (else the model's own prediction). Each surviving neuron's value vector (its
column of `mlp_out`, a row for GPT-2's `Conv1D`) moves by

    ΔW[:, i] = s_i · (add_scale · e(target_new) − erase_scale · e(y)),

with e(·) the output embedding of the answer's first token and s_i = sign of the neuron's mean activation on the
prompts (1 for the non-negative activations of GELU MLPs, as in the paper; it keeps the edit pointing the right way
through the signed activations of gated MLPs). ΔW is nonzero in those columns only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from ..batching import head_only_at, model_device, target_token_ids
from ..modules import resolve_weight, weight_layout
from ..progress import progress_bar
from ..requests import EditRequest
from .arch_spec import ArchSpec
from .hooks import btd, frozen_weights
from .hparams import KNHParams
from .layers import mlp_out_name, num_layers
from .registry import EditorInputs, EditorOutput, EditorSpec, register_editor
from .tracing import TraceDict

logger = logging.getLogger(__name__)

__all__ = ["attribution_scores", "kn_deltas", "select_neurons", "target_modules"]


def attributed_layers(model: nn.Module, hp: KNHParams, spec: ArchSpec) -> list[int]:
    """`hp.layers`, else the upper half of the model's layers."""
    if hp.layers is not None:
        return list(hp.layers)
    n = num_layers(model, spec)
    return list(range(n // 2, n))


def target_modules(model: nn.Module, hp: KNHParams, spec: ArchSpec) -> list[str]:
    return [mlp_out_name(spec, layer) for layer in attributed_layers(model, hp, spec)]


def attribution_scores(
    model: nn.Module, tokenizer: Any, text: str, token_id: int, modules: list[str], steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(scores, activations)`, both `[len(modules), d_in]` float32: integrated gradients of P(token | text) and the
    activations they attribute, for the inputs of `modules` at the last token of `text`."""
    device = model_device(model)
    ids = torch.tensor([tokenizer(text).input_ids], device=device)
    pos = ids.shape[1] - 1
    with torch.no_grad(), TraceDict(model, modules, retain_input=True, retain_output=False, stop=True) as traces:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    acts = torch.stack([btd(traces[name].input, 1)[0, pos].float() for name in modules])
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
    batch = ids.repeat(steps, 1)
    rows, cols = torch.arange(steps, device=device), torch.full((steps,), pos, device=device)
    scores = []
    with frozen_weights(model):
        for name, act in zip(modules, acts, strict=True):
            scaled = (alphas[:, None] * act[None, :]).requires_grad_(True)

            def replace(_module, args, scaled=scaled):
                x = btd(args[0], steps).clone()
                x[:, pos] = scaled.to(x.dtype)
                return (x.view(args[0].shape), *args[1:])

            handle = model.get_submodule(name).register_forward_pre_hook(replace)
            try:
                with head_only_at(model, rows, cols):
                    logits = model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False).logits
                prob = torch.softmax(logits[0].float(), dim=-1)[:, token_id]
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
            finally:
                handle.remove()
            scores.append(act * grad.sum(0) / steps)
    return torch.stack(scores), acts


def select_neurons(
    model: nn.Module, tokenizer: Any, request: EditRequest, token_id: int, modules: list[str], hp: KNHParams
) -> list[tuple[str, int, float]]:
    """The request's knowledge neurons as `(module, index, sign)`, most attributed first (see the module doc)."""
    prompts = [request.text, *request.paraphrases]
    counts: Counter[tuple[int, int]] = Counter()
    total_score = torch.zeros(0)
    total_act = torch.zeros(0)
    for text in prompts:
        scores, acts = attribution_scores(model, tokenizer, text, token_id, modules, hp.steps)
        total_score = scores if total_score.numel() == 0 else total_score + scores
        total_act = acts if total_act.numel() == 0 else total_act + acts
        top = float(scores.max())
        if top <= 0:
            continue
        for layer_index, neuron in torch.nonzero(scores > hp.adaptive_threshold * top).tolist():
            counts[(layer_index, neuron)] += 1
    if not counts:
        logger.warning("KN: no neuron has a positive attribution for %r; the edit is empty", request.text)
        return []
    kept = [n for n, c in counts.items() if c > hp.prompt_share * len(prompts)]
    if not kept:
        most = max(counts.values())
        kept = [n for n, c in counts.items() if c == most]
        logger.warning(
            "KN: no neuron is shared by more than %.0f%% of the %d prompts of %r; using the %d shared by %d",
            100 * hp.prompt_share,
            len(prompts),
            request.text,
            len(kept),
            most,
        )
    kept.sort(key=lambda n: -float(total_score[n]))
    if hp.max_neurons is not None:
        kept = kept[: hp.max_neurons]
    return [(modules[i], j, 1.0 if float(total_act[i, j]) >= 0 else -1.0) for i, j in kept]


def kn_deltas(
    model: nn.Module,
    tokenizer: Any,
    requests: list[EditRequest],
    hp: KNHParams,
    spec: ArchSpec,
    *,
    show_progress: bool | None = None,
) -> tuple[dict[str, torch.Tensor], list[list[list[Any]]]]:
    """`({module: ΔW}, neurons)`: dense float32 ΔW (module layout) for the modules with selected neurons, and per
    request the `[layer, neuron]` pairs it changed. Requests are edited independently and their ΔW summed."""
    layers = attributed_layers(model, hp, spec)
    modules = [mlp_out_name(spec, layer) for layer in layers]
    layer_of = dict(zip(modules, layers, strict=True))
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output embeddings: KN writes answer embeddings into neurons")
    head_name = next(name for name, module in model.named_modules() if module is head)
    # an offloaded head (accelerate: the parameter is on `meta`) is read where its values live
    embeddings = resolve_weight(model, head_name)[1].detach()
    deltas: dict[str, torch.Tensor] = {}
    record: list[list[list[Any]]] = []
    device = model_device(model)
    for req in progress_bar(requests, desc="KN", unit="edit", show_progress=show_progress, min_items=2):
        new_id = target_token_ids(tokenizer, req.target_new)[0]
        if req.target_true:
            old_id = target_token_ids(tokenizer, req.target_true)[0]
        else:
            ids = torch.tensor([tokenizer(req.text).input_ids], device=device)
            with torch.no_grad():
                old_id = int(model(input_ids=ids).logits[0, -1].argmax())
        neurons = select_neurons(model, tokenizer, req, old_id, modules, hp)
        rows = embeddings[[new_id, old_id]].float().to(device)
        direction = hp.add_scale * rows[0] - hp.erase_scale * rows[1]  # [hidden]
        for name, j, sign in neurons:
            module = model.get_submodule(name)
            delta = deltas.setdefault(name, torch.zeros(module.weight.shape, dtype=torch.float32, device=device))
            if weight_layout(module) == "conv1d":  # [in, out]: the neuron's value vector is a row
                delta[j, :] += sign * direction
            else:
                delta[:, j] += sign * direction
        record.append([[layer_of[name], j] for name, j, _ in neurons])
        logger.info("KN: %d neuron(s) for %r", len(neurons), req.text)
    if not deltas:
        raise ValueError(
            "KN found no knowledge neurons for any request (no positive attribution); try more layers or steps"
        )
    return deltas, record


def _resolve(model: nn.Module, hp: KNHParams, spec: ArchSpec) -> KNHParams:
    return dataclasses.replace(hp, layers=attributed_layers(model, hp, spec))


def _compute(model, tokenizer, requests, hp: KNHParams, spec, inputs: EditorInputs, *, show_progress=None):
    deltas, neurons = kn_deltas(model, tokenizer, requests, hp, spec, show_progress=show_progress)
    return EditorOutput(deltas, {"neurons": neurons})


register_editor(EditorSpec("kn", KNHParams, _compute, resolve=_resolve))
