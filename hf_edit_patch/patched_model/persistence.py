"""Saving, loading and pushing a whole stack of patches: one subfolder per patch and `patch_stack.json`."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import PatchFormatError, PatchNotFoundError
from ..hub.files import atomic_write_files
from ..hub.push import PushOptions, push_folder
from ..hub.resolve import resolve_file
from ..patch.config import CONFIG_NAME, STACK_NAME, check_patch_name, read_stack, stack_json
from ..patch.edit_patch import EditPatch
from .stack import serialized

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..hub.push import PushKwargs
    from .model import PatchedModel


class StackPersistence:
    """`from_pretrained`, `save_pretrained` and `push_to_hub` of `PatchedModel` (a mixin; see `PatchedModel`)."""

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

    @serialized
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
