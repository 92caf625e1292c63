"""Pushing to the Hub: one set of push options, and a saved folder uploaded as one commit.

Every `push_to_hub` of the library (patches, stacks, saved folders with their evaluation, key statistics, MEND
editors) takes the same keyword options, declared once as `PushKwargs` and carried as `PushOptions`:

Example:
    ```python
    from hf_edit_patch.hub.push import PushOptions, push_folder

    options = PushOptions.from_kwargs({"private": True, "revision": "v2"})
    push_folder(lambda folder: patch.save_pretrained(folder), "user/eiffel", options)
    ```
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

from huggingface_hub import HfApi


class PushKwargs(TypedDict, total=False):
    """The keyword options of every `push_to_hub` (for `**options: Unpack[PushKwargs]` signatures)."""

    private: bool | None
    revision: str | None
    create_pr: bool
    commit_message: str | None
    token: str | bool | None
    license: str | None


@dataclasses.dataclass(frozen=True)
class PushOptions:
    """How a push goes to the Hub.

    Args:
        private: create the repo private (None: the Hub's default; an existing repo keeps its visibility).
        revision: the branch to commit to, created if needed (None: the default branch).
        create_pr: open a pull request with the commit instead of committing to the branch.
        commit_message: the commit message (None: a message naming what is pushed).
        token: a Hub token (None: the saved login or `HF_TOKEN`).
        license: a Hub license id for the card's metadata (None: the base model's where known).
    """

    private: bool | None = None
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    token: str | bool | None = None
    license: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "private": (bool, type(None)),
            "revision": (str, type(None)),
            "create_pr": (bool,),
            "commit_message": (str, type(None)),
            "token": (str, bool, type(None)),
            "license": (str, type(None)),
        }
        for name, types in checks.items():
            value = getattr(self, name)
            if not isinstance(value, types):
                accepted = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                raise TypeError(f"push option {name} must be {accepted}, got {type(value).__name__} {value!r:.60}")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> PushOptions:
        """Options from `push_to_hub` keyword arguments; an unknown keyword is a `TypeError` listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown push option(s) {unknown}; accepted: {sorted(known)}")
        return cls(**kwargs)


def push_folder(
    save: Callable[[str], Any], repo_id: str, options: PushOptions | None = None, *, api: HfApi | None = None
) -> Any:
    """Creates the repo (if needed), calls `save(tmp_dir)` and uploads that folder as one commit.

    Returns the `CommitInfo` of the upload.
    """
    options = options or PushOptions()
    api = api or HfApi(token=options.token)
    api.create_repo(repo_id, private=options.private, exist_ok=True, token=options.token)
    if options.revision is not None and not options.create_pr:
        api.create_branch(repo_id, branch=options.revision, exist_ok=True, token=options.token)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=options.commit_message or "Upload edit patch with hf_edit_patch",
            revision=options.revision,
            create_pr=options.create_pr,
            token=options.token,
        )
