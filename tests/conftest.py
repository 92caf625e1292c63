"""Shared fixtures: tiny random GPT-2 (Conv1D layout) and Llama (nn.Linear layout) models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: Hub calls fail fast
# Triton (imported by transformers) must see TRITON_INTERPRET before it loads: the kernel tests run the Triton
# kernels through its interpreter on CPU. Everything else uses the reference path unless a test opts in with
# HF_EDIT_PATCH_KERNELS=auto (the kernel test modules do, for all their tests).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_EDIT_PATCH_KERNELS", "reference")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()


def make_llama(seed: int = 0, intermediate_size: int = 48, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def make_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    differing = [k for k, v in state.items() if not torch.equal(v, expected[k])]
    assert not differing, f"{len(differing)} tensors differ bit-wise, first: {differing[:3]}"


@pytest.fixture
def triton_kernels(monkeypatch):
    """Dispatch to the Triton kernels (through the interpreter on CPU) for this test."""
    pytest.importorskip("triton")
    monkeypatch.setenv("HF_EDIT_PATCH_KERNELS", "auto")


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return make_llama()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return make_gpt2()


LLAMA_TARGETS = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj")
GPT2_TARGETS = ("transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj", "transformer.h.1.mlp.c_fc")
