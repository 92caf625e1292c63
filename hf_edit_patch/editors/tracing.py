"""Forward-hook tracing: read (and optionally replace) what named submodules see and produce during a forward pass.

Example:
    ```python
    >>> import torch
    >>> from hf_edit_patch.editors.tracing import Trace, TraceDict
    >>> with Trace(model, "model.layers.3.mlp.down_proj", retain_input=True, stop=True) as t:  # doctest: +SKIP
    ...     model(**inputs)                        # ends right after down_proj of layer 3 ran; logits are not computed
    >>> t.input.shape, t.output.shape  # doctest: +SKIP
    (torch.Size([1, 7, 1536]), torch.Size([1, 7, 576]))
    >>> names = ["model.layers.1.mlp", "model.layers.2.mlp"]
    >>> with TraceDict(model, names, edit_output=lambda out, name: out * 0) as traces:  # doctest: +SKIP
    ...     logits = model(**inputs).logits        # both MLPs ablated, for this call only
    ```

Hooks are registered when the `with` block is entered and always removed when it is left, whether normally, through
`StopForward` (which the block swallows) or through any other exception (which propagates).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import PatchError

logger = logging.getLogger(__name__)

EditOutput = Callable[[torch.Tensor, str], torch.Tensor]

__all__ = ["StopForward", "Trace", "TraceDict", "TraceError"]


class StopForward(Exception):
    """Raised by a tracing hook to end the forward pass early; `Trace` and `TraceDict` swallow it on exit."""


class TraceError(PatchError):
    """A trace was asked for a module the model does not have, or was used incorrectly."""


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _get_module(model: nn.Module, name: str) -> nn.Module:
    """`model.get_submodule(name)` with an error that lists the closest existing names."""
    if not isinstance(name, str):
        raise TraceError(f"module names must be strings as in model.named_modules(), got {type(name).__name__}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        close = difflib.get_close_matches(name, _module_names(model), n=3, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else ""
        raise TraceError(
            f"module {name!r} does not exist in {type(model).__name__}{hint} (accepted: the names of "
            "model.named_modules(), relative to the model passed in; '' is the model itself)"
        ) from None


def _primary_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The first positional argument, else the `hidden_states` keyword, else the first tensor keyword argument."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _primary_output(output: Any) -> Any:
    """The first element of a plain tuple or list output, else the output itself."""
    if type(output) in (tuple, list) and len(output) > 0:
        return output[0]
    return output


class Trace:
    """
    Hooks one submodule for the duration of a `with` block: retains its input and output, optionally replaces the
    output, optionally ends the forward pass right after it ran.

    Args:
        model (`torch.nn.Module`):
            The model (or any module) the name is relative to.
        module_name (`str`):
            The submodule's name as in `model.named_modules()`, e.g. `"model.layers.5.mlp.down_proj"`.
        retain_input (`bool`, *optional*, defaults to `False`):
            Keep the module's input: `.input` is the first positional argument (or the `hidden_states` keyword, or
            the first tensor keyword argument), `.input_args` / `.input_kwargs` everything it was called with (what a
            decoder layer needs to be run again by hand).
        retain_output (`bool`, *optional*, defaults to `True`):
            Keep the module's output: `.output` is the output tensor (the first element when the module returns a
            tuple or list) and `.output_full` the whole output. With `edit_output`, the edited output is kept (what
            the rest of the model saw).
        edit_output (`Callable[[torch.Tensor, str], torch.Tensor]`, *optional*):
            Called as `edit_output(output, module_name)` on the output tensor (the first element of a tuple or list
            output, which is rebuilt around the result); must return the tensor to use instead (it may modify and
            return its argument).
        stop (`bool`, *optional*, defaults to `False`):
            Raise `StopForward` right after the module ran (after retaining and editing), so nothing after it is
            computed; the `with` block swallows it.
        clone (`bool`, *optional*, defaults to `False`):
            Retain copies of the tensors (safe against later in-place changes).
        detach (`bool`, *optional*, defaults to `False`):
            Retain tensors detached from the autograd graph.

    If the module runs several times inside the block, the attributes describe the last call; `.calls` counts them.

    Example:

    ```python
    >>> from hf_edit_patch.editors.tracing import Trace
    >>> with Trace(model, "model.layers.0", retain_input=True, stop=True) as t:  # doctest: +SKIP
    ...     model(**inputs)
    >>> layer = model.get_submodule("model.layers.0")  # doctest: +SKIP
    >>> torch.equal(layer(*t.input_args, **t.input_kwargs), t.output)  # doctest: +SKIP
    True
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        module_name: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditOutput | None = None,
        stop: bool = False,
        clone: bool = False,
        detach: bool = False,
    ) -> None:
        if edit_output is not None and not callable(edit_output):
            raise TraceError(
                f"edit_output must be a callable (output, module_name) -> output or None, got "
                f"{type(edit_output).__name__}"
            )
        self.module_name = module_name
        self.module = _get_module(model, module_name)
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.edit_output = edit_output
        self.stop = stop
        self.clone = clone
        self.detach = detach
        self.input: torch.Tensor | None = None
        self.input_args: tuple[Any, ...] | None = None
        self.input_kwargs: dict[str, Any] | None = None
        self.output: Any = None
        self.output_full: Any = None
        self.calls = 0
        self._handles: list[RemovableHandle] = []

    def _retain(self, value: Any) -> Any:
        """`value` with `detach` / `clone` applied to its tensors (through tuples, lists and dicts)."""
        if isinstance(value, torch.Tensor):
            if self.detach:
                value = value.detach()
            return value.clone() if self.clone else value
        if not (self.clone or self.detach):
            return value
        if type(value) is tuple:
            return tuple(self._retain(v) for v in value)
        if type(value) is list:
            return [self._retain(v) for v in value]
        if type(value) is dict:
            return {k: self._retain(v) for k, v in value.items()}
        return value

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        primary = _primary_input(args, kwargs)
        if primary is None:
            logger.warning("Trace(%r): the module was called without a tensor input; .input is None", self.module_name)
        self.input = self._retain(primary)
        self.input_args = self._retain(tuple(args))
        self.input_kwargs = self._retain(dict(kwargs))

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        self.calls += 1
        replaced = None
        if self.edit_output is not None:
            primary = _primary_output(output)
            edited = self.edit_output(primary, self.module_name)
            if isinstance(primary, torch.Tensor) and not isinstance(edited, torch.Tensor):
                raise TraceError(
                    f"edit_output for {self.module_name!r} returned {type(edited).__name__}; it must return the "
                    "output tensor to use (return its argument after editing it in place)"
                )
            if edited is not primary:
                if type(output) is tuple and output:
                    replaced = (edited, *output[1:])
                elif type(output) is list and output:
                    replaced = [edited, *output[1:]]
                else:
                    replaced = edited
                output = replaced
        if self.retain_output:
            self.output_full = self._retain(output)
            self.output = _primary_output(self.output_full)
        if self.stop:
            raise StopForward(self.module_name)
        return replaced

    def __enter__(self) -> Trace:
        if self._handles:
            raise TraceError(
                f"Trace({self.module_name!r}) is already active; a Trace can be entered only once at a time"
            )
        try:
            if self.retain_input:
                self._handles.append(self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(self.module.register_forward_hook(self._hook, with_kwargs=True))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Removes the hooks (idempotent); the retained values stay readable."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def __repr__(self) -> str:
        return f"Trace({self.module_name!r}, calls={self.calls}, active={bool(self._handles)})"


class TraceDict(Mapping[str, Trace]):
    """
    `Trace` over several submodules at once: a read-only mapping from module name to its `Trace`.

    Takes the same keyword arguments as `Trace`, applied to every module (`edit_output` receives the module name, so
    one function can treat each module differently). With `stop=True` the forward pass ends once every listed module
    has run, i.e. right after the last of them in forward order, whatever order the names are given in.

    Args:
        model (`torch.nn.Module`):
            The model the names are relative to.
        module_names (`Iterable[str]`):
            Submodule names as in `model.named_modules()`; duplicates are traced once.
        **kwargs:
            `retain_input`, `retain_output`, `edit_output`, `stop`, `clone`, `detach`, as for `Trace`.

    Example:

    ```python
    >>> from hf_edit_patch.editors.tracing import TraceDict
    >>> names = [f"model.layers.{i}.mlp.down_proj" for i in (4, 5, 6)]
    >>> with TraceDict(model, names, retain_input=True, retain_output=False, stop=True) as td:  # doctest: +SKIP
    ...     model(**inputs)                        # ends right after layer 6's down_proj
    >>> keys = {name: td[name].input for name in names}  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        module_names: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditOutput | None = None,
        stop: bool = False,
        clone: bool = False,
        detach: bool = False,
    ) -> None:
        if isinstance(module_names, str):
            module_names = [module_names]
        names = list(dict.fromkeys(module_names))
        if not names:
            raise TraceError("TraceDict needs at least one module name, got none")
        missing = [name for name in names if not self._exists(model, name)]
        if missing:
            close = {m: difflib.get_close_matches(m, _module_names(model), n=1, cutoff=0.6) for m in missing}
            hints = ", ".join(f"{m!r} (did you mean {c[0]!r}?)" if c else repr(m) for m, c in close.items())
            raise TraceError(
                f"{len(missing)} of the module names do not exist in {type(model).__name__}: {hints} "
                "(accepted: the names of model.named_modules())"
            )
        self._traces = {
            name: Trace(
                model,
                name,
                retain_input=retain_input,
                retain_output=retain_output,
                edit_output=edit_output,
                stop=False,
                clone=clone,
                detach=detach,
            )
            for name in names
        }
        self.stop = stop
        self._stack: contextlib.ExitStack | None = None
        self._fired: set[str] = set()

    @staticmethod
    def _exists(model: nn.Module, name: str) -> bool:
        try:
            _get_module(model, name)
        except TraceError:
            return False
        return True

    def __getitem__(self, name: str) -> Trace:
        return self._traces[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._traces)

    def __len__(self) -> int:
        return len(self._traces)

    def _stop_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._fired.add(name)
            if len(self._fired) == len(self._traces):
                raise StopForward(name)

        return hook

    def __enter__(self) -> TraceDict:
        if self._stack is not None:
            raise TraceError("this TraceDict is already active; it can be entered only once at a time")
        self._fired = set()
        with contextlib.ExitStack() as stack:
            for trace in self._traces.values():
                stack.enter_context(trace)
            if self.stop:  # registered after the traces' hooks, so these run last: capture and edits come first
                for name, trace in self._traces.items():
                    stack.callback(trace.module.register_forward_hook(self._stop_hook(name)).remove)
            self._stack = stack.pop_all()
        return self

    def close(self) -> None:
        """Removes every hook (idempotent); the retained values stay readable."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def __repr__(self) -> str:
        return f"TraceDict({list(self._traces)}, active={self._stack is not None})"
