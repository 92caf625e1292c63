"""Public names of a package loaded on first use, so that importing the package stays light.

Example:
    ```python
    # in a package's __init__.py
    from ..lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(__name__, {"run_general_tasks": "run"}, __all__)
    ```
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, modules: Mapping[str, str], names: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`, where `modules` maps each lazily loaded name to
    the submodule (relative to `package`) that defines it. A loaded name is stored in the package, so the lookup
    runs once per name."""
    listed = tuple(names)

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *listed})

    return __getattr__, __dir__
