"""Local-or-Hub resolution of patch files, and pushing a saved folder to the Hub in one commit."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import PatchNotFoundError

logger = logging.getLogger(__name__)

CARD_MARKER = "<!-- hf_edit_patch card sha256:"


def resolve_file(
    path_or_repo_id: str | os.PathLike,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    missing_ok: bool = False,
) -> str | None:
    """Path of `filename` in a local folder, or downloaded from a Hub repo through the huggingface_hub cache.

    A local folder is tried first. `missing_ok=True` returns None when the repo or folder exists but the file
    does not; every other failure raises `PatchNotFoundError` naming the repo and the file expected.
    """
    source = os.fspath(path_or_repo_id)
    rel = f"{subfolder}/{filename}" if subfolder else filename
    if os.path.isdir(source):
        local = os.path.join(source, subfolder or "", filename)
        if os.path.isfile(local):
            return local
        if missing_ok:
            return None
        raise PatchNotFoundError(f"{local} does not exist: the folder {source!r} has no {rel!r}")
    where = f"{source!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return hf_hub_download(
            repo_id=source,
            filename=filename,
            subfolder=subfolder or None,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
        )
    except LocalEntryNotFoundError as exc:
        raise PatchNotFoundError(
            f"could not get {rel!r} from the Hub repo {where}: it is not in the local cache and the Hub cannot be "
            "reached (offline, HF_HUB_OFFLINE=1 or local_files_only=True)"
        ) from exc
    except EntryNotFoundError as exc:
        if missing_ok:
            return None
        raise PatchNotFoundError(f"the Hub repo {where} has no file {rel!r}") from exc
    except RevisionNotFoundError as exc:
        raise PatchNotFoundError(f"revision {revision!r} does not exist in the Hub repo {source!r}") from exc
    except RepositoryNotFoundError as exc:
        raise PatchNotFoundError(
            f"{source!r} is not a local folder and no Hub repo of that name was found "
            "(check the id, or pass token=... for a private repo)"
        ) from exc
    except HFValidationError as exc:
        raise PatchNotFoundError(f"{source!r} is neither an existing local folder nor a valid Hub repo id") from exc
    except OSError as exc:  # network errors from requests/httpx are OSErrors too
        raise PatchNotFoundError(f"could not download {rel!r} from the Hub repo {where}: {exc}") from exc


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def card_with_marker(body: str) -> str:
    """Appends a marker holding the card's hash, so a later save can tell whether a person edited it."""
    return f"{body.rstrip()}\n\n{CARD_MARKER}{hashlib.sha256(body.rstrip().encode()).hexdigest()} -->\n"


def card_is_generated_and_unedited(text: str) -> bool:
    body, sep, tail = text.rpartition(CARD_MARKER)
    if not sep:
        return False
    return tail.strip().removesuffix("-->").strip() == hashlib.sha256(body.rstrip().encode()).hexdigest()


def write_card(path: str, body: str, *, overwrite: bool, write: Callable[[str, str], None]) -> bool:
    """Writes README.md unless a person edited the existing one (then it is kept unless `overwrite`)."""
    if os.path.exists(path) and not overwrite:
        with open(path, encoding="utf-8", errors="replace") as f:
            existing = f.read()
        if not card_is_generated_and_unedited(existing):
            logger.warning(
                "Keeping the existing %s (it was edited or not written by hf_edit_patch); pass "
                "overwrite_card=True to replace it.",
                path,
            )
            return False
    write(path, card_with_marker(body))
    return True


def push_folder(
    save: Callable[[str], Any],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | bool | None = None,
    api: HfApi | None = None,
) -> Any:
    """Creates the repo (if needed), calls `save(tmp_dir)` and uploads that folder as one commit.

    Returns the `CommitInfo` of the upload.
    """
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload edit patch with hf_edit_patch",
            revision=revision,
            create_pr=create_pr,
            token=token,
        )
