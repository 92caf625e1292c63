"""Sharing key statistics through the Hugging Face Hub: a repo of safetensors files, an `index.json` and a card.

[`push_stats_to_hub`] uploads entries of a [`StatsCache`] in one commit, keeping what an earlier push listed in the
repo's index; [`load_stats_from_hub`] checks every listed file (sha256, key, token count, matrix) before any is stored
in the cache, where `get_second_moments` then finds them instead of computing them.

```
index.json                                   format, version, and one entry per file: filename, key, count, sha256
README.md                                    a card listing model, module, corpus and sizes
<model>--<module>--<key hash>.safetensors    one second moment per key, as written by StatsCache
```

Example:
    ```python
    >>> from hf_edit_patch.hub.stats_cache import StatsCache
    >>> from hf_edit_patch.hub.stats_sharing import load_stats_from_hub, push_stats_to_hub
    >>> cache = StatsCache()
    >>> push_stats_to_hub(cache, cache.entries(), "me/smollm2-key-stats")  # doctest: +SKIP
    >>> load_stats_from_hub("me/smollm2-key-stats")  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import StatsError, StatsFormatError, StatsUnavailableError
from ..progress import progress_bar
from ..schema import Int, List, Object, Str, read_json, validate
from . import resolve as hub
from .files import atomic_write, file_sha256
from .push import PushOptions, push_folder
from .stats_cache import STATS_FORMAT, STATS_FORMAT_VERSION, StatsCache, StatsEntry, StatsKey, read_stats_file

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .push import PushKwargs

logger = logging.getLogger(__name__)

__all__ = ["INDEX_FILENAME", "load_stats_from_hub", "push_stats_to_hub"]

INDEX_FILENAME = "index.json"
MAX_INDEX_ENTRIES = 100_000
# The declared schema of index.json (each entry's key is checked by `StatsKey.from_dict`).
INDEX_SCHEMA = Object(
    {
        "format": Str(max_length=64),
        "format_version": Int(1, 2**31 - 1),
        "entries": List(
            Object(
                {
                    "filename": Str(min_length=1, max_length=512),
                    "key": Object({}, extra="keep", what="a JSON object (a statistics key)"),
                    "count": Int(1, 2**62),
                    "sha256": Str(max_length=71, pattern=r"sha256:[0-9a-f]{64}", what="'sha256:' then 64 hex digits"),
                },
                required=("filename", "key", "count", "sha256"),
                what="a JSON object (an index entry: filename, key, count, sha256)",
            ),
            max_length=MAX_INDEX_ENTRIES,
        ),
    },
    required=("format", "format_version", "entries"),
)


def push_stats_to_hub(
    cache: StatsCache,
    keys_or_entries: Iterable[StatsKey | StatsEntry],
    repo_id: str,
    **options: Unpack[PushKwargs],
) -> Any:
    """
    Uploads cached statistics to a Hub repo in one commit: their safetensors files, an `index.json` and a README.

    The repo is created if needed. Entries already listed in the repo's `index.json` (on the branch pushed to) are
    kept in the new index, so statistics can be added over several pushes.

    Args:
        cache (`StatsCache`): where the entries are.
        keys_or_entries (`Iterable[StatsKey | StatsEntry]`): what to upload (e.g. `cache.entries()`).
        repo_id (`str`): the Hub repo, `"namespace/name"`.
        options: `private`, `revision`, `create_pr`, `commit_message`, `token`, `license` (the card's license)
            ([`hf_edit_patch.hub.push.PushOptions`]).

    Returns:
        `CommitInfo`: the commit of the upload.

    Raises:
        `StatsUnavailableError`: if a key is not in the cache.
        `StatsFormatError`: if a cached file is invalid.

    Example:

    ```python
    >>> from hf_edit_patch.hub.stats_cache import StatsCache
    >>> from hf_edit_patch.hub.stats_sharing import push_stats_to_hub
    >>> cache = StatsCache()
    >>> push_stats_to_hub(cache, cache.entries(), "me/smollm2-key-stats", private=True)  # doctest: +SKIP
    ```
    """
    push = PushOptions.from_kwargs(options)
    selected: dict[str, tuple[StatsEntry, Path]] = {}
    for item in keys_or_entries:
        key = item.key if isinstance(item, StatsEntry) else item
        if not isinstance(key, StatsKey):
            raise StatsError(f"expected StatsKey or StatsEntry items, got a {type(item).__name__}")
        entry = cache.entry(key)
        if entry is None:
            raise StatsUnavailableError(f"{cache} has no valid statistics for {key}")
        read_stats_file(entry.path, expected_key=key)  # validated before anything is uploaded
        selected[key.filename()] = (entry, entry.path)
    if not selected:
        raise StatsError("no statistics selected to push")

    def save(folder: str) -> None:
        previous = _existing_index_entries(repo_id, push.revision, push.token)
        listed = {item["filename"]: item for item in previous}
        for filename, (entry, path) in selected.items():
            shutil.copyfile(path, os.path.join(folder, filename))
            listed[filename] = {
                "filename": filename,
                "key": entry.key.to_dict(),
                "count": entry.count,
                "sha256": file_sha256(path),
            }
        index = {
            "format": STATS_FORMAT,
            "format_version": STATS_FORMAT_VERSION,
            "entries": [listed[name] for name in sorted(listed)],
        }
        atomic_write(os.path.join(folder, INDEX_FILENAME), json.dumps(index, indent=2) + "\n")
        atomic_write(os.path.join(folder, "README.md"), _stats_card(index["entries"], license=push.license))

    message = push.commit_message or f"Upload key statistics of {len(selected)} module(s) with hf_edit_patch"
    return push_folder(save, repo_id, dataclasses.replace(push, commit_message=message))


def _existing_index_entries(repo_id: str, revision: str | None, token: str | bool | None) -> list[dict[str, Any]]:
    path = hub.resolve_file(
        repo_id, INDEX_FILENAME, revision=revision, token=token, missing_ok=True, force_download=True
    )
    return [] if path is None else _parse_index(path)


def _parse_index(path: str) -> list[dict[str, Any]]:
    try:
        index = read_json(path, error=StatsFormatError)
    except OSError as exc:
        raise StatsFormatError(f"{path} is not a readable statistics index: {exc}") from None
    if (
        not isinstance(index, dict)
        or index.get("format") != STATS_FORMAT
        or index.get("format_version") != STATS_FORMAT_VERSION
        or not isinstance(index.get("entries"), list)
    ):
        raise StatsFormatError(
            f"{path} is not a statistics index of format {STATS_FORMAT!r} version {STATS_FORMAT_VERSION} "
            "(expected an object with 'format', 'format_version' and a list of 'entries')"
        )
    index = validate(INDEX_SCHEMA, index, source=path, error=StatsFormatError)
    entries = []
    for number, item in enumerate(index["entries"]):
        key = StatsKey.from_dict(item["key"], source=f"{path}: entries[{number}].key")
        if item["filename"] != key.filename():
            raise StatsFormatError(
                f"{path}: entry {number} names the file {item['filename']!r}; its key belongs in {key.filename()!r}"
            )
        entries.append(item)
    return entries


def _stats_card(entries: list[dict[str, Any]], *, license: str | None = None) -> str:
    rows = "\n".join(
        f"| {e['key']['model_id']} | {e['key']['revision'] or ''} | `{e['key']['module']}` | {e['key']['dataset']} | "
        f"{e['key']['sample_count']} | {e['key']['max_length']} | {e['count']} |"
        for e in entries
    )
    return (
        "---\n" + (f"license: {license}\n" if license else "") + "tags:\n- hf_edit_patch\n- rome\n- memit\n---\n\n"
        "# Key statistics for ROME / MEMIT\n\n"
        "Second moments `C = E[k kᵀ]` (float32) of the inputs of MLP output projections, computed with "
        "hf_edit_patch over the non-padding tokens of a corpus. Load them with\n\n"
        "```python\nfrom hf_edit_patch.hub.stats_sharing import load_stats_from_hub\n\n"
        "load_stats_from_hub(REPO_ID)\n```\n\n"
        "| model | revision | module | corpus | texts | max length | tokens |\n"
        "|---|---|---|---|---|---|---|\n"
        f"{rows}\n"
    )


def load_stats_from_hub(
    repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache: StatsCache | None = None,
    local_files_only: bool = False,
    show_progress: bool | None = None,
) -> list[StatsEntry]:
    """
    Downloads the statistics listed in a Hub repo's `index.json` (or a local folder's) into the cache.

    Every file is checked before any is stored: its sha256 against the index, its key metadata against the index and
    its file name, the matrix's shape, dtype and finiteness. Files are read with safetensors only; nothing is
    unpickled.

    Args:
        repo_id (`str` or `os.PathLike`): a Hub repo id, or a local folder written the same way.
        revision (`str`, *optional*): a branch, tag or commit of the repo.
        token (`str` or `bool`, *optional*): the Hub token.
        cache (`StatsCache`, *optional*): where to store them; defaults to `StatsCache()`.
        local_files_only (`bool`, *optional*, defaults to `False`): use only the huggingface_hub cache.
        show_progress (`bool`, *optional*): a bar per file; `None` shows it on a terminal only.

    Returns:
        `list[StatsEntry]`: the stored entries.

    Raises:
        `PatchNotFoundError`: if the repo or one of its files cannot be found or downloaded.
        `StatsFormatError`: if the index or a file is invalid or does not match the index.

    Example:

    ```python
    >>> from hf_edit_patch.hub.stats_sharing import load_stats_from_hub
    >>> entries = load_stats_from_hub("me/smollm2-key-stats")  # doctest: +SKIP
    >>> [e.key.module for e in entries]  # doctest: +SKIP
    ['model.layers.3.mlp.down_proj', 'model.layers.4.mlp.down_proj']
    ```
    """
    cache = cache if cache is not None else StatsCache()
    options = {"revision": revision, "token": token, "local_files_only": local_files_only}
    index_path = hub.resolve_file(repo_id, INDEX_FILENAME, **options)
    loaded: list[tuple[StatsKey, torch.Tensor, int]] = []
    items = _parse_index(index_path)
    for item in progress_bar(items, desc="Loading key statistics", unit="file", show_progress=show_progress):
        key = StatsKey.from_dict(item["key"])
        path = hub.resolve_file(repo_id, item["filename"], **options)
        if file_sha256(path) != item["sha256"]:
            raise StatsFormatError(f"{item['filename']} of {repo_id!r} does not match the sha256 in its index")
        matrix, _, count = read_stats_file(Path(path), expected_key=key)
        if count != item["count"]:
            raise StatsFormatError(
                f"{item['filename']} of {repo_id!r} averages over {count} tokens, its index says {item['count']}"
            )
        loaded.append((key, matrix, count))
    info = {"source": f"hub:{os.fspath(repo_id)}" + (f"@{revision}" if revision else "")}
    entries = [cache.put(key, matrix, count, info=info) for key, matrix, count in loaded]
    logger.info("loaded %d key statistics from %s into %s", len(entries), repo_id, cache.cache_dir)
    return entries
