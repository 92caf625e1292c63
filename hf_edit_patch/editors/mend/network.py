"""The MEND editor network: its config, the low-rank residual layers, and the transform of an edit's gradient
factors into ΔW. Pure computation: saving, loading and sharing editors is `hf_edit_patch.hub.mend`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import PatchError, PatchFormatError
from ...modules import model_source, weight_layout
from ...version import __version__

logger = logging.getLogger(__name__)

__all__ = ["MEND_FORMAT", "MEND_FORMAT_VERSION", "MendConfig", "MendEditor", "MendError"]

MEND_FORMAT = "hf_edit_patch.mend"
MEND_FORMAT_VERSION = 1
_EPS = 1e-7


class MendError(PatchError):
    """A MEND editor is malformed, does not fit the model, or cannot be trained on the records given."""


@dataclass
class MendConfig:
    """What a `MendEditor` edits and how it is built; saved as `mend_config.json`.

    Args:
        modules: the edited matrices (MLP output projections), e.g. `["model.layers.27.mlp.down_proj", ...]`.
        layout: their weight layout, "linear" (`[out, in]`) or "conv1d" (GPT-2, `[in, out]`).
        d_in, d_out: their input and output widths.
        rank: rank of the network's low-rank layers (MEND: 1920), at most d_in + d_out.
        n_hidden: hidden layers of the network (MEND: 1).
        edit_lr: the starting step size α of every layer.
        base_model_name_or_path, base_model_revision, model_type: the model the editor was trained for.
        training: how it was trained (steps, learning rates, loss weights, records, final losses).
    """

    modules: list[str]
    layout: str
    d_in: int
    d_out: int
    rank: int = field(default=1920, metadata={"help": "Rank of the editor network's layers (MEND: 1920)."})
    n_hidden: int = field(default=1, metadata={"help": "Hidden layers of the editor network (MEND: 1)."})
    edit_lr: float = field(default=1e-4, metadata={"help": "Starting step size α of every edited layer."})
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    model_type: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (
            not isinstance(self.modules, (list, tuple))
            or not self.modules
            or not all(isinstance(m, str) and m for m in self.modules)
        ):
            raise MendError(f"MendConfig.modules must be a non-empty list of module names, got {self.modules!r}")
        self.modules = list(self.modules)
        if self.layout not in ("linear", "conv1d"):
            raise MendError(f"MendConfig.layout must be 'linear' or 'conv1d', got {self.layout!r}")
        for name in ("d_in", "d_out", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MendError(f"MendConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.n_hidden, bool) or not isinstance(self.n_hidden, int) or self.n_hidden < 0:
            raise MendError(f"MendConfig.n_hidden must be an integer >= 0, got {self.n_hidden!r}")
        if not isinstance(self.edit_lr, (int, float)) or isinstance(self.edit_lr, bool):
            raise MendError(f"MendConfig.edit_lr must be a number, got {self.edit_lr!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MEND_FORMAT,
            "format_version": MEND_FORMAT_VERSION,
            "hf_edit_patch": __version__,
            **dataclasses.asdict(self),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "the config") -> MendConfig:
        if not isinstance(data, dict) or data.get("format") != MEND_FORMAT:
            raise PatchFormatError(f"{source} is not a MEND editor config (format {MEND_FORMAT!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > MEND_FORMAT_VERSION:
            raise PatchFormatError(
                f"{source} has MEND format version {version!r}; this hf_edit_patch reads up to "
                f"{MEND_FORMAT_VERSION}: upgrade hf_edit_patch to read it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"format", "format_version", "hf_edit_patch"})
        if unknown:
            logger.warning(
                "%s: ignoring fields %s written by a newer hf_edit_patch (upgrade to read them)", source, unknown
            )
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise PatchFormatError(f"{source} is not a valid MEND editor config: {exc}") from exc


class LowRankResidual(nn.Module):
    """MEND's `LRLinear`: x + act(s_mode ⊙ (U V x + b) + o_mode), U initialized to zero (identity at start)."""

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.v = nn.Parameter(torch.empty(rank, dim))
        nn.init.xavier_uniform_(self.v)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (x @ self.v.T) @ self.u.T + self.bias
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return x + (pre.clamp_min(0) if self.relu else pre)


class MendEditor(nn.Module):
    """
    A trained MEND editor for one model: `hf_edit_patch.edit(..., method="mend", hparams={"editor": editor})`.

    Build one with [`train`]; save, load and share it with `hf_edit_patch.hub.mend` (`save_mend_editor`,
    `load_mend_editor`, `push_mend_editor`: a folder or a Hub repo id; safetensors and JSON only).

    Example:

    ```python
    >>> from hf_edit_patch.editors import mend
    >>> editor = mend.train(model, tokenizer, records[:200], max_steps=500)  # doctest: +SKIP
    >>> editor.config.modules  # doctest: +SKIP
    ['model.layers.27.mlp.down_proj', 'model.layers.28.mlp.down_proj', 'model.layers.29.mlp.down_proj']
    ```
    """

    def __init__(self, config: MendConfig) -> None:
        super().__init__()
        self.config = config
        n, d_in, d_out = len(config.modules), config.d_in, config.d_out
        dim = d_in + d_out
        rank = min(config.rank, dim)
        self.layers = nn.ModuleList(
            [LowRankResidual(dim, rank, n, relu=i < config.n_hidden) for i in range(config.n_hidden + 1)]
        )
        self.edit_lrs = nn.Parameter(torch.full((n,), float(config.edit_lr)))
        # standardization of the inputs: per edited module, mean and sum of squared deviations (Welford), and count
        self.register_buffer("u_mean", torch.zeros(n, d_in))
        self.register_buffer("u_m2", torch.zeros(n, d_in))
        self.register_buffer("delta_mean", torch.zeros(n, d_out))
        self.register_buffer("delta_m2", torch.zeros(n, d_out))
        self.register_buffer("count", torch.zeros(n, dtype=torch.float64))
        self.name_or_path: str | None = None  # where it was saved or loaded from, set by hf_edit_patch.hub.mend

    def __repr__(self) -> str:
        return (
            f"MendEditor(modules={self.config.modules}, rank={self.config.rank}, "
            f"base={self.config.base_model_name_or_path!r})"
        )

    # ------------------------------------------------------------------ the transform
    @torch.no_grad()
    def update_statistics(self, index: int, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Adds tokens (`u` `[T, d_in]`, `delta` `[T, d_out]`) to module `index`'s standardization statistics."""
        n_b = u.shape[0]
        if n_b == 0:
            return
        n_a = float(self.count[index])
        total = n_a + n_b
        for side, x in (("u", u), ("delta", delta)):
            mean, m2 = getattr(self, f"{side}_mean"), getattr(self, f"{side}_m2")
            x = x.to(mean)
            mean_b = x.mean(0)
            diff = mean_b - mean[index]
            m2[index] += ((x - mean_b) ** 2).sum(0) + diff**2 * (n_a * n_b / total)
            mean[index] += diff * (n_b / total)
        self.count[index] = total

    def _standardize(self, index: int, side: str, x: torch.Tensor) -> torch.Tensor:
        n = float(self.count[index])
        if n < 2:
            raise MendError(
                "the MEND editor has no input statistics for "
                f"{self.config.modules[index]!r}; build editors with hf_edit_patch.editors.mend.train(...)"
            )
        mean, m2 = getattr(self, f"{side}_mean")[index], getattr(self, f"{side}_m2")[index]
        return (x.to(mean) - mean) / ((m2 / (n - 1)).sqrt() + _EPS)

    def transform(self, index: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(ũ, δ̃)` for module `index`'s token pairs (`u` `[T, d_in]`, `delta` `[T, d_out]`)."""
        z = torch.cat([self._standardize(index, "u", u), self._standardize(index, "delta", delta)], dim=-1)
        for layer in self.layers:
            z = layer(z, index)
        return z.split([self.config.d_in, self.config.d_out], dim=-1)

    def factors(self, index: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(Ũ, D)`, `[T, d_in]` and `[T, d_out]`, with ΔW = Dᵀ Ũ in `[out, in]` layout (D = −α δ̃)."""
        u_t, d_t = self.transform(index, u, delta)
        return u_t, -self.edit_lrs[index] * d_t

    def delta_weight(self, index: int, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """ΔW of module `index` in the module's own layout, float32."""
        u_t, d_t = self.factors(index, u, delta)
        dense = d_t.T @ u_t  # [out, in]
        return dense.T.contiguous() if self.config.layout == "conv1d" else dense

    # ------------------------------------------------------------------ checks and provenance
    def check(self, model: nn.Module) -> None:
        """Raises `MendError` unless every edited module exists in `model` with the editor's shape and layout."""
        for name in self.config.modules:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise MendError(
                    f"the MEND editor edits {name!r}, which {type(model).__name__} does not have; it was trained for "
                    f"{self.config.base_model_name_or_path!r}"
                ) from None
            layout = weight_layout(module)
            c = self.config
            shape = (c.d_out, c.d_in) if c.layout == "linear" else (c.d_in, c.d_out)
            if layout != c.layout or tuple(module.weight.shape) != shape:
                raise MendError(
                    f"the MEND editor expects {name!r} to be a {c.layout} weight of shape {list(shape)}, the model "
                    f"has a {layout} weight of shape {list(module.weight.shape)}; it was trained for "
                    f"{c.base_model_name_or_path!r}"
                )
        model_id = model_source(model)[0]
        if self.config.base_model_name_or_path and model_id and model_id != self.config.base_model_name_or_path:
            logger.warning(
                "the MEND editor was trained for %r; using it on %r", self.config.base_model_name_or_path, model_id
            )

    def describe(self) -> dict[str, Any]:
        """What a patch records about the editor (JSON-safe)."""
        return {
            "editor": self.name_or_path or "in-memory MendEditor",
            "modules": list(self.config.modules),
            "rank": self.config.rank,
            "n_hidden": self.config.n_hidden,
            "base_model": self.config.base_model_name_or_path,
            "training": dict(self.config.training),
        }
