"""One model, one stack: the patches attached to a model, their undo data and the lock, stored on the model.

Every `PatchedModel` wrapping the same model finds the same `PatchStack` (attribute `STACK_ATTRIBUTE` of the model
whose weights patches change), so two wrappers can never keep two independent stacks over one set of weights, and
`serialized` methods of any wrapper exclude each other.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..modules import unwrap_peft
from ..patch.edit_patch import EditPatch
from .writes import Applied

STACK_ATTRIBUTE = "_hf_edit_patch_stack"
_CREATING = threading.Lock()  # held only while a model's stack is created


class PatchStack:
    """The patches attached to one model, their undo data and the lock that serializes changing them.

    Stored on the model (`STACK_ATTRIBUTE`), so that every wrapper of the model shares it. A copy of the model
    (`copy.deepcopy`, pickle) carries a copy of the patches that are applied in it, with a lock of its own.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.patches: OrderedDict[str, EditPatch] = OrderedDict()
        self.applied: dict[str, list[Applied]] = {}
        self.disabled = 0

    def __getstate__(self) -> dict[str, Any]:
        with self.lock:  # inside disable_patches() nothing is applied: the copy has the base weights, no patches
            applied = {n: self.applied[n] for n in self.patches if n in self.applied}
            return {"patches": OrderedDict((n, self.patches[n]) for n in applied), "applied": applied}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.patches.update(state["patches"])
        self.applied.update(state["applied"])


F = TypeVar("F", bound=Callable[..., Any])


def serialized(method: F) -> F:
    """Runs a `PatchedModel` method holding the model's stack lock (`self.lock`)."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


def stack_of(model: nn.Module) -> PatchStack:
    """The stack of the model whose weights patches change (inside a PEFT model, its base), created once."""
    target = unwrap_peft(model)
    stack = target.__dict__.get(STACK_ATTRIBUTE)
    if stack is None:
        with _CREATING:
            stack = target.__dict__.get(STACK_ATTRIBUTE)
            if stack is None:
                stack = PatchStack()
                object.__setattr__(target, STACK_ATTRIBUTE, stack)
    return stack
