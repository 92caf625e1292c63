"""Commits on top of a known state of a Hub repo: what appending to a series of patches needs.

`push_folder` (`push.py`) uploads a whole folder. Appending adds a few files to what a repo already holds, and must
not silently overwrite what someone else pushed in between: `head_commit` reads the commit a branch points to,
and `commit_files` adds files in one commit whose parent must still be that commit (the Hub refuses it otherwise).
`snapshot_commit` tells which commit a file downloaded through the huggingface_hub cache belongs to, so that the
other files of a repo can be read from that same commit.

Example:
    ```python
    from hf_edit_patch.hub.commits import commit_files, head_commit
    from hf_edit_patch.hub.push import PushOptions

    parent = head_commit("user/series")
    commit_files(folder, "user/series", PushOptions(commit_message="Add edit 7"), parent_commit=parent)
    ```
"""

from __future__ import annotations

import os
import re
from pathlib import PurePath
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from ..errors import PatchError
from .push import PushOptions

__all__ = ["SeriesChangedError", "commit_files", "head_commit", "open_repo", "snapshot_commit"]

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class SeriesChangedError(PatchError):
    """The branch moved between reading a repo and committing to it (someone else pushed): read it again."""


def open_repo(repo_id: str, options: PushOptions) -> HfApi:
    """Creates `repo_id` if needed (and the branch `options.revision`, unless a pull request is asked for), as
    `push_folder` does; returns the `HfApi` to go on with."""
    api = HfApi(token=options.token)
    api.create_repo(repo_id, private=options.private, exist_ok=True, token=options.token)
    if options.revision is not None and not options.create_pr:
        api.create_branch(repo_id, branch=options.revision, exist_ok=True, token=options.token)
    return api


def head_commit(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None, api: HfApi | None = None
) -> str | None:
    """The commit `revision` (None: the default branch) of `repo_id` points to; None when the repo or the revision
    does not exist.

    Example:
        ```python
        >>> head_commit("user/series", revision="main")  # doctest: +SKIP
        '3f2b...'
        ```
    """
    api = api or HfApi(token=token)
    try:
        return api.repo_info(repo_id, revision=revision, token=token).sha
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None


def commit_files(
    folder: str | os.PathLike,
    repo_id: str,
    options: PushOptions,
    *,
    parent_commit: str | None,
    api: HfApi | None = None,
) -> Any:
    """One commit adding (or replacing) every file under `folder`, at the same relative paths, on top of
    `parent_commit` (None: on whatever the branch holds). Returns the `CommitInfo`.

    Raises:
        SeriesChangedError: the branch no longer points to `parent_commit` (the Hub answered 412 or 409).
    """
    folder = os.fspath(folder)
    operations = [
        CommitOperationAdd(path_in_repo=PurePath(os.path.relpath(os.path.join(d, f), folder)).as_posix(),
                           path_or_fileobj=os.path.join(d, f))
        for d, _, files in sorted(os.walk(folder))
        for f in sorted(files)
    ]  # fmt: skip
    api = api or HfApi(token=options.token)
    try:
        return api.create_commit(
            repo_id,
            operations,
            commit_message=options.commit_message or "Upload with hf_edit_patch",
            revision=options.revision,
            create_pr=options.create_pr,
            token=options.token,
            parent_commit=parent_commit,
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (409, 412):
            where = repo_id + (f" at {options.revision!r}" if options.revision else "")
            raise SeriesChangedError(
                f"{where} changed after it was read (its head is no longer {parent_commit}): someone else pushed; "
                "load the series again and retry"
            ) from exc
        raise


def snapshot_commit(path: str | os.PathLike) -> str | None:
    """The commit a file downloaded through the huggingface_hub cache belongs to (`.../snapshots/<commit>/...`), or
    None for any other path."""
    parts = PurePath(os.fspath(path)).parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and _COMMIT.match(parts[i + 1]):
            return parts[i + 1]
    return None
