"""Atomic file writes: data goes to a temporary file beside the target, then replaces it in one rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator


def _temp_beside(path: str) -> str:
    """A new empty temporary file in `path`'s folder (so that renaming it onto `path` is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path in the target's folder; on success it is fsynced and renamed onto `path`."""
    path = os.fspath(path)
    tmp = _temp_beside(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_files(writers: dict[str, Callable[[str], None]]) -> None:
    """Writes several files so that a failure before the last byte leaves every old file intact.

    Each `writers[path](tmp_path)` writes its file aside, in order; only when all are written and fsynced are
    they renamed onto their targets, in the same order.
    """
    temps: dict[str, str] = {}
    try:
        for path, write in writers.items():
            temps[path] = _temp_beside(path)
            write(temps[path])
            _fsync(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[str], None]) -> None:
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
