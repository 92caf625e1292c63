"""Where an editor finds things in a causal LM: decoder blocks, the edited MLP matrix, final norm, head, embeddings.

Example:
    ```python
    >>> from hf_edit_patch.editors.architectures import get_arch, default_rome_layer, mlp_out_name, mlp_width
    >>> spec = get_arch(model)  # doctest: +SKIP
    >>> layer = default_rome_layer(model, spec)  # doctest: +SKIP
    >>> mlp_out_name(spec, layer), mlp_width(model, spec)  # doctest: +SKIP
    ('model.layers.5.mlp.down_proj', 1536)
    >>> # an architecture that is not registered: say where things are
    >>> templates = {"layers": "model.layers", "mlp_out": "model.layers.{}.mlp.down_proj", "layout": "linear",
    ...              "final_norm": "model.norm", "lm_head": "lm_head", "embed": "model.embed_tokens"}
    >>> spec = get_arch(model, templates=templates)  # doctest: +SKIP
    ```

The edited matrix is the MLP's output projection: its input are the "keys" (MLP width wide), its output the "values"
(hidden size wide). Default layers are fractions of the depth, derived from the layers ROME and MEMIT used (ROME:
layer 17 of 48 for GPT-2 XL, 5 of 28 for GPT-J, 15 of 44 for GPT-NeoX-20B; MEMIT: 13-17 of 48 and 3-8 of 28;
EasyEdit: 5 and 4-8 of 32 for LLaMA-7B), so they scale to smaller and larger models of the same family. Measured
defaults for a particular checkpoint go into `LAYER_OVERRIDES`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import PatchError, PatchValidationError
from ..modules import model_source, weight_layout

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "LAYER_OVERRIDES",
    "ArchSpec",
    "ArchitectureError",
    "LayerDefaults",
    "UnsupportedArchitectureError",
    "default_memit_layers",
    "default_rome_layer",
    "get_arch",
    "hidden_size",
    "mlp_out_name",
    "mlp_width",
    "num_layers",
    "resolve_layers",
]

SPEC_LAYOUTS = ("linear", "conv1d")

# A layer choice: an index, a fraction of the depth, explicit indices, or an inclusive (start, end) fraction range.
LayerChoice = int | float | Sequence[int] | tuple[float, float] | range


class ArchitectureError(PatchError):
    """An architecture spec is malformed or does not match the model, or a layer choice is out of range."""


class UnsupportedArchitectureError(ArchitectureError):
    """The model's `config.model_type` has no registered `ArchSpec` and no templates were passed."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_fraction(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0


def _check_rome_layer(value: Any, where: str) -> int | float:
    if _is_int(value) and value >= 0:
        return value
    if _is_fraction(value):
        return value
    raise ArchitectureError(
        f"{where}: rome_layer must be a layer index (int >= 0) or a fraction of the depth (float in [0, 1]), "
        f"got {value!r}"
    )


def _check_memit_layers(value: Any, where: str) -> tuple[int, ...] | tuple[float, float]:
    if isinstance(value, (range, list, tuple)):
        value = tuple(value)
        if value and all(_is_int(v) and v >= 0 for v in value):
            return value
        if len(value) == 2 and all(_is_fraction(v) for v in value) and value[0] <= value[1]:
            return value
    raise ArchitectureError(
        f"{where}: memit_layers must be explicit layer indices (a tuple or range of ints >= 0, e.g. (4, 5, 6, 7, 8)) "
        f"or an inclusive (start, end) range of depth fractions (two floats, 0 <= start <= end <= 1, e.g. "
        f"(0.125, 0.25)), got {value!r}"
    )


@dataclass(frozen=True)
class ArchSpec:
    """
    Where an editor finds the parts of a causal LM, as names relative to the model (`model.named_modules()`).

    Args:
        layers (`str`):
            The `ModuleList` of decoder blocks, e.g. `"model.layers"`.
        mlp_out (`str`):
            The edited matrix, the MLP's output projection, with `"{}"` for the layer index, e.g.
            `"model.layers.{}.mlp.down_proj"`. Its input are the keys, its output the values.
        layout (`str`):
            `"linear"` (`nn.Linear`, weight `[out, in]`) or `"conv1d"` (GPT-2's `Conv1D`, weight `[in, out]`).
        final_norm (`str` or `None`):
            The norm applied before the head, e.g. `"model.norm"`; `None` when the model has none (OPT-350m).
        lm_head (`str`):
            The output projection to the vocabulary, e.g. `"lm_head"`.
        embed (`str`):
            The input token embeddings, e.g. `"model.embed_tokens"`.
        rome_layer (`int` or `float`, *optional*, defaults to `0.2`):
            ROME's default layer: an index, or a fraction of the number of layers.
        memit_layers (`tuple`, *optional*, defaults to `(0.1, 0.3)`):
            MEMIT's default layers: explicit indices (ints), or an inclusive `(start, end)` range of depth
            fractions (two floats). A list or `range` is accepted and stored as a tuple.

    Example:

    ```python
    >>> from hf_edit_patch.editors.architectures import ArchSpec
    >>> spec = ArchSpec(layers="model.layers", mlp_out="model.layers.{}.mlp.down_proj", layout="linear",
    ...                 final_norm="model.norm", lm_head="lm_head", embed="model.embed_tokens",
    ...                 memit_layers=range(4, 9))
    >>> spec.rome_layer, spec.memit_layers
    (0.2, (4, 5, 6, 7, 8))
    ```
    """

    layers: str
    mlp_out: str
    layout: str
    final_norm: str | None
    lm_head: str
    embed: str
    rome_layer: float | int = 0.2
    memit_layers: tuple[float, float] | tuple[int, ...] = (0.1, 0.3)

    def __post_init__(self) -> None:
        for name in ("layers", "mlp_out", "lm_head", "embed", "final_norm"):
            value = getattr(self, name)
            if name == "final_norm" and value is None:
                continue
            if not isinstance(value, str) or not value:
                raise ArchitectureError(
                    f"ArchSpec.{name} must be a non-empty module name as in model.named_modules(), got {value!r}"
                )
        if self.mlp_out.count("{}") != 1:
            raise ArchitectureError(
                f"ArchSpec.mlp_out must contain '{{}}' exactly once, where the layer index goes (e.g. "
                f"'model.layers.{{}}.mlp.down_proj'), got {self.mlp_out!r}"
            )
        if self.layout not in SPEC_LAYOUTS:
            raise ArchitectureError(f"ArchSpec.layout must be one of {SPEC_LAYOUTS}, got {self.layout!r}")
        object.__setattr__(self, "rome_layer", _check_rome_layer(self.rome_layer, "ArchSpec"))
        object.__setattr__(self, "memit_layers", _check_memit_layers(self.memit_layers, "ArchSpec"))


@dataclass(frozen=True)
class LayerDefaults:
    """
    Measured default layers for particular checkpoints, replacing the architecture's (`None` keeps that one).

    Args:
        rome_layer (`int` or `float`, *optional*): as `ArchSpec.rome_layer`.
        memit_layers (`tuple`, *optional*): as `ArchSpec.memit_layers`.

    Example:

    ```python
    >>> from hf_edit_patch.editors.architectures import LayerDefaults
    >>> LayerDefaults(rome_layer=4, memit_layers=range(3, 8))
    LayerDefaults(rome_layer=4, memit_layers=(3, 4, 5, 6, 7))
    ```
    """

    rome_layer: float | int | None = None
    memit_layers: tuple[float, float] | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.rome_layer is not None:
            object.__setattr__(self, "rome_layer", _check_rome_layer(self.rome_layer, "LayerDefaults"))
        if self.memit_layers is not None:
            object.__setattr__(self, "memit_layers", _check_memit_layers(self.memit_layers, "LayerDefaults"))


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


def _find(model: nn.Module, field: str, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else ""
        raise ArchitectureError(
            f"ArchSpec.{field} = {name!r}: no such module in {type(model).__name__}{hint} (names are relative to the "
            "model passed in, as in model.named_modules())"
        ) from None


def _is_empty_slot(model: nn.Module, name: str) -> bool:
    """Whether `name`'s parent exists and sets that attribute to `None` (a module the config switched off)."""
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return False
    return hasattr(parent, leaf) and getattr(parent, leaf) is None


def _validate(model: nn.Module, spec: ArchSpec) -> ArchSpec:
    layers = _find(model, "layers", spec.layers)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
        raise ArchitectureError(
            f"ArchSpec.layers = {spec.layers!r} must name a non-empty ModuleList of decoder blocks, got "
            f"{type(layers).__name__} of length {len(layers) if hasattr(layers, '__len__') else 'n/a'}; ModuleLists "
            f"in this model: {_module_lists(model)}"
        )
    for layer in range(len(layers)):
        name = spec.mlp_out.format(layer)
        module = _find(model, "mlp_out", name)
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
        _find(model, field, getattr(spec, field))
    if spec.final_norm is not None:
        if _is_empty_slot(model, spec.final_norm):
            logger.info(
                "%s has no final norm (%s is None); using final_norm=None", type(model).__name__, spec.final_norm
            )
            spec = dataclasses.replace(spec, final_norm=None)
        else:
            _find(model, "final_norm", spec.final_norm)
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


def num_layers(model: nn.Module, spec: ArchSpec) -> int:
    """
    The number of decoder blocks, `len(model.get_submodule(spec.layers))`.

    Example:

    ```python
    >>> num_layers(model, get_arch(model))  # doctest: +SKIP
    30
    ```
    """
    return len(_find(model, "layers", spec.layers))


def mlp_out_name(spec: ArchSpec, layer: int) -> str:
    """
    The name of the edited matrix of layer `layer`.

    Example:

    ```python
    >>> from hf_edit_patch.editors.architectures import ARCHITECTURES, mlp_out_name
    >>> mlp_out_name(ARCHITECTURES["gpt2"], 17)
    'transformer.h.17.mlp.c_proj'
    ```
    """
    if not _is_int(layer) or layer < 0:
        raise ArchitectureError(f"layer must be an int >= 0, got {layer!r}")
    return spec.mlp_out.format(layer)


def _fraction_to_index(fraction: float, n: int) -> int:
    return min(n - 1, math.floor(fraction * n + 0.5))


def resolve_layers(model: nn.Module, spec: ArchSpec, layers: LayerChoice) -> list[int]:
    """
    Layer indices, ascending and unique, from an index, a depth fraction, explicit indices or a fraction range.

    A fraction `f` means layer `round(f * num_layers)` (half up, at most the last layer); a pair of floats
    `(start, end)` means every layer from `start`'s to `end`'s, inclusive.

    Args:
        model (`torch.nn.Module`): the model (for its number of layers).
        spec (`ArchSpec`): its spec.
        layers (`int`, `float`, sequence of `int`, `range` or `(float, float)`): the choice.

    Returns:
        `list[int]`: the layers, each in `[0, num_layers)`.

    Example:

    ```python
    >>> resolve_layers(gpt2_xl, get_arch(gpt2_xl), (13 / 48, 17 / 48))  # doctest: +SKIP
    [13, 14, 15, 16, 17]
    >>> resolve_layers(smollm2, get_arch(smollm2), 5 / 32)  # 30 layers  # doctest: +SKIP
    [5]
    ```
    """
    n = num_layers(model, spec)
    accepted = (
        f"accepted: a layer index in [0, {n}), a fraction of the depth in [0, 1], explicit indices, or an inclusive "
        "(start, end) pair of fractions"
    )
    if _is_int(layers):
        indices = [layers]
    elif _is_fraction(layers):
        indices = [_fraction_to_index(layers, n)]
    elif isinstance(layers, (range, list, tuple)):
        values = tuple(layers)
        if values and all(_is_int(v) for v in values):
            indices = list(values)
        elif len(values) == 2 and all(_is_fraction(v) for v in values) and values[0] <= values[1]:
            indices = list(range(_fraction_to_index(values[0], n), _fraction_to_index(values[1], n) + 1))
        else:
            raise ArchitectureError(f"layers={layers!r} cannot be resolved; {accepted}")
    else:
        raise ArchitectureError(f"layers={layers!r} ({type(layers).__name__}) cannot be resolved; {accepted}")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ArchitectureError(f"layers {bad} are out of range for a model with {n} layers; {accepted}")
    return sorted(set(indices))


def default_rome_layer(model: nn.Module, spec: ArchSpec) -> int:
    """
    ROME's default layer for this model: `spec.rome_layer` resolved against its depth.

    Example:

    ```python
    >>> default_rome_layer(model, get_arch(model))  # SmolLM2-135M: 5/32 of 30 layers  # doctest: +SKIP
    5
    ```
    """
    return resolve_layers(model, spec, spec.rome_layer)[0]


def default_memit_layers(model: nn.Module, spec: ArchSpec) -> list[int]:
    """
    MEMIT's default layers for this model: `spec.memit_layers` resolved against its depth.

    Example:

    ```python
    >>> default_memit_layers(model, get_arch(model))  # SmolLM2-135M: 4/32 to 8/32 of 30 layers  # doctest: +SKIP
    [4, 5, 6, 7, 8]
    ```
    """
    return resolve_layers(model, spec, spec.memit_layers)


def hidden_size(model: nn.Module) -> int:
    """
    The residual stream width (the values' dimension): the config's `hidden_size`, else the embedding width.

    Example:

    ```python
    >>> hidden_size(model)  # SmolLM2-135M  # doctest: +SKIP
    576
    ```
    """
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        size = getattr(text_config, "hidden_size", None)
        if _is_int(size):
            return size
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        raise ArchitectureError(
            f"cannot tell the hidden size of {type(model).__name__}: it has neither config.hidden_size nor input "
            "embeddings"
        )
    return embeddings.weight.shape[1]


def mlp_width(model: nn.Module, spec: ArchSpec, layer: int = 0) -> int:
    """
    The MLP's inner width (the keys' dimension): the input size of `mlp_out`, read off its weight and layout.

    Example:

    ```python
    >>> mlp_width(model, get_arch(model))  # SmolLM2-135M  # doctest: +SKIP
    1536
    ```
    """
    name = mlp_out_name(spec, layer)
    weight = getattr(_find(model, "mlp_out", name), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ArchitectureError(f"ArchSpec.mlp_out: {name!r} has no 2-D weight")
    return weight.shape[1] if spec.layout == "linear" else weight.shape[0]
