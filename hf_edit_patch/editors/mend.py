"""MEND (Mitchell et al. 2022): a trained editor network that turns the fine-tuning gradient of an edit into ΔW.

For an edited matrix W (an MLP output projection), the gradient of the edit's fine-tuning loss L (the NLL of
`target_new` after the prompt) is a sum of rank-one terms over the tokens t of the edit sequence,
∇_W L = Σ_t δ_t u_tᵀ, with u_t the matrix's input and δ_t = ∂L/∂(W u_t) the gradient at its output. MEND transforms
each pair instead of the gradient: with z_t = [norm(u_t); norm(δ_t)] (each dimension standardized by the mean and
standard deviation measured on the training records),

    h_t = z_t + ReLU(s¹_ℓ ⊙ (U₁V₁ z_t + b₁) + o¹_ℓ),   [ũ_t; δ̃_t] = h_t + s²_ℓ ⊙ (U₂V₂ h_t + b₂) + o²_ℓ,

one network shared by the edited layers (low-rank U V, rank `rank`; U starts at zero so the network starts as the
identity), with a scale s_ℓ and offset o_ℓ per layer ℓ, and

    ΔW_ℓ = −α_ℓ Σ_t δ̃_t ũ_tᵀ,     α_ℓ a learned step size per layer (starting at `edit_lr`).

Training (`train`) keeps the model frozen and optimizes only the editor, per step on a batch of records:
c_edit · L_edit + c_loc · L_loc, where L_edit is the NLL of `target_new` after the edit prompt and its paraphrases
with ΔW applied, and L_loc the KL divergence from the unedited to the edited next-token distributions over the
tokens of a locality prompt (the record's neighborhood prompt, else another record's prompt). ΔW acts through
forward hooks, so gradients reach the editor; the model's weights never change.

Example:
    ```python
    import json
    import hf_edit_patch as hep
    from hf_edit_patch.editors import mend

    records = json.load(open("zsre_eval.json"))
    editor = mend.train(model, tokenizer, records[:200], max_steps=500)
    editor.save_pretrained("out/mend-smollm2")           # mend_config.json + mend_model.safetensors + README.md
    patch = hep.edit(model, tokenizer, [hep.EditRequest.from_zsre(records[300])], method="mend",
                     hparams={"editor": "out/mend-smollm2"}, keep_ratio=0.4)
    ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..batching import model_device, pad_batch, pad_id, target_token_ids
from ..errors import PatchError, PatchFormatError
from ..hub import resolve as hub
from ..hub.cards import write_card
from ..hub.files import atomic_write
from ..hub.push import PushOptions, push_folder
from ..modules import model_source, unwrap_peft, weight_layout
from ..requests import EditRequest
from ..version import __version__
from .architectures import ArchSpec, get_arch, mlp_out_name, num_layers
from .common import btd, frozen_weights
from .hparams import MendHParams

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "MendConfig", "MendEditor", "mend_deltas", "train"]

MEND_FORMAT = "hf_edit_patch.mend"
MEND_FORMAT_VERSION = 1
CONFIG_NAME = "mend_config.json"
WEIGHTS_NAME = "mend_model.safetensors"
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


class _LowRankResidual(nn.Module):
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

    Build one with [`train`]; save it with `save_pretrained`, share it with `push_to_hub`, load it with
    `from_pretrained` (a folder or a Hub repo id; safetensors and JSON only).

    Example:

    ```python
    >>> from hf_edit_patch.editors.mend import MendEditor
    >>> editor = MendEditor.from_pretrained("out/mend-smollm2")  # doctest: +SKIP
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
            [_LowRankResidual(dim, rank, n, relu=i < config.n_hidden) for i in range(config.n_hidden + 1)]
        )
        self.edit_lrs = nn.Parameter(torch.full((n,), float(config.edit_lr)))
        # standardization of the inputs: per edited module, mean and sum of squared deviations (Welford), and count
        self.register_buffer("u_mean", torch.zeros(n, d_in))
        self.register_buffer("u_m2", torch.zeros(n, d_in))
        self.register_buffer("delta_mean", torch.zeros(n, d_out))
        self.register_buffer("delta_m2", torch.zeros(n, d_out))
        self.register_buffer("count", torch.zeros(n, dtype=torch.float64))
        self.name_or_path: str | None = None

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

    # ------------------------------------------------------------------ save / load / share
    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite_card: bool = False) -> None:
        """Writes `mend_config.json`, `mend_model.safetensors` (weights and statistics) and a README.md card."""
        directory = os.fspath(save_directory)
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}

        def write_weights(tmp: str) -> None:
            save_file(tensors, tmp, metadata={"format": MEND_FORMAT, "format_version": str(MEND_FORMAT_VERSION)})

        atomic_write(os.path.join(directory, WEIGHTS_NAME), write_weights)
        atomic_write(os.path.join(directory, CONFIG_NAME), json.dumps(self.config.to_dict(), indent=2) + "\n")
        write_card(os.path.join(directory, "README.md"), self._card(), overwrite=overwrite_card, write=atomic_write)
        if self.name_or_path is None:
            self.name_or_path = directory

    def _card(self) -> str:
        c = self.config
        base = c.base_model_name_or_path or "unknown"
        training = "\n".join(f"- {k}: {v}" for k, v in c.training.items()) or "- (not recorded)"
        header = "---\nlibrary_name: hf_edit_patch\ntags:\n- hf_edit_patch\n- model-editing\n- mend\n"
        if c.base_model_name_or_path and not os.path.isabs(base):
            header += f"base_model: {base}\n"
        return (
            f"{header}---\n\n# MEND editor for {base}\n\n"
            "A MEND editor network (Mitchell et al. 2022) trained with hf_edit_patch: it turns the fine-tuning "
            "gradient of an edit into a weight update of these modules:\n\n"
            + "".join(f"- `{m}`\n" for m in c.modules)
            + "\n```python\nimport hf_edit_patch as hep\n"
            f'patch = hep.edit(model, tokenizer, [request], method="mend", hparams={{"editor": REPO_ID}})\n```\n\n'
            f"## Training\n\n{training}\n"
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> MendEditor:
        """Loads an editor from a folder or a Hub repo written by `save_pretrained` (safetensors and JSON only)."""
        options = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        source = os.fspath(path_or_repo_id)
        config_path = hub.resolve_file(source, CONFIG_NAME, **options)
        weights_path = hub.resolve_file(source, WEIGHTS_NAME, **options)
        try:
            with open(config_path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as exc:
            raise PatchFormatError(f"{CONFIG_NAME} of {source!r} is not valid JSON: {exc}") from exc
        editor = cls(MendConfig.from_dict(data, source=f"{CONFIG_NAME} of {source!r}"))
        try:
            state = load_file(weights_path)
        except Exception as exc:  # safetensors raises its own error type for malformed files
            raise PatchFormatError(f"{WEIGHTS_NAME} of {source!r} is not a readable safetensors file: {exc}") from exc
        expected = editor.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or bad:
            raise PatchFormatError(
                f"{WEIGHTS_NAME} of {source!r} does not match its config: missing {missing}, unexpected {unexpected}, "
                f"wrong shapes {bad}"
            )
        if not all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()):
            raise PatchFormatError(f"{WEIGHTS_NAME} of {source!r} holds non-finite values")
        editor.load_state_dict(state)
        editor.name_or_path = source
        return editor.eval()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> Any:
        """Creates the Hub repo if needed and uploads the saved editor in one commit; returns the commit info."""
        message = commit_message or "Upload MEND editor with hf_edit_patch"
        options = PushOptions(private=private, token=token, revision=revision, commit_message=message)
        return push_folder(lambda folder: self.save_pretrained(folder), repo_id, options)


# --------------------------------------------------------------------------------------------------------------------
# Gradients of the edit, and edits through hooks
# --------------------------------------------------------------------------------------------------------------------


def _teacher_forced(
    tokenizer, texts: list[str], targets: list[str]
) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
    rows, slices = [], []
    for text, target in zip(texts, targets, strict=True):
        ids = tokenizer(text).input_ids
        target_ids = target_token_ids(tokenizer, target)
        rows.append(ids + target_ids[:-1])
        slices.append((len(ids) - 1, target_ids))
    return rows, slices


def _mean_nll(logits: torch.Tensor, slices: list[tuple[int, list[int]]]) -> torch.Tensor:
    """Mean over sequences of the mean NLL of each one's target tokens."""
    nll = []
    for i, (start, target) in enumerate(slices):
        logp = torch.log_softmax(logits[i, start : start + len(target)].float(), dim=-1)
        nll.append(-logp.gather(-1, torch.tensor(target, device=logp.device)[:, None]).mean())
    return torch.stack(nll).mean()


def edit_gradients(
    model: nn.Module, tokenizer, requests: list[EditRequest], modules: list[str]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """`({module: (u, δ)}, loss)`: the input u `[T, d_in]` and output gradient δ `[T, d_out]` (float32) of each module
    at the tokens where δ ≠ 0, for the mean NLL of each request's `target_new` after its prompt."""
    device = model_device(model)
    rows, slices = _teacher_forced(tokenizer, [r.text for r in requests], [r.target_new for r in requests])
    batch = pad_batch(rows, pad_id(tokenizer), device)
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name: str):
        def hook(_module, args, output):
            zero = torch.zeros_like(output, requires_grad=True)
            store[name] = (args[0].detach(), zero)
            return output + zero

        return hook

    handles = [model.get_submodule(name).register_forward_hook(capture(name)) for name in modules]
    try:
        with frozen_weights(model), torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            loss = _mean_nll(logits, slices)
            grads = torch.autograd.grad(loss, [store[name][1] for name in modules])
    finally:
        for handle in handles:
            handle.remove()
    mask = batch.attention_mask.bool().reshape(-1)
    out = {}
    for name, grad in zip(modules, grads, strict=True):
        u = btd(store[name][0], len(rows))
        u = u.reshape(-1, u.shape[-1]).float()
        d = btd(grad, len(rows))
        d = d.reshape(-1, d.shape[-1]).float()
        keep = mask & (d != 0).any(-1) & (u != 0).any(-1)
        out[name] = (u[keep], d[keep])
    return out, float(loss.detach())


@contextlib.contextmanager
def _applying_factors(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Forward hooks adding x ΔWᵀ = (x Ũᵀ) D to each module's output (differentiable in Ũ and D)."""

    def make(u_t: torch.Tensor, d_t: torch.Tensor):
        def hook(_module, args, output):
            return output + ((args[0].to(u_t.dtype) @ u_t.T) @ d_t).to(output.dtype)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make(*f)) for n, f in factors.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _resolve_editor(hp: MendHParams) -> MendEditor:
    editor = hp.editor
    if isinstance(editor, MendEditor):
        return editor
    if isinstance(editor, str):
        return MendEditor.from_pretrained(editor, revision=hp.revision)
    raise MendError(
        f"hparams['editor'] must be a MendEditor or the folder / Hub repo id of one, got {type(editor).__name__}"
    )


def mend_deltas(
    model: nn.Module, tokenizer, requests: list[EditRequest], hp: MendHParams, spec: ArchSpec | None = None
) -> tuple[dict[str, torch.Tensor], MendEditor]:
    """`({module: ΔW}, editor)`: the editor's dense float32 ΔW (module layout) for the requests, as one batch."""
    editor = _resolve_editor(hp)
    editor.check(model)
    device = model_device(model)
    if next(editor.parameters()).device != device:
        editor.to(device)
    was_training = editor.training
    editor.eval()
    try:
        grads, loss = edit_gradients(model, tokenizer, requests, editor.config.modules)
        with torch.no_grad():
            deltas = {
                name: editor.delta_weight(i, *grads[name]).float() for i, name in enumerate(editor.config.modules)
            }
    finally:
        editor.train(was_training)
    logger.info("MEND: fine-tuning NLL before the edit %.4f", loss)
    return deltas, editor


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def _as_training_requests(records: Any) -> list[EditRequest]:
    out = []
    for number, record in enumerate(records):
        try:
            if isinstance(record, EditRequest):
                out.append(record)
            elif isinstance(record, dict) and "src" in record and "alt" in record:
                out.append(EditRequest.from_zsre(record))
            elif isinstance(record, dict) and ("requested_rewrite" in record or "ground_truth" in record):
                out.append(EditRequest.from_counterfact(record))
            else:
                out.append(EditRequest.from_dict(record))
        except (ValueError, TypeError) as exc:
            raise MendError(f"training record {number} is not an edit request: {exc}") from exc
    if not out:
        raise MendError("train() needs at least one record (ZsRE records, CounterFact records or EditRequests)")
    return out


def train(
    model: nn.Module,
    tokenizer: Any,
    records: Any,
    *,
    max_steps: int = 200,
    lr: float = 1e-4,
    layers: list[int] | None = None,
    batch_size: int = 1,
    seed: int = 0,
    show_progress: bool | None = None,
    edit_lr: float = 1e-4,
    lr_lr: float = 1e-4,
    rank: int = 1920,
    n_hidden: int = 1,
    c_edit: float = 0.1,
    c_loc: float = 1.0,
    grad_clip: float = 100.0,
    templates: Any = None,
) -> MendEditor:
    """
    Trains a MEND editor for `model` on edit records; the model's weights are not changed.

    Args:
        model: a causal LM (frozen: only the editor trains).
        tokenizer: its tokenizer.
        records: ZsRE records (`src`, `alt`, `rephrase`, `loc`, ...), CounterFact records or `EditRequest`s; their
            paraphrases join the edit loss, their neighborhood prompts the locality loss.
        max_steps: optimization steps (0 gives the untrained editor: the identity network at step size `edit_lr`).
        lr: Adam learning rate of the editor network.
        layers: edited layers (default: the last three, as MEND).
        batch_size: records per step, edited together as one batch.
        seed: seed of the network's initialization and of the record sampling.
        edit_lr: starting step size α; lr_lr: Adam learning rate of the step sizes.
        rank, n_hidden: the network's low-rank width and hidden layers (MEND: 1920, 1).
        c_edit, c_loc: weights of the edit and locality losses (MEND: 0.1, 1.0).
        grad_clip: gradient-norm clip of the editor's parameters (MEND: 100).
        templates: module templates for an architecture the registry does not know (see `hf_edit_patch.edit`).

    Returns:
        The trained `MendEditor` (in eval mode; its config records how it was trained).

    Example:
        ```python
        >>> editor = train(model, tokenizer, records[:200], max_steps=500)  # doctest: +SKIP
        ```
    """
    for name, value, minimum in (("max_steps", max_steps, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise MendError(f"{name} must be an integer >= {minimum}, got {value!r}")
    reqs = _as_training_requests(records)
    base = unwrap_peft(model.base_model if getattr(model, "is_patched_model", False) else model)
    spec = get_arch(base, templates=templates)
    n_layers = num_layers(base, spec)
    layers = sorted(set(layers)) if layers is not None else list(range(max(0, n_layers - 3), n_layers))
    modules = [mlp_out_name(spec, layer) for layer in layers]
    first = base.get_submodule(modules[0])
    d_in, d_out = first.weight.shape[::-1] if spec.layout == "linear" else first.weight.shape
    model_id, revision = model_source(base)
    config = MendConfig(
        modules=modules,
        layout=spec.layout,
        d_in=int(d_in),
        d_out=int(d_out),
        rank=rank,
        n_hidden=n_hidden,
        edit_lr=edit_lr,
        base_model_name_or_path=model_id,
        base_model_revision=revision,
        model_type=getattr(getattr(base, "config", None), "model_type", None),
    )
    device = model_device(base)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        editor = MendEditor(config).to(device)
    editor.check(base)
    quiet = show_progress is False
    was_training = base.training
    base.eval()
    try:
        # input statistics: the (u, δ) of every training edit, measured once (MEND accumulates them online)
        for req in tqdm(reqs, desc="MEND statistics", unit="record", disable=quiet or None, leave=False):
            grads, _ = edit_gradients(base, tokenizer, [req], modules)
            for i, name in enumerate(modules):
                editor.update_statistics(i, *grads[name])
        history = _optimize(
            base, tokenizer, reqs, editor, max_steps, lr, lr_lr, batch_size, seed, c_edit, c_loc, grad_clip, quiet
        )
    finally:
        base.train(was_training)
    editor.config.training = {
        "records": len(reqs),
        "max_steps": max_steps,
        "batch_size": batch_size,
        "lr": lr,
        "lr_lr": lr_lr,
        "c_edit": c_edit,
        "c_loc": c_loc,
        "grad_clip": grad_clip,
        "seed": seed,
        **history,
        "edit_lrs": [round(float(x), 8) for x in editor.edit_lrs.detach()],
    }
    return editor.eval()


def _optimize(
    model: nn.Module,
    tokenizer,
    reqs: list[EditRequest],
    editor: MendEditor,
    max_steps: int,
    lr: float,
    lr_lr: float,
    batch_size: int,
    seed: int,
    c_edit: float,
    c_loc: float,
    grad_clip: float,
    quiet: bool,
) -> dict[str, Any]:
    if max_steps == 0:
        return {}
    device = model_device(model)
    modules = editor.config.modules
    network = [p for n, p in editor.named_parameters() if n != "edit_lrs"]
    optimizer = torch.optim.Adam([{"params": network, "lr": lr}, {"params": [editor.edit_lrs], "lr": lr_lr}])
    rng = random.Random(seed)
    n = len(reqs)
    locality = [
        r.neighborhood[0] if r.neighborhood else (reqs[(i + 1) % n].text if n > 1 else None)
        for i, r in enumerate(reqs)
    ]
    if not any(locality):
        logger.warning("MEND training without any locality prompt: the locality loss is off")
    editor.train()
    bar = tqdm(range(max_steps), desc="Training MEND", unit="step", disable=quiet or None)
    edit_loss = loc_loss = torch.zeros(())
    for _ in bar:
        picked = rng.sample(range(n), min(batch_size, n))
        batch = [reqs[i] for i in picked]
        grads, _ = edit_gradients(model, tokenizer, batch, modules)
        factors = {name: editor.factors(i, *grads[name]) for i, name in enumerate(modules)}
        texts = [t for r in batch for t in [r.text, *r.paraphrases]]
        targets = [r.target_new for r in batch for _ in [r.text, *r.paraphrases]]
        rows, slices = _teacher_forced(tokenizer, texts, targets)
        loc_texts = [locality[i] for i in picked if locality[i]]
        loc_rows = [tokenizer(t).input_ids for t in loc_texts]
        padded = pad_batch(rows + loc_rows, pad_id(tokenizer), device)
        with frozen_weights(model), _applying_factors(model, factors):
            logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, use_cache=False).logits
        edit_loss = _mean_nll(logits, slices)
        loss = c_edit * edit_loss
        if loc_texts:
            loc_batch = pad_batch(loc_rows, pad_id(tokenizer), device)
            with torch.no_grad():  # the frozen model's next-token distributions (not cached: 200 KB per token)
                ref_logits = model(
                    input_ids=loc_batch.input_ids, attention_mask=loc_batch.attention_mask, use_cache=False
                ).logits
            kls = []
            for j, row in enumerate(loc_rows):
                ref = torch.log_softmax(ref_logits[j, : len(row)].float(), dim=-1)
                logp = torch.log_softmax(logits[len(rows) + j, : len(row)].float(), dim=-1)
                kls.append((ref.exp() * (ref - logp)).sum(-1).mean())
            loc_loss = torch.stack(kls).mean()
            loss = loss + c_loc * loc_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), grad_clip)
        optimizer.step()
        bar.set_postfix(edit=f"{edit_loss.item():.3f}", loc=f"{loc_loss.item():.4f}")
    bar.close()
    logger.info("MEND training: final edit NLL %.4f, locality KL %.5f", edit_loss.item(), loc_loss.item())
    return {"final_edit_nll": round(edit_loss.item(), 6), "final_loc_kl": round(loc_loss.item(), 6)}
