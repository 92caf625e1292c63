"""`PatchedModel`: attaches edit patches to a model in place, stacks them, and takes them off exactly.

Patches are applied to the weights themselves (`W[idx] = cast(float32(W[idx]) + float32(ΔW))`), so a patched
model runs exactly as fast as the base. Before writing, the original values of the touched entries are saved;
removing a patch writes them back (never subtracts), so the weights are at every moment bit-identical to the
base with the active patches applied in order.

Example:
    ```python
    from hf_edit_patch import PatchedModel

    pm = PatchedModel.from_pretrained(model, "out/eiffel")       # local folder, Hub id or EditPatch
    pm.add_patch(other, patch_name="p2")                         # stacks on top
    pm.remove_patch("default")                                   # weights == base + p2, exactly
    with pm.disable_patches():
        ...                                                      # the base weights
    base = pm.unload()                                           # bit-identical to the model passed in
    ```

A PEFT `PeftModel` (a base with LoRA adapters, say) can be wrapped too: patches address the base model's module
names, are written into the base weights under PEFT's wrappers while the adapters stay active, and `unload()`
returns the `PeftModel` exactly as it was.

One model, one stack: the attached patches, their undo data and a re-entrant lock live on the wrapped model itself
(attribute `_hf_edit_patch_stack`), so every `PatchedModel` wrapping the same model shows and changes the same
stack. Weight-changing calls (`add_patch`, `load_patch`, `remove_patch`, `disable_patches` for the length of its
block, `edit`, `compact`, `unload`, `merge_and_unload`, loading a saved stack) hold that lock, so calls from several
threads give the result of some serial order, bit for bit. Forward passes do not take it: hold `pm.lock` around
them to keep another thread from changing the weights in the middle of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from .errors import FingerprintMismatchError, PatchError, PatchFormatError, PatchNotFoundError, PatchValidationError
from .hub.files import atomic_write_files
from .hub.push import PushOptions, push_folder
from .hub.resolve import resolve_file
from .kernels.sparse_add import restore_, sparse_add_
from .modules import merged_adapters, resolve_weight, unwrap_peft
from .patch.config import CONFIG_NAME, STACK_NAME, check_patch_name, read_stack, stack_json
from .patch.edit_patch import EditPatch
from .patch.encoding import dtype_name, fingerprint

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .hub.push import PushKwargs

logger = logging.getLogger(__name__)


@dataclass
class _Applied:
    """What one patch wrote into one weight: where, and the values that were there before."""

    module: str
    flat: torch.Tensor
    original: torch.Tensor


def _check_finite(
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


STACK_ATTRIBUTE = "_hf_edit_patch_stack"
_CREATING = threading.Lock()  # held only while a model's stack is created


class _PatchStack:
    """The patches attached to one model, their undo data and the lock that serializes changing them.

    Stored on the model (`STACK_ATTRIBUTE`), so that every wrapper of the model shares it. A copy of the model
    (`copy.deepcopy`, pickle) carries a copy of the patches that are applied in it, with a lock of its own.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.patches: OrderedDict[str, EditPatch] = OrderedDict()
        self.applied: dict[str, list[_Applied]] = {}
        self.disabled = 0

    def __getstate__(self) -> dict[str, Any]:
        with self.lock:  # inside disable_patches() nothing is applied: the copy has the base weights, no patches
            applied = {n: self.applied[n] for n in self.patches if n in self.applied}
            return {"patches": OrderedDict((n, self.patches[n]) for n in applied), "applied": applied}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.patches.update(state["patches"])
        self.applied.update(state["applied"])


F = TypeVar("F", bound=Callable[..., Any])


def _serialized(method: F) -> F:
    """Runs `method` holding the model's stack lock."""

    @functools.wraps(method)
    def locked(self: PatchedModel, *args: Any, **kwargs: Any) -> Any:
        with self._stack.lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


def _stack_of(model: nn.Module) -> _PatchStack:
    """The stack of the model whose weights patches change (inside a PEFT model, its base), created once."""
    target = unwrap_peft(model)
    stack = target.__dict__.get(STACK_ATTRIBUTE)
    if stack is None:
        with _CREATING:
            stack = target.__dict__.get(STACK_ATTRIBUTE)
            if stack is None:
                stack = _PatchStack()
                object.__setattr__(target, STACK_ATTRIBUTE, stack)
    return stack


class PatchedModel(nn.Module):
    """A model with edit patches attached, in the manner of PEFT's `PeftModel`.

    `base_model` is the very model object passed in; its weights are the patched weights while patches are
    active. Calls and unknown attributes (`config`, `generate`, `device`, ...) are delegated to it.

    Wrapping a model that another `PatchedModel` already wraps joins its stack: both wrappers show the same active
    patches, and a patch attached through one is removed through the other. All weight-changing methods are
    thread-safe (see the module docstring); `lock` is the re-entrant lock they hold.

    Args:
        model: any `torch.nn.Module`: typically a transformers `PreTrainedModel`, or a PEFT `PeftModel` (patches then
            name the base model's modules and change its base weights; the adapters stay active).
    """

    is_patched_model = True
    _edit_function: ClassVar[Callable[..., EditPatch] | None] = None  # see register_edit_function

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "is_patched_model", False):
            raise PatchError("the model is already a PatchedModel; add patches to it with add_patch()")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__()
        self.base_model = model
        self.training = model.training  # mirror the wrapped model (nn.Module starts in training mode)
        self._stack = _stack_of(model)

    @property
    def _patches(self) -> OrderedDict[str, EditPatch]:
        return self._stack.patches

    @property
    def _applied(self) -> dict[str, list[_Applied]]:
        return self._stack.applied

    @property
    def lock(self) -> threading.RLock:
        """The re-entrant lock every weight-changing call on this model holds (shared by all its wrappers)."""
        return self._stack.lock

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ state
    @property
    def active_patches(self) -> list[str]:
        """Names of the attached patches, in application order."""
        with self.lock:
            return list(self._patches)

    @property
    def patches(self) -> dict[str, EditPatch]:
        """`{name: EditPatch}` of the attached patches, in application order (a copy)."""
        with self.lock:
            return dict(self._patches)

    def __repr__(self) -> str:
        state = " (disabled)" if self._stack.disabled else ""
        return f"PatchedModel(patches={self.active_patches}{state}, base_model={type(self.base_model).__name__})"

    def _require_enabled(self, what: str) -> None:
        if self._stack.disabled:
            raise PatchError(f"cannot {what} inside disable_patches(); leave the `with` block first")

    # ------------------------------------------------------------------ low level
    def _validate(self, patch: EditPatch, *, strict: bool) -> None:
        """Checks that a patch fits the current weights (layout, shape, tied targets, fingerprints); writes nothing."""
        seen: dict[int, str] = {}
        mismatched = []
        for name, delta in patch.deltas.items():
            record = patch.config.modules[name]
            _, weight, layout = resolve_weight(self.base_model, name)
            merged = merged_adapters(unwrap_peft(self.base_model).get_submodule(name))
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
                    f"module {name!r}: weight shape {list(weight.shape)} does not match the patch's "
                    f"{list(delta.shape)}"
                )
            if not weight.is_contiguous():
                raise PatchValidationError(f"module {name!r}: weight is not contiguous and cannot be patched in place")
            key = weight.untyped_storage().data_ptr() + weight.storage_offset() * weight.element_size()
            if key in seen:
                raise PatchValidationError(
                    f"modules {seen[key]!r} and {name!r} share one weight tensor (tied weights); a patch may target "
                    "it through one name only"
                )
            seen[key] = name
            if record.fingerprint is not None and fingerprint(weight) != record.fingerprint:
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

    def _apply(self, patch: EditPatch) -> list[_Applied]:
        """Writes a patch into the weights with the sparse-add kernel; undone entirely if any result is not finite."""
        applied: list[_Applied] = []
        try:
            with torch.no_grad():
                for name, delta in patch.deltas.items():
                    _, weight, _ = resolve_weight(self.base_model, name)
                    flat = delta.flat_indices.to(weight.device)
                    values = delta.values.to(weight.device)
                    original = sparse_add_(weight.data, flat, values)
                    applied.append(_Applied(name, flat, original))
                    _check_finite(name, weight.data, flat, original, values)
        except BaseException:
            self._restore(applied)
            raise
        return applied

    def _restore(self, applied: list[_Applied]) -> None:
        with torch.no_grad():
            for a in reversed(applied):
                _, weight, _ = resolve_weight(self.base_model, a.module)
                original = a.original
                if original.dtype != weight.dtype or original.device != weight.device:
                    warnings.warn(
                        f"module {a.module!r} changed dtype or device while patched ({original.dtype} -> "
                        f"{weight.dtype}); restoring with a cast, which cannot be bit-exact",
                        stacklevel=3,
                    )
                    original = original.to(weight.device, weight.dtype)
                restore_(weight.data, a.flat.to(weight.device), original)

    def _unapply_down_to(self, index: int) -> list[str]:
        """Restores the patches at positions >= index (top first); returns their names, bottom first."""
        names = list(self._patches)[index:]
        for name in reversed(names):
            if name in self._applied:  # after a failed re-apply, the top ones may be off already
                self._restore(self._applied.pop(name))
        return names

    def _reapply(self, names: list[str]) -> None:
        for name in names:
            self._applied[name] = self._apply(self._patches[name])

    # ------------------------------------------------------------------ public API
    @_serialized
    def add_patch(self, patch: EditPatch, patch_name: str = "default", *, strict: bool = False) -> PatchedModel:
        """Attaches `patch` on top of the active ones, or raises leaving the model untouched.

        Raises:
            PatchValidationError: unknown module, layout/shape mismatch, non-patchable dtype, or a result that
                would not be finite in the weight's dtype.
            FingerprintMismatchError: with `strict=True`, when the target weights differ from those the patch
                was computed on (otherwise a warning).
        """
        if not isinstance(patch, EditPatch):
            raise TypeError(
                f"patch must be an EditPatch, got {type(patch).__name__}; use load_patch() for a path or Hub id"
            )
        check_patch_name(patch_name, self._patches)
        self._require_enabled("add a patch")
        self._validate(patch, strict=strict)
        self._applied[patch_name] = self._apply(patch)
        self._patches[patch_name] = patch
        logger.info("Attached patch %r (%d modules, %d entries)", patch_name, len(patch.deltas), patch.nnz)
        return self

    @_serialized
    def load_patch(
        self,
        path_or_repo_id: str | os.PathLike | EditPatch,
        patch_name: str = "default",
        *,
        strict: bool = False,
        **hub_kwargs: Any,
    ) -> PatchedModel:
        """Loads a patch (folder, Hub id, or EditPatch) and stacks it on top; see `EditPatch.from_pretrained`."""
        check_patch_name(patch_name, self._patches)
        self._require_enabled("load a patch")
        patch = (
            path_or_repo_id
            if isinstance(path_or_repo_id, EditPatch)
            else EditPatch.from_pretrained(path_or_repo_id, **hub_kwargs)
        )
        return self.add_patch(patch, patch_name, strict=strict)

    @_serialized
    def remove_patch(self, patch_name: str) -> EditPatch:
        """Takes one patch off (top or middle); the weights become base + the remaining patches, exactly."""
        if patch_name not in self._patches:
            raise PatchError(f"no patch named {patch_name!r}; active patches: {self.active_patches}")
        self._require_enabled("remove a patch")
        index = list(self._patches).index(patch_name)
        removed = self._unapply_down_to(index)
        above = removed[1:]
        try:
            self._reapply(above)
        except BaseException:  # e.g. a patch above overflows without this one: put everything back as it was
            self._unapply_down_to(index)
            self._reapply(removed)
            raise
        return self._patches.pop(patch_name)

    @contextlib.contextmanager
    def disable_patches(self) -> Iterator[PatchedModel]:
        """Context manager: the base weights inside, the patches re-applied (exactly) on exit, even on error.

        The block holds the model's lock: other threads' weight-changing calls wait until it ends.
        """
        stack = self._stack
        with stack.lock:
            if stack.disabled:
                stack.disabled += 1
                try:
                    yield self
                finally:
                    stack.disabled -= 1
                return
            names = self._unapply_down_to(0)
            stack.disabled = 1
            try:
                yield self
            finally:
                stack.disabled = 0
                self._reapply(names)

    @classmethod
    def register_edit_function(cls, fn: Callable[..., EditPatch]) -> None:
        """Sets the function `edit` runs: `hf_edit_patch.edit`, registered by `hf_edit_patch.editing` on import.

        The editing layer sits above this one (its `keep_ratio="auto"` search attaches candidates to a
        `PatchedModel`), so it plugs itself in rather than being imported from here.
        """
        if not callable(fn):
            raise TypeError(f"the edit function must be callable, got {type(fn).__name__}")
        PatchedModel._edit_function = fn

    @_serialized
    def edit(self, tokenizer: Any, requests: Any, *, patch_name: str | None = None, **kwargs: Any) -> EditPatch:
        """Sequential editing: computes an edit on the current (patched) weights and stacks it on top.

        Takes the arguments of `hf_edit_patch.edit` (method, keep_ratio, regularizer, hparams, stats_dataset, ...).
        The new patch records the active patches as its parents. Returns it.

        Example:
            ```python
            >>> pm.edit(tokenizer, [req], method="memit", patch_name="batch1")
            ```
        """
        self._require_enabled("edit")
        if PatchedModel._edit_function is None:
            raise PatchError(
                "PatchedModel.edit runs hf_edit_patch.edit, which is not loaded: import hf_edit_patch.editing (using "
                "the package as `hf_edit_patch.PatchedModel` loads it)"
            )
        name = patch_name or next(f"edit{i}" for i in range(len(self._patches) + 1) if f"edit{i}" not in self._patches)
        check_patch_name(name, self._patches)
        patch = PatchedModel._edit_function(self, tokenizer, requests, **kwargs)
        self.add_patch(patch, name)
        return patch

    @_serialized
    def compact(
        self,
        keep_ratio: float | None = None,
        *,
        norm_budget: float | None = None,
        regularizer: str | None = "rect",
        patch_name: str = "stack",
        value_dtype: str | torch.dtype = "float32",
    ) -> EditPatch:
        """Stack-level regularization: replaces the active patches with one patch of their combined update.

        The combined ΔW of every module the stack touches (current weights minus base weights) is sparsified again
        with `regularizer` at `keep_ratio` (or RECT's `norm_budget`), so that however many edits are stacked, the
        number of changed entries stays bounded. The new patch is computed against the base weights, records the
        requests of all the patches it replaces, and is attached in their place; removing it restores the base
        model exactly. With `keep_ratio=None` and no `norm_budget` the stack becomes one patch holding the whole
        combined update (in float32 by default, so the weights match the stack's up to rounding of that sum).
        If anything fails, the stack is left as it was.

        Returns:
            The new patch (also attached as `patch_name`).
        """
        self._require_enabled("compact")
        if not self._patches:
            raise PatchError("there are no active patches to compact")
        check_patch_name(patch_name, {})
        modules = sorted({m for p in self._patches.values() for m in p.deltas})
        current = {m: resolve_weight(self.base_model, m)[1].detach().clone() for m in modules}
        replaced = list(self._patches.items())
        with self.disable_patches():
            deltas = {m: current[m].float() - resolve_weight(self.base_model, m)[1].detach().float() for m in modules}
            del current
            patch = EditPatch.from_deltas(
                deltas,
                self.base_model,
                keep_ratio=keep_ratio,
                regularizer=regularizer,
                regularizer_kwargs={"norm_budget": norm_budget} if norm_budget is not None else None,
                value_dtype=value_dtype,
                editor="stack",
                editor_hparams={
                    "compacted": [
                        {"name": n, "editor": p.config.editor, "content_hash": p.config.content_hash}
                        for n, p in replaced
                    ]
                },
                requests=[r for _, p in replaced for r in p.config.requests],
            )
        names = self._unapply_down_to(0)
        self._patches.clear()
        try:
            self.add_patch(patch, patch_name)
        except BaseException:
            self._patches.update(replaced)
            self._reapply(names)
            raise
        return patch

    @_serialized
    def unload(self) -> nn.Module:
        """Removes every patch and returns the base model, bit-identical to what was passed in."""
        self._require_enabled("unload")
        self._unapply_down_to(0)
        self._patches.clear()
        return self.base_model

    @_serialized
    def merge_and_unload(self) -> nn.Module:
        """Returns the base model with the active patches baked in (the undo data is dropped)."""
        self._require_enabled("merge")
        self._applied.clear()
        self._patches.clear()
        return self.base_model

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path_or_repo_id: str | os.PathLike | EditPatch,
        patch_name: str = "default",
        *,
        strict: bool = False,
        **hub_kwargs: Any,
    ) -> PatchedModel:
        """Wraps `model` and attaches a patch (folder, Hub id or EditPatch) or a saved stack of patches.

        A folder or repo written by `PatchedModel.save_pretrained` (with `patch_stack.json`) attaches every
        patch of the stack under its saved name, in order; `patch_name` is then ignored.

        Example:
            ```python
            >>> pm = PatchedModel.from_pretrained(model, "user/edit-patch")
            ```
        """
        pm = model if getattr(model, "is_patched_model", False) else cls(model)
        if isinstance(path_or_repo_id, EditPatch):
            return pm.add_patch(path_or_repo_id, patch_name, strict=strict)
        sub = hub_kwargs.pop("subfolder", None)
        if resolve_file(path_or_repo_id, CONFIG_NAME, subfolder=sub, missing_ok=True, **hub_kwargs) is not None:
            return pm.load_patch(path_or_repo_id, patch_name, strict=strict, subfolder=sub, **hub_kwargs)
        stack_file = resolve_file(path_or_repo_id, STACK_NAME, subfolder=sub, missing_ok=True, **hub_kwargs)
        if stack_file is None:
            where = f"{os.fspath(path_or_repo_id)!r}" + (f" (subfolder {sub!r})" if sub else "")
            raise PatchNotFoundError(
                f"{where} has neither {CONFIG_NAME} (a patch) nor {STACK_NAME} (a stack saved by PatchedModel)"
            )
        names = read_stack(stack_file)
        for name in names:  # before anything is read: a name is also a subfolder path
            check_patch_name(name, dict.fromkeys(pm.active_patches))
        if len(set(names)) != len(names):
            raise PatchFormatError(f"{stack_file} lists a patch name twice: {names}")
        patches = [
            (n, EditPatch.from_pretrained(path_or_repo_id, subfolder=f"{sub}/{n}" if sub else n, **hub_kwargs))
            for n in names
        ]
        attached = []
        with pm.lock:  # the whole stack or nothing, with no other call in between
            try:
                for name, patch in patches:
                    pm.add_patch(patch, name, strict=strict)
                    attached.append(name)
            except BaseException:
                for name in reversed(attached):
                    pm.remove_patch(name)
                raise
        return pm

    @_serialized
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> str:
        """Saves every active patch in its own subfolder (named after the patch) and the order in patch_stack.json.

        The whole stack is one atomic set of files: a kill at any instant leaves the previous save or this one,
        each loading exactly (see `hf_edit_patch.hub.files`). Takes the options of `EditPatch.save_pretrained`.
        """
        save_directory = os.fspath(save_directory)
        files = {}
        for name, patch in self._patches.items():
            files.update(patch.files_to_save(os.path.join(save_directory, name), **kwargs))
        files[os.path.join(save_directory, STACK_NAME)] = stack_json(self.active_patches)
        atomic_write_files(files, root=save_directory)
        return save_directory

    def push_to_hub(
        self,
        repo_id: str,
        **options: Unpack[PushKwargs],
    ) -> Any:
        """Uploads the whole stack (one subfolder per patch, and `patch_stack.json`) in one commit.

        Takes the options of `EditPatch.push_to_hub`; `PatchedModel.from_pretrained(model, repo_id)` loads the stack
        back. Returns the `CommitInfo`.

        Example:
            ```python
            >>> pm.push_to_hub("user/all-edits", revision="v2", create_pr=True)
            ```
        """
        push = PushOptions.from_kwargs(options)
        message = push.commit_message or f"Upload edit patches {self.active_patches}"
        push = dataclasses.replace(push, commit_message=message)
        return push_folder(lambda folder: self.save_pretrained(folder, license=push.license), repo_id, push)
