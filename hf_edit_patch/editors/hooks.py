"""Edits in progress, applied through forward hooks: the model itself is never modified.

An edit is a function `fn(output, inputs) -> new output` of one module; `Edits` maps module names to them. Also here:
the weights frozen while an editor optimizes something else, activation checkpointing of the blocks above an edited
module, and the `[batch, tokens, d]` view of a module's activations.

Example:
    ```python
    >>> from hf_edit_patch.editors.hooks import applying, low_rank_edit
    >>> with applying(model, {"model.layers.5.mlp.down_proj": low_rank_edit(u, v)}):  # doctest: +SKIP
    ...     logits = model(input_ids=ids).logits
    ```
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "EditFn",
    "Edits",
    "applying",
    "btd",
    "checkpointed_from",
    "compose",
    "frozen_weights",
    "low_rank_edit",
    "rank_one_edit",
]

EditFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Edits = dict  # module name -> fn(output, inputs) -> new output: edits in progress, applied through hooks


def btd(t: torch.Tensor, batch: int) -> torch.Tensor:
    """`[batch, tokens, d]` view of a module input/output (OPT's MLP flattens its input to `[batch·tokens, d]`)."""
    return t if t.dim() == 3 else t.view(batch, -1, t.shape[-1])


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


def rank_one_edit(u_out: torch.Tensor, v_in: torch.Tensor) -> EditFn:
    """An output edit adding (input · v_in) u_out, i.e. the effect of ΔW = u_out v_inᵀ on a module."""

    def edit(output, inputs):
        return output + (inputs.to(torch.float32) @ v_in)[..., None].to(output.dtype) * u_out.to(output.dtype)

    return edit


def low_rank_edit(u_out: torch.Tensor, v_in: torch.Tensor) -> EditFn:
    """An output edit adding (input V) Uᵀ: the effect of ΔW = U Vᵀ with U `[d_out, r]`, V `[d_in, r]`."""

    def edit(output, inputs):
        return output + ((inputs.to(torch.float32) @ v_in) @ u_out.T).to(output.dtype)

    return edit


@contextlib.contextmanager
def checkpointed_from(model: nn.Module, module: str) -> Iterator[None]:
    """Activation checkpointing for the decoder block holding `module` and every block after it.

    Backward then keeps only each block's input and recomputes the block (with the same hooks) when it needs it:
    one more forward of those blocks per step, for a fraction of the memory. Blocks are found as the items of the
    `nn.ModuleList` on `module`'s path.
    """
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
    patched: list[tuple[nn.Module, object]] = []
    missing = object()
    try:
        for block in list(blocks)[first:]:
            forward = block.forward

            def run(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            patched.append((block, block.__dict__.get("forward", missing)))
            block.forward = run
        yield
    finally:
        for block, own in patched:  # an instance forward (accelerate's hook wrapper) is put back; else the class's
            if own is missing:
                del block.forward
            else:
                block.forward = own
