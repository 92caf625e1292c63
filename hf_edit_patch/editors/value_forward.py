"""The forward passes of the value optimization: the loss rows of many requests in one batch, and the logits the loss
reads as a function of one value offset δ per request.

A row is one prompt of one request (the request's prompt in one prefix context, followed by the new target's tokens
but the last; or the prompt "{subject} is a" that keeps the subject's essence), with δ added to the edited module's
output at the subject's last token. Nothing before that token, and no block below the edited one, depends on δ.
A reference pass (`reference_pass`) therefore computes, once per batch, every block's attention keys and values and
the edited block's input; each step then runs only the rows' suffixes (from the subject's last token to the last
position the loss reads) through the blocks from the edited one up, attending to the cached prefix
(`SuffixForward`). ZsRE questions mostly end with their subject: for the first 10 records the suffixes hold 370 of
the rows' 1,486 tokens (SmolLM2's tokenizer). `FullForward` runs the whole rows through the whole model at every
step, as ROME's implementation does: the baseline, and the fallback for a model whose cache this does not fit
(`SuffixForward.matches` checks).

Example:
    ```python
    >>> module = "model.layers.5.mlp.down_proj"
    >>> rows = loss_rows(tokenizer, requests, ["{}", "It was. {}"])  # doctest: +SKIP
    >>> ref = reference_pass(model, rows, module, {}, cache=True)  # doctest: +SKIP
    >>> forward = SuffixForward(model, rows, module, {}, ref)  # doctest: +SKIP
    >>> with forward.session(delta_per_row) as run:  # doctest: +SKIP
    ...     logits = run()  # [positions, vocab] at the rows' loss positions, in order
    ```
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batching import head_only_at, model_device, pad_batch, target_token_ids
from ..requests import EditRequest
from .hooks import Edits, applying, btd, checkpointed_from, compose
from .prompts import subject_last_index
from .tracing import Trace

logger = logging.getLogger(__name__)

__all__ = ["FullForward", "LossRows", "Reference", "SuffixForward", "loss_rows", "reference_pass"]

KL_PROMPTS = ("{} is a",)


@dataclass
class LossRows:
    """The rows of a batch of requests and the positions their loss reads.

    Args:
        ids: each row's token ids (cut after the last position the loss reads).
        request: the request each row belongs to.
        subject: each row's subject-last token index, where δ is added.
        positions: each row's positions whose next-token distribution the loss reads.
        targets: for a rewrite row, the token expected at each of its positions; empty for a KL row.
        bare: for each request, its row holding the bare prompt (context "{}"), or None.
    """

    ids: list[list[int]]
    request: list[int]
    subject: list[int]
    positions: list[list[int]]
    targets: list[list[int]]
    bare: list[int | None]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_requests(self) -> int:
        return len(self.bare)

    def tokens(self) -> int:
        return sum(len(r) for r in self.ids)


def request_rows(
    tokenizer: Any, request: EditRequest, contexts: Sequence[str]
) -> list[tuple[list[int], int, list[int], list[int]]]:
    """`(ids, subject index, positions, targets)` of one request's rows: one per context, then the KL prompts."""
    target = target_token_ids(tokenizer, request.target_new)
    rows = []
    for context in contexts:
        template = context.format(request.prompt)
        ids = tokenizer(template.format(request.subject)).input_ids
        start = len(ids) - 1
        rows.append(
            (
                list(ids) + target[:-1],
                subject_last_index(tokenizer, template, request.subject),
                list(range(start, start + len(target))),
                list(target),
            )
        )
    for template in KL_PROMPTS:
        s = subject_last_index(tokenizer, template, request.subject)
        ids = tokenizer(template.format(request.subject)).input_ids
        rows.append((list(ids)[: s + 1], s, [s], []))
    return rows


def loss_rows(tokenizer: Any, requests: Sequence[EditRequest], contexts: Sequence[str]) -> LossRows:
    """The rows of `requests` in every context, plus their KL rows, in request order."""
    out = LossRows([], [], [], [], [], [])
    bare_context = list(contexts).index("{}") if "{}" in contexts else None
    for r, request in enumerate(requests):
        first = len(out.ids)
        for ids, s, positions, targets in request_rows(tokenizer, request, contexts):
            out.ids.append(ids)
            out.request.append(r)
            out.subject.append(s)
            out.positions.append(positions)
            out.targets.append(targets)
        out.bare.append(None if bare_context is None else first + bare_context)
    return out


def _flat_positions(rows: LossRows, select: Sequence[int], offset: bool) -> tuple[list[int], list[int]]:
    """(row in the batch, column) of every loss position of the selected rows, columns relative to the subject's
    last token when `offset`."""
    rr, cc = [], []
    for i, row in enumerate(select):
        base = rows.subject[row] if offset else 0
        for p in rows.positions[row]:
            rr.append(i)
            cc.append(p - base)
    return rr, cc


def _add_at(delta_rows: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n: int):
    """An output edit adding `delta_rows[i]` at `(rows[i], cols[i])` of a `[n, tokens, d]` output."""

    def edit(output, _inputs):
        out = btd(output, n).clone()
        r, c = rows.to(out.device), cols.to(out.device)  # no-ops unless the model is spread over devices
        out[r, c] = out[r, c] + delta_rows.to(device=out.device, dtype=out.dtype)
        return out.view(output.shape)

    return edit


def _with(edits: Edits, module: str, fn) -> Edits:
    step = dict(edits)
    step[module] = compose(edits[module], fn) if module in edits else fn
    return step


def block_of(model: nn.Module, module: str) -> tuple[nn.ModuleList, int] | None:
    """The `nn.ModuleList` of decoder blocks on `module`'s path and the index of the block holding it."""
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, nn.ModuleList) and parts[i].isdigit():
            return parent, int(parts[i])
    return None


def _cache_keyword(model: nn.Module) -> str | None:
    """The name under which the model's forward takes a key/value cache (`cache` from transformers 5.2x on)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_ids" not in params:
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


@dataclass
class Reference:
    """What the reference pass (no δ) measured on a batch of rows.

    Args:
        values: the module's output at each row's subject-last token, `[rows, d]` float32.
        logp_targets: each rewrite position's log-probability of its target token, flat in row order.
        logp_kl: the full next-token log-distribution at each KL row's position, `[kl rows, vocab]` float32.
        block_input: the edited block's input on the whole rows, `[rows, tokens, d]` (None unless cached).
        cache: the model's key/value cache of the whole rows (None unless asked for and supported).
    """

    values: torch.Tensor
    logp_targets: torch.Tensor
    logp_kl: torch.Tensor
    block_input: torch.Tensor | None = None
    cache: Any = None


def split_logp(logp: torch.Tensor, rows: LossRows, select: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """From log-probs at the selected rows' loss positions (in order), the targets' log-probs (flat) and the KL
    rows' distributions."""
    index, targets, kl_index = [], [], []
    k = 0
    for row in select:
        n = len(rows.positions[row])
        if rows.targets[row]:
            index.extend(range(k, k + n))
            targets.extend(rows.targets[row])
        else:
            kl_index.extend(range(k, k + n))
        k += n
    device = logp.device
    t = logp[torch.tensor(index, device=device, dtype=torch.long), torch.tensor(targets, device=device)]
    return t, logp[torch.tensor(kl_index, device=device, dtype=torch.long)]


@torch.no_grad()
def reference_pass(model: nn.Module, rows: LossRows, module: str, edits: Edits, *, cache: bool) -> Reference:
    """One forward of all rows with the edits in progress (no δ): the module's values, the loss's reference
    log-probabilities, and, when `cache`, what `SuffixForward` needs (else those fields are None)."""
    device = model_device(model)
    batch = pad_batch(rows.ids, 0, device)
    select = range(len(rows))
    rr, cc = _flat_positions(rows, select, offset=False)
    keyword = _cache_keyword(model) if cache else None
    found = block_of(model, module) if keyword else None
    kwargs: dict[str, Any] = {"use_cache": keyword is not None}
    with contextlib.ExitStack() as stack:
        stack.enter_context(applying(model, edits))
        stack.enter_context(head_only_at(model, torch.tensor(rr, device=device), torch.tensor(cc, device=device)))
        traced = stack.enter_context(Trace(model, module, retain_output=True))
        block_trace = None
        if found is not None:
            blocks, b = found
            name = next(n for n, m in model.named_modules() if m is blocks[b])
            block_trace = stack.enter_context(Trace(model, name, retain_input=True, retain_output=False))
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    logp = torch.log_softmax(out.logits[0].float(), dim=-1)
    logp_targets, logp_kl = split_logp(logp, rows, select)
    subject = torch.tensor(rows.subject, device=device)
    values = btd(traced.output, len(rows))[torch.arange(len(rows), device=device), subject].float()
    ref = Reference(values=values, logp_targets=logp_targets, logp_kl=logp_kl)
    if found is not None:
        kv = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if kv is not None and block_trace is not None and block_trace.input is not None:
            ref.cache = kv
            ref.block_input = btd(block_trace.input, len(rows))
    return ref


class FullForward:
    """Whole rows through the whole model at every step (ROME's way): logits at the loss positions of the rows."""

    def __init__(self, model: nn.Module, rows: LossRows, module: str, edits: Edits, *, checkpoint: bool) -> None:
        self.model, self.rows, self.module, self.edits, self.checkpoint = model, rows, module, edits, checkpoint
        self.device = model_device(model)
        self.select(range(len(rows)))

    def select(self, select: Sequence[int]) -> None:
        """Restricts the following calls to these rows (in this order)."""
        self.rows_sel = list(select)
        batch = pad_batch([self.rows.ids[i] for i in self.rows_sel], 0, self.device)
        self.ids, self.mask = batch.input_ids, batch.attention_mask
        rr, cc = _flat_positions(self.rows, self.rows_sel, offset=False)
        self.head_rows = torch.tensor(rr, device=self.device, dtype=torch.long)
        self.head_cols = torch.tensor(cc, device=self.device, dtype=torch.long)
        self.at_rows = torch.arange(len(self.rows_sel), device=self.device)
        self.at_cols = torch.tensor([self.rows.subject[i] for i in self.rows_sel], device=self.device)

    @contextlib.contextmanager
    def session(self, delta_rows: torch.Tensor) -> Iterator[Callable[[], torch.Tensor]]:
        """Inside: a function giving the logits `[positions, vocab]` at the selected rows' loss positions with
        `delta_rows[i]` added at row i. Backward goes inside too (checkpointed blocks rerun their hooks)."""
        edit = _add_at(delta_rows, self.at_rows, self.at_cols, len(self.rows_sel))
        with (
            applying(self.model, _with(self.edits, self.module, edit)),
            head_only_at(self.model, self.head_rows, self.head_cols),
            checkpointed_from(self.model, self.module) if self.checkpoint else contextlib.nullcontext(),
        ):
            yield lambda: self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits[0]


@contextlib.contextmanager
def _forward_replaced(modules: Sequence[nn.Module], forward: Callable[..., Any]) -> Iterator[None]:
    """Each module's forward replaced by `forward` inside (an instance attribute, as accelerate's hooks set, is put
    back afterwards)."""
    saved = [(m, vars(m).get("forward")) for m in modules]
    try:
        for m in modules:
            m.forward = forward
        yield
    finally:
        for m, previous in saved:
            if previous is None:
                del m.forward
            else:
                m.forward = previous


@dataclass
class _Group:
    """Rows of similar suffix length, run in one forward: their inputs, cache slices and loss positions."""

    local: torch.Tensor  # the rows' indices in the selection
    kv: list[tuple[Any, Any]]
    ids: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor
    head_rows: torch.Tensor
    head_cols: torch.Tensor


class SuffixForward:
    """Only the rows' suffixes, from the edited block up, attending to the reference pass's cached keys and values.

    Blocks below the edited one are skipped (their forward returns its input for the duration of a call), and the
    edited block's input on the suffix tokens is the reference pass's. Rows run in groups of similar suffix length:
    suffixes hold 1 to 20 tokens, and one padded batch of a 10-request chunk held 4× the tokens of its suffixes. A
    forward has a cost of its own, though (reading every weight: on a busy 2-core CPU, SmolLM2's 25 blocks above layer
    5 take 0.7 s forward and backward for a handful of tokens, as long as ~64 more tokens), so a row joins the current
    group unless the padding that adds exceeds `group_cost` tokens. Each group attends to its rows' cached keys and
    values, which are put in the cache before its forward; the reference pass's are put back after the session.
    """

    def __init__(
        self, model: nn.Module, rows: LossRows, module: str, edits: Edits, ref: Reference, *, group_cost: int = 64
    ) -> None:
        found = block_of(model, module)
        if ref.cache is None or ref.block_input is None or found is None:
            raise ValueError("SuffixForward needs a reference pass with cache=True on a model that returned a cache")
        self.model, self.rows, self.module, self.edits, self.group_cost = model, rows, module, edits, group_cost
        self.device = model_device(model)
        self.keyword = _cache_keyword(model)
        self.blocks, self.first = found
        self.cache = ref.cache
        self.layers = list(getattr(self.cache, "layers", None) or [])
        if not self.layers or not all(torch.is_tensor(getattr(layer, "keys", None)) for layer in self.layers):
            raise ValueError(f"unsupported cache {type(self.cache).__name__}: no per-layer key and value tensors")
        self.full_kv = [(layer.keys, layer.values) for layer in self.layers]
        self.block_input = ref.block_input
        self.select(range(len(rows)))

    def _groups(self, widths: list[int]) -> list[list[int]]:
        """Indices grouped by width, ascending: a row joins the current group unless the padding that adds costs
        more than a forward of its own (`self.group_cost` tokens)."""
        groups: list[list[int]] = []
        width = 0
        for i in sorted(range(len(widths)), key=widths.__getitem__):
            if groups and len(groups[-1]) * (widths[i] - width) <= self.group_cost:
                groups[-1].append(i)
            else:
                groups.append([i])
            width = widths[i]
        return groups

    def select(self, select: Sequence[int]) -> None:
        """Restricts the following calls to these rows (in this order)."""
        rows, device = self.rows, self.device
        self.rows_sel = sel = list(select)
        starts = [rows.subject[i] for i in sel]
        ends = [max(rows.positions[i]) + 1 for i in sel]
        widths = [e - s for s, e in zip(starts, ends, strict=True)]
        flat_start = [0]
        for row in sel:
            flat_start.append(flat_start[-1] + len(rows.positions[row]))
        self.groups, order = [], []
        for local in self._groups(widths):
            n, width = len(local), max(widths[i] for i in local)
            prefix = max(starts[i] for i in local)  # the cache holds the whole rows; this group reads up to here
            ids = torch.zeros((n, width), dtype=torch.long)
            pos = torch.zeros((n, width), dtype=torch.long)
            mask = torch.zeros((n, prefix + width), dtype=torch.long)
            cols = torch.zeros((n, width), dtype=torch.long)
            head_rows, head_cols = [], []
            for j, i in enumerate(local):
                row, s, e = sel[i], starts[i], ends[i]
                ids[j, : e - s] = torch.tensor(rows.ids[row][s:e])
                pos[j] = torch.arange(s, s + width)
                mask[j, :s] = 1  # the row's own prefix; cached positions from s on belong to the reference pass
                mask[j, prefix : prefix + e - s] = 1
                cols[j] = torch.arange(s, s + width).clamp_max(len(rows.ids[row]) - 1)
                head_rows += [j] * len(rows.positions[row])
                head_cols += [p - s for p in rows.positions[row]]
                order.extend(range(flat_start[i], flat_start[i + 1]))
            rows_g = [sel[i] for i in local]
            hidden = _rows_of(self.block_input, rows_g)
            hidden = hidden[torch.arange(n, device=hidden.device)[:, None], cols.to(hidden.device)]
            kv = [
                (_prefix_of(_rows_of(k, rows_g), prefix), _prefix_of(_rows_of(v, rows_g), prefix))
                for k, v in self.full_kv
            ]
            self.groups.append(
                _Group(
                    local=torch.tensor(local, device=device),
                    kv=kv,
                    ids=ids.to(device),
                    pos=pos.to(device),
                    mask=mask.to(device),
                    hidden=hidden,
                    head_rows=torch.tensor(head_rows, device=device),
                    head_cols=torch.tensor(head_cols, device=device),
                )
            )
        self.unorder = torch.argsort(torch.tensor(order, device=device))

    def _put(self, kv: list[tuple[Any, Any]]) -> None:
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.keys, layer.values = k, v

    @contextlib.contextmanager
    def session(self, delta_rows: torch.Tensor) -> Iterator[Callable[[], torch.Tensor]]:
        """Inside: a function giving the logits `[positions, vocab]` at the selected rows' loss positions with
        `delta_rows[i]` added at row i (as `FullForward.session`)."""
        current: list[_Group] = []

        def identity(*args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        def replace_input(_module, args, kwargs):
            hidden = current[0].hidden
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        def add_delta(output, _inputs):
            group = current[0]
            out = btd(output, len(group.local)).clone()
            delta = delta_rows[group.local.to(delta_rows.device)].to(device=out.device, dtype=out.dtype)
            out[:, 0] = out[:, 0] + delta  # column 0 of a suffix is the subject's last token
            return out.view(output.shape)

        def run() -> torch.Tensor:
            logits = []
            for group in self.groups:
                current[:] = [group]
                self._put(group.kv)
                with head_only_at(self.model, group.head_rows, group.head_cols):
                    out = self.model(
                        input_ids=group.ids,
                        attention_mask=group.mask,
                        position_ids=group.pos,
                        use_cache=True,
                        **{self.keyword: self.cache},
                    )
                logits.append(out.logits[0])
            return torch.cat(logits)[self.unorder.to(logits[0].device)]

        handle = self.blocks[self.first].register_forward_pre_hook(replace_input, with_kwargs=True)
        try:
            with (
                applying(self.model, _with(self.edits, self.module, add_delta)),
                _forward_replaced(list(self.blocks)[: self.first], identity),
            ):
                yield run
        finally:
            handle.remove()
            self._put(self.full_kv)

    def matches(self, ref: Reference, *, atol: float) -> bool:
        """Whether two calls at δ = 0 reproduce the reference pass's log-probabilities (within `atol`)."""
        select = self.rows_sel
        zeros = torch.zeros(len(select), ref.values.shape[1], device=self.device)
        try:
            with torch.no_grad(), self.session(zeros) as run:
                for _ in range(2):  # the second call checks that the cache was reset
                    got_t, got_kl = split_logp(torch.log_softmax(run().float(), dim=-1), self.rows, select)
                    err = max(_max_abs(got_t - ref.logp_targets), _max_abs(got_kl - ref.logp_kl))
                    if not err <= atol:
                        logger.info("prefix reuse is off for this model: %.3g from the full forward", err)
                        return False
        except Exception as exc:  # noqa: BLE001 - whatever fails here, the full forward is the fallback
            logger.info("prefix reuse is off for this model (%s: %s)", type(exc).__name__, exc)
            return False
        return True


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _prefix_of(t: Any, length: int) -> Any:
    """The first `length` positions of a cached `[batch, heads, positions, head_dim]` tensor."""
    if not torch.is_tensor(t) or t.dim() < 2 or t.numel() == 0:
        return t
    return t[..., :length, :]


def _rows_of(t: Any, select: Sequence[int]) -> Any:
    """`t[select]` along the batch dimension (a cache layer may hold an empty placeholder instead)."""
    if not torch.is_tensor(t) or t.dim() == 0 or t.numel() == 0:
        return t
    return t.index_select(0, torch.tensor(list(select), device=t.device, dtype=torch.long))
