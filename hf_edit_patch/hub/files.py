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
import secrets
from collections.abc import Callable, Iterator

from ..errors import PatchFormatError
from ..schema import List, Object, Str, read_json, validate

JOURNAL_NAME = ".hf_edit_patch-commit.json"
MAX_JOURNAL_BYTES = 1 << 20
# The declared schema of the journal: [temporary file, target] pairs of relative paths (their shape is checked below).
JOURNAL_SCHEMA = Object(
    {"renames": List(List(Str(min_length=1, max_length=4096), min_length=2, max_length=2), max_length=100_000)},
    required=("renames",),
)
_TEMP_RE = re.compile(r"^\..+\.pid(\d+)\.[^./]+\.tmp$")

FileData = bytes | str | Callable[[str], None]


def _temp_beside(path: str) -> str:
    """A new empty temporary file in `path`'s folder (so that renaming it onto `path` is atomic).

    Created with mode 0o666 under the process umask, as `open(path, "w")` would (usually 0o644), not with the
    0o600 of `tempfile.mkstemp`: the file renamed into place is as readable as any other file the user writes.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.pid{os.getpid()}."
    for _ in range(100):
        tmp = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


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
        mode = _mode(tmp)
        data(tmp)
        _restore_mode(tmp, mode)  # safetensors writes its files 0o600 whatever the umask
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
        data = read_json(path, max_bytes=MAX_JOURNAL_BYTES, max_depth=4)
        pairs = validate(JOURNAL_SCHEMA, data, source=path)["renames"]
    except FileNotFoundError:
        return []
    except PatchFormatError as exc:
        raise PatchFormatError(f"{exc} (a damaged commit journal: delete it)") from exc
    ok = all(
        all(not os.path.isabs(s) and ".." not in s.split("/") for s in p)
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


def _mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def _restore_mode(path: str, mode: int) -> None:
    """Gives `path` back `mode` if a writer replaced or narrowed it (a missing file is the writer's to report)."""
    with contextlib.suppress(FileNotFoundError):
        if _mode(path) != mode:
            os.chmod(path, mode)


def default_file_mode(folder: str | os.PathLike) -> int:
    """The permission bits a new file in `folder` gets from `open()`: 0o666 under the process umask (often 0o644).

    Example:
        ```python
        >>> oct(default_file_mode("."))  # doctest: +SKIP
        '0o644'
        ```
    """
    probe = _temp_beside(os.path.join(os.fspath(folder), "mode-probe"))
    try:
        return _mode(probe)
    finally:
        os.unlink(probe)


def apply_default_mode(folder: str | os.PathLike) -> list[str]:
    """Gives every file under `folder` the mode `open()` would have given it (see [`default_file_mode`]).

    Some writers (safetensors among them) create their files 0o600 whatever the umask; a saved model folder is
    then unreadable to the other users a shared cache or server is meant for. Returns the files changed.

    Example:
        ```python
        >>> model.save_pretrained("out/merged")  # doctest: +SKIP
        >>> apply_default_mode("out/merged")  # doctest: +SKIP
        ['out/merged/model.safetensors']
        ```
    """
    folder = os.fspath(folder)
    mode = default_file_mode(folder)
    changed = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and _mode(path) != mode:
                os.chmod(path, mode)
                changed.append(path)
    return changed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path in the target's folder; on success it is fsynced and renamed onto `path`.

    The file keeps the mode `open()` would give it, even if the writer replaced it or narrowed its mode.
    """
    path = os.fspath(path)
    remove_leftovers(os.path.dirname(os.path.abspath(path)))
    tmp = _temp_beside(path)
    mode = _mode(tmp)
    try:
        yield tmp
        _restore_mode(tmp, mode)
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
