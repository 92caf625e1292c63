"""Hyperparameters of the editors: dataclasses with help text, validated once in `__post_init__`.

Fields left at `None` are filled per model (`editors.layers`: the architecture's default layers) when the edit runs.

Example:
    ```python
    >>> from hf_edit_patch.editors.hparams import RomeHParams
    >>> RomeHParams(layer=5, v_num_grad_steps=10).v_lr
    0.5
    ```
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import PatchError


class HParamsError(PatchError):
    """Invalid editor hyperparameters."""


def _positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value < 0
            or (value == 0 and not allow_zero)
        ):
            bound = ">= 0" if allow_zero else "> 0"
            raise HParamsError(f"{type(obj).__name__}.{name} must be a number {bound}, got {value!r}")


@dataclass
class _Base:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_any(cls, value: Any) -> _Base:
        """An instance from None (defaults), an instance, or a dict of fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return dataclasses.replace(value)
        if isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise HParamsError(f"unknown {cls.__name__} fields {unknown}; accepted: {sorted(known)}")
            return cls(**value)
        raise HParamsError(f"hparams must be None, a dict or a {cls.__name__}, got {type(value).__name__}")


VALUE_SOLVERS = ("lbfgs", "adam")


@dataclass
class ValueOptHParams(_Base):
    """Settings of the value-vector optimization shared by ROME and MEMIT."""

    v_num_grad_steps: int = field(default=20, metadata={"help": "Maximum optimization steps for the value."})
    v_lr: float = field(default=0.5, metadata={"help": "Adam learning rate of the value offset."})
    v_weight_decay: float = field(default=0.5, metadata={"help": "Weight of ||δ||² / ||v||² in the loss."})
    clamp_norm_factor: float = field(default=4.0, metadata={"help": "||δ|| is clamped to this times ||v||."})
    kl_factor: float = field(default=0.0625, metadata={"help": "Weight of the KL term keeping the subject's essence."})
    early_stop_loss: float = field(default=0.05, metadata={"help": "Stop once the target NLL is below this."})
    n_context_templates: int = field(default=5, metadata={"help": "Prefix contexts sampled from the model."})
    context_length: int = field(default=10, metadata={"help": "Tokens per sampled prefix context."})
    seed: int = field(default=0, metadata={"help": "Seed of the context sampling."})
    mom2_adjustment: bool = field(default=True, metadata={"help": "Use the keys' second moment C (covariance)."})
    mom2_n_samples: int = field(default=1000, metadata={"help": "Texts used for the key statistics."})
    mom2_max_length: int = field(default=256, metadata={"help": "Tokens per text for the key statistics."})
    checkpoint_blocks: bool = field(
        default=True,
        metadata={
            "help": "Recompute the decoder blocks from the edited one upward during backward instead of keeping "
            "their activations: less memory, one more partial forward per step. Applies to the full forward "
            "(v_reuse_prefix=False, or a model whose cache the prefix reuse does not fit)."
        },
    )
    v_solver: str = field(
        default="adam",
        metadata={
            "help": "How δ is optimized: 'adam' (ROME's Adam at v_lr) or 'lbfgs' (quasi-Newton directions in a "
            "trust radius per request; see editors/value.py for how the two compare)."
        },
    )
    v_history: int = field(default=8, metadata={"help": "'lbfgs': the number of past steps its directions use."})
    v_first_step: float = field(
        default=1.0, metadata={"help": "'lbfgs': the norm of the first step along the gradient, times ||v||."}
    )
    v_reuse_prefix: bool = field(
        default=True,
        metadata={
            "help": "Compute the tokens before the subject's last one and the blocks below the edited one once per "
            "batch, and run only the rest at each step (checked against the full forward; off where it differs)."
        },
    )
    v_batch_tokens: int = field(
        default=4096,
        metadata={"help": "Requests are optimized together in chunks whose prompts hold at most this many tokens."},
    )
    v_share_subject: bool = field(
        default=True,
        metadata={
            "help": "Requests of one call with the same subject share one δ, optimized on all their prompts: their "
            "keys nearly coincide, so the update cannot give them different values, and separately optimized "
            "targets would be averaged into one that states none of them."
        },
    )

    def _validate_common(self) -> None:
        _positive(
            self,
            "v_num_grad_steps",
            "v_lr",
            "clamp_norm_factor",
            "mom2_n_samples",
            "mom2_max_length",
            "context_length",
        )
        _positive(self, "v_weight_decay", "kl_factor", "early_stop_loss", "n_context_templates", allow_zero=True)
        _positive(self, "v_history", "v_first_step", "v_batch_tokens")
        if self.v_solver not in VALUE_SOLVERS:
            raise HParamsError(f"{type(self).__name__}.v_solver must be one of {VALUE_SOLVERS}, got {self.v_solver!r}")


@dataclass
class RomeHParams(ValueOptHParams):
    """ROME: a rank-one update of one MLP output projection (Meng et al. 2022)."""

    layer: int | None = field(default=None, metadata={"help": "Layer to edit (None: the architecture default)."})

    def __post_init__(self) -> None:
        self._validate_common()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise HParamsError(f"RomeHParams.layer must be an int or None, got {self.layer!r}")


@dataclass
class MemitHParams(ValueOptHParams):
    """MEMIT: many edits spread over several layers with the λC + KKᵀ solve (Meng et al. 2023)."""

    layers: list[int] | None = field(default=None, metadata={"help": "Layers to edit (None: architecture default)."})
    mom2_update_weight: float | None = field(
        default=None,
        metadata={
            "help": "λ, the weight of C against KKᵀ. None: the MLP width d / 16 (96 for SmolLM2-135M, chosen on "
            "ZsRE records 0-299: records 0-39 in one batch score 0.88 where λ = d scores 0.70; a larger λ protects "
            "other keys more and edits less; see docs/results.md)."
        },
    )
    v_num_grad_steps: int = field(default=25, metadata={"help": "Maximum optimization steps per target vector."})

    def __post_init__(self) -> None:
        self._validate_common()
        if self.mom2_update_weight is not None:
            _positive(self, "mom2_update_weight")
        if self.layers is not None:
            if (
                not isinstance(self.layers, (list, tuple))
                or not self.layers
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers)
            ):
                raise HParamsError(f"MemitHParams.layers must be a non-empty list of ints, got {self.layers!r}")
            self.layers = sorted(set(self.layers))


@dataclass
class FTHParams(_Base):
    """Constrained fine-tuning of one MLP output projection (the FT-L baseline): a dense ΔW."""

    layer: int | None = field(default=None, metadata={"help": "Layer to fine-tune (None: the architecture default)."})
    num_steps: int = field(default=25, metadata={"help": "Optimization steps."})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate."})
    norm_constraint: float = field(default=5e-4, metadata={"help": "Each ΔW entry is clamped to ±this."})
    early_stop_loss: float = field(default=0.05, metadata={"help": "Stop once the target NLL is below this."})

    def __post_init__(self) -> None:
        _positive(self, "num_steps", "lr", "norm_constraint")
        _positive(self, "early_stop_loss", allow_zero=True)


def _check_layers(obj: Any) -> None:
    layers = obj.layers
    if layers is None:
        return
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)
    ):
        raise HParamsError(f"{type(obj).__name__}.layers must be a non-empty list of ints >= 0, got {layers!r}")
    obj.layers = sorted(set(layers))


@dataclass
class AlphaEditHParams(ValueOptHParams):
    """AlphaEdit: MEMIT's update projected onto the null space of preserved keys (Fang et al., ICLR 2025).

    The key statistics (`mom2_*`) are always used: the projection is built from them (`mom2_adjustment` is ignored).
    """

    layers: list[int] | None = field(default=None, metadata={"help": "Layers to edit (None: MEMIT's default)."})
    nullspace_threshold: float = field(
        default=2e-2,
        metadata={
            "help": "Eigenvalues of C = E[k kᵀ] below this span the null space the update is confined to "
            "(AlphaEdit's released configs: 2e-2; the paper's text: 1e-2, which on SmolLM2-135M leaves ~10% of a "
            "key's energy in the null space, too little for l2 = 10)."
        },
    )
    l2: float = field(
        default=10.0,
        metadata={"help": "The ridge term of the solve, (K_p K_pᵀ P + K Kᵀ P + l2·I)⁻¹ (AlphaEdit's L2 = 10)."},
    )
    preserve_parent_keys: bool = field(
        default=True,
        metadata={
            "help": "On a PatchedModel, K_p holds the keys of the requests of its active patches (recomputed on "
            "the current weights), as in sequential AlphaEdit; otherwise K_p is empty."
        },
    )
    v_num_grad_steps: int = field(default=25, metadata={"help": "Maximum optimization steps per target vector."})

    def __post_init__(self) -> None:
        self._validate_common()
        _positive(self, "nullspace_threshold")
        _positive(self, "l2", allow_zero=True)
        _check_layers(self)


@dataclass
class KNHParams(_Base):
    """Knowledge neurons (Dai et al. 2022): integrated-gradients attribution, then an edit of those neurons' values."""

    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layers whose MLP neurons are attributed. None: the upper half, where the KN paper found "
            "knowledge neurons (attributing every layer, as the paper does, lets the massive-activation neurons of "
            "early layers win: on SmolLM2-135M one layer-0 neuron takes every prompt)."
        },
    )
    steps: int = field(default=20, metadata={"help": "Riemann steps of the integrated gradients."})
    adaptive_threshold: float = field(
        default=0.2, metadata={"help": "A neuron is kept for a prompt when its attribution exceeds this × the max."}
    )
    prompt_share: float = field(
        default=0.5,
        metadata={"help": "Neurons kept for more than this fraction of the prompts (prompt + paraphrases) survive."},
    )
    max_neurons: int | None = field(
        default=None, metadata={"help": "Keep at most this many neurons per request, by attribution (None: all)."}
    )
    erase_scale: float = field(
        default=2.0, metadata={"help": "λ₁: times the old answer's embedding subtracted from each neuron's value."}
    )
    add_scale: float = field(
        default=2.0, metadata={"help": "λ₂: times the new answer's embedding added to each neuron's value."}
    )

    def __post_init__(self) -> None:
        _positive(self, "steps", "adaptive_threshold")
        _positive(self, "erase_scale", "add_scale", allow_zero=True)
        if not 0.0 <= self.prompt_share < 1.0:
            raise HParamsError(f"KNHParams.prompt_share must be in [0, 1), got {self.prompt_share!r}")
        if not 0.0 < self.adaptive_threshold <= 1.0:
            raise HParamsError(f"KNHParams.adaptive_threshold must be in (0, 1], got {self.adaptive_threshold!r}")
        if self.max_neurons is not None:
            _positive(self, "max_neurons")
        _check_layers(self)


@dataclass
class MendHParams(_Base):
    """MEND (Mitchell et al. 2022): a trained editor network turns the fine-tuning gradient into ΔW."""

    editor: Any = field(
        default=None,
        metadata={
            "help": "A trained `MendEditor`, or a folder or Hub repo id written by "
            "hf_edit_patch.hub.mend.save_mend_editor."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Revision of a Hub editor."})

    def __post_init__(self) -> None:
        if self.editor is None:
            raise HParamsError(
                "method='mend' needs a trained editor: hparams={'editor': editor} with a MendEditor from "
                "hf_edit_patch.editors.mend.train(...), or the folder / Hub repo id it was saved to"
            )
        if isinstance(self.editor, os.PathLike):
            self.editor = os.fspath(self.editor)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the editor is recorded by where it came from and what it edits, not by its weights."""
        editor = self.editor
        if isinstance(editor, str):
            return {"editor": editor, "revision": self.revision}
        info = editor.describe() if hasattr(editor, "describe") else {"editor": type(editor).__name__}
        return {**info, "revision": self.revision}
