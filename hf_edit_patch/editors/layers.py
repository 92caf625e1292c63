"""Where things are in a model, given its `ArchSpec`: the number of decoder blocks, the edited matrix of a layer,
layer choices resolved against the depth (ROME's and MEMIT's defaults), the residual and MLP widths.

Example:
    ```python
    >>> from hf_edit_patch.editors.architectures import get_arch
    >>> from hf_edit_patch.editors.layers import default_rome_layer, mlp_out_name, mlp_width
    >>> spec = get_arch(model)  # doctest: +SKIP
    >>> mlp_out_name(spec, default_rome_layer(model, spec)), mlp_width(model, spec)  # doctest: +SKIP
    ('model.layers.5.mlp.down_proj', 1536)
    ```
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import nn

from .arch_spec import ArchitectureError, ArchSpec, LayerChoice, is_fraction, is_int

__all__ = [
    "default_memit_layers",
    "default_rome_layer",
    "find_module",
    "hidden_size",
    "mlp_out_name",
    "mlp_width",
    "num_layers",
    "resolve_layers",
]


def find_module(model: nn.Module, field: str, name: str) -> nn.Module:
    """`model.get_submodule(name)`, or an `ArchitectureError` naming the spec field and the closest names."""
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


def num_layers(model: nn.Module, spec: ArchSpec) -> int:
    """
    The number of decoder blocks, `len(model.get_submodule(spec.layers))`.

    Example:

    ```python
    >>> num_layers(model, get_arch(model))  # doctest: +SKIP
    30
    ```
    """
    return len(find_module(model, "layers", spec.layers))


def mlp_out_name(spec: ArchSpec, layer: int) -> str:
    """
    The name of the edited matrix of layer `layer`.

    Example:

    ```python
    >>> from hf_edit_patch.editors.architectures import ARCHITECTURES
    >>> from hf_edit_patch.editors.layers import mlp_out_name
    >>> mlp_out_name(ARCHITECTURES["gpt2"], 17)
    'transformer.h.17.mlp.c_proj'
    ```
    """
    if not is_int(layer) or layer < 0:
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
    if is_int(layers):
        indices = [layers]
    elif is_fraction(layers):
        indices = [_fraction_to_index(layers, n)]
    elif isinstance(layers, (range, list, tuple)):
        values = tuple(layers)
        if values and all(is_int(v) for v in values):
            indices = list(values)
        elif len(values) == 2 and all(is_fraction(v) for v in values) and values[0] <= values[1]:
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
        if is_int(size):
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
    weight = getattr(find_module(model, "mlp_out", name), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ArchitectureError(f"ArchSpec.mlp_out: {name!r} has no 2-D weight")
    return weight.shape[1] if spec.layout == "linear" else weight.shape[0]
