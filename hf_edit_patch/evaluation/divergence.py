"""How far an edit moved a model's predictions on ordinary text: next-token KL divergence and perplexity change.

An edit is meant to change a few facts and leave everything else alone. Task accuracy on downstream benchmarks
(see `metrics`) measures the damage only once it is large enough to flip answers, and needs generation and
scoring. Comparing the next-token distributions of the base and edited models on a handful of unrelated texts
is cheaper (one forward pass per model per batch) and more sensitive: any change in the output distribution
shows up in the KL divergence, long before it changes an argmax.

Example:
    ```python
    from hf_edit_patch.evaluation import drift

    pm = PatchedModel.from_pretrained(model, "out/eiffel")
    report = drift(None, pm, tokenizer, ["The weather today is mild.", "Water boils at 100 degrees."])
    report["kl"], report["ppl_change"]
    ```
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import model_device, pad_batch, pad_id
from ..progress import progress_bar
from .checks import check_int

logger = logging.getLogger(__name__)

__all__ = ["drift"]


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of strings (e.g. a list), got {type(texts).__name__}")
    if not texts:
        raise ValueError("texts is empty; pass at least one text to measure drift on")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must contain only strings; item {bad[0]} is a {type(texts[bad[0]]).__name__}")
    return list(texts)


def _encode(tokenizer: Any, texts: list[str], max_length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`, truncated to `max_length`; the tokenizer is not modified."""
    rows = [list(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    batch = pad_batch(rows, pad, torch.device("cpu"))
    return batch.input_ids, batch.attention_mask


def _resolve_models(base_model: nn.Module | None, edited_model: nn.Module) -> Callable[..., torch.Tensor]:
    """A function returning the base logits: a separate model, or the edited PatchedModel with patches disabled."""
    patched = getattr(edited_model, "is_patched_model", False)
    if base_model is None or (patched and (base_model is edited_model or base_model is edited_model.base_model)):
        if not patched:
            raise ValueError(
                "base_model is None but edited_model is not a PatchedModel: pass the unedited model as base_model, "
                "or a PatchedModel as edited_model (its base outputs are computed with the patches disabled)"
            )
        if base_model is not None:  # its weights are the patched ones: the true base needs the patches off
            logger.info("base_model is the model under edited_model; computing base outputs with patches disabled")

        def base_logits(**inputs: torch.Tensor) -> torch.Tensor:
            with edited_model.disable_patches():
                return edited_model(**inputs).logits

        return base_logits
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be a torch.nn.Module or None, got {type(base_model).__name__}")
    if base_model is edited_model:
        logger.warning("base_model and edited_model are the same object: the drift will be 0")
    return lambda **inputs: base_model(**inputs).logits


def drift(
    base_model: nn.Module | None,
    edited_model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    show_progress: bool | None = None,
) -> dict[str, float | int]:
    """Mean next-token KL(p_base || p_edited) and the perplexity change of an edited model on `texts`.

    Both models read the same tokens. At every position that predicts a real (non-padding) next token, the
    float32 log-softmax of both models' logits gives KL(p_base || p_edited) in nats and each model's negative
    log-likelihood of the actual next token; the KL is averaged over those positions and perplexity is
    exp(mean NLL). Texts are truncated to `max_length` tokens and right-padded within a batch, with the
    padding masked out, so results do not depend on `batch_size`. The tokenizer is not modified (padding is
    done here, so no pad token is needed). Runs under `torch.no_grad()`; models should be in eval mode.

    A small KL on texts unrelated to the edit means the edit left the model's general behaviour alone; it is
    cheaper to compute and more sensitive than downstream task accuracy, which moves only once the
    distribution has shifted enough to change answers.

    Args:
        base_model: the unedited model, or None when `edited_model` is a `PatchedModel`: the base outputs are
            then those of the same model inside `disable_patches()`. Passing the model that a `PatchedModel`
            wraps (whose weights are patched in place) is treated the same way.
        edited_model: the edited model (a `PatchedModel` or any causal LM returning `.logits`).
        tokenizer: a Hugging Face tokenizer for both models.
        texts: the texts to measure on (non-empty); texts of fewer than two tokens contribute nothing.
        batch_size: texts per forward pass.
        max_length: tokens per text after truncation (>= 2).
        show_progress: a progress bar over batches (None: on a terminal only, from two batches on).

    Returns:
        `{"kl": float, "ppl_base": float, "ppl_edited": float, "ppl_change": float, "n_tokens": int}`:
        the mean KL in nats, both perplexities, `ppl_edited - ppl_base`, and the number of predicted tokens.

    Raises:
        TypeError: `texts` is not a sequence of strings, or `base_model` is not a module.
        ValueError: `texts` is empty or yields no next-token position, `batch_size` < 1, `max_length` < 2, or
            `base_model` is None while `edited_model` is not a `PatchedModel`.

    Example:
        ```python
        >>> report = drift(base, edited, tokenizer, ["Paris is the capital of France."])
        >>> report["kl"] >= 0.0
        True
        ```
    """
    texts = _check_texts(texts)
    check_int("batch_size", batch_size, 1)
    check_int("max_length", max_length, 2)
    if not isinstance(edited_model, nn.Module):
        raise TypeError(
            f"edited_model must be a torch.nn.Module (or a PatchedModel), got {type(edited_model).__name__}"
        )
    base_logits = _resolve_models(base_model, edited_model)
    for name, model in (("base_model", base_model), ("edited_model", edited_model)):
        if model is not None and model.training:
            logger.warning("%s is in training mode: dropout makes the drift random; call .eval() first", name)

    pad = pad_id(tokenizer)
    device = model_device(edited_model)
    kl_sum = nll_base = nll_edited = 0.0
    n_tokens = 0
    starts = range(0, len(texts), batch_size)
    with torch.no_grad():
        for start in progress_bar(starts, desc="Drift", unit="batch", show_progress=show_progress, min_items=2):
            input_ids, mask = _encode(tokenizer, texts[start : start + batch_size], max_length, pad)
            valid = mask[:, 1:].bool()  # position t predicts token t + 1 (right padding: t itself is real too)
            if not bool(valid.any()):
                continue
            inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
            targets = input_ids[:, 1:][valid].to(device).unsqueeze(-1)
            valid = valid.to(device)
            lp_base = F.log_softmax(base_logits(**inputs)[:, :-1].float(), dim=-1)[valid]
            lp_edited = F.log_softmax(edited_model(**inputs).logits[:, :-1].float(), dim=-1)[valid]
            kl_sum += float(F.kl_div(lp_edited, lp_base, reduction="sum", log_target=True).double())
            nll_base -= float(lp_base.gather(-1, targets).double().sum())
            nll_edited -= float(lp_edited.gather(-1, targets).double().sum())
            n_tokens += int(valid.sum())
    if not n_tokens:
        raise ValueError("no text has two or more tokens, so there is no next-token prediction to compare")

    ppl_base = math.exp(nll_base / n_tokens)
    ppl_edited = math.exp(nll_edited / n_tokens)
    result = {
        "kl": kl_sum / n_tokens,
        "ppl_base": ppl_base,
        "ppl_edited": ppl_edited,
        "ppl_change": ppl_edited - ppl_base,
        "n_tokens": n_tokens,
    }
    logger.info(
        "Drift over %d tokens: KL %.3g nats, perplexity %.4g -> %.4g", n_tokens, result["kl"], ppl_base, ppl_edited
    )
    return result
