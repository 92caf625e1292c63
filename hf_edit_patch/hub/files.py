"""Atomic saves: one file, or a whole set of files, replaced so that a reader sees the old set or the new one.

One file is written to a temporary file beside it and renamed onto it. A set of files (a patch's config, weights
and card; a stack of patches with its `patch_stack.json`; a MEND editor) is written in three steps:

1. every file is written to a temporary file beside its target and fsynced (the old files are untouched);
2. a small journal, `.hf_edit_patch-commit.json` in the set's top folder, is written atomically: it lists which
   temporary file replaces which target. Its rename is the commit point;
3. the temporary files are renamed onto their targets, then the journal is removed.

Guarantee: a kill at any instant leaves either the old set or the new one, each loading exactly. Before the
journal exists, readers see the old files and ignore the temporary ones; once it exists, `committed_path` sends
every read of a listed target to its temporary file while that file is still there, so readers see the new set
even if the renames were cut short. The next save into the folder finishes a committed journal and removes the
temporary files that killed writers left behind (a temporary file names its writer's process id, and only those of
processes that are no longer running are removed). One writer per folder at a time; readers may run beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator

from ..errors import PatchFormatError

JOURNAL_NAME = ".hf_edit_patch-commit.json"
MAX_JOURNAL_BYTES = 1 << 20
_TEMP_RE = re.compile(r"^\..+\.pid(\d+)\.[^./]+\.tmp$")

FileData = bytes | str | Callable[[str], None]


def _temp_beside(path: str) -> str:
    """A new empty temporary file in `path`'s folder (so that renaming it onto `path` is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.pid{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(tmp: str, data: FileData) -> None:
    if callable(data):
        data(tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    _fsync(tmp)


def _relative(path: str, top: str) -> str:
    return os.path.relpath(path, top).replace(os.sep, "/")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


def remove_leftovers(folder: str | os.PathLike) -> list[str]:
    """Removes the temporary files of killed writers in `folder` (not those of running ones); returns their names."""
    folder = os.fspath(folder)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            match = _TEMP_RE.match(name)
            if match and not _alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                removed.append(name)
    return removed


def _read_journal(folder: str) -> list[tuple[str, str]]:
    """The `(temporary, target)` pairs, relative to `folder`, of its journal; empty when there is none."""
    path = os.path.join(folder, JOURNAL_NAME)
    try:
        if os.path.getsize(path) > MAX_JOURNAL_BYTES:
            raise PatchFormatError(f"{path}: the journal is over {MAX_JOURNAL_BYTES} bytes; delete it")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PatchFormatError(f"{path} is not a valid commit journal ({exc}); delete it") from exc
    pairs = data.get("renames") if isinstance(data, dict) else None
    ok = isinstance(pairs, list) and all(
        isinstance(p, list)
        and len(p) == 2
        and all(isinstance(s, str) and s and not os.path.isabs(s) and ".." not in s.split("/") for s in p)
        and _TEMP_RE.match(os.path.basename(p[0]))
        and os.path.dirname(p[0]) == os.path.dirname(p[1])
        for p in pairs
    )
    if not ok:
        raise PatchFormatError(
            f"{path}: field 'renames' must be a list of [temporary file, target] pairs of relative paths in one "
            f"folder, got {str(pairs)[:80]!r}; delete the file"
        )
    return [(a, b) for a, b in pairs]


def _finish(folder: str) -> None:
    """Completes a committed journal in `folder` (renames whatever is left), then removes it."""
    for tmp, target in _read_journal(folder):
        with contextlib.suppress(FileNotFoundError):  # renamed already
            os.replace(os.path.join(folder, tmp), os.path.join(folder, target))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, JOURNAL_NAME))


def committed_path(folder: str | os.PathLike, relative: str) -> str:
    """The file to read for `relative` in `folder`: its committed new version while a save is being completed.

    Looks for a journal in `folder` and in every folder between it and the file.
    """
    folder = os.fspath(folder)
    parts = [p for p in relative.replace(os.sep, "/").split("/") if p]
    for depth in range(len(parts)):
        root = os.path.join(folder, *parts[:depth])
        rel = "/".join(parts[depth:])
        for tmp, target in _read_journal(root):
            if target == rel and os.path.isfile(os.path.join(root, tmp)):
                return os.path.join(root, tmp)
    return os.path.join(folder, *parts)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path in the target's folder; on success it is fsynced and renamed onto `path`."""
    path = os.fspath(path)
    remove_leftovers(os.path.dirname(os.path.abspath(path)))
    tmp = _temp_beside(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_files(files: dict[str, FileData], *, root: str | os.PathLike | None = None) -> None:
    """Replaces a set of files as a whole: after a kill at any instant, readers see the old set or the new one.

    Args:
        files: `{path: data}` where data is bytes, text, or `write(tmp_path)` that writes the file. Writers run in
            order, so a later one may use what an earlier one computed (e.g. a config recording a weights hash).
        root: the set's top folder, where the journal goes (default: the folder common to all paths). Readers
            that go through `committed_path` (as `resolve_file` does for local folders) see the set whole.
    """
    paths = {os.path.abspath(p): data for p, data in files.items()}
    folders = sorted({os.path.dirname(p) for p in paths})
    top = os.path.abspath(os.fspath(root)) if root is not None else os.path.commonpath(folders)
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    for folder in sorted({top, *folders}):
        _finish(folder)  # a save that was committed and then killed is completed first
        remove_leftovers(folder)
    temps: dict[str, str] = {}
    try:
        for path, data in paths.items():
            temps[path] = _temp_beside(path)
            _write(temps[path], data)
        renames = [[_relative(t, top), _relative(p, top)] for p, t in temps.items()]
        with atomic_path(os.path.join(top, JOURNAL_NAME)) as journal, open(journal, "w", encoding="utf-8") as f:
            json.dump({"renames": renames}, f)
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    _fsync_dir(top)
    for path, tmp in temps.items():  # committed: from here on the new set is what readers see
        os.replace(tmp, path)
    for folder in folders:
        _fsync_dir(folder)
    os.unlink(os.path.join(top, JOURNAL_NAME))


def atomic_write(path: str | os.PathLike, data: FileData) -> None:
    """Writes bytes or text to `path` atomically, or calls `data(tmp_path)` to write the file itself."""
    with atomic_path(path) as tmp:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()
