"""ROME, MEMIT and FT on tiny random models: the model is left unchanged, the patch has the promised shape and rank,
and the new target's probability rises where it should."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_state_equal, snapshot
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hf_edit_patch as hep
from hf_edit_patch.editors import memit, rome, spread
from hf_edit_patch.editors.architectures import get_arch
from hf_edit_patch.editors.hparams import MemitHParams, RomeHParams

WORDS = [
    "the",
    "a",
    "of",
    "in",
    "is",
    "city",
    "located",
    "capital",
    "country",
    "paris",
    "rome",
    "london",
    "berlin",
    "tokyo",
    "france",
    "italy",
    "japan",
    "germany",
    "eiffel",
    "tower",
    "colosseum",
    "louvre",
    "big",
    "ben",
    "museum",
    "river",
    "and",
    "it",
    "was",
    "where",
    "which",
    ".",
    ",",
    "?",
    "you",
    "i",
    "we",
    "because",
    "therefore",
    "he",
    "she",
    "they",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
]
FAST = {"v_num_grad_steps": 15, "n_context_templates": 2, "context_length": 3, "mom2_adjustment": False}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def llama4(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(cfg).eval()


def gpt2_4(tok, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=48,
        n_layer=4,
        n_head=4,
        vocab_size=len(tok),
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": llama4, "gpt2": gpt2_4}


def target_logprob(model, tok, text, target) -> float:
    ids = tok(text).input_ids
    tid = tok(target, add_special_tokens=False).input_ids
    x = torch.tensor([ids + tid[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
    return float(torch.stack([logp[len(ids) - 1 + i, t] for i, t in enumerate(tid)]).mean())


REQ = hep.EditRequest(
    prompt="{} is located in the city of", subject="the eiffel tower", target_new="rome", target_true="paris"
)


def module_output_at_subject(model, tok, name, req):
    from hf_edit_patch.editors.prompts import input_output_at

    return input_output_at(model, tok, name, req.prompt, req.subject)


@pytest.mark.parametrize("arch", MODELS)
def test_rome_update_writes_the_optimized_value_and_leaves_the_model_unchanged(arch, tok, monkeypatch):
    model = MODELS[arch](tok)
    base = snapshot(model)
    spec = get_arch(model)
    name = spec.mlp_out.format(1)  # default layer round(0.2 · 4)
    _, v = module_output_at_subject(model, tok, name, REQ)
    target = v + torch.linspace(-1, 1, v.numel())  # a known value: the update must make the module produce it
    monkeypatch.setattr(rome, "optimize_value", lambda *a, **k: (v, target))
    patch = hep.edit(model, tok, [REQ], method="rome", hparams=FAST, value_dtype="float32", keep_ratio=None)
    assert_state_equal(model, base)
    assert patch.target_modules == [name]
    dense = patch.deltas[name].to_dense()
    assert dense.shape == tuple(model.get_submodule(name).weight.shape)  # Conv1D: [in, out]
    assert torch.linalg.matrix_rank(dense.double(), rtol=1e-5) == 1  # fp32 rounding, not float64 eps
    assert patch.config.editor == "rome" and patch.config.requests[0]["target_new"] == "rome"
    pm = hep.PatchedModel.from_pretrained(model, patch)
    _, now = module_output_at_subject(pm, tok, name, REQ)
    assert torch.allclose(now, target, atol=1e-4), (now - target).abs().max()


@pytest.mark.parametrize("arch", ["llama"])  # a random 4-layer GPT-2 barely routes the subject to the last token
def test_value_optimization_lowers_the_target_nll(arch, tok):
    from hf_edit_patch.editors.hooks import applying, btd
    from hf_edit_patch.editors.prompts import context_templates, subject_last_index
    from hf_edit_patch.editors.value import optimize_value

    model = MODELS[arch](tok)
    name = get_arch(model).mlp_out.format(1)
    hp = RomeHParams(**{**FAST, "v_num_grad_steps": 20})
    contexts = context_templates(model, tok, hp.n_context_templates, hp.context_length, hp.seed)
    v, v_star = optimize_value(model, tok, REQ, name, contexts, hp)
    j = subject_last_index(tok, REQ.prompt, REQ.subject)

    def nll_with(value):
        def put(output, _inputs):
            out = btd(output, 1).clone()
            out[0, j] = value.to(out.dtype)
            return out.view(output.shape)

        with applying(model, {name: put}):
            return -target_logprob(model, tok, REQ.text, "rome")

    before, after = nll_with(v), nll_with(v_star)
    assert after < 0.85 * before, (before, after)  # the optimum under the KL and decay terms, not zero
    assert (v_star - v).norm() <= hp.clamp_norm_factor * v.norm() + 1e-5


def test_rome_several_requests_are_sequential_rank_one_terms(tok, monkeypatch):
    model = llama4(tok)
    name = "model.layers.1.mlp.down_proj"
    reqs = [REQ, hep.EditRequest(prompt="the capital of {} is", subject="japan", target_new="berlin")]
    targets = {}

    def fake_value(model_, tok_, req, module, contexts, hp, edits=None, desc=""):
        from hf_edit_patch.editors.prompts import input_output_at

        _, v = input_output_at(model_, tok_, module, req.prompt, req.subject, edits)
        targets[req.subject] = v + 0.5
        return v, targets[req.subject]

    monkeypatch.setattr(rome, "optimize_value", fake_value)
    u, v = rome.rome_deltas(model, tok, reqs, RomeHParams(**FAST), get_arch(model), None)[name]
    assert u.shape == (48, 2) and v.shape == (96, 2)
    pm = hep.PatchedModel.from_pretrained(
        model, hep.EditPatch.from_deltas({name: (u, v)}, model, value_dtype="float32")
    )
    # the second edit is computed on the model as the first left it, so it lands exactly; it may nudge the first
    _, now = module_output_at_subject(pm, tok, name, reqs[1])
    assert torch.allclose(now, targets[reqs[1].subject], atol=1e-3), (now - targets[reqs[1].subject]).abs().max()


def test_rome_with_second_moment_uses_it(tok):
    model = llama4(tok)
    spec = get_arch(model)
    name = spec.mlp_out.format(1)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(96, 96, generator=gen)
    c = a @ a.T / 96 + torch.eye(96)
    hp = RomeHParams(**{**FAST, "mom2_adjustment": True, "v_num_grad_steps": 1})
    with_c = rome.rome_deltas(model, tok, [REQ], hp, spec, {name: c})[name]
    plain = rome.rome_deltas(model, tok, [REQ], RomeHParams(**{**FAST, "v_num_grad_steps": 1}), spec, None)[name]
    # without C the key direction is k*/|k*|; with C it is C⁻¹k*/|C⁻¹k*|
    expected = torch.linalg.solve(c.double(), plain[1][:, 0].double())
    assert torch.allclose(with_c[1][:, 0].double(), expected / expected.norm(), atol=1e-4)


@pytest.mark.parametrize("arch", MODELS)
def test_memit_closes_the_residual_gap_at_the_last_layer(arch, tok, monkeypatch):
    from hf_edit_patch.editors.prompts import input_output_at

    model = MODELS[arch](tok)
    base = snapshot(model)
    spec = get_arch(model)
    reqs = [
        REQ,
        hep.EditRequest(prompt="the capital of {} is", subject="japan", target_new="berlin"),
        hep.EditRequest(prompt="{} is in the city of", subject="the colosseum", target_new="london"),
    ]
    layers = [1, 2]
    block = f"{spec.layers}.2"
    targets = {}

    def fake_values(model_, tok_, reqs_, module, contexts, hp, edits=None, show_progress=None, desc=""):
        assert module == block  # MEMIT's targets live in the residual stream of the last edited layer
        zs = [input_output_at(model_, tok_, module, req.prompt, req.subject)[1] for req in reqs_]
        for req, z in zip(reqs_, zs, strict=True):
            targets[req.subject] = z + 0.3 * z.norm() / z.numel() ** 0.5
        return torch.stack(zs), torch.stack([targets[req.subject] for req in reqs_])

    monkeypatch.setattr(spread, "optimize_values", fake_values)
    width = model.get_submodule(spec.mlp_out.format(1)).weight.shape[1 if spec.layout == "linear" else 0]
    moments = {spec.mlp_out.format(i): torch.eye(width) for i in layers}
    hp = MemitHParams(layers=layers, mom2_update_weight=1e-4, **{**FAST, "n_context_templates": 0})
    deltas = memit.memit_deltas(model, tok, reqs, hp, spec, moments)
    assert_state_equal(model, base)
    assert sorted(deltas) == [spec.mlp_out.format(i) for i in layers]
    pm = hep.PatchedModel.from_pretrained(model, hep.EditPatch.from_deltas(deltas, model, value_dtype="float32"))
    for req in reqs:
        _, z = input_output_at(pm, tok, block, req.prompt, req.subject)
        gap = (z - targets[req.subject]).norm() / (targets[req.subject] - base_z(model, pm, tok, block, req)).norm()
        assert gap < 0.05, gap


def base_z(model, pm, tok, block, req):
    from hf_edit_patch.editors.prompts import input_output_at

    with pm.disable_patches():
        return input_output_at(model, tok, block, req.prompt, req.subject)[1]


def test_memit_handles_many_requests(tok):
    model = llama4(tok)
    spec = get_arch(model)
    subjects = [f"{a} {b}" for a in WORDS for b in WORDS if a != b][:1000]
    reqs = [hep.EditRequest(prompt="{} is in", subject=s, target_new=WORDS[i % 20]) for i, s in enumerate(subjects)]
    hp = MemitHParams(layers=[1, 2], v_num_grad_steps=1, n_context_templates=0, mom2_adjustment=False)
    moments = {spec.mlp_out.format(i): torch.eye(96) for i in (1, 2)}
    deltas = memit.memit_deltas(model, tok, reqs, hp, spec, moments, show_progress=False)
    u, v = deltas[spec.mlp_out.format(1)]
    assert u.shape == (48, 1000) and v.shape == (96, 1000)
    assert all(torch.isfinite(t).all() for pair in deltas.values() for t in pair)


def test_ft_gives_a_dense_clamped_delta(tok):
    model = llama4(tok)
    base = snapshot(model)
    before = target_logprob(model, tok, REQ.text, "rome")
    patch = hep.edit(
        model,
        tok,
        [REQ],
        method="ft",
        hparams={"norm_constraint": 0.05, "lr": 0.01},
        value_dtype="float32",
        keep_ratio=None,
    )
    assert_state_equal(model, base)
    dense = patch.deltas["model.layers.1.mlp.down_proj"].to_dense()
    assert dense.abs().max() <= 0.05 + 1e-7
    assert patch.nnz > 0.9 * dense.numel()  # dense: most entries moved
    pm = hep.PatchedModel.from_pretrained(model, patch)
    assert target_logprob(pm, tok, REQ.text, "rome") > before + 0.5


def test_patched_model_edit_stacks_and_records_parents(tok):
    model = llama4(tok)
    base = snapshot(model)
    pm = hep.PatchedModel(model)
    first = pm.edit(tok, [REQ], method="rome", hparams=FAST, keep_ratio=0.4)
    second = pm.edit(
        tok,
        [hep.EditRequest(prompt="the capital of {} is", subject="japan", target_new="berlin")],
        method="rome",
        hparams=FAST,
        patch_name="japan",
    )
    assert pm.active_patches == ["edit0", "japan"]
    assert [p["name"] for p in second.config.parent_patches] == ["edit0"]
    assert first.config.keep_ratio == 0.4 and first.config.regularizer == "rect"
    pm.unload()
    assert_state_equal(model, base)


def test_bad_requests_and_methods_are_clear_errors(tok):
    model = llama4(tok)
    with pytest.raises(ValueError, match="exactly one '\\{\\}'"):
        hep.EditRequest(prompt="no slot", subject="x", target_new="y")
    with pytest.raises(ValueError, match="unknown editing method 'magic'"):
        hep.edit(model, tok, [REQ], method="magic")
    with pytest.raises(ValueError, match="unknown RomeHParams fields \\['lr'\\]"):
        hep.edit(model, tok, [REQ], method="rome", hparams={"lr": 1})
    with pytest.raises(ValueError, match="non-empty list"):
        hep.edit(model, tok, [], method="rome")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpointed_blocks_give_the_same_value_and_are_restored(arch, tok):
    from hf_edit_patch.editors.hooks import checkpointed_from
    from hf_edit_patch.editors.prompts import context_templates
    from hf_edit_patch.editors.value import optimize_value

    model = MODELS[arch](tok)
    name = get_arch(model).mlp_out.format(1)
    contexts = context_templates(model, tok, 2, 3, 0)
    results = []
    for checkpoint in (False, True):
        hp = RomeHParams(**{**FAST, "v_num_grad_steps": 5, "checkpoint_blocks": checkpoint})
        results.append(optimize_value(model, tok, REQ, name, contexts, hp)[1])
    assert torch.allclose(results[0], results[1], rtol=1e-5, atol=1e-6), (results[0] - results[1]).abs().max()
    blocks = model.get_submodule(get_arch(model).layers)
    with checkpointed_from(model, name):
        assert "forward" in vars(blocks[1]) and "forward" not in vars(blocks[0])
    assert all("forward" not in vars(b) for b in blocks)  # the class's forward is back


def test_head_only_at_returns_the_full_logits_at_the_chosen_positions(tok):
    from hf_edit_patch.batching import head_only_at

    model = MODELS["llama"](tok)
    ids = torch.tensor([tok(REQ.text).input_ids] * 2)
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([2, 0, ids.shape[1] - 1])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with head_only_at(model, rows, cols):
            picked = model(input_ids=ids).logits
    assert picked.shape == (1, 3, full.shape[-1])
    assert torch.allclose(picked[0], full[rows, cols], atol=1e-6)
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == full.shape  # hook removed


def test_methods_come_from_the_editor_registry_and_the_cli_offers_them_all():
    from hf_edit_patch.cli import build_parser
    from hf_edit_patch.editing import METHODS
    from hf_edit_patch.editors.registry import get_editor

    assert set(METHODS) == {"alphaedit", "ft", "kn", "memit", "mend", "rome"}
    assert get_editor("memit").hparams is MemitHParams
    edit_parser = build_parser()._subparsers._group_actions[0].choices["edit"]
    (method,) = [a for a in edit_parser._actions if a.dest == "method"]
    assert set(method.choices) == set(METHODS)
    with pytest.raises(ValueError, match=r"unknown editing method 'magic'; accepted: \('alphaedit', 'ft', "):
        get_editor("magic")


def test_a_registered_editor_gets_its_declared_inputs_and_records_its_output(tok, monkeypatch):
    from hf_edit_patch.editing import compute_update
    from hf_edit_patch.editors import registry

    model = llama4(tok)
    seen = {}

    def needs(model_, hp, spec):
        return registry.EditorNeeds(parent_requests=True)

    def resolve(model_, hp, spec):
        return dataclasses.replace(hp, layer=2)

    def compute(model_, tok_, reqs, hp, spec, inputs, *, show_progress=None):
        seen.update(layer=hp.layer, parents=inputs.parent_requests, stats=inputs.second_moments)
        name = spec.mlp_out.format(hp.layer)
        return registry.EditorOutput({name: torch.ones(model_.get_submodule(name).weight.shape)}, {"note": "hi"})

    monkeypatch.setattr(registry, "_EDITORS", dict(registry._EDITORS))
    registry.register_editor(registry.EditorSpec("toy", RomeHParams, compute, needs=needs, resolve=resolve))
    update = compute_update(model, tok, [REQ], method="toy")
    assert seen == {"layer": 2, "parents": [], "stats": None}
    assert list(update.deltas) == ["model.layers.2.mlp.down_proj"]
    assert update.record["layer"] == 2 and update.record["note"] == "hi" and "stats_dataset" not in update.record
    with pytest.raises(ValueError, match="already registered"):
        registry.register_editor(registry.EditorSpec("toy", RomeHParams, compute))
