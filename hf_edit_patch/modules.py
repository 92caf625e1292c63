"""Finding the weight matrices a patch targets, and describing them (layout, provenance of the model)."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from .config import LAYOUTS
from .errors import PatchValidationError


def weight_layout(module: nn.Module) -> str:
    """'linear' (`nn.Linear`, `[out, in]`), 'conv1d' (GPT-2 `Conv1D`, `[in, out]`) or 'embedding'."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and getattr(module, "nf", None) is not None:
        return "conv1d"
    raise PatchValidationError(
        f"modules of type {type(module).__name__} cannot be patched; supported: nn.Linear, transformers "
        f"Conv1D and nn.Embedding (layouts {LAYOUTS})"
    )


def _candidates(model: nn.Module) -> list[str]:
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2
    ]


def resolve_weight(model: nn.Module, name: str) -> tuple[nn.Module, torch.Tensor, str]:
    """`(module, weight, layout)` for the module called `name` in `model`.

    Raises:
        PatchValidationError: naming the module and, for a typo, the closest existing names.
    """
    try:
        module = model.get_submodule(name) if name else model
    except AttributeError:
        close = difflib.get_close_matches(name, _candidates(model), n=3, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else ""
        raise PatchValidationError(
            f"module {name!r} does not exist in {type(model).__name__}{hint} "
            "(names are relative to the model passed in, as in model.named_modules())"
        ) from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise PatchValidationError(f"module {name!r} ({type(module).__name__}) has no 2-D weight to patch")
    layout = weight_layout(module)
    if not weight.dtype.is_floating_point:
        raise PatchValidationError(
            f"module {name!r}: weight dtype {weight.dtype} cannot be patched; accepted: float16, bfloat16, "
            "float32, float64 (quantized weights must be dequantized first)"
        )
    return module, weight, layout


def model_source(model: nn.Module) -> tuple[str | None, str | None]:
    """`(model_id, revision)` of a transformers model, for a patch's provenance.

    A model converted by `load_default_model` records where its weights came from in
    `config.hf_edit_patch_source`; otherwise the config's name and commit hash are used.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None, None
    source = getattr(config, "hf_edit_patch_source", None)
    if isinstance(source, dict) and source.get("model_id"):
        return source["model_id"], source.get("revision")
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
    return (str(name) if name else None), getattr(config, "_commit_hash", None)
