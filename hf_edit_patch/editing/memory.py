"""How much memory an edit needs, from the model's config alone: the model is built on the `meta` device (no weights
are read or allocated), and the edited matrices' shapes are read off it.

What an edit holds besides the model, and where:

- **statistics**: the float32 `C = E[k kᵀ]` of every edited module (`d_in²` each), on the CPU while the edit runs;
- **statistics pass**: computing them, a float64 sum per module of the pass plus one float32 product, on the device
  each module computes on (modules are grouped into passes whose float32 matrices fit `max_bytes`; one module whose
  matrix alone exceeds it needs a larger `max_bytes`, which `passes` assumes);
- **solve**: the largest per-layer solve in float64, on the edited layer's device, one layer at a time (ROME about 4
  `d_in²` matrices, MEMIT 5, AlphaEdit 6, plus AlphaEdit's projections of all layers, `d_in²` float64 each, on the
  CPU);
- **update**: ΔW made dense for the regularizer, float32, one module at a time, with RECT's working copies (about 3
  matrices); FT keeps ΔW, its gradient and Adam's two moments (4); KN keeps the dense ΔW of all its modules;
- **offload copies**: when the edited layers are offloaded to disk, attaching the patch keeps one copy of each edited
  weight in CPU memory (`hf_edit_patch.offload`).

Activations (the value optimization's prompts, from each subject's last token on, backpropagated through the blocks
from the edited layer up, in chunks of at most `v_batch_tokens` prompt tokens) come on top and depend on the prompts,
not on the config.

Example:
    ```python
    >>> from transformers import AutoConfig
    >>> from hf_edit_patch.editing.memory import edit_memory
    >>> config = AutoConfig.from_pretrained("meta-llama/Llama-2-7b-hf")  # doctest: +SKIP
    >>> print(edit_memory(config, method="memit").table())  # doctest: +SKIP
    ```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..editors import alphaedit, ft, kn, memit, rome
from ..editors.architectures import get_arch
from ..editors.registry import get_editor
from ..editors.second_moments import DEFAULT_MAX_BYTES, plan_passes
from ..errors import PatchError
from ..modules import resolve_weight

__all__ = ["EditMemory", "edit_memory"]

_TARGETS: dict[str, Callable[..., list[str]]] = {
    "rome": rome.target_modules,
    "memit": memit.target_modules,
    "alphaedit": alphaedit.target_modules,
    "ft": ft.target_modules,
    "kn": kn.target_modules,
}
_SOLVE_MATRICES = {"rome": 4, "memit": 5, "alphaedit": 6}


@dataclass(frozen=True)
class EditMemory:
    """The memory of one edit, in bytes (see the module docstring for what each part is and where it lives).

    Args:
        method: the editor.
        dtype: the weights' dtype.
        modules: the edited matrices, `{name: (rows, columns)}` in the module's own layout.
        weights: all parameters of the model, in `dtype`.
        largest_block: the largest decoder block, in `dtype` (what one device must hold at least).
        statistics: the float32 statistics of the edited modules (CPU).
        statistics_pass: computing them, the largest pass (float64 sums and a float32 product).
        passes: the passes over the corpus that computing them takes.
        solve: the largest per-layer solve, and for AlphaEdit its projections.
        update: the dense update and the regularizer's working copies.
        offload_copies: one copy of each edited weight, for disk-offloaded edited layers (CPU).
    """

    method: str
    dtype: torch.dtype
    modules: dict[str, tuple[int, int]]
    weights: int
    largest_block: int
    statistics: int
    statistics_pass: int
    passes: int
    solve: int
    update: int
    offload_copies: int

    def table(self) -> str:
        """A plain-text table of the parts, in GiB."""
        rows = [
            ("weights", self.weights, "the devices of the device map (or CPU/disk offload)"),
            ("largest decoder block", self.largest_block, "the least a device (or the offload buffer) holds"),
            ("key statistics", self.statistics, "CPU, during the edit (cached on disk)"),
            (
                "statistics pass",
                self.statistics_pass,
                f"the modules' devices, in {self.passes} pass(es) over the corpus",
            ),
            ("solve", self.solve, "the edited layer's device, one layer at a time"),
            ("dense update", self.update, "the weight's device, one module at a time"),
            ("disk-offload copies", self.offload_copies, "CPU, while the patch is attached to disk-offloaded layers"),
        ]
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [f"{self.method} on {len(self.modules)} module(s), weights in {dtype}"]
        lines += [f"  {name:<22} {size / 2**30:9.2f} GiB   {where}" for name, size, where in rows]
        return "\n".join(lines)


def _meta_model(config_or_model: Any) -> nn.Module:
    if isinstance(config_or_model, nn.Module):
        config = config_or_model.config
    elif isinstance(config_or_model, str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config_or_model)
    else:
        config = config_or_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def edit_memory(
    config_or_model: Any,
    *,
    method: str = "rome",
    hparams: Any = None,
    dtype: torch.dtype | str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> EditMemory:
    """The memory an edit with `method` needs on a model, computed from its config (see the module docstring).

    Args:
        config_or_model: a transformers config, a model (only its config is read) or a Hub id / folder of one.
        method: "rome", "memit", "alphaedit", "ft" or "kn".
        hparams: the method's hyperparameters (a dict or its dataclass); the edited layers are resolved from them.
        dtype: the dtype the weights are loaded in (default: a model's own, else the config's, else bfloat16).
        max_bytes: the bound on the float32 matrices of one statistics pass (as `get_second_moments` takes it).

    Returns:
        `EditMemory`, whose `table()` prints it.

    Raises:
        PatchError: a method this estimate does not cover, or a dtype that is not a floating point type.

    Example:
        ```python
        >>> from transformers import LlamaConfig
        >>> from hf_edit_patch.editing.memory import edit_memory
        >>> config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32000)
        >>> round(edit_memory(config, method="memit").statistics / 2**30, 2)  # 5 layers of 11008² float32
        2.26
        ```
    """
    if method not in _TARGETS:
        raise PatchError(f"edit_memory covers the methods {sorted(_TARGETS)}, got {method!r}")
    if dtype is None:
        config = getattr(config_or_model, "config", config_or_model)
        dtype = getattr(config_or_model, "dtype", None) if isinstance(config_or_model, nn.Module) else None
        dtype = dtype or getattr(config, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PatchError(f"dtype must be a floating point torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    model = _meta_model(config_or_model)
    spec = get_arch(model)
    editor = get_editor(method)
    hp = editor.resolve(model, editor.hparams.from_any(hparams), spec)
    targets = _TARGETS[method](model, hp, spec)
    needs = editor.needs(model, hp, spec).statistics
    stats = list(needs.modules) if needs is not None else []
    shapes = {name: tuple(resolve_weight(model, name)[1].shape) for name in dict.fromkeys(targets + stats)}
    layouts = {name: resolve_weight(model, name)[2] for name in shapes}
    d_in = {name: shapes[name][1] if layouts[name] == "linear" else shapes[name][0] for name in stats}
    size = dtype.itemsize
    blocks = model.get_submodule(spec.layers)
    largest = max(sum(p.numel() for p in block.parameters()) for block in blocks) * size
    matrix = {name: shapes[name][0] * shapes[name][1] for name in targets}
    square = max((d * d for d in d_in.values()), default=0)
    groups = plan_passes(model, d_in, max(max_bytes, square * 4)) if d_in else []
    largest_pass = max((sum(d_in[name] ** 2 for name in group) for group in groups), default=0)
    solve = _SOLVE_MATRICES.get(method, 0) * square * 8 if stats else 0
    if method == "alphaedit":
        solve += sum(d * d * 8 for d in d_in.values())
    update = {"ft": 4 * max(matrix.values()), "kn": sum(matrix.values())}.get(method, 3 * max(matrix.values())) * 4
    return EditMemory(
        method=method,
        dtype=dtype,
        modules={name: shapes[name] for name in targets},
        weights=sum(p.numel() for p in model.parameters()) * size,
        largest_block=largest,
        statistics=sum(d * d * 4 for d in d_in.values()),
        statistics_pass=largest_pass * 8 + square * 4,
        passes=len(groups),
        solve=solve,
        update=update,
        offload_copies=sum(matrix.values()) * size,
    )
