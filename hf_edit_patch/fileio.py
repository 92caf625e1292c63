"""Atomic file writes: data goes to a temporary file beside the target, then replaces it in one rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path in the target's folder; on success it is fsynced and renamed onto `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
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
            folder = os.path.dirname(os.path.abspath(path))
            fd, temps[path] = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
            os.close(fd)
            write(temps[path])
            with open(temps[path], "rb+") as f:
                os.fsync(f.fileno())
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
