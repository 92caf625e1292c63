"""Token batches for a causal LM, shared by the editors and the evaluation: padding, the model's device, target
token ids, and an output head restricted to a few positions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]


def pad_batch(rows: list[list[int]], pad_id: int, device: torch.device) -> Batch:
    """Right-padded batch of token id lists (positions stay those of the unpadded rows)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return Batch(ids.to(device), mask.to(device), [len(r) for r in rows])


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token id, else its EOS id, else 0 (padded positions are masked out anyway)."""
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    return 0


def model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def target_token_ids(tokenizer, target: str) -> list[int]:
    target = target if target.startswith(" ") else " " + target
    ids = tokenizer(target, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"the target {target!r} tokenizes to nothing")
    return ids


@contextlib.contextmanager
def head_only_at(model: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """Makes the output head see only the hidden states at `(rows[i], cols[i])`: logits come back `[1, P, vocab]`.

    The loss of a value optimization reads a few dozen positions; the full `[batch, seq, vocab]` logits (and their
    log-softmax and gradient) would dominate its time and memory on models with large vocabularies.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")

    def pick(_module, args):
        return (args[0][rows, cols].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()
