"""What an architecture spec is: where an editor finds the parts of a causal LM, and the default layers of ROME and
MEMIT as indices or fractions of the depth.

Example:
    ```python
    >>> from hf_edit_patch.editors.arch_spec import ArchSpec
    >>> ArchSpec(layers="model.layers", mlp_out="model.layers.{}.mlp.down_proj", layout="linear",
    ...          final_norm="model.norm", lm_head="lm_head", embed="model.embed_tokens").rome_layer
    0.2
    ```

The registered specs and `get_arch` (which checks a spec against a model) are in `editors.architectures`; the layer
queries a spec answers (`mlp_out_name`, `resolve_layers`, ...) in `editors.layers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PatchError

__all__ = [
    "SPEC_LAYOUTS",
    "ArchSpec",
    "ArchitectureError",
    "LayerChoice",
    "LayerDefaults",
    "UnsupportedArchitectureError",
    "is_fraction",
    "is_int",
]

SPEC_LAYOUTS = ("linear", "conv1d")

# A layer choice: an index, a fraction of the depth, explicit indices, or an inclusive (start, end) fraction range.
LayerChoice = int | float | Sequence[int] | tuple[float, float] | range


class ArchitectureError(PatchError):
    """An architecture spec is malformed or does not match the model, or a layer choice is out of range."""


class UnsupportedArchitectureError(ArchitectureError):
    """The model's `config.model_type` has no registered `ArchSpec` and no templates were passed."""


def is_int(x: Any) -> bool:
    """Whether `x` is an int (a bool is not)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_fraction(x: Any) -> bool:
    """Whether `x` is a float in [0, 1] (a fraction of the depth)."""
    return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0


def _check_rome_layer(value: Any, where: str) -> int | float:
    if is_int(value) and value >= 0:
        return value
    if is_fraction(value):
        return value
    raise ArchitectureError(
        f"{where}: rome_layer must be a layer index (int >= 0) or a fraction of the depth (float in [0, 1]), "
        f"got {value!r}"
    )


def _check_memit_layers(value: Any, where: str) -> tuple[int, ...] | tuple[float, float]:
    if isinstance(value, (range, list, tuple)):
        value = tuple(value)
        if value and all(is_int(v) and v >= 0 for v in value):
            return value
        if len(value) == 2 and all(is_fraction(v) for v in value) and value[0] <= value[1]:
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
    >>> from hf_edit_patch.editors.arch_spec import ArchSpec
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
    >>> from hf_edit_patch.editors.arch_spec import LayerDefaults
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
