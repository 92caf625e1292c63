"""The architecture registry (`hf_edit_patch.editors.architectures`, `arch_spec`, `layers`), checked on a tiny model of
every entry."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
)

from hf_edit_patch.editors.arch_spec import ArchitectureError, ArchSpec, LayerDefaults, UnsupportedArchitectureError
from hf_edit_patch.editors.architectures import ARCHITECTURES, get_arch
from hf_edit_patch.editors.layers import (
    default_memit_layers,
    default_rome_layer,
    hidden_size,
    mlp_out_name,
    mlp_width,
    num_layers,
    resolve_layers,
)
from hf_edit_patch.editors.tracing import Trace
from hf_edit_patch.modules import weight_layout

HIDDEN, WIDTH, LAYERS, VOCAB = 32, 48, 3, 64
_COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1}
_LLAMA_LIKE = {
    "hidden_size": HIDDEN,
    "intermediate_size": WIDTH,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    **_COMMON,
}

CONFIGS = {
    "gpt2": lambda: GPT2Config(n_embd=HIDDEN, n_inner=WIDTH, n_layer=LAYERS, n_head=4, n_positions=32, **_COMMON),
    "gpt_neo": lambda: GPTNeoConfig(
        hidden_size=HIDDEN,
        intermediate_size=WIDTH,
        num_layers=LAYERS,
        num_heads=4,
        max_position_embeddings=32,
        attention_types=[[["global", "local"], 1], [["global"], 1]],
        **_COMMON,
    ),
    "gptj": lambda: GPTJConfig(
        n_embd=HIDDEN, n_inner=WIDTH, n_layer=LAYERS, n_head=4, rotary_dim=4, n_positions=32, **_COMMON
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        hidden_size=HIDDEN,
        intermediate_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=32,
        **_COMMON,
    ),
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: Qwen3Config(**_LLAMA_LIKE, head_dim=8),
    "opt": lambda: OPTConfig(
        hidden_size=HIDDEN,
        ffn_dim=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=HIDDEN,
        **_COMMON,
    ),
    "phi": lambda: PhiConfig(**{k: v for k, v in _LLAMA_LIKE.items() if k != "num_key_value_heads"}),
}


def build(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[model_type]()
    assert config.model_type == model_type
    return AutoModelForCausalLM.from_config(config).eval()


def test_every_registered_type_is_tested():
    assert set(CONFIGS) == set(ARCHITECTURES)
    assert {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "opt", "phi"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_registered_architecture(model_type):
    model = build(model_type)
    spec = get_arch(model)
    assert spec == ARCHITECTURES[model_type]
    assert num_layers(model, spec) == LAYERS
    assert hidden_size(model) == HIDDEN

    for layer in range(LAYERS):
        module = model.get_submodule(mlp_out_name(spec, layer))
        assert weight_layout(module) == spec.layout
        assert mlp_width(model, spec, layer) == WIDTH

    # keys (the edited matrix's input) are MLP-width wide, values (its output) hidden-size wide
    name = mlp_out_name(spec, LAYERS - 1)
    with torch.no_grad(), Trace(model, name, retain_input=True, stop=True) as t:
        model(input_ids=torch.tensor([[2, 3, 4, 5]]))
    # OPT flattens (batch, seq) into one dimension before its MLP: [4, width], not [1, 4, width]
    assert t.input.shape[-1] == WIDTH and t.input.numel() == 4 * WIDTH
    assert t.output.shape[-1] == HIDDEN and t.output.numel() == 4 * HIDDEN

    assert model.get_submodule(spec.embed) is model.get_input_embeddings()
    assert model.get_submodule(spec.lm_head) is model.get_output_embeddings()
    assert "norm" in type(model.get_submodule(spec.final_norm)).__name__.lower()

    rome = default_rome_layer(model, spec)
    memit = default_memit_layers(model, spec)
    assert 0 <= rome < LAYERS
    assert memit and memit == sorted(set(memit)) and all(0 <= i < LAYERS for i in memit)


def _fake(spec: ArchSpec, n: int) -> nn.Module:
    """A module with only the decoder-block list, `n` long: enough for resolving layer choices."""
    root = nn.Module()
    *path, leaf = spec.layers.split(".")
    node = root
    for part in path:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(leaf, nn.ModuleList(nn.Identity() for _ in range(n)))
    return root


@pytest.mark.parametrize(
    ("model_type", "n", "rome", "memit"),
    [
        ("gpt2", 48, 17, [13, 14, 15, 16, 17]),  # GPT-2 XL in ROME / MEMIT
        ("gptj", 28, 5, [3, 4, 5, 6, 7, 8]),  # GPT-J in ROME / MEMIT
        ("gpt_neox", 44, 15, [11, 12, 13, 14, 15]),  # GPT-NeoX-20B in ROME
        ("llama", 32, 5, [4, 5, 6, 7, 8]),  # LLaMA-7B in EasyEdit
        ("llama", 30, 5, [4, 5, 6, 7, 8]),  # SmolLM2-135M
        ("llama", 2, 0, [0, 1]),
    ],
)
def test_default_layers_reproduce_the_published_choices(model_type, n, rome, memit):
    spec = ARCHITECTURES[model_type]
    model = _fake(spec, n)
    assert default_rome_layer(model, spec) == rome
    assert default_memit_layers(model, spec) == memit


def test_resolve_layers():
    spec = ARCHITECTURES["llama"]
    model = _fake(spec, 10)
    assert resolve_layers(model, spec, 3) == [3]
    assert resolve_layers(model, spec, 0.0) == [0]
    assert resolve_layers(model, spec, 1.0) == [9]
    assert resolve_layers(model, spec, 0.25) == [3]  # 2.5 rounds half up
    assert resolve_layers(model, spec, (5, 2, 5)) == [2, 5]
    assert resolve_layers(model, spec, range(7, 10)) == [7, 8, 9]
    assert resolve_layers(model, spec, (0.1, 0.3)) == [1, 2, 3]
    for bad, match in [
        (10, r"\[10\] are out of range for a model with 10 layers"),
        ([-1, 2], r"\[-1\] are out of range"),
        (1.5, "cannot be resolved"),
        (True, "cannot be resolved"),
        ((0.5, 0.1), "cannot be resolved"),
        ((0.1, 2), "cannot be resolved"),
        ([], "cannot be resolved"),
        ("5", "cannot be resolved"),
    ]:
        with pytest.raises(ArchitectureError, match=match):
            resolve_layers(model, spec, bad)


def test_unknown_model_type_lists_supported_types_and_templates(monkeypatch):
    model = build("llama")
    monkeypatch.setattr(model.config, "model_type", "mystery")
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_arch(model)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'mystery'" in message
    for model_type in ARCHITECTURES:
        assert repr(model_type) in message
    assert "templates={" in message and "'mlp_out': 'model.layers.{}.mlp.down_proj'" in message
    assert "ModuleLists in this model: ['model.layers']" in message


def test_custom_templates(monkeypatch):
    model = build("llama")
    monkeypatch.setattr(model.config, "model_type", "mystery")
    llama = ARCHITECTURES["llama"]
    assert get_arch(model, templates=llama) == llama

    fields = {f: getattr(llama, f) for f in ("layers", "mlp_out", "layout", "final_norm", "lm_head", "embed")}
    spec = get_arch(model, templates={**fields, "rome_layer": 1, "memit_layers": [0, 1]})
    assert spec.rome_layer == 1 and spec.memit_layers == (0, 1)
    assert default_rome_layer(model, spec) == 1 and default_memit_layers(model, spec) == [0, 1]
    assert get_arch(model, templates=fields).rome_layer == ArchSpec.rome_layer  # the ArchSpec default


def test_bad_templates_name_the_problem():
    model = build("llama")
    fields = {f.name: getattr(ARCHITECTURES["llama"], f.name) for f in dataclasses.fields(ArchSpec)}
    cases = [
        ({"mlp_out": "model.layers.{}.mlp.down_prj"}, r"mlp_out = 'model\.layers\.0\.mlp\.down_prj'.*down_proj"),
        ({"final_norm": "model.nrm"}, r"final_norm = 'model\.nrm'.*did you mean \['model\.norm'"),
        ({"lm_head": "head"}, r"lm_head = 'head'"),
        ({"embed": "model.embed"}, r"embed = 'model\.embed'.*model\.embed_tokens"),
        ({"layers": "model.layer"}, r"layers = 'model\.layer'.*model\.layers"),
        ({"layers": "model.norm"}, r"non-empty ModuleList.*\['model\.layers'\]"),
        ({"layout": "conv1d"}, r"layout = 'conv1d', but 'model\.layers\.0\.mlp\.down_proj' is a Linear"),
        ({"mlp_out": "model.layers.{}.mlp"}, r"LlamaMLP without a 2-D weight"),
        ({"mlp_out": "model.layers.0.mlp.down_proj"}, r"must contain '\{\}' exactly once"),
        ({"layout": "embedding"}, r"layout must be one of \('linear', 'conv1d'\)"),
        ({"memit_layers": (0.1, 2)}, "memit_layers must be explicit layer indices"),
        ({"rome_layer": -1}, "rome_layer must be a layer index"),
        ({"lm_head": ""}, "lm_head must be a non-empty module name"),
    ]
    for change, match in cases:
        with pytest.raises(ArchitectureError, match=match):
            get_arch(model, templates={**fields, **change})
    with pytest.raises(ArchitectureError, match=r"unknown keys \['rewrite_module_tmp'\].*accepted keys"):
        get_arch(model, templates={**fields, "rewrite_module_tmp": "x"})
    with pytest.raises(ArchitectureError, match=r"missing keys \['embed'\]"):
        get_arch(model, templates={k: v for k, v in fields.items() if k != "embed"})
    with pytest.raises(ArchitectureError, match="templates must be an ArchSpec"):
        get_arch(model, templates="llama")


def test_layer_overrides(monkeypatch):
    model = build("llama")
    monkeypatch.setattr(model.config, "_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    by_name = {"smollm2": LayerDefaults(rome_layer=0), "SmolLM2-135M": LayerDefaults(rome_layer=2)}
    spec = get_arch(model, overrides=by_name)
    assert spec.rome_layer == 2  # the longest matching name wins; memit_layers keeps the architecture's
    assert spec.memit_layers == ARCHITECTURES["llama"].memit_layers

    by_shape = {("llama", LAYERS, HIDDEN): LayerDefaults(rome_layer=1, memit_layers=range(1, 3))}
    spec = get_arch(model, overrides=by_shape)
    assert default_rome_layer(model, spec) == 1 and default_memit_layers(model, spec) == [1, 2]

    assert get_arch(model, overrides={("llama", 30, 576): LayerDefaults(rome_layer=9)}) == ARCHITECTURES["llama"]
    assert get_arch(model, overrides={"Qwen": LayerDefaults(rome_layer=9)}) == ARCHITECTURES["llama"]
    # explicit templates are used as given
    assert get_arch(model, templates=ARCHITECTURES["llama"], overrides=by_name) == ARCHITECTURES["llama"]
    with pytest.raises(ArchitectureError, match="rome_layer must be"):
        LayerDefaults(rome_layer="5")


def test_opt_without_final_norm():
    # OPT-350m style: post-norm decoder (no final norm) and a projected embedding
    config = OPTConfig(
        hidden_size=HIDDEN,
        ffn_dim=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        do_layer_norm_before=False,
        **_COMMON,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    spec = get_arch(model)
    assert spec.final_norm is None
    assert dataclasses.replace(spec, final_norm=ARCHITECTURES["opt"].final_norm) == ARCHITECTURES["opt"]
    assert hidden_size(model) == HIDDEN and mlp_width(model, spec) == WIDTH
