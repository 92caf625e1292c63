"""Forward-hook tracing (`hf_edit_patch.editors.tracing`) on the tiny Llama and GPT-2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from hf_edit_patch.editors.tracing import StopForward, Trace, TraceDict, TraceError

IDS = torch.tensor([[3, 17, 5, 9, 22, 41], [8, 2, 30, 11, 7, 19]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding: decoder layers get a 4-D mask

# (fixture, module names): an MLP output projection (Linear / Conv1D), a decoder block, the final norm
TRACED = {
    "llama": ("model.layers.0.mlp.down_proj", "model.layers.1", "model.norm"),
    "gpt2": ("transformer.h.0.mlp.c_proj", "transformer.h.1", "transformer.ln_f"),
}
LATER = {"llama": "lm_head", "gpt2": "lm_head"}


def _all_hooks_removed(model: torch.nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs for m in model.modules()
    )


def _manual_capture(model, name):
    """What a plain forward (pre-)hook sees: the first positional input, the output, the kwargs."""
    seen = {}
    module = model.get_submodule(name)

    def pre(mod, args, kwargs):
        seen["input"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = dict(kwargs)

    def post(mod, args, output):
        seen["output"] = output

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    return seen, handles


@pytest.fixture(params=["llama", "gpt2"])
def model_and_kind(request):
    return request.getfixturevalue(request.param), request.param


@torch.no_grad()
def test_captures_match_manual_hooks(model_and_kind):
    model, kind = model_and_kind
    for name in TRACED[kind]:
        seen, handles = _manual_capture(model, name)
        try:
            with Trace(model, name, retain_input=True) as t:
                model(input_ids=IDS, attention_mask=MASK)
        finally:
            for h in handles:
                h.remove()
        assert t.calls == 1
        assert torch.equal(t.input, seen["input"])
        full = seen["output"]
        expected = full[0] if isinstance(full, tuple) else full
        assert torch.equal(t.output, expected)
        assert t.output_full is full or torch.equal(t.output_full, full)
        assert t.input_kwargs.keys() == seen["kwargs"].keys()
    assert _all_hooks_removed(model)


@torch.no_grad()
def test_retained_layer_call_reproduces_the_layer_output(model_and_kind):
    # what the ROME editor relies on: a decoder layer can be re-run from the retained args/kwargs
    model, kind = model_and_kind
    name = TRACED[kind][1]
    with Trace(model, name, retain_input=True, clone=True) as t:
        model(input_ids=IDS, attention_mask=MASK, use_cache=False)
    out = model.get_submodule(name)(*t.input_args, **t.input_kwargs)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, t.output, rtol=0, atol=0)


@torch.no_grad()
def test_tuple_output_of_attention(llama):
    # attention modules still return (attn_output, attn_weights)
    name = "model.layers.0.self_attn"
    with Trace(llama, name) as t:
        llama(input_ids=IDS)
    assert isinstance(t.output_full, tuple)
    assert t.output is t.output_full[0]
    assert t.output.shape == (2, IDS.shape[1], 32)


@torch.no_grad()
def test_edit_output_changes_logits_only_inside_the_block(model_and_kind):
    model, kind = model_and_kind
    name = TRACED[kind][0]
    base = model(input_ids=IDS).logits
    names_seen = []

    def edit(output, module_name):
        names_seen.append(module_name)
        return output + 1.0

    with Trace(model, name, edit_output=edit) as t:
        edited = model(input_ids=IDS).logits
    after = model(input_ids=IDS).logits
    assert names_seen == [name]
    assert not torch.allclose(edited, base)
    assert torch.equal(after, base)
    # the retained output is the edited one (what the rest of the model saw)
    seen, handles = _manual_capture(model, name)
    model(input_ids=IDS)
    for h in handles:
        h.remove()
    torch.testing.assert_close(t.output, seen["output"] + 1.0)


@torch.no_grad()
def test_edit_output_on_a_tuple_output_rebuilds_the_tuple(llama):
    name = "model.layers.1.self_attn"
    base = llama(input_ids=IDS).logits
    with Trace(llama, name, edit_output=lambda out, _: torch.zeros_like(out)) as t:
        edited = llama(input_ids=IDS).logits
    assert isinstance(t.output_full, tuple) and len(t.output_full) == 2
    assert t.output is t.output_full[0] and not t.output.any()
    assert not torch.allclose(edited, base)


@torch.no_grad()
def test_edit_output_must_return_a_tensor(llama):
    with (
        pytest.raises(TraceError, match="returned NoneType"),
        Trace(llama, "model.layers.0.mlp", edit_output=lambda out, _: None),
    ):
        llama(input_ids=IDS)
    assert _all_hooks_removed(llama)


@torch.no_grad()
def test_stop_ends_the_forward_pass(model_and_kind):
    model, kind = model_and_kind
    name = TRACED[kind][0]
    later = []
    handle = model.get_submodule(LATER[kind]).register_forward_hook(lambda *a: later.append(1))
    result, reached = None, False
    try:
        with Trace(model, name, retain_input=True, stop=True) as t:
            result = model(input_ids=IDS)
            reached = True
    finally:
        handle.remove()
    assert result is None and not reached  # model() raised StopForward, which the block swallowed
    assert later == []  # nothing after the traced module ran: no logits
    assert t.output is not None and t.input is not None and t.calls == 1
    assert _all_hooks_removed(model)


def test_hooks_removed_after_normal_exit_stop_and_error(llama):
    name = "model.layers.0"
    with torch.no_grad(), Trace(llama, name, retain_input=True):
        llama(input_ids=IDS)
    assert _all_hooks_removed(llama)

    with torch.no_grad(), Trace(llama, name, retain_input=True, stop=True):
        llama(input_ids=IDS)
    assert _all_hooks_removed(llama)

    with pytest.raises(RuntimeError, match="boom"), Trace(llama, name, retain_input=True, stop=True) as t:
        assert llama.get_submodule(name)._forward_hooks  # active inside the block
        raise RuntimeError("boom")
    assert _all_hooks_removed(llama)
    assert t.calls == 0

    with pytest.raises(RuntimeError, match="boom"), TraceDict(llama, [name, "model.norm"], stop=True):
        raise RuntimeError("boom")
    assert _all_hooks_removed(llama)


def test_only_stop_forward_is_swallowed(llama):
    with pytest.raises(ValueError, match="not swallowed"), Trace(llama, "model.norm"):
        raise ValueError("not swallowed")
    with Trace(llama, "model.norm"):
        raise StopForward()
    assert _all_hooks_removed(llama)


def test_clone_and_detach(llama):
    model = llama
    name = "model.layers.0.mlp.down_proj"
    with Trace(model, name, retain_input=True) as plain:
        model(input_ids=IDS)
    assert plain.output.requires_grad
    with Trace(model, name, retain_input=True, clone=True, detach=True) as t:
        out = model(input_ids=IDS)
    assert not t.output.requires_grad and not t.input.requires_grad
    assert out.logits.requires_grad  # the model's own graph is untouched
    torch.testing.assert_close(t.output, plain.output.detach(), rtol=0, atol=0)

    keep = {}

    def grab(mod, args, output):
        keep["output"] = output

    handle = model.get_submodule(name).register_forward_hook(grab)
    with torch.no_grad(), Trace(model, name, clone=True) as cloned:
        model(input_ids=IDS)
    handle.remove()
    assert cloned.output.data_ptr() != keep["output"].data_ptr()
    assert torch.equal(cloned.output, keep["output"])


@torch.no_grad()
def test_trace_dict_three_modules(model_and_kind):
    model, kind = model_and_kind
    names = TRACED[kind]
    seen = {}
    handles = []
    for name in names:
        seen[name], hs = _manual_capture(model, name)
        handles += hs
    try:
        with TraceDict(model, names, retain_input=True) as td:
            model(input_ids=IDS, attention_mask=MASK)
    finally:
        for h in handles:
            h.remove()
    assert list(td) == list(names) and len(td) == 3
    for name in names:
        assert torch.equal(td[name].input, seen[name]["input"])
        full = seen[name]["output"]
        assert torch.equal(td[name].output, full[0] if isinstance(full, tuple) else full)
    assert _all_hooks_removed(model)


@torch.no_grad()
def test_trace_dict_stops_after_the_last_module_in_forward_order(model_and_kind):
    model, kind = model_and_kind
    names = list(reversed(TRACED[kind]))  # given in reverse forward order: still stops after the last to run
    later = []
    handle = model.get_submodule(LATER[kind]).register_forward_hook(lambda *a: later.append(1))
    try:
        with TraceDict(model, names, stop=True) as td:
            model(input_ids=IDS)
    finally:
        handle.remove()
    assert later == []
    assert all(td[n].calls == 1 and td[n].output is not None for n in names)
    assert _all_hooks_removed(model)


@torch.no_grad()
def test_trace_dict_edit_output_gets_each_name(llama):
    names = ["model.layers.0.mlp", "model.layers.1.mlp"]
    base = llama(input_ids=IDS).logits
    calls = []

    def edit(output, name):
        calls.append(name)
        return output * 0 if name == names[1] else output

    with TraceDict(llama, names, edit_output=edit) as td:
        edited = llama(input_ids=IDS).logits
    assert calls == names
    assert not td[names[1]].output.any()
    assert not torch.allclose(edited, base)
    assert torch.equal(llama(input_ids=IDS).logits, base)


def test_unknown_module_name(llama):
    with pytest.raises(TraceError, match=r"model\.layers\.0\.mlp\.down_prj.*down_proj") as info:
        Trace(llama, "model.layers.0.mlp.down_prj")
    assert isinstance(info.value, ValueError)
    with pytest.raises(TraceError, match=r"1 of the module names.*'model\.nrm' \(did you mean 'model\.norm'\?\)"):
        TraceDict(llama, ["model.layers.0", "model.nrm"])
    with pytest.raises(TraceError, match="at least one"):
        TraceDict(llama, [])
    with pytest.raises(TraceError, match="callable"):
        Trace(llama, "model.norm", edit_output="double")
    assert _all_hooks_removed(llama)


def test_a_trace_cannot_be_entered_twice(llama):
    t = Trace(llama, "model.norm")
    with t, pytest.raises(TraceError, match="already active"), t:
        pass
    assert _all_hooks_removed(llama)
