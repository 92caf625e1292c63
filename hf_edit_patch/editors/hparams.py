"""Hyperparameters of the editors: dataclasses with help text, validated once in `__post_init__`.

Fields left at `None` are filled per architecture (`editors.architectures`) when the edit runs.

Example:
    ```python
    >>> from hf_edit_patch.editors.hparams import RomeHParams
    >>> RomeHParams(layer=5, v_num_grad_steps=10).v_lr
    0.5
    ```
"""

from __future__ import annotations

import dataclasses
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
            "their activations: less memory, one more partial forward per step."
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
            "help": "λ, the weight of C against KKᵀ. None: the MLP width d (C's scale grows like 1/d; GPT-J's "
            "d = 16384 is close to MEMIT's published 15000, and d = 1536 works for SmolLM2-135M)."
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
