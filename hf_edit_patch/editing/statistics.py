"""Key statistics for the editors, cached or computed: what ROME, MEMIT and AlphaEdit are given as `C = E[k kᵀ]`.

[`get_second_moments`] looks each module's second moment up in a [`StatsCache`] (`hf_edit_patch.hub.stats_cache`),
computes the missing ones together from a corpus (`hf_edit_patch.hub.corpora`) or from text the model samples itself
(`hf_edit_patch.editors.sampled_text`) with `hf_edit_patch.editors.second_moments`, and stores them. [`stats_keys`]
says under which keys. [`null_space_projections`] does the same for AlphaEdit's projections: eigendecompositions
cached beside the statistics (`hf_edit_patch.hub.nullspace`), computed with `hf_edit_patch.editors.alphaedit`.

Statistics can also be shared: `hf_edit_patch.hub.stats_sharing.load_stats_from_hub` puts statistics from the Hub in
the cache, where these functions find them.

Example:
    ```python
    >>> from hf_edit_patch.editing.statistics import get_second_moments
    >>> C = get_second_moments(model, tokenizer, ["model.layers.5.mlp.down_proj"], stats_dataset="wikitext")  # doctest: +SKIP
    ```
"""  # noqa: E501

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..distributed import barrier, broadcast_object, current_processes, gather_owned
from ..editors import alphaedit
from ..editors.sampled_text import model_sampled_texts
from ..editors.second_moments import DEFAULT_MAX_BYTES, estimate_second_moments, input_widths
from ..errors import StatsUnavailableError
from ..hub.corpora import TextSource, current_option_names
from ..hub.nullspace import EigenCache
from ..hub.stats_cache import StatsCache, StatsKey
from ..modules import model_source
from ..version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_SAMPLED_PREFIX",
    "get_second_moments",
    "null_space_projections",
    "stats_keys",
]

MODEL_SAMPLED_PREFIX = "model-sampled"
"""How statistics from model-sampled text are labelled in their key: `"model-sampled:<seed>:<n>"`."""
MODEL_SAMPLED_SEED = 0
MODEL_SAMPLED_MAX_NEW_TOKENS = 64


def get_second_moments(
    model: Any,
    tokenizer: Any,
    module_names: list[str],
    *,
    stats_dataset: str | os.PathLike | TextSource | None = None,
    text_field: str = "text",
    split: str = "train",
    sample_count: int = 1000,
    max_length: int = 256,
    batch_size: int = 8,
    cache: StatsCache | None = None,
    model_id: str | None = None,
    revision: str | None = None,
    allow_model_sampled: bool = False,
    show_progress: bool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    distributed: bool = False,
) -> dict[str, torch.Tensor]:
    """
    The second moments `C = E[k kᵀ]` of the inputs of `module_names`, from the cache or computed (and then cached).

    Each module has its own cache entry, keyed by the model (id and revision), the module, the corpus (a local file
    by its content hash), the text field, `sample_count`, `max_length` and the accumulation dtype. Cached entries are
    used as they are; the missing ones are computed together
    (`hf_edit_patch.editors.second_moments.estimate_second_moments`) and stored.

    Without `stats_dataset`, statistics come from text the model samples itself (`model_sampled_texts`, seed 0,
    `min(max_length, 64)` new tokens, keyed `"model-sampled:0:<sample_count>"`) when `allow_model_sampled=True`;
    otherwise the call fails at once, as a silent fallback would change the edit.

    Args:
        model (`PreTrainedModel`): a causal language model.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        module_names (`list[str]`): the modules whose input statistics are needed.
        stats_dataset (`str`, `os.PathLike` or `TextSource`, *optional*):
            A local `.txt`/`.json`/`.jsonl` file or a Hugging Face dataset id (`"wikitext"` for WikiText-103).
        text_field (`str`, *optional*, defaults to `"text"`): the field holding the text.
        split (`str`, *optional*, defaults to `"train"`): the split of a Hugging Face dataset.
        sample_count (`int`, *optional*, defaults to 1000): texts used.
        max_length (`int`, *optional*, defaults to 256): tokens per text.
        batch_size (`int`, *optional*, defaults to 8): texts per forward pass.
        cache (`StatsCache`, *optional*): where statistics are cached; defaults to `StatsCache()`.
        model_id (`str`, *optional*): the model's id for the key; defaults to what `model_source(model)` finds. A model
            without any id (built from a config) is computed every time and not cached.
        revision (`str`, *optional*): the model's revision for the key; defaults to `model_source(model)`'s.
        allow_model_sampled (`bool`, *optional*, defaults to `False`): without `stats_dataset`, use text the model
            samples itself.
        show_progress (`bool`, *optional*): progress bars for sampling and for the statistics pass (`None`, the
            default: on a terminal only; `False`: never; see `hf_edit_patch.progress`).
        max_bytes (`int`, *optional*, defaults to 2 GiB): bound on the matrices accumulated in one pass.
        distributed (`bool`, *optional*, defaults to `False`): compute with every process of the initialized
            torch.distributed group (all must call this with the same arguments): what any process lacks in its cache
            is computed by all of them together, each running its share of the batches, and the sums are added in
            float64 (`estimate_second_moments`); model-sampled text is sampled on rank 0 and sent to the others. Rank
            0 writes the cache entries; every process returns the statistics. The keys are those of one process.

    Returns:
        `dict[str, torch.Tensor]`: for each module, in the order given, its float32 `[d, d]` second moment (CPU).

    Raises:
        `StatsUnavailableError`: without `stats_dataset` and `allow_model_sampled`, or when the corpus cannot be
        loaded; the message says how to provide statistics.
        `StatsError`: for invalid modules or arguments.

    Example:

    ```python
    >>> from hf_edit_patch import load_default_model
    >>> from hf_edit_patch.editing.statistics import get_second_moments
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> modules = [f"model.layers.{i}.mlp.down_proj" for i in range(3, 8)]
    >>> C = get_second_moments(model, tokenizer, modules, stats_dataset="../shared/data/tasks/boolq_dev.jsonl",
    ...                        text_field="passage")  # doctest: +SKIP
    >>> C["model.layers.5.mlp.down_proj"].shape  # doctest: +SKIP
    torch.Size([1536, 1536])
    ```
    """
    widths = input_widths(model, module_names)
    procs = current_processes() if distributed else None
    show_progress = show_progress if procs is None or procs.is_main else False
    source, keys = _source_and_keys(
        model,
        list(widths),
        stats_dataset=stats_dataset,
        text_field=text_field,
        split=split,
        sample_count=sample_count,
        max_length=max_length,
        model_id=model_id,
        revision=revision,
        allow_model_sampled=allow_model_sampled,
    )
    if keys:
        cache = cache if cache is not None else StatsCache()
    else:
        logger.warning(
            "the model has no id (it was not loaded with from_pretrained): key statistics are computed and not "
            "cached; pass model_id=... to cache them"
        )

    results: dict[str, torch.Tensor] = {}
    for name, key in keys.items():
        matrix = cache.get(key)
        if matrix is None:
            continue
        if matrix.shape != (widths[name], widths[name]):
            logger.warning(
                "the cached statistics of %s are %s, not %d×%d: recomputing them",
                name,
                tuple(matrix.shape),
                widths[name],
                widths[name],
            )
            continue
        logger.info("using cached key statistics of %s (%s)", name, cache.path(key))
        results[name] = matrix

    had = set(results)
    missing = [name for name in widths if name not in results]
    if procs is not None:  # what any process lacks, all of them compute together
        lacking = set().union(*gather_owned({procs.rank: missing}, procs.world, procs))
        missing = [name for name in widths if name in lacking]
    if missing:
        if source is None:
            texts: list[str] | TextSource | None = None
            if procs is None or procs.is_main:
                texts = model_sampled_texts(
                    model,
                    tokenizer,
                    sample_count,
                    max_new_tokens=min(max_length, MODEL_SAMPLED_MAX_NEW_TOKENS),
                    seed=MODEL_SAMPLED_SEED,
                    show_progress=show_progress,
                )
            if procs is not None:
                texts = broadcast_object(texts, procs)
        else:
            texts = source
        computed, count = estimate_second_moments(
            model,
            tokenizer,
            missing,
            texts,
            sample_count=sample_count,
            max_length=max_length,
            batch_size=batch_size,
            show_progress=show_progress,
            max_bytes=max_bytes,
            distributed=procs is not None,
        )
        info = {
            "hf_edit_patch": __version__,
            "torch": torch.__version__,
            "model_dtype": str(getattr(model, "dtype", "")),
        }
        for name, matrix in computed.items():
            if name in keys and name not in had and (procs is None or procs.is_main):
                cache.put(keys[name], matrix, count, info=info)
            results[name] = matrix
        if procs is not None:  # once any process returns, the entries are written
            barrier(procs)
    return {name: results[name] for name in widths}


def _source_and_keys(
    model: Any,
    module_names: Sequence[str],
    *,
    stats_dataset: str | os.PathLike | TextSource | None,
    text_field: str,
    split: str,
    sample_count: int,
    max_length: int,
    model_id: str | None,
    revision: str | None,
    allow_model_sampled: bool,
) -> tuple[TextSource | None, dict[str, StatsKey]]:
    """The corpus (None: model-sampled text) and the cache key of each module's statistics ({} without a model id)."""
    if stats_dataset is None:
        if not allow_model_sampled:
            raise StatsUnavailableError(_no_corpus_message(module_names))
        source: TextSource | None = None
        dataset_key, key_text_field = f"{MODEL_SAMPLED_PREFIX}:{MODEL_SAMPLED_SEED}:{sample_count}", ""
    else:
        source = (
            stats_dataset
            if isinstance(stats_dataset, TextSource)
            else TextSource(stats_dataset, text_field=text_field, split=split)
        )
        dataset_key, key_text_field = source.fingerprint(), source.key_text_field
    found_id, found_revision = model_source(model)
    model_id = model_id or found_id
    revision = revision if revision is not None else found_revision
    if not model_id:
        return source, {}
    return source, {
        name: StatsKey(model_id, revision, name, dataset_key, key_text_field, sample_count, max_length)
        for name in module_names
    }


def stats_keys(
    model: Any,
    module_names: Sequence[str],
    *,
    stats_dataset: str | os.PathLike | TextSource | None = None,
    text_field: str = "text",
    split: str = "train",
    sample_count: int = 1000,
    max_length: int = 256,
    model_id: str | None = None,
    revision: str | None = None,
    allow_model_sampled: bool = False,
) -> dict[str, StatsKey]:
    """
    The [`StatsKey`] under which [`get_second_moments`] caches each module's statistics, for the same arguments.

    Quantities derived from a second moment (AlphaEdit's null-space projection) are cached under the same key.

    Returns:
        `dict[str, StatsKey]`: one key per module; empty when the model has no id (nothing is cached then).

    Example:

    ```python
    >>> from hf_edit_patch.editing.statistics import stats_keys
    >>> stats_keys(model, ["model.layers.5.mlp.down_proj"], allow_model_sampled=True)  # doctest: +SKIP
    {'model.layers.5.mlp.down_proj': StatsKey(model_id='HuggingFaceTB/SmolLM2-135M-Instruct', ...)}
    ```
    """
    return _source_and_keys(
        model,
        module_names,
        stats_dataset=stats_dataset,
        text_field=text_field,
        split=split,
        sample_count=sample_count,
        max_length=max_length,
        model_id=model_id,
        revision=revision,
        allow_model_sampled=allow_model_sampled,
    )[1]


def _no_corpus_message(module_names: Sequence[str]) -> str:
    names = current_option_names()
    return (
        f"no corpus for the key statistics (C = E[k kᵀ]) of {list(module_names)}, which ROME, MEMIT and AlphaEdit "
        f"need. Provide one of: {names.setting('dataset', 'wikitext')} (a Hugging Face dataset id; needs `pip "
        "install datasets` and the Hub, or the datasets cache); a local .txt (one text per line), .json or .jsonl "
        f"file, e.g. {names.settings(('dataset', 'corpus.jsonl'), ('text_field', 'passage'))}; "
        f"{names.setting('model_sampled')} for statistics from text the model samples itself (fully offline, "
        "labelled 'model-sampled' in the cache); or statistics shared on the Hub: "
        "hf_edit_patch.hub.stats_sharing.load_stats_from_hub(repo_id) (or `hf-edit-patch stats pull REPO_ID`) puts "
        f"them in the cache, then pass the {names.dataset} they were computed from (a Hub dataset is then not "
        "downloaded)."
    )


def null_space_projections(
    model: nn.Module,
    tokenizer: Any,
    module_names: list[str],
    *,
    threshold: float,
    stats_dataset: str | os.PathLike | None = None,
    text_field: str = "text",
    sample_count: int = 1000,
    max_length: int = 256,
    cache: StatsCache | None = None,
    allow_model_sampled: bool = False,
    show_progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """
    AlphaEdit's projection P (float64 `[d, d]`) of each module, from cached eigendecompositions when there are some.

    Missing ones are computed from the key statistics (themselves cached or computed by [`get_second_moments`], with
    the same arguments) and cached beside them ([`hf_edit_patch.hub.nullspace.EigenCache`], under the statistics'
    own keys), so another `threshold` needs no recomputation. A model without an id caches nothing, as for the
    statistics.

    Example:

    ```python
    >>> from hf_edit_patch.editing.statistics import null_space_projections
    >>> P = null_space_projections(model, tokenizer, ["model.layers.5.mlp.down_proj"], threshold=1e-2,
    ...                            stats_dataset="corpus.jsonl")  # doctest: +SKIP
    >>> P["model.layers.5.mlp.down_proj"].shape  # doctest: +SKIP
    torch.Size([1536, 1536])
    ```
    """
    options = {
        "stats_dataset": stats_dataset,
        "text_field": text_field,
        "sample_count": sample_count,
        "max_length": max_length,
        "allow_model_sampled": allow_model_sampled,
    }
    cache = cache if cache is not None else StatsCache()
    stored = EigenCache(cache)
    widths = input_widths(model, module_names)
    keys = stats_keys(model, module_names, **options)
    eigen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, key in keys.items():
        found = stored.get(key, widths[name])
        if found is not None:
            eigen[name] = found
    missing = [name for name in module_names if name not in eigen]
    if missing:
        moments = get_second_moments(model, tokenizer, missing, cache=cache, show_progress=show_progress, **options)
        for name in missing:
            eigen[name] = alphaedit.eigendecompose(moments[name])
            if name in keys:
                stored.put(keys[name], *eigen[name])
    return {name: alphaedit.projection(*eigen[name], threshold, name=name) for name in module_names}
