"""Prompts and what the model computes on them at the subject: sampled prefix contexts, the subject's last token,
the keys (inputs) and values (outputs) of a module there, and a target's log-probability.

Example:
    ```python
    >>> from hf_edit_patch.editors.prompts import context_templates, subject_key
    >>> contexts = context_templates(model, tokenizer, n=5, length=10, seed=0)  # doctest: +SKIP
    >>> k = subject_key(model, tokenizer, "model.layers.5.mlp.down_proj", request, contexts)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..batching import model_device, pad_batch, pad_id, target_token_ids
from ..requests import EditRequest
from .hooks import Edits, applying, btd
from .tracing import Trace, TraceDict

__all__ = [
    "context_templates",
    "input_output_at",
    "keys_at",
    "subject_activations",
    "subject_key",
    "subject_last_index",
    "target_logprob",
]

_CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In", "A", "We", "She")


def context_templates(model: nn.Module, tokenizer, n: int, length: int, seed: int) -> list[str]:
    """`["{}"]` plus n short prefixes sampled from the model itself ("<text>. {}"), reproducibly for a seed.

    All prefixes are sampled in one left-padded batch: one generation step per token, not per token and prefix.
    """
    templates = ["{}"]
    if n == 0:
        return templates
    device = model_device(model)
    starts = [tokenizer(_CONTEXT_STARTS[i % len(_CONTEXT_STARTS)]).input_ids for i in range(n)]
    width = max(len(ids) for ids in starts)
    pad = pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in starts], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in starts], device=device)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=length, do_sample=True, top_k=5, pad_token_id=pad
        )
    for i, r in enumerate(starts):
        text = tokenizer.decode(out[i, width - len(r) :], skip_special_tokens=True)
        templates.append(text.replace("{", " ").replace("}", " ").strip() + ". {}")
    return templates


def subject_last_index(tokenizer, template: str, subject: str) -> int:
    """Token index of the subject's last token in `template.format(subject)`."""
    prefix = template[: template.index("{}")]
    return len(tokenizer(prefix + subject).input_ids) - 1


def keys_at(
    model: nn.Module, tokenizer, module: str, prompts: list[str], subject: str, edits: Edits | None = None
) -> torch.Tensor:
    """Inputs of `module` at the subject's last token of each prompt (each with one `{}` for the subject).

    Returns `[len(prompts), d_in]` float32.
    """
    rows = [tokenizer(p.format(subject)).input_ids for p in prompts]
    index = [subject_last_index(tokenizer, p, subject) for p in prompts]
    batch = pad_batch(rows, pad_id(tokenizer), model_device(model))
    with (
        torch.no_grad(),
        applying(model, edits or {}),
        Trace(model, module, retain_input=True, retain_output=False, stop=True) as tr,
    ):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    inputs = btd(tr.input, len(rows))
    return torch.stack([inputs[i, j] for i, j in enumerate(index)]).float()


def input_output_at(model: nn.Module, tokenizer, module: str, prompt: str, subject: str, edits: Edits | None = None):
    """`(input, output)` of `module` at the subject's last token of one prompt (float32 vectors)."""
    ids = torch.tensor([tokenizer(prompt.format(subject)).input_ids], device=model_device(model))
    j = subject_last_index(tokenizer, prompt, subject)
    with torch.no_grad(), applying(model, edits or {}), Trace(model, module, retain_input=True, stop=True) as tr:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return btd(tr.input, 1)[0, j].float(), btd(tr.output, 1)[0, j].float()


def subject_key(
    model: nn.Module, tokenizer, module: str, request: EditRequest, contexts: list[str], edits: Edits | None = None
) -> torch.Tensor:
    """The key k* of a request at `module`: its input at the subject's last token, averaged over the request's prompt
    in every context (`[d_in]` float32)."""
    prompts = [c.format(request.prompt) for c in contexts]
    return keys_at(model, tokenizer, module, prompts, request.subject, edits).mean(0)


def subject_activations(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    *,
    keys: Sequence[str] = (),
    outputs: Sequence[str] = (),
    edits: Edits | None = None,
    batch_tokens: int = 4096,
) -> dict[str, torch.Tensor]:
    """`subject_key` and the output of `input_output_at` for many requests and modules, in batched forward passes.

    For each module in `keys`: its input at the subject's last token averaged over the request's prompt in every
    context, `[len(requests), d_in]`. For each module in `outputs`: its output at the subject's last token of the
    bare prompt, `[len(requests), d_out]`. All float32; prompts are batched in chunks of about `batch_tokens`
    tokens, and each pass stops after the last module it traces.

    Example:
        ```python
        >>> acts = subject_activations(model, tokenizer, requests, contexts,  # doctest: +SKIP
        ...                            keys=["model.layers.4.mlp.down_proj"], outputs=["model.layers.8"])
        >>> acts["model.layers.4.mlp.down_proj"].shape, acts["model.layers.8"].shape  # doctest: +SKIP
        (torch.Size([100, 1536]), torch.Size([100, 576]))
        ```
    """
    if not requests:
        raise ValueError("subject_activations needs at least one request, got none")
    names = list(dict.fromkeys([*keys, *outputs]))
    if not names:
        return {}
    templates = list(contexts) if "{}" in contexts else [*contexts, "{}"]
    bare = templates.index("{}")
    n_ctx = len(contexts)
    rows, index = [], []  # one row per (request, template), request-major
    for request in requests:
        for t in templates:
            prompt = t.format(request.prompt)
            rows.append(tokenizer(prompt.format(request.subject)).input_ids)
            index.append(subject_last_index(tokenizer, prompt, request.subject))
    device = model_device(model)
    sums = {name: [] for name in keys}
    outs = {name: [] for name in outputs}
    per_request = len(templates)
    step = max(1, batch_tokens // max(1, max(len(r) for r in rows) * per_request)) * per_request
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        batch = pad_batch(chunk, pad_id(tokenizer), device)
        with (
            torch.no_grad(),
            applying(model, edits or {}),
            TraceDict(model, names, retain_input=bool(keys), stop=True) as traces,
        ):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        at_rows = torch.arange(len(chunk), device=device)
        at_cols = torch.tensor(index[start : start + step], device=device)
        for name in keys:
            x = btd(traces[name].input, len(chunk))[at_rows, at_cols].float()
            sums[name].append(x.view(-1, per_request, x.shape[-1])[:, :n_ctx].mean(1))
        for name in outputs:
            y = btd(traces[name].output, len(chunk))[at_rows, at_cols].float()
            outs[name].append(y.view(-1, per_request, y.shape[-1])[:, bare])
    result = {name: torch.cat(parts) for name, parts in sums.items()}
    result.update({name: torch.cat(parts) for name, parts in outs.items()})
    return result


def target_logprob(model: nn.Module, tokenizer, text: str, target: str) -> float:
    """Mean log-probability of `target`'s tokens (with a leading space) following `text`, teacher-forced."""
    ids = tokenizer(text).input_ids
    target_ids = target_token_ids(tokenizer, target)
    x = torch.tensor([ids + target_ids[:-1]], device=model_device(model))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, len(ids) - 1 :].float(), dim=-1)
    return float(logp[torch.arange(len(target_ids)), torch.tensor(target_ids, device=logp.device)].mean())
