"""Stack-level regularizers: constraints on the accumulated update of a stack of patches, one module at a time.

Long runs of edits degrade a model through the *accumulated* update ΔW_acc: its norm grows, its large singular
values grow, and the edited matrix becomes ill-conditioned. These regularizers take ΔW_acc of one module and the
weight W under it, and return a replacement update that satisfies a bound, or ΔW_acc itself when it already does:

- `"prune"`, a condition-number restraint in the spirit of PRUNE (Ma et al. 2024, "Perturbation-Restrained
  Sequential Model Editing"): the singular values of ΔW_acc above τ = `threshold` · σ_max(W) are compressed
  logarithmically, σ ↦ τ · (1 + ln(σ / τ)). The map is the identity up to τ, continuous with slope 1 there, and
  grows only logarithmically beyond, so no direction of the update outgrows the weight's own spectrum by much and
  the edited matrix W + ΔW_acc keeps a condition number close to W's. The singular vectors are kept: each edit's
  direction survives, with a smaller gain in the directions many edits pushed.
- `"norm_anchor"`: ‖ΔW_acc‖_F ≤ `alpha` · ‖W‖_F; an update over the bound is scaled down to it (direction and
  sparsity kept).
- `"rect"`: RECT on the accumulated update (top-k by |ΔW_acc / W| at `keep_ratio`, or the fewest entries carrying
  `norm_budget` of its squared norm), which bounds how many entries a stack changes however long it grows.

AlphaEdit's projection against the keys of earlier edits is not a function of ΔW_acc alone: it is the
`"alphaedit"` editor, which projects each new update knowing the requests of the active patches.

Importing this module registers the three under those names (`hf_edit_patch.patch.stack_regularizers`), for
`PatchedModel.consolidate(regularizer=...)` and `hf_edit_patch.edit(..., stack_regularizer=...)`.

Example:
    ```python
    >>> import torch
    >>> from hf_edit_patch.regularizers.stack import prune_restrain
    >>> w = torch.eye(8)
    >>> dw = torch.zeros(8, 8); dw[0, 0] = 10.0
    >>> float(prune_restrain(dw, w, threshold=1.0)[0, 0])   # 1 · (1 + ln 10)
    3.302585...
    ```
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict

import torch

from ..errors import PatchError
from ..patch.encoding import fingerprint
from ..patch.sparsifiers import sparsify
from ..patch.stack_regularizers import register_stack_regularizer

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_THRESHOLD",
    "largest_singular_value",
    "norm_anchor",
    "prune_restrain",
    "rect_accumulated",
]

DEFAULT_THRESHOLD = 0.5
"""`prune`: singular values of the accumulated update above this multiple of the weight's largest are compressed.

0.5 is the setting measured to 1,000 sequential ROME edits on SmolLM2-135M (docs/results.md, "Lifelong editing"):
reliability 0.298 against 0.014 unregularized, KL drift 0.14 against 10.5 nats, the general tasks at the base
model's level. It binds from the first edits (0.87 against 0.95 reliability at 10 edits); 1.0 leaves short stacks
as they are."""
DEFAULT_ALPHA = 0.1
"""`norm_anchor`: the accumulated update's Frobenius norm is bounded by this fraction of the weight's."""


def _positive(value: object, what: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise PatchError(f"{name}: {what} must be a positive finite number, got {value!r}")
    return float(value)


@register_stack_regularizer("prune")
def prune_restrain(
    delta: torch.Tensor, weight: torch.Tensor, *, name: str = "delta", threshold: float = DEFAULT_THRESHOLD
) -> torch.Tensor:
    """Compresses the singular values of ΔW above τ = `threshold` · σ_max(W) to τ · (1 + ln(σ / τ)).

    Only the components above τ change: the result is ΔW − Σ_{σᵢ > τ} (σᵢ − σ'ᵢ) uᵢ vᵢᵀ. The singular values above τ
    and their vectors on the smaller side come from the symmetric eigendecomposition of ΔW ΔWᵀ (or ΔWᵀ ΔW) in
    float64, the other side's vectors never being formed: at a 4096×11008 matrix this is several times cheaper than
    an SVD (`scripts/bench_stack_regularizers.py`), and as accurate where it matters, the directions over τ. σ_max(W)
    is remembered by W's content hash, so a stack's later edits on the same base weight do not compute it again.
    Returns `delta` itself when no singular value exceeds τ, found without any decomposition when ‖ΔW‖_F ≤ τ.

    Args:
        delta: the accumulated update ΔW (float32), in the module's layout (singular values do not depend on it).
        weight: the weight under the update.
        threshold: τ as a multiple of W's largest singular value, > 0.

    Example:
        ```python
        >>> prune_restrain(torch.zeros(4, 4), torch.eye(4)).abs().sum()
        tensor(0.)
        ```
    """
    threshold = _positive(threshold, "threshold", name)
    tau = threshold * _largest_singular_value_of_weight(weight)
    if tau <= 0.0:
        raise PatchError(f"{name}: the weight is zero, so its spectrum gives no bound for 'prune'")
    if float(torch.linalg.vector_norm(delta.to(torch.float32))) <= tau:  # σ_max(ΔW) ≤ ‖ΔW‖_F
        return delta
    a = _float64(delta)
    gram, wide = _gram(a)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    s = eigenvalues.clamp_min(0.0).sqrt()
    big = s > tau
    if not bool(big.any()):
        return delta
    s_big, basis = s[big], vectors[:, big]
    shrunk = tau * (1.0 + torch.log(s_big / tau))
    logger.debug("%s: %d singular value(s) over %.4g compressed (largest %.4g -> %.4g)", name, int(big.sum()), tau,
                 float(s_big.max()), float(shrunk.max()))  # fmt: skip
    gain = 1.0 - shrunk / s_big  # per singular direction: the share of σᵢ taken off
    if wide:  # basis: left singular vectors uᵢ, and uᵢᵀ ΔW = σᵢ vᵢᵀ
        correction = (basis * gain) @ (basis.T @ a)
    else:  # basis: right singular vectors vᵢ, and ΔW vᵢ = σᵢ uᵢ
        correction = ((a @ basis) * gain) @ basis.T
    return delta - correction.to(delta.device, delta.dtype)


def largest_singular_value(matrix: torch.Tensor) -> float:
    """σ_max of a 2-D matrix: the square root of the largest eigenvalue of its Gram matrix on the smaller side.

    In float64 this is as accurate as an SVD (the eigenvalues of a symmetric matrix are found to a few units of
    float64 rounding of the largest) and several times faster: one matrix product and a symmetric eigensolve of the
    smaller side, against a full SVD of the matrix.

    Example:
        ```python
        >>> largest_singular_value(torch.diag(torch.tensor([3.0, 4.0])))
        4.0
        ```
    """
    gram, _ = _gram(_float64(matrix))
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


_SIGMA_MAX: OrderedDict[str, float] = OrderedDict()  # fingerprint of a weight -> its σ_max, most recent last
_SIGMA_MAX_ENTRIES = 256
_SIGMA_MAX_LOCK = threading.Lock()


def _largest_singular_value_of_weight(weight: torch.Tensor) -> float:
    """`largest_singular_value(weight)`, remembered by the weight's content hash for the weights seen last.

    Per edit, `prune` meets the same base weight again and again: hashing it (~0.1 s at 4096×11008) replaces the
    eigensolve (tens of seconds on a CPU). The value is the same either way, so the cache changes no result.
    """
    key = fingerprint(weight)
    with _SIGMA_MAX_LOCK:
        if key in _SIGMA_MAX:
            _SIGMA_MAX.move_to_end(key)
            return _SIGMA_MAX[key]
    sigma = largest_singular_value(weight)
    with _SIGMA_MAX_LOCK:
        _SIGMA_MAX[key] = sigma
        while len(_SIGMA_MAX) > _SIGMA_MAX_ENTRIES:
            _SIGMA_MAX.popitem(last=False)
    return sigma


def _gram(a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The Gram matrix on the smaller side, A Aᵀ for a wide (or square) A, else Aᵀ A, and whether A is wide."""
    wide = a.shape[0] <= a.shape[1]
    return (a @ a.T if wide else a.T @ a), wide


def _float64(t: torch.Tensor) -> torch.Tensor:
    # MPS has no float64: its tensors are computed on the CPU.
    return t.detach().to("cpu" if t.device.type == "mps" else t.device, torch.float64)


@register_stack_regularizer("norm_anchor")
def norm_anchor(
    delta: torch.Tensor, weight: torch.Tensor, *, name: str = "delta", alpha: float = DEFAULT_ALPHA
) -> torch.Tensor:
    """Scales ΔW down to ‖ΔW‖_F = `alpha` · ‖W‖_F when it is larger; returns `delta` itself otherwise.

    Example:
        ```python
        >>> float(norm_anchor(torch.eye(4), torch.eye(4), alpha=0.5).norm())   # ‖W‖_F = 2: bound 1
        1.0
        ```
    """
    alpha = _positive(alpha, "alpha", name)
    bound = alpha * float(torch.linalg.vector_norm(weight.to(torch.float32)))
    norm = float(torch.linalg.vector_norm(delta.to(torch.float32)))
    if norm <= bound:
        return delta
    return delta * (bound / norm)


@register_stack_regularizer("rect")
def rect_accumulated(
    delta: torch.Tensor,
    weight: torch.Tensor,
    *,
    name: str = "delta",
    keep_ratio: float | None = None,
    norm_budget: float | None = None,
) -> torch.Tensor:
    """RECT on the accumulated update: keeps its top `keep_ratio` entries by |ΔW / W| (or a `norm_budget`).

    Returns `delta` itself when every nonzero entry is kept.

    Example:
        ```python
        >>> int(rect_accumulated(torch.ones(4, 4), torch.ones(4, 4), keep_ratio=0.25).count_nonzero())
        4
        ```
    """
    if keep_ratio is None and norm_budget is None:
        raise PatchError(f"{name}: stack regularizer 'rect' needs keep_ratio (in (0, 1]) or norm_budget (in (0, 1])")
    kwargs = {"norm_budget": norm_budget} if norm_budget is not None else {}
    kept = sparsify(delta, weight, "rect", keep_ratio, name=name, **kwargs)
    if kept.nnz == int(torch.count_nonzero(delta)):
        return delta
    return kept.to_dense(torch.float32)
