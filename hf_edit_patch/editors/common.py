"""Pieces shared by the locate-then-edit editors: prompts, subject positions, keys, and the value optimization.

The model is never modified: edits in progress are applied through forward hooks, and gradients flow only into
the value offset δ (the weights' `requires_grad` flags are switched off for the optimization and restored).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batching import head_only_at, model_device, pad_batch, pad_id, target_token_ids
from ..requests import EditRequest
from .hparams import ValueOptHParams
from .tracing import Trace

logger = logging.getLogger(__name__)

_CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In", "A", "We", "She")


Edits = dict  # module name -> fn(output, inputs) -> new output: edits in progress, applied through hooks


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


def btd(t: torch.Tensor, batch: int) -> torch.Tensor:
    """`[batch, tokens, d]` view of a module input/output (OPT's MLP flattens its input to `[batch·tokens, d]`)."""
    return t if t.dim() == 3 else t.view(batch, -1, t.shape[-1])


def subject_last_index(tokenizer, template: str, subject: str) -> int:
    """Token index of the subject's last token in `template.format(subject)`."""
    prefix = template[: template.index("{}")]
    return len(tokenizer(prefix + subject).input_ids) - 1


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """No parameter of the model collects gradients inside; the original flags are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


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


@contextlib.contextmanager
def applying(model: nn.Module, edits: Edits) -> Iterator[None]:
    """Forward hooks that replace each named module's output by `edits[name](output, input)` inside the block."""
    handles = []
    try:
        for name, fn in edits.items():
            handles.append(
                model.get_submodule(name).register_forward_hook(
                    lambda _m, args, output, fn=fn: _replace_first(output, fn, args[0] if args else None)
                )
            )
        yield
    finally:
        for h in handles:
            h.remove()


def _replace_first(output, fn, inputs):
    if isinstance(output, tuple):
        return (fn(output[0], inputs), *output[1:])
    return fn(output, inputs)


def compose(first, second):
    """An edit applying `first` then `second` to the same module's output."""
    return lambda output, inputs: second(first(output, inputs), inputs)


def target_logprob(model: nn.Module, tokenizer, text: str, target: str) -> float:
    """Mean log-probability of `target`'s tokens (with a leading space) following `text`, teacher-forced."""
    ids = tokenizer(text).input_ids
    target_ids = target_token_ids(tokenizer, target)
    x = torch.tensor([ids + target_ids[:-1]], device=model_device(model))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, len(ids) - 1 :].float(), dim=-1)
    return float(logp[torch.arange(len(target_ids)), torch.tensor(target_ids, device=logp.device)].mean())


@contextlib.contextmanager
def checkpointed_from(model: nn.Module, module: str) -> Iterator[None]:
    """Activation checkpointing for the decoder block holding `module` and every block after it.

    Backward then keeps only each block's input and recomputes the block (with the same hooks) when it needs it:
    one more forward of those blocks per step, for a fraction of the memory. Blocks are found as the items of the
    `nn.ModuleList` on `module`'s path.
    """
    from torch.utils.checkpoint import checkpoint

    parts = module.split(".")
    blocks, first = None, None
    for i in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, nn.ModuleList) and parts[i].isdigit():
            blocks, first = parent, int(parts[i])
            break
    if blocks is None:
        yield
        return
    patched = []
    try:
        for block in list(blocks)[first:]:
            forward = block.forward

            def run(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            block.forward = run
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward  # the instance attribute hid the class's forward


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
