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
block, `edit`, `consolidate`, `compact`, `unload`, `merge_and_unload`, loading a saved stack) hold that lock, so
calls from several threads give the result of some serial order, bit for bit. Forward passes do not take it: hold
`pm.lock` around them to keep another thread from changing the weights in the middle of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import PatchError
from ..patch.config import check_patch_name
from ..patch.conflicts import StackConflicts, find_conflicts
from ..patch.edit_patch import EditPatch
from ..patch.sparsifiers import sparsify
from .consolidate import consolidate_run, consolidated_name, run_of
from .persistence import StackPersistence
from .stack import serialized, stack_of
from .writes import Applied, apply_patch, restore_weights, validate_patch

logger = logging.getLogger(__name__)


class PatchedModel(StackPersistence, nn.Module):
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
        self._stack = stack_of(model)

    @property
    def _patches(self) -> OrderedDict[str, EditPatch]:
        return self._stack.patches

    @property
    def _applied(self) -> dict[str, list[Applied]]:
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

    # ------------------------------------------------------------------ stack mechanics
    def _unapply_down_to(self, index: int) -> list[str]:
        """Restores the patches at positions >= index (top first); returns their names, bottom first."""
        names = list(self._patches)[index:]
        for name in reversed(names):
            if name in self._applied:  # after a failed re-apply, the top ones may be off already
                restore_weights(self.base_model, self._applied.pop(name))
        return names

    def _reapply(self, names: list[str]) -> None:
        for name in names:
            self._applied[name] = apply_patch(self.base_model, self._patches[name])

    # ------------------------------------------------------------------ public API
    @serialized
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
        validate_patch(self.base_model, patch, strict=strict)
        self._applied[patch_name] = apply_patch(self.base_model, patch)
        self._patches[patch_name] = patch
        logger.info("Attached patch %r (%d modules, %d entries)", patch_name, len(patch.deltas), patch.nnz)
        return self

    @serialized
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

    @serialized
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

    @serialized
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

    @serialized
    def consolidate(
        self,
        patch_names: list[str] | str | None = None,
        regularizer: str | None = None,
        *,
        regularizer_kwargs: dict[str, Any] | None = None,
        patch_name: str | None = None,
        value_dtype: str | torch.dtype = "float32",
    ) -> EditPatch:
        """Replaces a run of consecutive patches by one patch: their accumulated update, regularized if asked.

        The new patch holds, per module the run touches, the weights with the run applied minus the weights under it
        (float32 by default, so without a regularizer the weights match the run's up to rounding of that
        difference). A stack-level `regularizer` ("prune", "norm_anchor", "rect"; `hf_edit_patch.regularizers.stack`)
        with `regularizer_kwargs` replaces that update with one that satisfies its bound. The patch records the
        replaced patches (`config.consolidates`: names, editors, content hashes), all their requests and the
        regularizer; it is attached where the run was, and the patches above it are re-applied on top. Removing it
        restores the weights under it bit for bit. It saves, loads and pushes like any patch. If anything fails, the
        stack is left as it was.

        Args:
            patch_names: the run, consecutive in the stack (None: every active patch).
            regularizer: a registered stack regularizer, or None for the exact accumulated update.
            regularizer_kwargs: its settings, e.g. `{"threshold": 1.0}` for "prune", `{"alpha": 0.1}` for
                "norm_anchor", `{"keep_ratio": 0.4}` for "rect".
            patch_name: the new patch's name (default: the run's first and last names, 'p2-p3').
            value_dtype: stored dtype of the values ("float32", "float16", "bfloat16" or "auto").

        Example:
            ```python
            >>> pm.consolidate(["p2", "p3"], regularizer="prune", patch_name="c")
            ```
        """
        self._require_enabled("consolidate")
        names = run_of(self.active_patches, patch_names)
        name = patch_name if patch_name is not None else consolidated_name(names)
        check_patch_name(name, [n for n in self._patches if n not in names])
        patch = consolidate_run(
            self.base_model,
            self._stack,
            names,
            regularizer=regularizer,
            regularizer_kwargs=regularizer_kwargs,
            value_dtype=value_dtype,
        )
        self._replace_run(names, patch, name)
        return patch

    def _replace_run(self, names: list[str], patch: EditPatch, patch_name: str) -> None:
        """Attaches `patch` in place of the run `names` and re-applies the patches above; all or nothing."""
        start = list(self._patches).index(names[0])
        saved = list(self._patches.items())
        removed = self._unapply_down_to(start)  # the run and the patches above it, bottom first, now off
        above = removed[len(names) :]
        for name in removed:
            del self._patches[name]
        try:
            self.add_patch(patch, patch_name)
            self._patches.update((n, dict(saved)[n]) for n in above)
            self._reapply(above)
        except BaseException:
            self._unapply_down_to(start)
            self._patches.clear()
            self._patches.update(saved)
            self._reapply(removed)
            raise

    def conflicts(self) -> StackConflicts:
        """What the active patches' edits do to each other: facts edited twice, contradicting requests, overlaps.

        Returns a `StackConflicts` (see `hf_edit_patch.patch.conflicts.find_conflicts`): `superseded` (a later patch
        edits the same subject and relation as an earlier one), `contradictions` (one patch asks for two targets
        for the same subject and relation) and `overlaps` (per module, the entries more than one patch changes).
        `str()` of it is a readable report.

        Example:
            ```python
            >>> print(pm.conflicts())
            ```
        """
        return find_conflicts(list(self.patches.items()))

    @serialized
    def compact(
        self,
        keep_ratio: float | None = None,
        *,
        norm_budget: float | None = None,
        regularizer: str | None = "rect",
        patch_name: str = "stack",
        value_dtype: str | torch.dtype = "float32",
    ) -> EditPatch:
        """Stack-level sparsifying: replaces every active patch with one patch of their combined update.

        `consolidate` of the whole stack with a per-matrix `regularizer` ("rect", "random" or "pca") applied to the
        combined update at `keep_ratio` (or RECT's `norm_budget`), so that however many edits are stacked, the number
        of changed entries stays bounded. With `keep_ratio=None` and no `norm_budget` the stack becomes one patch
        holding the whole combined update. The patch also lists the replaced patches in
        `editor_hparams["compacted"]`. If anything fails, the stack is left as it was.

        Returns:
            The new patch (also attached as `patch_name`).
        """
        self._require_enabled("compact")
        if not self._patches:
            raise PatchError("there are no active patches to compact")
        names = self.active_patches
        check_patch_name(patch_name, {})
        settings = {"norm_budget": norm_budget} if norm_budget is not None else {}
        sparsifying = regularizer is not None and (keep_ratio is not None or norm_budget is not None)

        def regularize(module: str, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            if not sparsifying:
                return delta
            return sparsify(delta, weight, regularizer, keep_ratio, name=module, **settings).to_dense(torch.float32)

        replaced = [
            {"name": n, "editor": p.config.editor, "content_hash": p.config.content_hash}
            for n, p in self._patches.items()
        ]
        patch = consolidate_run(
            self.base_model,
            self._stack,
            names,
            regularize=regularize,
            value_dtype=value_dtype,
            editor_hparams={"compacted": replaced},
        )
        if sparsifying:
            patch.config = dataclasses.replace(
                patch.config, regularizer=regularizer, keep_ratio=keep_ratio, regularizer_kwargs=settings
            )
        self._replace_run(names, patch, patch_name)
        return patch

    @serialized
    def unload(self) -> nn.Module:
        """Removes every patch and returns the base model, bit-identical to what was passed in."""
        self._require_enabled("unload")
        self._unapply_down_to(0)
        self._patches.clear()
        return self.base_model

    @serialized
    def merge_and_unload(self) -> nn.Module:
        """Returns the base model with the active patches baked in (the undo data is dropped)."""
        self._require_enabled("merge")
        self._applied.clear()
        self._patches.clear()
        return self.base_model
