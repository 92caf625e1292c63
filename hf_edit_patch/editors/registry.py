"""The editing methods by name: each editor module registers an `EditorSpec` (its hparams, its requests → ΔW function,
what it needs from the entry point, and how it fills model-dependent defaults).

`hf_edit_patch.editing.compute_update` looks a method up here, resolves its hyperparameters, provides the inputs it
declares (key statistics, null-space projections, the parent requests of a `PatchedModel`, a saved editor), calls it
and records what it returns. Importing `hf_edit_patch.editors` registers every built-in editor.

Example:
    ```python
    >>> import hf_edit_patch.editors  # registers the built-in editors
    >>> from hf_edit_patch.editors.registry import get_editor, registered_editors
    >>> "rome" in registered_editors()
    True
    >>> get_editor("rome").hparams.__name__
    'RomeHParams'
    ```

A new method is one module that calls `register_editor(EditorSpec(name=..., hparams=..., compute=...))` when
imported; the function receives the model (unwrapped from PEFT and `PatchedModel`, in eval mode), the tokenizer, the
requests, the resolved hparams, the model's `ArchSpec`, the `EditorInputs` it declared, and `show_progress`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import PatchError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..requests import EditRequest
    from .arch_spec import ArchSpec

__all__ = [
    "EditorInputs",
    "EditorNeeds",
    "EditorOutput",
    "EditorSpec",
    "KeyStatistics",
    "SavedEditor",
    "get_editor",
    "register_editor",
    "registered_editors",
]


@dataclass(frozen=True)
class KeyStatistics:
    """Key second moments C = E[k kᵀ] of some modules' inputs over the edit's statistics corpus.

    Args:
        modules: the modules whose input statistics are needed.
        sample_count: texts of the corpus to measure.
        max_length: tokens per text.
        nullspace_threshold: when set, the editor is given the null-space projection P of each C (the eigenvectors
            with eigenvalue below the threshold) instead of C.
    """

    modules: tuple[str, ...]
    sample_count: int
    max_length: int
    nullspace_threshold: float | None = None


@dataclass(frozen=True)
class SavedEditor:
    """A trained editor network (MEND's, as `hf_edit_patch.hub.mend` saves it) in a folder or a Hub repo, loaded by
    the entry point: editors do no I/O."""

    path_or_repo_id: str
    revision: str | None = None


@dataclass(frozen=True)
class EditorNeeds:
    """What an editor needs from the entry point for one edit.

    Args:
        statistics: key statistics (or their null-space projections) of some modules, from the cache or a corpus.
        parent_requests: the requests recorded in the active patches of the `PatchedModel` being edited.
        saved_editor: a trained editor to load.
    """

    statistics: KeyStatistics | None = None
    parent_requests: bool = False
    saved_editor: SavedEditor | None = None


@dataclass(frozen=True)
class EditorInputs:
    """What the entry point provides, as declared by `EditorNeeds` (fields not asked for stay empty).

    Args:
        second_moments: `{module: C}` for `KeyStatistics` without a threshold.
        projections: `{module: P}` for `KeyStatistics` with a `nullspace_threshold`.
        parent_requests: the `PatchedModel`'s recorded requests (empty for another model).
        saved_editor: the loaded editor network.
    """

    second_moments: dict[str, torch.Tensor] | None = None
    projections: dict[str, torch.Tensor] | None = None
    parent_requests: list[EditRequest] = field(default_factory=list)
    saved_editor: Any = None


@dataclass(frozen=True)
class EditorOutput:
    """An editor's result: `{module: ΔW}` (dense, or factored `(U, V)` with ΔW = U Vᵀ, in the module's own layout)
    and what the patch should record about the edit beyond the hparams (JSON-safe)."""

    deltas: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)


def _no_needs(model: nn.Module, hp: Any, spec: ArchSpec) -> EditorNeeds:
    return EditorNeeds()


def _as_given(model: nn.Module, hp: Any, spec: ArchSpec) -> Any:
    return hp


@dataclass(frozen=True)
class EditorSpec:
    """One editing method.

    Args:
        name: the `method=` name, e.g. `"rome"`.
        hparams: its hyperparameter dataclass (with `from_any(None | dict | instance)` and `to_dict()`).
        compute: `(model, tokenizer, requests, hp, spec, inputs, *, show_progress) -> EditorOutput`.
        needs: `(model, hp, spec) -> EditorNeeds`, what the entry point must provide (default: nothing).
        resolve: `(model, hp, spec) -> hp` with the defaults that depend on the model filled in (layers, λ), so
            the patch records what was used (default: the hparams as given).
    """

    name: str
    hparams: type
    compute: Callable[..., EditorOutput]
    needs: Callable[[nn.Module, Any, ArchSpec], EditorNeeds] = _no_needs
    resolve: Callable[[nn.Module, Any, ArchSpec], Any] = _as_given

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise PatchError(f"an editor's name must be an identifier such as 'rome', got {self.name!r}")
        if not dataclasses.is_dataclass(self.hparams) or not hasattr(self.hparams, "from_any"):
            raise PatchError(f"editor {self.name!r}: hparams must be a hyperparameter dataclass, got {self.hparams!r}")
        for name in ("compute", "needs", "resolve"):
            if not callable(getattr(self, name)):
                raise PatchError(f"editor {self.name!r}: {name} must be callable")


_EDITORS: dict[str, EditorSpec] = {}


def register_editor(spec: EditorSpec) -> EditorSpec:
    """Adds an editing method; registering a second one under a taken name is an error. Returns `spec`."""
    if not isinstance(spec, EditorSpec):
        raise TypeError(f"register_editor takes an EditorSpec, got {type(spec).__name__}")
    if spec.name in _EDITORS and _EDITORS[spec.name] != spec:
        raise PatchError(f"an editor named {spec.name!r} is already registered")
    _EDITORS[spec.name] = spec
    return spec


def registered_editors() -> tuple[str, ...]:
    """The names of the registered editing methods, sorted."""
    return tuple(sorted(_EDITORS))


def get_editor(name: str) -> EditorSpec:
    """The `EditorSpec` of a method; an unknown name is a `PatchError` listing the registered ones."""
    spec = _EDITORS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise PatchError(f"unknown editing method {name!r}; accepted: {registered_editors()}")
    return spec
