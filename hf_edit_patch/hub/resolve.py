"""Local-or-Hub resolution of files: a folder is tried first, then the Hub (or its cache), with errors naming the
repo and the file that was expected."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import PatchNotFoundError
from .files import committed_path

logger = logging.getLogger(__name__)


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

    A local folder is tried first; anything else is a Hub repo id, downloaded with `hf_hub_download` (so the cache,
    `HF_ENDPOINT`, `HF_HUB_OFFLINE` and tokens work as everywhere in the Hugging Face stack). `missing_ok=True` returns
    None when the folder or repo exists but the file does not; every other failure raises `PatchNotFoundError`
    naming the repo and the file that was expected, chained to the huggingface_hub error.

    Example:
        ```python
        >>> resolve_file("user/edit-patch", "patch_config.json", revision="v1")   # a path in the HF cache
        ```
    """
    source = os.fspath(path_or_repo_id)
    rel = f"{subfolder}/{filename}" if subfolder else filename
    if os.path.isdir(source):
        local = committed_path(source, rel)  # a save cut short after its commit point reads as the new one
        if os.path.isfile(local):
            return local
        if missing_ok:
            return None
        raise PatchNotFoundError(f"{local} does not exist: the folder {source!r} has no {rel!r}")
    options = {"revision": revision, "cache_dir": cache_dir, "token": token}
    try:
        return hf_hub_download(
            repo_id=source,
            filename=filename,
            subfolder=subfolder or None,
            local_files_only=local_files_only,
            force_download=force_download,
            **options,
        )
    except Exception as exc:
        # with force_download, huggingface_hub wraps a failed metadata request in a ValueError
        cause = exc.__cause__ if force_download and type(exc) is ValueError else None
        error = cause if isinstance(cause, HfHubHTTPError) else exc
        _not_found(error, source, rel, missing_ok=missing_ok, **options)  # raises unless the file is just missing
        return None


def _not_found(
    error: Exception,
    source: str,
    rel: str,
    *,
    missing_ok: bool,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
) -> None:
    """Returns when `error` means that `rel` is absent from an existing repo and `missing_ok`; otherwise raises
    `PatchNotFoundError` naming the repo and the file (or re-raises an error that is not about finding files)."""
    where = f"{source!r}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(error, LocalEntryNotFoundError):
        if missing_ok and _known_missing_offline(source, rel, revision=revision, cache_dir=cache_dir):
            return
        raise PatchNotFoundError(
            f"could not get {rel!r} from the Hub repo {where}: it is not in the local cache and the Hub cannot be "
            "reached (offline, HF_HUB_OFFLINE=1 or local_files_only=True)"
        ) from error
    if isinstance(error, EntryNotFoundError):
        if missing_ok:
            return
        raise PatchNotFoundError(f"the Hub repo {where} has no file {rel!r}") from error
    if isinstance(error, RevisionNotFoundError):
        raise PatchNotFoundError(
            f"could not get {rel!r}: revision {revision!r} does not exist in the Hub repo {source!r}"
        ) from error
    if isinstance(error, RepositoryNotFoundError):
        # Some Hub-compatible servers (mirrors such as olah) answer "repository not found" for a missing file or
        # revision of an existing repo; metadata requests tell these apart.
        missing = _what_is_missing(source, revision, token)
        if missing == "file":
            if missing_ok:
                return
            raise PatchNotFoundError(f"the Hub repo {where} has no file {rel!r}") from error
        if missing == "revision":
            raise PatchNotFoundError(
                f"could not get {rel!r}: revision {revision!r} does not exist in the Hub repo {source!r}"
            ) from error
        raise PatchNotFoundError(
            f"could not get {rel!r}: {source!r} is not a local folder and no Hub repo of that name was found "
            "(check the id, or pass token=... for a private repo)"
        ) from error
    if isinstance(error, HFValidationError):
        raise PatchNotFoundError(
            f"could not get {rel!r}: {source!r} is neither an existing local folder nor a valid Hub repo id"
        ) from error
    if isinstance(error, OSError):  # network errors (httpx's are OSErrors too), a Hub that answers 5xx, ...
        raise PatchNotFoundError(f"could not download {rel!r} from the Hub repo {where}: {error}") from error
    raise error


def _what_is_missing(repo_id: str, revision: str | None, token: str | bool | None) -> str:
    """Which is missing: the "file" (the repo has the revision), the "revision" (only the default branch exists)
    or the "repo"."""
    api = HfApi(token=token)
    candidates = [(revision or constants.DEFAULT_REVISION, "file")]
    if revision not in (None, constants.DEFAULT_REVISION):
        candidates.append((constants.DEFAULT_REVISION, "revision"))
    for candidate, answer in candidates:
        try:
            api.repo_info(repo_id, revision=candidate, token=token)
        except Exception:  # not found, no network, or a server without the API: not known to exist
            continue
        return answer
    return "repo"


def _known_missing_offline(
    repo_id: str, rel: str, *, revision: str | None, cache_dir: str | os.PathLike | None
) -> bool:
    """Offline: whether the cache knows `rel` to be absent (a recorded 404), or holds the revision without it."""
    cached = try_to_load_from_cache(repo_id, rel, cache_dir=cache_dir, revision=revision)
    if cached is not None:  # a path (then the download would not have failed) or the "known missing" sentinel
        return not isinstance(cached, str)
    repo_dir = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / (revision or constants.DEFAULT_REVISION)
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    return bool(commit) and (repo_dir / "snapshots" / commit).is_dir()
