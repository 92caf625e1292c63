"""Progress bars with one meaning of ``show_progress`` everywhere.

Every function a user may wait on takes ``show_progress``:

- ``None`` (the default): tqdm decides — a bar on an interactive terminal, nothing when stderr is redirected to
  a file or a pipe (CI logs stay clean);
- ``True``: always a bar, also in logs;
- ``False``: never a bar.

The environment variable ``HF_EDIT_PATCH_DISABLE_PROGRESS_BARS=1`` (or huggingface_hub's
``HF_HUB_DISABLE_PROGRESS_BARS=1``) turns every bar off, like ``False``, unless a call asks for ``True``.

Example:
    >>> from hf_edit_patch.progress import progress_bar
    >>> for batch in progress_bar(range(3), desc="Key statistics", unit="batch", show_progress=False):
    ...     pass
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_OFF_VARIABLES = ("HF_EDIT_PATCH_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")


def bar_disabled(show_progress: bool | None) -> bool | None:
    """The ``disable`` argument tqdm gets for a ``show_progress`` value (``None`` lets tqdm detect a terminal)."""
    if show_progress is True:
        return False
    if show_progress is False:
        return True
    if any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"} for name in _OFF_VARIABLES):
        return True
    return None


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    show_progress: bool | None = None,
    min_items: int = 0,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``) that follows ``show_progress``.

    Args:
        iterable: what to iterate; ``None`` for a bar advanced with ``update()``.
        show_progress: ``None`` (tqdm's terminal detection), ``True`` or ``False``.
        min_items: no bar below this many items (a bar for one quick item is noise); an explicit ``True`` still
            shows it.
        kwargs: passed to tqdm (``desc``, ``unit``, ``total``, ``leave``...).
    """
    disable = bar_disabled(show_progress)
    if show_progress is not True and min_items:
        total = kwargs.get("total")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if total is not None and total < min_items:
            disable = True
    return tqdm(iterable, disable=disable, **kwargs)
