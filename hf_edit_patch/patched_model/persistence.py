"""Saving, loading and pushing a whole stack of patches (a series): one subfolder per patch, `patch_stack.json`
(the names in order, with their content hashes) and one README.md card that lists every edit.

A series on the Hub grows one commit at a time: `push_to_hub(repo_id, append=True)` sends only the patches the repo
does not hold yet, with the new manifest and card, as one commit on top of the commit it read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import PatchError, PatchFormatError, PatchNotFoundError
from ..hub.cards import card_is_generated_and_unedited, card_with_marker, keeps_existing_card, stack_card
from ..hub.commits import commit_files, head_commit, open_repo, snapshot_commit
from ..hub.files import FileData, atomic_write_files
from ..hub.push import PushOptions, push_folder
from ..hub.resolve import resolve_file
from ..patch.config import CONFIG_NAME, STACK_NAME, PatchConfig, check_patch_name, read_stack_manifest, stack_json
from ..patch.edit_patch import EditPatch
from .stack import serialized

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..hub.push import PushKwargs
    from .model import PatchedModel

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"


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

        A folder or repo written by `PatchedModel.save_pretrained` or `push_to_hub` (with `patch_stack.json`)
        attaches every patch of the stack under its saved name, in order; `patch_name` is then ignored. Each patch's
        content hash is checked against the manifest. From the Hub, `revision=` picks a branch, tag or commit, and
        every file of the series is read from the commit the manifest came from, so a push in the middle of loading
        cannot mix two states of the series.

        Example:
            ```python
            >>> pm = PatchedModel.from_pretrained(model, "user/edit-patch")
            >>> pm = PatchedModel.from_pretrained(model, "user/series", revision="v1")   # the series as tagged
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
        names, hashes = read_stack_manifest(stack_file)
        for name in names:  # before anything is read: a name is also a subfolder path
            check_patch_name(name, dict.fromkeys(pm.active_patches))
        if len(set(names)) != len(names):
            raise PatchFormatError(f"{stack_file} lists a patch name twice: {names}")
        pinned = snapshot_commit(stack_file) if not os.path.isdir(os.fspath(path_or_repo_id)) else None
        if pinned is not None:
            hub_kwargs["revision"] = pinned
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
                _check_manifest(stack_file, patches, hashes)
            except BaseException:
                for name in reversed(attached):
                    pm.remove_patch(name)
                raise
        return pm

    @staticmethod
    def _stack_files(
        save_directory: str,
        patches: list[tuple[str, EditPatch]],
        names: list[str],
        *,
        card: bool,
        license: str | None = None,
        overwrite_card: bool = False,
        card_repo_id: str | None = None,
    ) -> dict[str, FileData]:
        """The files of a save of the stack `patches`: the subfolders of `names`, the manifest of the whole stack and
        (with `card`) the stack's card, unless a person edited the README.md in the folder."""
        files: dict[str, FileData] = {}
        by_name = dict(patches)
        for name in names:
            folder = os.path.join(save_directory, name)
            files.update(by_name[name].files_to_save(folder, license=license, overwrite_card=overwrite_card))
        files[os.path.join(save_directory, STACK_NAME)] = stack_json(
            [n for n, _ in patches], [p.config.content_hash for _, p in patches]
        )
        readme = os.path.join(save_directory, CARD_FILE)
        if card and not keeps_existing_card(readme, overwrite=overwrite_card):
            repo = card_repo_id or save_directory
            files[readme] = card_with_marker(str(stack_card(patches, repo_id=repo, license=license)))
        return files

    @serialized
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        license: str | None = None,
        overwrite_card: bool = False,
        card_repo_id: str | None = None,
    ) -> str:
        """Saves every active patch in its own subfolder (named after the patch), the order and content hashes in
        patch_stack.json, and a README.md card listing every patch and edit.

        The whole stack is one atomic set of files: a kill at any instant leaves the previous save or this one,
        each loading exactly (see `hf_edit_patch.hub.files`). `license` (a Hub license id) goes into the cards; a
        README.md a person edited is kept unless `overwrite_card`; `card_repo_id` is the repo the card's snippets
        load from.

        Example:
            ```python
            >>> pm.save_pretrained("out/all")
            ```
        """
        save_directory = os.fspath(save_directory)
        patches = list(self._patches.items())
        files = self._stack_files(
            save_directory,
            patches,
            [n for n, _ in patches],
            card=True,
            license=license,
            overwrite_card=overwrite_card,
            card_repo_id=card_repo_id,
        )
        atomic_write_files(files, root=save_directory)
        return save_directory

    def push_to_hub(self, repo_id: str, *, append: bool = False, **options: Unpack[PushKwargs]) -> Any:
        """Uploads the stack as a series: one subfolder per patch, `patch_stack.json` and one card, in one commit.

        With `append=True`, the repo's series (at `revision`) must be the first patches of this stack (same names,
        same content hashes): only the patches after them are uploaded, with the new manifest and card, as one
        commit whose parent is the commit that was read. If someone pushed in between, the Hub refuses it
        (`SeriesChangedError`) instead of overwriting. A repo without a series gets the whole stack. Returns the
        `CommitInfo`, or None when the repo already holds the whole stack.

        Takes the options of `EditPatch.push_to_hub`; `PatchedModel.from_pretrained(model, repo_id)` loads the stack
        back.

        Example:
            ```python
            >>> pm.push_to_hub("user/all-edits", revision="v2", create_pr=True)
            >>> pm.edit(tokenizer, [request], patch_name="edit-12")
            >>> pm.push_to_hub("user/all-edits", append=True)   # one commit: edit-12, the manifest, the card
            ```
        """
        push = PushOptions.from_kwargs(options)
        patches = list(self.patches.items())  # a copy, taken under the lock: the push works on this state
        if not patches:
            raise PatchError("there are no active patches to push")
        if not append:
            message = push.commit_message or f"Upload edit patches {[n for n, _ in patches]}"
            push = dataclasses.replace(push, commit_message=message)

            def save(folder: str) -> None:
                files = self._stack_files(
                    folder, patches, [n for n, _ in patches], card=True, license=push.license, card_repo_id=repo_id
                )
                atomic_write_files(files, root=folder)

            return push_folder(save, repo_id, push)
        return self._append_to_series(repo_id, patches, push)

    def _append_to_series(self, repo_id: str, patches: list[tuple[str, EditPatch]], push: PushOptions) -> Any:
        api = open_repo(repo_id, push)
        parent = head_commit(repo_id, revision=push.revision, token=push.token, api=api)
        remote = self._remote_series(repo_id, parent, push.token)
        local = [n for n, _ in patches]
        for i, (name, content_hash) in enumerate(remote):
            mine = patches[i][1].config.content_hash if i < len(local) else None
            if i >= len(local) or local[i] != name or (content_hash is not None and content_hash != mine):
                raise PatchError(
                    f"{repo_id} holds the series {[n for n, _ in remote]}, which is not the start of this stack "
                    f"{local} (they differ at position {i}: {name!r}); push without append=True to replace it, or "
                    "load the series first and edit on top of it"
                )
        new = local[len(remote) :]
        if not new:
            logger.info("%s already holds every patch of this stack; nothing to push", repo_id)
            return None
        card = True
        if parent is not None:
            readme = resolve_file(repo_id, CARD_FILE, revision=parent, token=push.token, missing_ok=True)
            if readme is not None:
                with open(readme, encoding="utf-8", errors="replace") as f:
                    card = card_is_generated_and_unedited(f.read())
                if not card:
                    logger.warning(
                        "Keeping the README.md of %s (a person edited it); the card is not updated", repo_id
                    )
        message = push.commit_message or f"Append edit patch{'es' if len(new) > 1 else ''} {new} to the series"
        push = dataclasses.replace(push, commit_message=message)
        with tempfile.TemporaryDirectory() as folder:
            files = self._stack_files(folder, patches, new, card=card, license=push.license, card_repo_id=repo_id)
            atomic_write_files(files, root=folder)
            return commit_files(folder, repo_id, push, parent_commit=parent, api=api)

    @staticmethod
    def _remote_series(repo_id: str, commit: str | None, token: str | bool | None) -> list[tuple[str, str | None]]:
        """`(name, content hash)` of the series `repo_id` holds at `commit` ([] for none)."""
        if commit is None:
            return []
        stack_file = resolve_file(repo_id, STACK_NAME, revision=commit, token=token, missing_ok=True)
        if stack_file is None:
            if resolve_file(repo_id, CONFIG_NAME, revision=commit, token=token, missing_ok=True) is not None:
                raise PatchError(f"{repo_id} holds a single patch, not a series; push without append=True")
            return []
        names, hashes = read_stack_manifest(stack_file)
        if hashes is None:  # a manifest written without hashes: read them from the patches' configs
            hashes = [
                PatchConfig.from_json_file(
                    resolve_file(repo_id, CONFIG_NAME, subfolder=n, revision=commit, token=token)
                ).content_hash
                for n in names
            ]
        return list(zip(names, hashes, strict=True))


def _check_manifest(stack_file: str, patches: list[tuple[str, EditPatch]], hashes: list[str | None] | None) -> None:
    """Raises unless every patch has the content hash the manifest lists for it (none listed: nothing to check)."""
    for i, (name, patch) in enumerate(patches):
        if hashes is not None and hashes[i] is not None and patch.config.content_hash != hashes[i]:
            raise PatchFormatError(
                f"patch {name!r} of {stack_file} has content hash {patch.config.content_hash}, but the manifest lists "
                f"{hashes[i]}: the series is corrupt or was changed by hand"
            )
