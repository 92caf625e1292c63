"""Text the model samples itself: a corpus for key statistics when no other is at hand.

ROME, MEMIT and AlphaEdit need the second moment of a layer's keys over *some* text. Offline and without any corpus,
[`model_sampled_texts`] lets the model write its own: top-k continuations of a few generic prompts, under a fixed
seed, leaving the global random state untouched. Statistics computed from such text are labelled as such in their
cache key (see `hf_edit_patch.editing.statistics`).

Example:
    ```python
    >>> from hf_edit_patch.editors.sampled_text import model_sampled_texts
    >>> texts = model_sampled_texts(model, tokenizer, 4, max_new_tokens=16)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..batching import model_device, pad_id
from ..errors import StatsError
from ..progress import progress_bar

__all__ = ["DEFAULT_PROMPTS", "model_sampled_texts"]

DEFAULT_PROMPTS = ("The", "In", "A", "It", "This", "He", "She", "We", "On", "When")
"""Generic prompts that [`model_sampled_texts`] continues, in turn."""


def model_sampled_texts(
    model: Any,
    tokenizer: Any,
    n: int,
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    top_k: int = 50,
    batch_size: int = 64,
    show_progress: bool | None = None,
) -> list[str]:
    """
    `n` texts sampled from the model itself (top-k sampling), for computing statistics without any corpus.

    Text `i` continues `prompts[i % len(prompts)]`. The global random state is left untouched: sampling runs under
    `torch.random.fork_rng` seeded with `seed`, so the result depends only on the model, the arguments and the
    hardware. Statistics computed from such text must be labelled as such: `get_second_moments` keys them with the
    dataset `"model-sampled:<seed>:<n>"`.

    Args:
        model (`PreTrainedModel`): a causal language model.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        n (`int`): how many texts to sample.
        max_new_tokens (`int`, *optional*, defaults to 64): tokens sampled after each prompt.
        seed (`int`, *optional*, defaults to 0): the random seed.
        prompts (`Sequence[str]`, *optional*): prompts to continue, in turn; defaults to [`DEFAULT_PROMPTS`].
        top_k (`int`, *optional*, defaults to 50): sample among the `top_k` most likely tokens (temperature 1).
        batch_size (`int`, *optional*, defaults to 64): sequences sampled at once (texts whose prompts tokenize
            to the same length share a batch).
        show_progress (`bool`, *optional*): show a progress bar (`None`: on a terminal only; see
            `hf_edit_patch.progress`).

    Returns:
        `list[str]`: the texts (prompt included, special tokens removed).

    Example:

    ```python
    >>> from hf_edit_patch import load_default_model
    >>> from hf_edit_patch.editors.sampled_text import model_sampled_texts
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> texts = model_sampled_texts(model, tokenizer, 4, max_new_tokens=16)  # doctest: +SKIP
    >>> len(texts)  # doctest: +SKIP
    4
    ```
    """
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens), ("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StatsError(f"{name} must be a positive integer, got {value!r}")
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise StatsError(f"prompts must be a non-empty list of non-blank strings, got {prompts!r}")
    device = model_device(model)
    pad = pad_id(tokenizer)
    positions = _max_positions(model)
    texts: list[str | None] = [None] * n
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with (
            torch.random.fork_rng(devices=fork_devices),
            torch.no_grad(),
            progress_bar(total=n, desc="Sampling texts", unit="text", show_progress=show_progress) as bar,
        ):
            torch.manual_seed(seed)
            encoded = [tokenizer(prompt, return_tensors="pt")["input_ids"][0] for prompt in prompts]
            for prompt, ids in zip(prompts, encoded, strict=True):
                if ids.numel() == 0:
                    raise StatsError(f"the prompt {prompt!r} tokenizes to no tokens; pass other prompts=...")
                if positions is not None and positions - ids.numel() < 1:
                    raise StatsError(f"the prompt {prompt!r} fills the model's {positions} positions")
            # texts whose prompts have the same length are sampled together: one generate call per batch
            by_length: dict[int, list[int]] = {}
            for index in range(n):
                by_length.setdefault(encoded[index % len(prompts)].numel(), []).append(index)
            for length, indices in sorted(by_length.items()):
                new_tokens = max_new_tokens if positions is None else min(max_new_tokens, positions - length)
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    input_ids = torch.stack([encoded[i % len(prompts)] for i in chunk]).to(device)
                    output = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        do_sample=True,
                        top_k=top_k,
                        top_p=1.0,
                        temperature=1.0,
                        max_new_tokens=new_tokens,
                        pad_token_id=pad,
                    )
                    decoded = tokenizer.batch_decode(output, skip_special_tokens=True)
                    for index, text in zip(chunk, decoded, strict=True):
                        texts[index] = text
                    bar.update(len(chunk))
    finally:
        model.train(was_training)
    return [text or "" for text in texts]


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
