"""The value optimization of the locate-then-edit editors (ROME, MEMIT, AlphaEdit): the output of a module at the
subject's last token that makes the model say the new target.

For each request, δ minimizes the target's NLL over the request's prompt in every prefix context, plus `kl_factor` ·
KL to the unedited next-token distribution on "{subject} is a" (the subject's essence), plus `v_weight_decay` ·
||δ||² / ||v||², with ||δ|| at most `clamp_norm_factor` · ||v||; a request stops as soon as its NLL is below
`early_stop_loss`. Requests are independent, so many are optimized together: one batched forward per step, each row
with its own request's δ at its own subject position, requests leaving the batch as they converge, in chunks of at
most `v_batch_tokens` tokens. With `v_share_subject` (the default), requests with the same subject share one δ,
optimized on all their prompts: their keys at the subject's last token nearly coincide, so an update cannot map them
to different values, and targets optimized apart would be averaged by the solve into one that states none of them.

Two solvers (`v_solver`):

- `"adam"` (the default): Adam at `v_lr` for at most `v_num_grad_steps` steps, each δ clamped after its step (ROME's
  solver).
- `"lbfgs"`: a quasi-Newton method on each request's δ (d dimensions: 576 to 8,192): L-BFGS directions from the last
  `v_history` steps within a trust radius that starts at `v_first_step` · ||v||, trial points projected onto the
  clamp ball and accepted on sufficient decrease. At most `v_num_grad_steps` evaluations (one forward and backward
  pass each) per request, rejected trial points included.

Measured on SmolLM2-135M with ZsRE records, neither needs fewer than ~20 passes to reach the NLL Adam reaches: from
5-15 nats, the target NLL falls by a roughly constant amount per pass. On ROME's layer 5, L-BFGS ends at a higher
loss than Adam in the same number of passes (3 facts); on MEMIT's residual stream it ends lower and stops earlier
(12 facts: 119 s against 182 s, reliability 0.82 against 0.80, but generalization 0.58 against 0.65 and locality 0.95
against 1.0). Adam stays the default; what makes an edit cheaper is the cost of a pass, below.

With `v_reuse_prefix`, each step runs only what δ reaches (`value_forward.SuffixForward`): the tokens from the
subject's last one on, through the blocks from the edited one up, attending to keys and values cached once per chunk.

The model is never modified: edits in progress are applied through forward hooks, and gradients flow only into δ
(the weights' `requires_grad` flags are switched off for the optimization and restored).

Example:
    ```python
    >>> from hf_edit_patch.editors.value import optimize_values
    >>> module = "model.layers.5.mlp.down_proj"
    >>> v, v_star = optimize_values(model, tokenizer, requests, module, contexts, hp)  # doctest: +SKIP
    >>> v.shape, v_star.shape  # doctest: +SKIP
    (torch.Size([3, 576]), torch.Size([3, 576]))
    ```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..progress import progress_bar
from ..requests import EditRequest
from .hooks import Edits, frozen_weights
from .hparams import ValueOptHParams
from .prompts import input_output_at
from .value_forward import FullForward, LossRows, Reference, SuffixForward, loss_rows, reference_pass, split_logp

logger = logging.getLogger(__name__)

__all__ = ["optimize_value", "optimize_values"]


def optimize_value(
    model: nn.Module,
    tokenizer,
    request: EditRequest,
    module: str,
    contexts: list[str],
    hp: ValueOptHParams,
    *,
    edits: Edits | None = None,
    desc: str = "value",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finds the output of `module` at the subject's last token that makes the model say `target_new`.

    Returns `(v, v + δ)` in float32, v being the unedited output on the bare prompt (see the module docstring).

    Example:
        ```python
        >>> module = "model.layers.5.mlp.down_proj"
        >>> v, v_star = optimize_value(model, tokenizer, request, module, contexts, hp)  # doctest: +SKIP
        ```
    """
    v, v_star = optimize_values(model, tokenizer, [request], module, contexts, hp, edits=edits, desc=desc)
    return v[0], v_star[0]


def optimize_values(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    module: str,
    contexts: Sequence[str],
    hp: ValueOptHParams,
    *,
    edits: Edits | None = None,
    show_progress: bool | None = None,
    desc: str = "values",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(v, v*)`, each `[len(requests), d]` float32: the module's output at each request's subject and the output
    that makes the model say its new target, all requests optimized together in chunks of `hp.v_batch_tokens`.

    Args:
        model, tokenizer: the model (never modified) and its tokenizer.
        requests: the edit requests.
        module: the module whose output is optimized, e.g. `"model.layers.5.mlp.down_proj"` (ROME) or a decoder
            block (MEMIT's residual stream).
        contexts: prefix templates with one `{}` for the prompt (`prompts.context_templates`).
        hp: the optimization's settings.
        edits: edits in progress, applied through hooks (sequential ROME).
        show_progress: `None` (a bar on a terminal), `True` or `False`.
        desc: what the bar shows.

    Example:
        ```python
        >>> v, v_star = optimize_values(model, tokenizer, requests, "model.layers.8", contexts, hp)  # doctest: +SKIP
        ```
    """
    requests = list(requests)
    if not requests:
        raise ValueError("optimize_values needs at least one request, got none")
    edits = dict(edits or {})
    groups = _subject_groups(requests) if hp.v_share_subject else [[i] for i in range(len(requests))]
    chunks = _chunks(tokenizer, requests, groups, contexts, hp.v_batch_tokens)
    v_out = torch.empty(0)
    star_out = torch.empty(0)
    bar = progress_bar(
        total=len(requests),
        desc=f"Optimizing {desc}",
        unit="edit",
        leave=False,
        show_progress=show_progress,
        min_items=2,
    )
    with bar, frozen_weights(model):
        for chunk in chunks:
            order = [i for group in chunk for i in group]
            part = [requests[i] for i in order]
            local, start = [], 0
            for group in chunk:
                local.append(list(range(start, start + len(group))))
                start += len(group)
            v, star = _optimize_chunk(model, tokenizer, part, module, contexts, hp, edits, local)
            if not v_out.numel():
                v_out = v.new_empty(len(requests), v.shape[-1])
                star_out = v.new_empty(len(requests), v.shape[-1])
            where = torch.tensor(order, device=v.device)
            v_out[where], star_out[where] = v, star
            bar.update(len(part))
    return v_out, star_out


def _subject_groups(requests: list[EditRequest]) -> list[list[int]]:
    """Indices of the requests with the same subject, groups in the order of their first request."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.subject, []).append(i)
    return list(groups.values())


def _chunks(
    tokenizer, requests: list[EditRequest], groups: list[list[int]], contexts: Sequence[str], budget: int
) -> list[list[list[int]]]:
    """Consecutive runs of `groups` whose rows hold at most `budget` tokens (a group alone may exceed it)."""
    if len(groups) == 1:
        return [groups]
    chunks: list[list[list[int]]] = [[]]
    used = 0
    for group in groups:
        tokens = loss_rows(tokenizer, [requests[i] for i in group], contexts).tokens()
        if chunks[-1] and used + tokens > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += tokens
    return chunks


@dataclass
class _Losses:
    total: torch.Tensor  # [a] per active request
    nll: torch.Tensor  # [a]
    grad: torch.Tensor | None  # [a, d]


class _Objective:
    """Each request's loss as a function of its δ, evaluated for a subset of the requests in one batched pass."""

    def __init__(self, rows: LossRows, forward, ref: Reference, v: torch.Tensor, hp: ValueOptHParams) -> None:
        self.rows, self.forward, self.hp = rows, forward, hp
        self.v_sq = v.pow(2).sum(-1)  # [n]
        self.kl_init = ref.logp_kl  # in row order of the KL rows
        kl_rows = [i for i in range(len(rows)) if not rows.targets[i]]
        self.kl_ordinal = {row: k for k, row in enumerate(kl_rows)}
        self.active: list[int] | None = None
        self.passes = 0  # forward+backward passes

    def _select(self, active: list[int]) -> None:
        if active == self.active:
            return
        self.active = list(active)
        local = {r: i for i, r in enumerate(active)}
        rows = self.rows
        sel = [i for i in range(len(rows)) if rows.request[i] in local]
        self.forward.select(sel)
        self.sel = sel
        device = self.v_sq.device
        self.row_req = torch.tensor([local[rows.request[i]] for i in sel], device=device)
        t_req = [local[rows.request[i]] for i in sel for _ in rows.targets[i]]
        self.t_req = torch.tensor(t_req, device=device, dtype=torch.long)
        kl = [i for i in sel if not rows.targets[i]]
        self.kl_req = torch.tensor([local[rows.request[i]] for i in kl], device=device, dtype=torch.long)
        order = torch.tensor([self.kl_ordinal[i] for i in kl], device=self.kl_init.device, dtype=torch.long)
        self.kl_ref = self.kl_init[order]
        self.t_count = torch.bincount(self.t_req, minlength=len(active)).clamp_min(1)
        self.kl_count = torch.bincount(self.kl_req, minlength=len(active)).clamp_min(1)

    def __call__(self, active: list[int], delta: torch.Tensor, *, stop_below: float | None = None) -> _Losses:
        """Losses at `delta` `[len(active), d]` (one δ per active request) and their gradients, except for requests
        whose NLL is already below `stop_below` (their gradient rows are zero; no backward pass when all are)."""
        self._select(active)
        a = len(active)
        x = delta.detach().clone().requires_grad_(True)
        with torch.enable_grad(), self.forward.session(x[self.row_req]) as run:
            logp = torch.log_softmax(run().float(), dim=-1)
            t, kl_logp = split_logp(logp, self.rows, self.sel)
            head = t.device  # the output head's device, which differs from δ's when the model is spread over devices
            nll = -torch.zeros(a, device=head).index_add(0, self.t_req.to(head), t) / self.t_count.to(head)
            kl_ref = self.kl_ref.to(head)
            kl_rows = (kl_ref.exp() * (kl_ref - kl_logp)).sum(-1)
            kl = torch.zeros(a, device=head).index_add(0, self.kl_req.to(head), kl_rows) / self.kl_count.to(head)
            nll, kl = nll.to(x.device), kl.to(x.device)
            decay = x.pow(2).sum(-1) / self.v_sq[torch.tensor(active, device=x.device)]
            total = nll + self.hp.kl_factor * kl + self.hp.v_weight_decay * decay
            needed = torch.ones_like(nll, dtype=torch.bool) if stop_below is None else ~(nll.detach() < stop_below)
            if bool(needed.any()):
                # requests are independent: each δ gets its own loss's gradient
                torch.where(needed, total, torch.zeros_like(total)).sum().backward()
                self.passes += 1
        grad = x.grad if x.grad is not None else torch.zeros_like(x)
        return _Losses(total.detach(), nll.detach(), grad)


def _optimize_chunk(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    module: str,
    contexts: Sequence[str],
    hp: ValueOptHParams,
    edits: Edits,
    groups: list[list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(v, v*)` of `requests`; the requests of each of `groups` (indices into `requests`) share one δ."""
    rows = loss_rows(tokenizer, requests, contexts)
    ref = reference_pass(model, rows, module, edits, cache=hp.v_reuse_prefix)
    if all(b is not None for b in rows.bare):
        v = ref.values[torch.tensor(rows.bare, device=ref.values.device)]
    else:
        v = torch.stack([input_output_at(model, tokenizer, module, r.prompt, r.subject, edits)[1] for r in requests])
    forward = None
    if ref.cache is not None:
        suffix = SuffixForward(model, rows, module, edits, ref)
        # log-probabilities from the same weights on differently shaped batches: float32 rounding stays far below
        # 1e-3; half precision rounds each activation to ~3 significant digits. A misplaced cache or position is off
        # by whole nats.
        atol = 1e-3 if _dtype(model) in (torch.float32, torch.float64) else 0.25
        forward = suffix if suffix.matches(ref, atol=atol) else None
    ref.block_input = None
    if forward is None:
        ref.cache = None
        forward = FullForward(model, rows, module, edits, checkpoint=hp.checkpoint_blocks)
    group_of = [0] * len(requests)
    for g, members in enumerate(groups):
        for i in members:
            group_of[i] = g
    index = torch.tensor(group_of, device=v.device)
    # a shared δ is measured against the group's mean value (for the decay and the clamp)
    v_group = torch.zeros(len(groups), v.shape[-1], device=v.device, dtype=v.dtype).index_add_(0, index, v)
    v_group /= torch.bincount(index, minlength=len(groups)).to(v.dtype)[:, None]
    by_group = replace(rows, request=[group_of[r] for r in rows.request])
    objective = _Objective(by_group, forward, ref, v_group, hp)
    solve = _lbfgs if hp.v_solver == "lbfgs" else _adam
    delta, nll = solve(objective, v_group, hp)
    logger.info(
        "value optimization of %d request(s) (%d δ): %d forward+backward passes of %d row(s); NLL mean %.4f max "
        "%.4f; ||δ||/||v|| mean %.3f",
        len(requests),
        len(groups),
        objective.passes,
        len(rows),
        float(nll.mean()),
        float(nll.max()),
        float((delta.norm(dim=-1) / v_group.norm(dim=-1)).mean()),
    )
    return v, v + delta[index]


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _clamp(delta: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    norm = delta.norm(dim=-1, keepdim=True)
    return torch.where(norm > max_norm[:, None], delta * (max_norm[:, None] / norm.clamp_min(1e-30)), delta)


def _adam(objective: _Objective, v: torch.Tensor, hp: ValueOptHParams) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's solver, per request: Adam steps, δ clamped after each, stop once the NLL is below the threshold."""
    n = v.shape[0]
    delta = torch.zeros_like(v)
    m, s = torch.zeros_like(v), torch.zeros_like(v)
    nll_out = torch.full((n,), float("inf"), device=v.device)
    max_norm = hp.clamp_norm_factor * v.norm(dim=-1)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    active = list(range(n))
    for step in range(1, hp.v_num_grad_steps + 1):
        idx = torch.tensor(active, device=v.device)
        losses = objective(active, delta[idx], stop_below=hp.early_stop_loss)
        nll_out[idx] = losses.nll
        going = ~(losses.nll < hp.early_stop_loss)
        if not bool(going.any()):
            break
        if not bool(going.all()):
            idx, g = idx[going], losses.grad[going]
            active = idx.tolist()
        else:
            g = losses.grad
        m[idx] = beta1 * m[idx] + (1 - beta1) * g
        s[idx] = beta2 * s[idx] + (1 - beta2) * g * g
        step_size = hp.v_lr / (1 - beta1**step)
        denom = (s[idx] / (1 - beta2**step)).sqrt() + eps
        delta[idx] = _clamp(delta[idx] - step_size * m[idx] / denom, max_norm[idx])
    return delta, nll_out


def _two_loop(g: torch.Tensor, s: torch.Tensor, y: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """-H g for each request by the L-BFGS two-loop recursion; `s`, `y` `[a, m, d]` oldest first, unused slots zero
    (rho zero), H₀ = (sᵀy / yᵀy) I from the newest pair."""
    q = g.clone()
    alphas = []
    for i in range(s.shape[1] - 1, -1, -1):
        a = rho[:, i] * (s[:, i] * q).sum(-1)
        q = q - a[:, None] * y[:, i]
        alphas.append(a)
    yy = (y[:, -1] * y[:, -1]).sum(-1)
    gamma = torch.where(yy > 0, (s[:, -1] * y[:, -1]).sum(-1) / yy.clamp_min(1e-30), torch.ones_like(yy))
    r = gamma[:, None] * q
    for i, a in zip(range(s.shape[1]), reversed(alphas), strict=True):
        b = rho[:, i] * (y[:, i] * r).sum(-1)
        r = r + s[:, i] * (a - b)[:, None]
    return -r


def _lbfgs(objective: _Objective, v: torch.Tensor, hp: ValueOptHParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request: L-BFGS directions within a trust radius, trial points projected onto the clamp ball and accepted
    on sufficient decrease (Armijo); stop once the NLL is below the threshold or after `v_num_grad_steps`
    evaluations.

    The radius starts at `v_first_step` · ||v||, doubles after an accepted step that reached it, and after a rejected
    trial shrinks to the minimum of the quadratic through f(x), f'(x) and f(trial), within [0.1, 0.5] of the step.
    """
    n, d = v.shape
    device = v.device
    mem = hp.v_history
    max_norm = hp.clamp_norm_factor * v.norm(dim=-1)
    radius = hp.v_first_step * v.norm(dim=-1)
    x = torch.zeros_like(v)  # accepted points
    f = torch.full((n,), float("inf"), device=device)
    g = torch.zeros_like(v)
    s_hist, y_hist = torch.zeros(n, mem, d, device=device), torch.zeros(n, mem, d, device=device)
    rho = torch.zeros(n, mem, device=device)
    p = torch.zeros_like(v)  # search directions
    started = torch.zeros(n, dtype=torch.bool, device=device)
    z = torch.zeros_like(v)  # trial points
    evals = torch.zeros(n, dtype=torch.long, device=device)
    result, nll_out = torch.zeros_like(v), torch.full((n,), float("inf"), device=device)
    active = torch.arange(n, device=device)
    while active.numel():
        losses = objective(active.tolist(), z[active], stop_below=hp.early_stop_loss)
        evals[active] += 1
        done = losses.nll < hp.early_stop_loss
        result[active[done]], nll_out[active[done]] = z[active[done]], losses.nll[done]
        keep = ~done
        idx, total, grad, nll = active[keep], losses.total[keep], losses.grad[keep], losses.nll[keep]
        taken = z[idx] - x[idx]  # the step actually tried (projected onto the clamp ball)
        slope = (g[idx] * taken).sum(-1)
        accept = ~started[idx] | (total <= f[idx] + 1e-4 * slope)
        acc, rej = idx[accept], idx[~accept]
        if rej.numel():
            curv = total[~accept] - f[rej] - slope[~accept]
            shrink = torch.where(curv > 0, -slope[~accept] / (2 * curv.clamp_min(1e-30)), torch.full_like(curv, 0.5))
            radius[rej] = shrink.clamp(0.1, 0.5) * taken[~accept].norm(dim=-1)
        if acc.numel():
            s_new, y_new = taken[accept], grad[accept] - g[acc]
            sy = (s_new * y_new).sum(-1)
            good = started[acc] & (sy > 1e-10 * y_new.norm(dim=-1) * s_new.norm(dim=-1))
            if bool(good.any()):
                upd = acc[good]
                s_hist[upd] = torch.cat([s_hist[upd, 1:], s_new[good, None]], 1)
                y_hist[upd] = torch.cat([y_hist[upd, 1:], y_new[good, None]], 1)
                rho[upd] = torch.cat([rho[upd, 1:], (1 / sy[good])[:, None]], 1)
            reached = started[acc] & (s_new.norm(dim=-1) >= 0.9 * radius[acc])
            radius[acc[reached]] *= 2
            x[acc], f[acc], g[acc], nll_out[acc] = z[acc], total[accept], grad[accept], nll[accept]
            direction = _two_loop(g[acc], s_hist[acc], y_hist[acc], rho[acc])
            descent = (direction * g[acc]).sum(-1) < 0
            if not bool(descent.all()):  # curvature pairs that no longer describe the function: start afresh
                bad = acc[~descent]
                s_hist[bad], y_hist[bad], rho[bad] = 0, 0, 0
            fresh = ~descent | (rho[acc] == 0).all(-1)
            if bool(fresh.any()):  # no curvature pairs: along the gradient, as far as the radius
                gr = g[acc[fresh]]
                direction[fresh] = -gr * (radius[acc[fresh]] / gr.norm(dim=-1).clamp_min(1e-30))[:, None]
            p[acc] = direction
            started[acc] = True
        out_of_budget = evals[idx] >= hp.v_num_grad_steps
        result[idx[out_of_budget]] = x[idx[out_of_budget]]
        active = idx[~out_of_budget]
        step = p[active]
        norm = step.norm(dim=-1, keepdim=True)
        step = step * (radius[active, None] / norm.clamp_min(1e-30)).clamp_max(1.0)
        z[active] = _clamp(x[active] + step, max_norm[active])
    return result, nll_out
