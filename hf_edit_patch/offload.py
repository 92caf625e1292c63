"""Weights of models dispatched with accelerate: where an offloaded weight lives, and writing it there.

A model dispatched with accelerate (`from_pretrained(..., device_map="auto")`, `dispatch_model`,
`load_checkpoint_and_dispatch`, `cpu_offload`, `disk_offload`) keeps the weights of offloaded modules outside the
modules: the parameter is an empty tensor on the `meta` device, and an `AlignDevicesHook` (on the module, or on a
block above it) loads the values from its `weights_map` before each forward and drops them after. Such a weight
lives in the weights map:

- **in memory** (modules mapped to `"cpu"` while the model runs on an accelerator, or `cpu_offload`): a tensor held
  by the map (`OffloadedWeightsLoader.state_dict`, or a plain dict). Patches are written into that tensor, in place.
- **on disk** (modules mapped to `"disk"`): a file, either one of accelerate's `.dat` memory maps in the offload
  folder or the checkpoint's own safetensors file, which transformers reads in place. Files are never written. The
  first patch on such a weight loads it once into CPU memory and puts that copy in the map's `state_dict`, which the
  map reads before its files (an in-memory override); the patch is written there. When the last patch on it is
  removed, the restored copy, bit-identical to the file by then, is dropped and the hook reads the file again. After
  `merge_and_unload` the override stays: it holds the merged weights.

Either way the hook loads from the map it always loaded from, so an attached patch adds nothing to a forward pass
beyond accelerate's own loading. Extra memory: one CPU copy of each disk-offloaded weight a patch touches (a 7B
Llama's `down_proj` in bfloat16: 4096 × 11008 × 2 B = 90 MB).

Weights that are not offloaded (an undispatched model, or modules placed on one of several devices) are ordinary
tensors, written where they are; nothing here applies to them.

accelerate is never imported: its objects are recognized by their attributes (`_hf_hook` on a module, `offload` and
`weights_map` of an `AlignDevicesHook`, `hooks` of a `SequentialHook`, `dataset` and `prefix` of a
`PrefixedDataset`, `state_dict` and `index` of an `OffloadedWeightsLoader`).

Example:
    ```python
    >>> from hf_edit_patch.offload import find_offloaded
    >>> home = find_offloaded(model, "model.layers.30.mlp.down_proj")  # doctest: +SKIP
    >>> home.read().shape, home.in_memory  # doctest: +SKIP
    (torch.Size([4096, 11008]), False)
    ```
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import PatchValidationError

__all__ = ["OffloadedWeight", "compute_device", "find_offloaded", "input_device"]

OVERRIDES_ATTRIBUTE = "_hf_edit_patch_overrides"
"""Attribute of an `OffloadedWeightsLoader`: `{key: patches holding it}` for the in-memory overrides made here."""
_OVERRIDES_LOCK = threading.Lock()


def _hooks(module: nn.Module) -> Iterator[Any]:
    """The accelerate hooks on a module (a `SequentialHook` is opened)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return
    inner = getattr(hook, "hooks", None)
    yield from (inner if isinstance(inner, list | tuple) else (hook,))


def _device(value: Any) -> torch.device | None:
    return None if value is None else torch.device(value)  # an int is an index of the machine's accelerator


@dataclass(frozen=True)
class OffloadedWeight:
    """Where the weight of an offloaded module lives: `mapping[key]`, loaded by a hook that runs on `device`.

    Args:
        mapping: the weights map's own storage: an `OffloadedWeightsLoader` (tensors in `state_dict`, files in
            `index`) or a dict of tensors.
        key: the weight's key in `mapping` (the weights map's prefix included).
        device: the device the module computes on (the hook's execution device), if the hook names one.
    """

    mapping: Any
    key: str
    device: torch.device | None

    @property
    def _loader(self) -> bool:
        return isinstance(getattr(self.mapping, "state_dict", None), dict) and hasattr(self.mapping, "index")

    @property
    def in_memory(self) -> bool:
        """True when the values are a tensor in memory (CPU offload, or a disk weight with an override)."""
        if self._loader:
            return self.key in self.mapping.state_dict
        return isinstance(self.mapping, dict)

    @property
    def identity(self) -> tuple[int, str]:
        """Tells two offloaded weights apart (the same map and key: the same weight)."""
        return id(self.mapping), self.key

    def read(self) -> torch.Tensor:
        """The current values: the tensor in memory itself, else a copy loaded from the file."""
        value = self.mapping[self.key]
        if not isinstance(value, torch.Tensor):
            raise PatchValidationError(
                f"the weights map of the offloaded weight {self.key!r} holds a {type(value).__name__}, not a tensor"
            )
        return value

    def writable(self) -> torch.Tensor:
        """The tensor the hook loads from, in memory, to be written in place (a disk weight gets its override)."""
        if self._loader:
            state = self.mapping.state_dict
            with _OVERRIDES_LOCK:
                if self.key not in state:
                    value = self.mapping[self.key]
                    state[self.key] = torch.empty_like(value, device="cpu").copy_(value)
                    self.mapping.__dict__.setdefault(OVERRIDES_ATTRIBUTE, {})[self.key] = 0
                return state[self.key]
        if isinstance(self.mapping, dict):
            return self.read()
        raise PatchValidationError(
            f"the offloaded weight {self.key!r} is served by a weights map of type {type(self.mapping).__name__}, "
            "which cannot be written; accepted: accelerate's OffloadedWeightsLoader (device_map with 'cpu' or "
            "'disk', load_checkpoint_and_dispatch) or a dict of tensors (cpu_offload)"
        )

    def hold(self) -> None:
        """Counts one more patch written into an override made by `writable` (nothing for other weights)."""
        with _OVERRIDES_LOCK:
            counts = self.mapping.__dict__.get(OVERRIDES_ATTRIBUTE) if self._loader else None
            if counts is not None and self.key in counts:
                counts[self.key] += 1

    def release(self) -> None:
        """Counts one patch less; the override goes once none is left (its values are the file's again)."""
        with _OVERRIDES_LOCK:
            counts = self.mapping.__dict__.get(OVERRIDES_ATTRIBUTE) if self._loader else None
            if counts is None or self.key not in counts:
                return
            counts[self.key] -= 1
            if counts[self.key] <= 0:
                del counts[self.key]
                self.mapping.state_dict.pop(self.key, None)


def _path(model: nn.Module, name: str, module: nn.Module) -> list[str]:
    """The attribute path from `model` to `module` (`name`, plus `base_layer` for a PEFT-wrapped layer)."""
    parts = name.split(".") if name else []
    named = model.get_submodule(name) if name else model
    if named is not module and getattr(named, "base_layer", None) is module:
        parts.append("base_layer")
    return parts


def find_offloaded(model: nn.Module, name: str, module: nn.Module | None = None) -> OffloadedWeight | None:
    """Where the weight of module `name` lives when an accelerate hook offloads it, else None.

    Args:
        model: the model `name` is relative to.
        name: the module's name, as in `model.named_modules()`.
        module: the module holding the weight, when it is not `model.get_submodule(name)` itself (the base layer of
            a PEFT adapter layer).

    Example:
        ```python
        >>> find_offloaded(model, "model.layers.1.mlp.down_proj").key  # doctest: +SKIP
        'model.layers.1.mlp.down_proj.weight'
        ```
    """
    module = module if module is not None else (model.get_submodule(name) if name else model)
    parts = _path(model, name, module)
    owner = model
    chain = [model]
    for part in parts:
        owner = getattr(owner, part)
        chain.append(owner)
    for depth in range(len(parts), -1, -1):
        for hook in _hooks(chain[depth]):
            weights_map = getattr(hook, "weights_map", None)
            if not getattr(hook, "offload", False) or weights_map is None:
                continue
            if depth < len(parts) and not getattr(hook, "place_submodules", False):
                continue
            relative = ".".join([*parts[depth:], "weight"])
            prefix = getattr(weights_map, "prefix", None)
            dataset = getattr(weights_map, "dataset", None)
            if isinstance(prefix, str) and dataset is not None:
                return OffloadedWeight(dataset, prefix + relative, _device(getattr(hook, "execution_device", None)))
            return OffloadedWeight(weights_map, relative, _device(getattr(hook, "execution_device", None)))
    return None


def compute_device(model: nn.Module, name: str) -> torch.device:
    """The device module `name` computes on: its weight's, or for an offloaded weight the hook's execution device.

    Example:
        ```python
        >>> compute_device(model, "model.layers.1.mlp.down_proj")  # doctest: +SKIP
        device(type='cuda', index=0)
        ```
    """
    module = model.get_submodule(name) if name else model
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.is_meta:
        return weight.device
    home = find_offloaded(model, name, module)
    if home is not None and home.device is not None:
        return home.device
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        raise PatchValidationError(
            f"module {name!r} has its weight on the meta device and no accelerate hook that loads it: load the "
            "model's weights (or dispatch it with accelerate) before using it"
        )
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device | None:
    """Where a dispatched model takes its inputs (the execution device of its top hook or first module), else None.

    Example:
        ```python
        >>> input_device(model)  # doctest: +SKIP
        device(type='cuda', index=0)
        ```
    """
    for hook in _hooks(model):
        device = _device(getattr(hook, "execution_device", None))
        if device is not None:
            return device
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict):
        for value in device_map.values():
            if value not in ("cpu", "disk"):
                return _device(value)
        if device_map:
            return torch.device("cpu")
    return None
