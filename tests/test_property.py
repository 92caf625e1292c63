"""Random sequences of add / remove / disable against an independently computed reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import LLAMA_TARGETS, make_gpt2, make_llama, snapshot
from helpers import expected_weights, random_patch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_edit_patch as hep

POOL_SIZE = 5
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, POOL_SIZE - 1)),
        st.tuples(st.just("remove"), st.integers(0, 10)),
        st.tuples(st.just("disable"), st.just(0)),
    ),
    min_size=1,
    max_size=12,
)


def _pool(model, targets):
    # large, overlapping updates, so that rounding in fp16/bf16 makes the order of application matter
    return [
        random_patch(model, targets[: 1 + i % len(targets)], keep_ratio=0.6, scale=0.5 + i, seed=100 + i)
        for i in range(POOL_SIZE)
    ]


CASES = {
    "llama-fp32": (make_llama, torch.float32, LLAMA_TARGETS),
    "llama-fp16": (make_llama, torch.float16, LLAMA_TARGETS),
    "gpt2-bf16": (make_gpt2, torch.bfloat16, ("transformer.h.0.mlp.c_proj", "transformer.h.0.mlp.c_fc")),
}


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=40, deadline=None)
@given(ops=OPS)
def test_random_operation_sequences_match_reference(case, ops):
    make, dtype, targets = CASES[case]
    model = make(dtype=dtype)
    base = snapshot(model)
    pool = _pool(model, targets)
    pm = hep.PatchedModel(model)
    active: list[tuple[str, int]] = []
    counter = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # stacked patches were computed on the base: fingerprints
        for op, arg in ops:
            if op == "add":
                name = f"p{counter}"
                counter += 1
                pm.add_patch(pool[arg], name)
                active.append((name, arg))
            elif op == "remove" and active:
                name, _ = active.pop(arg % len(active))
                pm.remove_patch(name)
            elif op == "disable":
                with pm.disable_patches():
                    _assert_equal(model, base)
            assert pm.active_patches == [n for n, _ in active]
            _assert_equal(model, expected_weights(base, [pool[i] for _, i in active], model))
    pm.unload()
    _assert_equal(model, base)


def _assert_equal(model, expected):
    for key, value in model.state_dict().items():
        if not torch.equal(value, expected[key]):
            diff = (value != expected[key]).sum().item()
            raise AssertionError(f"{key}: {diff} of {value.numel()} entries differ from the reference")
