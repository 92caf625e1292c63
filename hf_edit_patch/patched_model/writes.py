"""Writing patches into weights and taking them out again: validation, the sparse add, the undo data.

`apply_patch` writes `W[idx] = cast(float32(W[idx]) + float32(ΔW))` with the sparse-add kernel and returns, per
module, the flat indices and the values that were there before; `restore_weights` writes those values back (never
subtracts), so a restore is bit-exact whatever the dtype.

Each weight is written where it lives: in place on its device, or, for a module accelerate offloads, in the tensor
its hook loads from (for a disk-offloaded weight, an in-memory override of the file, dropped once no patch is left
on it; see `hf_edit_patch.offload`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FingerprintMismatchError, PatchFormatError, PatchValidationError
from ..kernels.sparse_add import restore_, sparse_add_
from ..modules import locate_weight, merged_adapters, unwrap_peft
from ..offload import OffloadedWeight
from ..patch.edit_patch import EditPatch
from ..patch.encoding import dtype_name, fingerprint


@dataclass
class Applied:
    """What one patch wrote into one weight: where, and the values that were there before."""

    module: str
    flat: torch.Tensor
    original: torch.Tensor


def check_finite(
    name: str, weight: torch.Tensor, flat: torch.Tensor, original: torch.Tensor, values: torch.Tensor
) -> None:
    """Raises if cast(W + ΔW) overflowed somewhere; skips the gather when |W| + |ΔW| cannot reach the dtype's max."""
    if not flat.numel():
        return
    bound = float(original.abs().max().to(torch.float64)) + float(values.abs().max().to(torch.float64))
    if bound <= torch.finfo(weight.dtype).max:
        return
    bad = ~torch.isfinite(weight.view(-1)[flat])
    if bool(bad.any()):
        raise PatchValidationError(
            f"module {name!r}: adding the patch makes {int(bad.sum())} entries non-finite in {weight.dtype} (first at "
            f"flat index {int(flat[bad.nonzero()[0]])}); the patch does not fit this weight dtype"
        )


def validate_patch(model: nn.Module, patch: EditPatch, *, strict: bool) -> None:
    """Checks that a patch fits the current weights (layout, shape, tied targets, fingerprints); writes nothing."""
    seen: dict[object, str] = {}
    mismatched = []
    for name, delta in patch.deltas.items():
        record = patch.config.modules[name]
        _, weight, layout, home = locate_weight(model, name)
        weight = home.read() if home is not None else weight
        merged = merged_adapters(unwrap_peft(model).get_submodule(name))
        if merged:
            raise PatchValidationError(
                f"module {name!r}: the PEFT adapter(s) {merged} are merged into its weight; unmerge them first "
                "(peft_model.unmerge_adapter()) so that the patch is applied to, and removed from, the base weight"
            )
        if layout != record.layout:
            raise PatchValidationError(
                f"module {name!r} has layout {layout!r} but the patch was computed for {record.layout!r} "
                "(e.g. a GPT-2 Conv1D patch on an nn.Linear model): the patch does not fit this model"
            )
        if tuple(weight.shape) != delta.shape:
            raise PatchValidationError(
                f"module {name!r}: weight shape {list(weight.shape)} does not match the patch's {list(delta.shape)}"
            )
        if not weight.is_contiguous():
            raise PatchValidationError(f"module {name!r}: weight is not contiguous and cannot be patched in place")
        key = (
            home.identity
            if home is not None
            else weight.untyped_storage().data_ptr() + weight.storage_offset() * weight.element_size()
        )
        if key in seen:
            raise PatchValidationError(
                f"modules {seen[key]!r} and {name!r} share one weight tensor (tied weights); a patch may target "
                "it through one name only"
            )
        seen[key] = name
        dtype_differs = record.weight_dtype is not None and record.weight_dtype != dtype_name(weight.dtype)
        if record.fingerprint is not None and fingerprint(weight) != record.fingerprint:
            mismatched.append((name, record, weight.dtype))
        elif dtype_differs and record.fingerprint is not None:  # a fingerprint covers the dtype: the record lies
            raise PatchFormatError(
                f"module {name!r}: the patch records weight_dtype {record.weight_dtype!r}, but its fingerprint is "
                f"that of this {dtype_name(weight.dtype)} weight: the config is inconsistent (edited or corrupt)"
            )
        elif dtype_differs:
            mismatched.append((name, record, weight.dtype))
    if mismatched:
        details = ", ".join(
            n
            + (
                f" (now {dtype_name(dt)}, patch computed on {r.weight_dtype})"
                if r.weight_dtype and r.weight_dtype != dtype_name(dt)
                else ""
            )
            for n, r, dt in mismatched[:3]
        ) + (", ..." if len(mismatched) > 3 else "")
        msg = (
            f"the weights of {len(mismatched)} target module(s) differ from those the patch was computed on: "
            f"{details}. The edit may not hold on these weights."
        )
        if strict:
            raise FingerprintMismatchError(msg + " (strict=True)")
        warnings.warn(msg + " Pass strict=True to make this an error.", stacklevel=4)


def target_weight(model: nn.Module, name: str) -> tuple[torch.Tensor, OffloadedWeight | None]:
    """The tensor a patch on module `name` is written into, and where an offloaded weight lives (else None)."""
    _, weight, _, home = locate_weight(model, name)
    if home is None:
        return weight.data, None
    return home.writable(), home


def apply_patch(model: nn.Module, patch: EditPatch) -> list[Applied]:
    """Writes a patch into the weights with the sparse-add kernel; undone entirely if any result is not finite."""
    applied: list[Applied] = []
    try:
        with torch.no_grad():
            for name, delta in patch.deltas.items():
                weight, home = target_weight(model, name)
                flat = delta.flat_indices.to(weight.device)
                values = delta.values.to(weight.device)
                if home is not None:
                    home.hold()
                try:
                    original = sparse_add_(weight, flat, values)
                except BaseException:
                    if home is not None:
                        home.release()
                    raise
                applied.append(Applied(name, flat, original))
                check_finite(name, weight, flat, original, values)
    except BaseException:
        restore_weights(model, applied)
        raise
    return applied


def restore_weights(model: nn.Module, applied: list[Applied]) -> None:
    """Writes back the values a patch's entries had before it was applied (top patch first)."""
    with torch.no_grad():
        for a in reversed(applied):
            weight, home = target_weight(model, a.module)
            original = a.original
            if original.dtype != weight.dtype or original.device != weight.device:
                warnings.warn(
                    f"module {a.module!r} changed dtype or device while patched ({original.dtype} -> "
                    f"{weight.dtype}); restoring with a cast, which cannot be bit-exact",
                    stacklevel=3,
                )
                original = original.to(weight.device, weight.dtype)
            restore_(weight, a.flat.to(weight.device), original)
            if home is not None:
                home.release()
