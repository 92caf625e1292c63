"""Which implementation runs: a compiled Triton kernel, the same kernel in Triton's interpreter, or the reference.

- CUDA tensor and Triton importable → the compiled kernel.
- `TRITON_INTERPRET=1` (set before the kernels are defined) and Triton importable → the same kernel through the
  interpreter, on CPU tensors; this is how the kernels are tested without a GPU.
- Otherwise → the pure-torch reference twin.

`HF_EDIT_PATCH_KERNELS=reference|triton|auto` (default `auto`) forces a path. Forcing `triton` where it cannot
run raises a `RuntimeError` that says why.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

MODES = ("auto", "reference", "triton")


def kernel_mode() -> str:
    """The value of `HF_EDIT_PATCH_KERNELS`, validated (read on every call, so tests can change it)."""
    mode = os.environ.get("HF_EDIT_PATCH_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"HF_EDIT_PATCH_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(device: torch.device) -> str | None:
    if not triton_available():
        return "Triton is not installed (pip install 'hf-edit-patch[triton]')"
    if device.type == "cuda" or interpreting():
        return None
    return f"tensors are on {device.type} and TRITON_INTERPRET=1 is not set (Triton compiles for CUDA only)"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors, False for the reference path.

    Raises:
        RuntimeError: when `HF_EDIT_PATCH_KERNELS=triton` forces a kernel that cannot run here.
    """
    mode = kernel_mode()
    if mode == "reference":
        return False
    device = tensors[0].device
    why = _why_not(device)
    if mode == "triton" and why is not None:
        raise RuntimeError(f"HF_EDIT_PATCH_KERNELS=triton, but the Triton kernel cannot run: {why}")
    return why is None
