"""Where an editor finds things in a causal LM: decoder blocks, the edited MLP matrix, final norm, head, embeddings.

Example:
    ```python
    >>> from hf_edit_patch.editors.architectures import get_arch
    >>> spec = get_arch(model)  # doctest: +SKIP
    >>> spec.mlp_out  # doctest: +SKIP
    'model.layers.{}.mlp.down_proj'
    >>> # an architecture that is not registered: say where things are
    >>> templates = {"layers": "model.layers", "mlp_out": "model.layers.{}.mlp.down_proj", "layout": "linear",
    ...              "final_norm": "model.norm", "lm_head": "lm_head", "embed": "model.embed_tokens"}
    >>> spec = get_arch(model, templates=templates)  # doctest: +SKIP
    ```

The edited matrix is the MLP's output projection: its input are the "keys" (MLP width wide), its output the "values"
(hidden size wide). Default layers are fractions of the depth, derived from the layers ROME and MEMIT used (ROME:
layer 17 of 48 for GPT-2 XL, 5 of 28 for GPT-J, 15 of 44 for GPT-NeoX-20B; MEMIT: 13-17 of 48 and 3-8 of 28;
EasyEdit: 5 and 4-8 of 32 for LLaMA-7B), so they scale to smaller and larger models of the same family. Measured
defaults for a particular checkpoint go into `LAYER_OVERRIDES`. What a spec holds is `editors.arch_spec`; the layer
queries it answers are `editors.layers`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import PatchValidationError
from ..modules import model_source, weight_layout
from .arch_spec import ArchitectureError, ArchSpec, LayerDefaults, UnsupportedArchitectureError
from .layers import find_module, hidden_size

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "LAYER_OVERRIDES", "get_arch"]


# LLaMA-7B as used by EasyEdit (32 layers): ROME layer 5, MEMIT layers 4-8. Also the default for the other
# LLaMA-style decoders, which have no published layer choice (EasyEdit uses the same indices for Mistral and Qwen2).
_LLAMA_LAYERS = {"rome_layer": 5 / 32, "memit_layers": (4 / 32, 8 / 32)}
# GPT-2 XL in ROME / MEMIT (48 layers): ROME layer 17, MEMIT layers 13-17.
_GPT2_LAYERS = {"rome_layer": 17 / 48, "memit_layers": (13 / 48, 17 / 48)}
# GPT-J 6B in ROME / MEMIT (28 layers): ROME layer 5, MEMIT layers 3-8.
_GPTJ_LAYERS = {"rome_layer": 5 / 28, "memit_layers": (3 / 28, 8 / 28)}
# GPT-NeoX-20B in ROME (44 layers): layer 15. MEMIT range assumed: the 5 layers ending there, as for GPT-2 XL.
_NEOX_LAYERS = {"rome_layer": 15 / 44, "memit_layers": (11 / 44, 15 / 44)}


def _llama_like(**extra: Any) -> ArchSpec:
    fields = {
        "layers": "model.layers",
        "mlp_out": "model.layers.{}.mlp.down_proj",
        "layout": "linear",
        "final_norm": "model.norm",
        "lm_head": "lm_head",
        "embed": "model.embed_tokens",
        **_LLAMA_LAYERS,
    }
    fields.update(extra)
    return ArchSpec(**fields)


# `config.model_type` -> spec; module names checked against transformers 5.24 (tests/test_architectures.py builds a
# tiny model of every entry).
ARCHITECTURES: Mapping[str, ArchSpec] = MappingProxyType(
    {
        "gpt2": ArchSpec(
            layers="transformer.h",
            mlp_out="transformer.h.{}.mlp.c_proj",
            layout="conv1d",
            final_norm="transformer.ln_f",
            lm_head="lm_head",
            embed="transformer.wte",
            **_GPT2_LAYERS,
        ),
        "gpt_neo": ArchSpec(
            layers="transformer.h",
            mlp_out="transformer.h.{}.mlp.c_proj",
            layout="linear",
            final_norm="transformer.ln_f",
            lm_head="lm_head",
            embed="transformer.wte",
            **_GPT2_LAYERS,
        ),
        "gptj": ArchSpec(
            layers="transformer.h",
            mlp_out="transformer.h.{}.mlp.fc_out",
            layout="linear",
            final_norm="transformer.ln_f",
            lm_head="lm_head",
            embed="transformer.wte",
            **_GPTJ_LAYERS,
        ),
        "gpt_neox": ArchSpec(
            layers="gpt_neox.layers",
            mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
            layout="linear",
            final_norm="gpt_neox.final_layer_norm",
            lm_head="lm_head",  # `embed_out` before transformers 5
            embed="gpt_neox.embed_in",
            **_NEOX_LAYERS,
        ),
        "llama": _llama_like(),  # LLaMA 1/2/3, SmolLM2
        "mistral": _llama_like(),
        "qwen2": _llama_like(),
        "qwen3": _llama_like(),
        "opt": ArchSpec(
            layers="model.decoder.layers",
            mlp_out="model.decoder.layers.{}.fc2",
            layout="linear",
            final_norm="model.decoder.final_layer_norm",  # None in OPT-350m (post-norm); get_arch handles that
            lm_head="lm_head",
            embed="model.decoder.embed_tokens",
            **_LLAMA_LAYERS,
        ),
        "phi": _llama_like(mlp_out="model.layers.{}.mlp.fc2", final_norm="model.final_layernorm"),
    }
)

# Measured per-checkpoint defaults, used by `get_arch` in place of the architecture's. A key is either a substring of
# the model's name or path (case-insensitive; the longest matching key wins) or `(model_type, num_layers,
# hidden_size)`; name keys win over shape keys. For example, once a layer sweep has been run on SmolLM2-135M:
#     "smollm2-135m": LayerDefaults(rome_layer=5, memit_layers=(4, 5, 6, 7, 8)),
#     ("llama", 30, 576): LayerDefaults(rome_layer=5),
LAYER_OVERRIDES: Mapping[str | tuple[str, int, int], LayerDefaults] = MappingProxyType({})

_REQUIRED_FIELDS = ("layers", "mlp_out", "layout", "final_norm", "lm_head", "embed")
_ALL_FIELDS = tuple(f.name for f in dataclasses.fields(ArchSpec))


def _templates_example() -> str:
    llama = ARCHITECTURES["llama"]
    fields = ", ".join(f"{name!r}: {getattr(llama, name)!r}" for name in _REQUIRED_FIELDS)
    return f"get_arch(model, templates={{{fields}}})"


def _module_lists(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if config is not None else None


def _spec_from_dict(templates: Mapping[str, Any]) -> ArchSpec:
    unknown = sorted(set(templates) - set(_ALL_FIELDS))
    missing = [name for name in _REQUIRED_FIELDS if name not in templates]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"unknown keys {unknown}")
        if missing:
            problems.append(f"missing keys {missing}")
        raise ArchitectureError(
            f"templates: {' and '.join(problems)}; accepted keys: {list(_ALL_FIELDS)} (required: "
            f"{list(_REQUIRED_FIELDS)}), e.g. {_templates_example()}"
        )
    return ArchSpec(**templates)


def _is_empty_slot(model: nn.Module, name: str) -> bool:
    """Whether `name`'s parent exists and sets that attribute to `None` (a module the config switched off)."""
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return False
    return hasattr(parent, leaf) and getattr(parent, leaf) is None


def _validate(model: nn.Module, spec: ArchSpec) -> ArchSpec:
    layers = find_module(model, "layers", spec.layers)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
        raise ArchitectureError(
            f"ArchSpec.layers = {spec.layers!r} must name a non-empty ModuleList of decoder blocks, got "
            f"{type(layers).__name__} of length {len(layers) if hasattr(layers, '__len__') else 'n/a'}; ModuleLists "
            f"in this model: {_module_lists(model)}"
        )
    for layer in range(len(layers)):
        name = spec.mlp_out.format(layer)
        module = find_module(model, "mlp_out", name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ArchitectureError(
                f"ArchSpec.mlp_out: {name!r} is a {type(module).__name__} without a 2-D weight; it must name the "
                "MLP's output projection (nn.Linear or GPT-2 Conv1D)"
            )
        try:
            layout = weight_layout(module)
        except PatchValidationError as err:
            raise ArchitectureError(f"ArchSpec.mlp_out: {name!r}: {err}") from None
        if layout != spec.layout:
            raise ArchitectureError(
                f"ArchSpec.layout = {spec.layout!r}, but {name!r} is a {type(module).__name__} with layout "
                f"{layout!r}; accepted: the module's own layout ('linear' for nn.Linear, 'conv1d' for Conv1D)"
            )
    for field in ("lm_head", "embed"):
        find_module(model, field, getattr(spec, field))
    if spec.final_norm is not None:
        if _is_empty_slot(model, spec.final_norm):
            logger.info(
                "%s has no final norm (%s is None); using final_norm=None", type(model).__name__, spec.final_norm
            )
            spec = dataclasses.replace(spec, final_norm=None)
        else:
            find_module(model, "final_norm", spec.final_norm)
    return spec


def _override_for(model: nn.Module, model_type: str, overrides: Mapping[Any, LayerDefaults]) -> LayerDefaults | None:
    if not overrides:
        return None
    config = getattr(model, "config", None)
    names = {str(n).lower() for n in (model_source(model)[0], getattr(config, "_name_or_path", None)) if n}
    by_name = [k for k in overrides if isinstance(k, str) and k and any(k.lower() in n for n in names)]
    if by_name:
        return overrides[max(by_name, key=len)]
    spec = ARCHITECTURES[model_type]
    key = (model_type, len(model.get_submodule(spec.layers)), hidden_size(model))
    return overrides.get(key)


def get_arch(
    model: nn.Module,
    *,
    templates: ArchSpec | Mapping[str, Any] | None = None,
    overrides: Mapping[str | tuple[str, int, int], LayerDefaults] | None = None,
) -> ArchSpec:
    """
    The `ArchSpec` of a model, checked against it: every layer's `mlp_out`, `final_norm`, `lm_head` and `embed` exist
    and `mlp_out` has the spec's layout.

    Args:
        model (`torch.nn.Module`):
            A causal LM, e.g. `LlamaForCausalLM` (names are relative to it).
        templates (`ArchSpec` or `dict`, *optional*):
            Where things are, for an architecture that is not registered (or to override a registered one): an
            `ArchSpec`, or a dict with its fields (`layers`, `mlp_out`, `layout`, `final_norm`, `lm_head`, `embed`;
            optionally `rome_layer`, `memit_layers`). Used as given: `overrides` do not apply to it.
        overrides (`Mapping`, *optional*):
            Per-checkpoint default layers (see `LAYER_OVERRIDES`, the default) applied to a registered spec.

    Returns:
        `ArchSpec`: the registered (or given) spec, with the default layers of a matching override and, for a model
        whose final norm is switched off by its config, `final_norm=None`.

    Raises:
        UnsupportedArchitectureError: the model's `config.model_type` is not registered and no templates were given;
            the message lists the registered types and how to pass templates.
        ArchitectureError: the spec names a module the model does not have, or the wrong layout.

    Example:

    ```python
    >>> from hf_edit_patch.editors.architectures import get_arch
    >>> get_arch(model).mlp_out  # doctest: +SKIP
    'model.layers.{}.mlp.down_proj'
    ```
    """
    if isinstance(templates, ArchSpec):
        spec = templates
    elif isinstance(templates, Mapping):
        spec = _spec_from_dict(templates)
    elif templates is None:
        model_type = _model_type(model)
        if model_type not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"no ArchSpec registered for {type(model).__name__} (config.model_type={model_type!r}); supported "
                f"model types: {sorted(ARCHITECTURES)}. For another architecture, pass where things are, e.g. "
                f"{_templates_example()} (names as in model.named_modules(); layout 'linear' for nn.Linear, "
                f"'conv1d' for GPT-2 Conv1D; ModuleLists in this model: {_module_lists(model)})"
            )
        spec = ARCHITECTURES[model_type]
        found = _override_for(model, model_type, LAYER_OVERRIDES if overrides is None else overrides)
        if found is not None:
            changes = {k: v for k, v in dataclasses.asdict(found).items() if v is not None}
            logger.info("Using measured default layers %s for %s", changes, model_source(model)[0])
            spec = dataclasses.replace(spec, **changes)
    else:
        raise ArchitectureError(
            f"templates must be an ArchSpec, a dict of its fields or None, got {type(templates).__name__}"
        )
    return _validate(model, spec)
