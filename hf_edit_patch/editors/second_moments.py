"""Key statistics for ROME and MEMIT: the second moment `C = E[k kᵀ]` of the inputs of MLP output projections.

ROME and MEMIT solve for a weight change of an MLP output projection (`model.layers.5.mlp.down_proj` in Llama, an
`nn.Linear`; `transformer.h.5.mlp.c_proj` in GPT-2, a transformers `Conv1D`) that is small *under the distribution of
its inputs* `k` (the MLP activations, of width `d`: `intermediate_size` for Llama, `4 · n_embd` for GPT-2). That
distribution enters as `C = E[k kᵀ]`, a float32 `[d, d]` matrix estimated over the non-padding tokens of a text corpus.

This module only computes such matrices ([`compute_second_moments`], [`estimate_second_moments`]) from texts it is
given; it reads no files. Corpora are read by `hf_edit_patch.hub.corpora`, matrices are cached by
`hf_edit_patch.hub.stats_cache`, and `hf_edit_patch.editing.statistics.get_second_moments` puts the three together.

Memory: all requested modules are collected in one forward pass per batch, and the forward pass stops right after the
last of them has run (later layers and the LM head never run). Each batch's `kᵀk` is computed in float32 and added to
a float64 sum, so one pass keeps one `[d, d]` float64 matrix per module on the module's device (5 SmolLM2
`down_proj` layers: 5 · 1536² · 8 B = 94 MB), plus one float32 `[d, d]` product and one batch of activations. When the
float32 matrices of all modules together exceed `max_bytes` (2 GiB by default), the modules are split, in forward
order, into groups that fit ([`plan_passes`]), and the corpus is run once per group; results are identical either way.

Several processes: with `distributed=True` (under `torchrun`, see `hf_edit_patch.distributed`) every process forms
the same batches, runs its share of them (batch `i` on rank `i mod N`), and the float64 sums and the token counts are
added with `all_reduce`: the result equals one process's up to the order of the float64 additions.

Example:
    ```python
    >>> from hf_edit_patch import load_default_model
    >>> from hf_edit_patch.editors.second_moments import compute_second_moments
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> C = compute_second_moments(model, tokenizer, ["model.layers.5.mlp.down_proj"], texts)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ..batching import model_device, pad_id
from ..distributed import Processes, all_reduce_int, all_reduce_sum, current_processes
from ..errors import PatchError, StatsError
from ..modules import resolve_weight
from ..offload import compute_device
from ..progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SecondMoments",
    "compute_second_moments",
    "estimate_second_moments",
    "input_widths",
    "plan_passes",
]

DEFAULT_MAX_BYTES = 2**31
"""Default bound on the bytes of `C` matrices accumulated in one pass over the corpus (2 GiB)."""


class SecondMoments(NamedTuple):
    """What [`estimate_second_moments`] returns: the matrices, and the number of tokens they average over."""

    matrices: dict[str, torch.Tensor]
    count: int


class _StopForward(Exception):
    """Raised by a hook once every requested module has run, to skip the rest of the forward pass."""


def compute_second_moments(
    model: Any,
    tokenizer: Any,
    module_names: list[str],
    texts: Iterable[str],
    *,
    sample_count: int = 1000,
    max_length: int = 256,
    batch_size: int = 8,
    show_progress: bool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, torch.Tensor]:
    """
    `C = E[k kᵀ]` over the non-padding tokens of `texts`, where `k` is the input of each of `module_names`.

    One forward pass per batch collects the inputs of all modules (forward pre-hooks), and stops as soon as the last
    of them has run, so later layers and the LM head never run (each module is assumed to run once per forward pass).
    Each batch's `kᵀk` (float32, over the tokens the attention mask keeps) is added to a float64 sum on the device the
    module computes on, which is divided by the number of tokens at the end. Texts are truncated to `max_length`
    tokens, sorted by length (longest first, so an out-of-memory error comes at once) and right-padded per batch;
    padding never enters `C`, and right padding with a causal mask leaves every real token's activations as they are
    without padding.

    Memory: one `[d, d]` float64 sum per module, plus one float32 product and one batch of activations. If the float32
    matrices of all modules exceed `max_bytes`, the modules are split in forward order into groups that fit and the
    corpus is run once per group (same results, more time); all 5 `down_proj` matrices of SmolLM2 take 47 MB in
    float32, so one pass.

    Args:
        model (`PreTrainedModel`):
            A causal language model; its training mode is restored afterwards.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer (a pad token is not needed).
        module_names (`list[str]`):
            `nn.Linear` or transformers `Conv1D` modules, e.g. `["model.layers.5.mlp.down_proj"]`.
        texts (`Iterable[str]`):
            The corpus (a list, or a `hf_edit_patch.hub.corpora.TextSource`); its first `sample_count` non-blank
            texts are used.
        sample_count (`int`, *optional*, defaults to 1000):
            How many texts to use.
        max_length (`int`, *optional*, defaults to 256):
            Tokens per text.
        batch_size (`int`, *optional*, defaults to 8):
            Texts per forward pass.
        show_progress (`bool`, *optional*):
            Show a progress bar over batches (`None`: on a terminal only; see `hf_edit_patch.progress`).
        max_bytes (`int`, *optional*, defaults to 2 GiB):
            Bound on the bytes of the float32 matrices of one pass over the corpus (their float64 sums take twice
            that).

    Returns:
        `dict[str, torch.Tensor]`: for each module, its float32 `[d, d]` second moment, on the CPU.

    Raises:
        `StatsError`: if a module does not exist or is not a linear layer, an argument is invalid, the texts hold no
        tokens, or `max_bytes` cannot hold one matrix.

    Example:

    ```python
    >>> from hf_edit_patch import load_default_model
    >>> from hf_edit_patch.editors.second_moments import compute_second_moments
    >>> from hf_edit_patch.hub.corpora import load_texts
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> texts = load_texts("../shared/data/tasks/boolq_dev.jsonl", text_field="passage", sample_count=100)  # doctest: +SKIP
    >>> C = compute_second_moments(model, tokenizer, ["model.layers.5.mlp.down_proj"], texts)  # doctest: +SKIP
    >>> C["model.layers.5.mlp.down_proj"].shape  # doctest: +SKIP
    torch.Size([1536, 1536])
    ```
    """  # noqa: E501
    return estimate_second_moments(
        model,
        tokenizer,
        module_names,
        texts,
        sample_count=sample_count,
        max_length=max_length,
        batch_size=batch_size,
        show_progress=show_progress,
        max_bytes=max_bytes,
    ).matrices


def estimate_second_moments(
    model: Any,
    tokenizer: Any,
    module_names: Sequence[str],
    texts: Iterable[str],
    *,
    sample_count: int = 1000,
    max_length: int = 256,
    batch_size: int = 8,
    show_progress: bool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    distributed: bool = False,
) -> SecondMoments:
    """
    [`compute_second_moments`], also returning the number of tokens the matrices average over (arguments alike).

    A cache stores that count beside each matrix, so that statistics over different corpora can be told apart and
    combined.

    With `distributed=True`, every process of the initialized torch.distributed group must call this with the same
    arguments and corpus: each runs its share of the batches, and all of them return the statistics of the whole
    corpus (see the module docstring).

    Returns:
        `SecondMoments`: `matrices` (for each module, in the order given, its float32 `[d, d]` second moment, on the
        CPU) and `count` (the number of non-padding tokens).

    Example:

    ```python
    >>> from hf_edit_patch.editors.second_moments import estimate_second_moments
    >>> moments = estimate_second_moments(model, tokenizer, ["model.layers.5.mlp.down_proj"], texts)  # doctest: +SKIP
    >>> moments.count  # doctest: +SKIP
    24813
    ```
    """
    for name, value in (
        ("sample_count", sample_count),
        ("max_length", max_length),
        ("batch_size", batch_size),
        ("max_bytes", max_bytes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StatsError(f"{name} must be a positive integer, got {value!r}")
    widths = input_widths(model, module_names)
    groups = plan_passes(model, widths, max_bytes)
    corpus = _take_texts(texts, sample_count)
    batches, count = _tokenize(tokenizer, corpus, max_length=max_length, batch_size=batch_size)
    procs = current_processes() if distributed else None
    if procs is not None:
        batches = _own_batches(batches, count, procs)
    device = model_device(model)
    logger.info(
        "computing key statistics of %d module(s) from %d texts (%d tokens) in %d pass(es) of %d batch(es)",
        len(widths),
        len(corpus),
        count,
        len(groups),
        len(batches),
    )
    results: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        total = len(groups) * len(batches)
        with (
            torch.no_grad(),
            progress_bar(total=total, desc="Key statistics", unit="batch", show_progress=show_progress) as bar,
        ):
            for number, group in enumerate(groups, start=1):
                if len(groups) > 1:
                    bar.set_postfix_str(f"pass {number}/{len(groups)}")
                sums = _run_pass(model, group, widths, batches, device, bar)
                for name, summed in sums.items():
                    summed = all_reduce_sum(summed, procs) if procs is not None else summed
                    summed /= count
                    symmetric = (summed + summed.T) * 0.5  # kᵀk is symmetric only up to rounding
                    results[name] = symmetric.to(device="cpu", dtype=torch.float32)
                del sums
    finally:
        model.train(was_training)
    return SecondMoments({name: results[name] for name in widths}, count)


def _run_pass(
    model: Any,
    group: list[str],
    widths: dict[str, int],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    """float64 sums of the float32 `kᵀk` of all batches for the modules of `group`, one forward pass per batch."""
    sums = {
        name: torch.zeros(widths[name], widths[name], dtype=torch.float64, device=compute_device(model, name))
        for name in group
    }
    wanted = set(group)
    seen: set[str] = set()
    masks: dict[torch.device, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            flat = x.reshape(-1, x.shape[-1])
            mask = masks.get(x.device)
            if mask is None:
                mask = masks[x.device] = masks[device].to(x.device)
            if flat.shape[0] != mask.numel() or flat.shape[1] != widths[name]:
                raise StatsError(
                    f"module {name!r} received an input of shape {tuple(x.shape)}; expected [batch, tokens, "
                    f"{widths[name]}] with batch · tokens = {mask.numel()} (one row per token of the batch)"
                )
            keys = flat[mask].to(torch.float32)
            acc = sums[name]
            keys = keys.to(acc.device)
            acc.add_(keys.T @ keys)
            seen.add(name)
            if seen >= wanted:
                raise _StopForward

        return hook

    handles = []
    try:
        for name in group:
            handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name), with_kwargs=True))
        for input_ids, attention_mask in batches:
            seen.clear()
            masks.clear()
            masks[device] = attention_mask.to(device).reshape(-1).bool()
            try:
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                missing = sorted(wanted - seen)
                raise StatsError(f"the modules {missing} did not run during the forward pass of the model")
            bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def input_widths(model: Any, module_names: Sequence[str]) -> dict[str, int]:
    """
    The input width `d` of each module, in the order given (validated: existing, linear, no duplicates).

    Raises:
        `StatsError`: for an unknown module (with the closest names), an embedding, duplicates or an empty list.

    Example:

    ```python
    >>> from hf_edit_patch.editors.second_moments import input_widths
    >>> input_widths(model, ["model.layers.5.mlp.down_proj"])  # doctest: +SKIP
    {'model.layers.5.mlp.down_proj': 1536}
    ```
    """
    if isinstance(module_names, str) or not isinstance(module_names, Sequence) or not module_names:
        raise StatsError(f"module_names must be a non-empty list of module names, got {module_names!r}")
    if len(set(module_names)) != len(module_names):
        raise StatsError(f"module_names has duplicates: {list(module_names)}")
    widths = {}
    for name in module_names:
        try:
            _, weight, layout = resolve_weight(model, name)
        except PatchError as exc:
            raise StatsError(str(exc)) from None
        if layout == "linear":
            widths[name] = int(weight.shape[1])
        elif layout == "conv1d":
            widths[name] = int(weight.shape[0])
        else:
            raise StatsError(
                f"module {name!r} is an embedding; key statistics need a linear layer (nn.Linear or Conv1D) whose "
                "input is the key vector, such as an MLP output projection"
            )
    return widths


def plan_passes(model: Any, widths: dict[str, int], max_bytes: int) -> list[list[str]]:
    """
    The modules split, in forward (registration) order, into groups whose float32 matrices fit in `max_bytes`.

    Raises:
        `StatsError`: if one matrix alone exceeds `max_bytes` (the message gives the bound that would do).

    Example:

    ```python
    >>> from hf_edit_patch.editors.second_moments import plan_passes
    >>> plan_passes(model, {"model.layers.5.mlp.down_proj": 1536, "model.layers.4.mlp.down_proj": 1536},
    ...             max_bytes=1536**2 * 4)  # doctest: +SKIP
    [['model.layers.4.mlp.down_proj'], ['model.layers.5.mlp.down_proj']]
    ```
    """
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    groups: list[list[str]] = []
    used = 0
    for name in sorted(widths, key=order.__getitem__):
        size = widths[name] ** 2 * 4
        if size > max_bytes:
            raise StatsError(
                f"max_bytes={max_bytes} cannot hold the {widths[name]}×{widths[name]} float32 matrix of {name!r} "
                f"({size} bytes); pass max_bytes >= {size}"
            )
        if not groups or used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _take_texts(texts: Iterable[str], sample_count: int) -> list[str]:
    """The first `sample_count` non-blank texts, validated."""
    if isinstance(texts, str | bytes) or not isinstance(texts, Iterable):
        raise StatsError(f"texts must be an iterable of strings, got {type(texts).__name__}")
    corpus: list[str] = []
    for text in texts:
        if not isinstance(text, str):
            raise StatsError(f"texts must be strings, got a {type(text).__name__}: {text!r}")
        if text.strip():
            corpus.append(text)
            if len(corpus) == sample_count:
                break
    if not corpus:
        raise StatsError("the corpus has no non-blank texts")
    if len(corpus) < sample_count:
        logger.info("the corpus has only %d non-blank texts; %d were asked for", len(corpus), sample_count)
    return corpus


def _tokenize(
    tokenizer: Any, texts: list[str], *, max_length: int, batch_size: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Right-padded `(input_ids, attention_mask)` batches, longest texts first, and the number of real tokens."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    sequences = [list(ids) for ids in encoded if len(ids)]
    count = sum(len(ids) for ids in sequences)
    if count == 0:
        raise StatsError("the texts tokenize to no tokens at all")
    sequences.sort(key=len, reverse=True)
    pad = pad_id(tokenizer)
    batches = []
    for chunk in _chunks(sequences, batch_size):
        width = len(chunk[0])
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        batches.append((input_ids, attention_mask))
    return batches, count


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _own_batches(
    batches: list[tuple[torch.Tensor, torch.Tensor]], count: int, procs: Processes
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of the batches (batch `i` on rank `i mod N`), after checking all ranks have one corpus."""
    own = [batches[i] for i in procs.owned(len(batches))]
    tokens = all_reduce_int(sum(int(mask.sum()) for _, mask in own), procs)
    low, high = all_reduce_int(count, procs, "min"), all_reduce_int(count, procs, "max")
    if not low == high == tokens:
        raise StatsError(
            f"the processes were given different corpora ({low} to {high} tokens); every process must read the same "
            "texts with the same tokenizer, sample_count, max_length and batch_size"
        )
    return own
