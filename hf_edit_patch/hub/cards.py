"""Model cards: the README.md of a patch and the card of its evaluation, rendered from the Jinja templates in
`templates/` through huggingface_hub's `ModelCard` / `ModelCardData` (evaluation results become `model-index`).

Example:
    ```python
    from huggingface_hub import ModelCard
    from hf_edit_patch.hub.cards import patch_card

    card = patch_card(patch, repo_id="user/eiffel", license="apache-2.0")   # a huggingface_hub ModelCard
    card.data.tags                      # ['hf-edit-patch', 'model-editing', 'knowledge-editing', 'rect', 'rome']
    ModelCard(str(card)).data.base_model == patch.config.base_model_name_or_path
    ```
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..version import __version__
from .default_model import GGUF_REVISION_PREFIX, gguf_weights_note

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..patch.edit_patch import EditPatch

__all__ = ["LIBRARY_NAME", "evaluation_card", "evaluation_results", "patch_card", "patch_tags", "stack_card"]

LIBRARY_NAME = "hf-edit-patch"
PATCH_TEMPLATE = "patch_card.md"
STACK_TEMPLATE = "stack_card.md"
EVALUATION_TEMPLATE = "evaluation_card.md"
MAX_EDIT_ROWS = 50
# Licenses of base models whose terms are known here (the embedded default model); others are left to the user.
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
EDITING_METRICS = ("reliability", "generalization", "locality")
# task -> (pretty name, dataset id, dataset name, config, split, metric id, metric name): the data of
# `hf_edit_patch.evaluation.tasks` (the RECT paper's eight general-ability tasks).
TASK_CARDS: dict[str, tuple[str, str, str, str | None, str, str, str]] = {
    "reasoning": ("Reasoning", "openai/gsm8k", "GSM8K", "main", "test", "accuracy", "solve rate"),
    "nli": ("Natural language inference", "nyu-mll/glue", "RTE", "rte", "train", "accuracy", "accuracy"),
    "open_qa": ("Open-domain QA", "google-research-datasets/nq_open", "NQ-open", None, "validation", "exact_match",
                "exact match"),
    "closed_qa": ("Closed-domain QA", "google/boolq", "BoolQ", None, "validation", "exact_match", "exact match"),
    "dialogue": ("Dialogue", "EleutherAI/mutual", "MuTual", "mutual", "validation", "recall", "R4@1"),
    "summarization": ("Summarization", "Samsung/samsum", "SAMSum", "samsum", "test", "rouge", "mean ROUGE-1/2/L F1"),
    "ner": ("Named entity recognition", "eriktks/conll2003", "CoNLL-2003", "conll2003", "validation", "f1",
            "entity F1"),
    "sentiment": ("Sentiment analysis", "nyu-mll/glue", "SST-2", "sst2", "validation", "accuracy", "accuracy"),
}  # fmt: skip


def _template(name: str) -> str:
    return resources.files("hf_edit_patch.hub").joinpath("templates", name).read_text(encoding="utf-8")


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|") if value not in (None, "") else "–"


def hub_model_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id (not a local folder or path), else None: what `base_model` may hold."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def patch_tags(patch: EditPatch) -> list[str]:
    """Hub tags of a patch: the library, the task, the regularizer and the editing method."""
    cfg = patch.config
    tags = [LIBRARY_NAME, "model-editing", "knowledge-editing"]
    tags += [t for t in (cfg.regularizer, cfg.editor) if t and t not in tags]
    return tags


def _base_snippet(base: str, revision: str | None) -> tuple[list[str], str]:
    """Import lines and the line that loads the base model the fingerprints were taken on."""
    if revision and revision.startswith(GGUF_REVISION_PREFIX):  # weights converted by load_default_model
        return ["from hf_edit_patch import PatchedModel, load_default_model"], (
            f'base, tokenizer = load_default_model("{base}")  # the weights the patch was computed on'
        )
    rev = f', revision="{revision}"' if revision and len(revision) == 40 else ""
    imports = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from hf_edit_patch import PatchedModel",
    ]
    load = f'base = AutoModelForCausalLM.from_pretrained("{base}"{rev})\n'
    return imports, load + f'tokenizer = AutoTokenizer.from_pretrained("{base}")'


def _usage(patch: EditPatch, repo: str) -> tuple[str, str]:
    cfg = patch.config
    base = cfg.base_model_name_or_path or "<base model>"
    imports, load = _base_snippet(base, cfg.base_model_revision)
    prompt = None
    if cfg.requests:
        req = cfg.requests[0]
        prompt = str(req.get("prompt", "{}")).replace("{}", str(req.get("subject", "")))
    lines = [*imports, "", load, f'model = PatchedModel.from_pretrained(base, "{repo}")']
    if prompt:
        lines += [
            "",
            f'inputs = tokenizer({json.dumps(prompt, ensure_ascii=False)}, return_tensors="pt")',
            "out = model.generate(**inputs, max_new_tokens=8, do_sample=False)",
            'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]))',
        ]
    lines.append("base = model.unload()  # the edit taken back off, bit for bit")
    python = "```python\n" + "\n".join(lines) + "\n```"  # the fence is added here: formatters leave the template be
    cli = f"hf-edit-patch apply --model {shlex.quote(base)} {shlex.quote(repo)}"
    cli += f" --prompt {shlex.quote(prompt)}" if prompt else " --output-dir merged-model"
    return python, cli


def _editor_summary(patch: EditPatch) -> str:
    cfg = patch.config
    hp = cfg.editor_hparams or {}
    parts = [f"`{cfg.editor or 'unknown'}`"]
    if hp.get("layers"):
        parts.append(f"layers {', '.join(map(str, hp['layers']))}")
    elif hp.get("layer") is not None:
        parts.append(f"layer {hp['layer']}")
    if hp.get("stats_dataset"):
        parts.append(f"key statistics from {corpus_label(str(hp['stats_dataset']))}")
    return ", ".join(parts)


def corpus_label(source: str) -> str:
    """A statistics corpus as a card shows it: a local file by name and the start of its content hash (never a
    local path), a dataset by id.

    Example:
        ```python
        >>> corpus_label("file:boolq_dev.jsonl@sha256:6e3c9a0b1f2d4c5e")
        '`boolq_dev.jsonl` (sha256:6e3c9a0b1f2d…)'
        ```
    """
    if source.startswith("file:") and "@" in source:
        name, _, digest = source.removeprefix("file:").rpartition("@")
        return f"`{name}` ({digest[:19]}…)" if len(digest) > 19 else f"`{name}` ({digest})"
    if source.startswith("hf-dataset:"):
        return f"the dataset `{source.removeprefix('hf-dataset:')}`"
    if os.path.isabs(source) or source.startswith(("./", "../", "~")):  # recorded by an older version
        return f"`{os.path.basename(source)}`"
    return source


def patch_card(
    patch: EditPatch,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    evaluation: Mapping[str, Any] | None = None,
    evaluation_images: str = "evaluation/",
) -> ModelCard:
    """The README.md of a patch, as a huggingface_hub `ModelCard`.

    YAML metadata: `library_name: hf-edit-patch`, `base_model` (when it is a Hub id), tags (model-editing,
    knowledge-editing, the regularizer and the method), `license`, and with `evaluation` the `model-index`. The body
    lists the edits, editor, regularizer, sparsity, size and changed modules, a snippet that loads the patch, the
    evaluation (when given) and the limitations.

    Args:
        patch: the patch.
        repo_id: the Hub repo (or folder) the card will live in, for the usage snippet.
        license: a Hub license id; defaults to the base model's where known (SmolLM2: apache-2.0), else omitted.
        evaluation: results written by `hf_edit_patch.evaluation.report.evaluate_patch` (`eval.json`), shown as a
            section and
            as `model-index`.
        evaluation_images: where the evaluation's plots are, relative to the card.

    Example:
        ```python
        >>> card = patch_card(patch, repo_id="user/eiffel")
        >>> card.data.library_name
        'hf-edit-patch'
        ```
    """
    cfg = patch.config
    base_id = hub_model_id(cfg.base_model_name_or_path)
    license = license or KNOWN_LICENSES.get(base_id or "")
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_id,
        license=license,
        tags=patch_tags(patch),
        base_model_relation="adapter" if base_id else None,
    )
    eval_text = None
    if evaluation is not None:
        eval_card = evaluation_card(
            evaluation, patch=patch, model_name=repo_id, level=2, images=evaluation_images, license=license
        )
        data.model_name = eval_card.data.model_name
        data.eval_results = eval_card.data.eval_results or None
        eval_text = eval_card.text.strip()

    numel = sum(r.shape[0] * r.shape[1] for r in cfg.modules.values())
    reg = "none (every nonzero entry kept)"
    if cfg.regularizer:
        settings = ([f"keep ratio {cfg.keep_ratio}"] if cfg.keep_ratio is not None else []) + [
            f"{k.replace('_', ' ')} {v}" for k, v in sorted(cfg.regularizer_kwargs.items())
        ]
        reg = ", ".join([cfg.regularizer, *settings])
    base_name = cfg.base_model_name_or_path or "an unnamed model"
    converted = gguf_weights_note(cfg.base_model_revision)
    facts = [
        ("base model", f"`{base_name}`" + (f" (revision `{rev}`)" if (rev := cfg.base_model_revision) else "")),
        *([("base weights", f"{converted}, not the original weights of `{base_name}`")] if converted else []),
        ("editor", _editor_summary(patch)),
        ("regularizer", reg),
        ("modules", len(cfg.modules)),
        ("changed entries", f"{patch.nnz:,} of {numel:,} ({patch.nnz / max(numel, 1):.2%})"),
        ("stored size", f"{_size(patch.nbytes())} ({cfg.value_dtype} values)"),
        ("parent patches", ", ".join(p.get("name", "?") for p in cfg.parent_patches) or "none"),
        ("content hash", f"`{cfg.content_hash}`"),
        ("written by", f"hf_edit_patch {cfg.library_version}"),
    ]
    edits = []
    for req in cfg.requests[:MAX_EDIT_ROWS]:
        subject = str(req.get("subject", ""))
        prompt = str(req.get("prompt", "{}")).replace("{}", f"**{subject}**" if subject else "{}")
        edits.append((_cell(prompt), _cell(req.get("target_new")), _cell(req.get("target_true"))))
    modules = []
    for name, rec in cfg.modules.items():
        density = rec.nnz / (rec.shape[0] * rec.shape[1])
        modules.append(
            (name, f"{rec.shape[0]}×{rec.shape[1]}", rec.layout, f"{rec.nnz:,} ({density:.1%})", rec.encoding)
        )
    usage_python, usage_cli = _usage(patch, repo_id or "path/or/repo-id")
    what = f"{len(cfg.requests)} fact{'s' if len(cfg.requests) != 1 else ''}" if cfg.requests else "a weight edit"
    matrices = f"{len(cfg.modules)} weight matri{'x' if len(cfg.modules) == 1 else 'ces'}"
    return ModelCard.from_template(
        data,
        template_str=_template(PATCH_TEMPLATE),
        title=f"Edit patch for {base_name}",
        summary=(
            f"A knowledge edit ({what}) of `{base_name}` as a small, exactly removable patch made with "
            f"[hf_edit_patch](https://pypi.org/project/hf-edit-patch/): a sparse ΔW for {matrices}, attached to the "
            "base model like a PEFT adapter." + (f" It was computed on weights {converted}." if converted else "")
        ),
        facts=facts,
        edits=edits,
        more_edits=max(0, len(cfg.requests) - MAX_EDIT_ROWS),
        modules=modules,
        usage_python=usage_python,
        usage_cli=usage_cli,
        evaluation=eval_text,
        unregularized=cfg.regularizer is None,
        converted=converted,
        base_name=base_name,
    )


def stack_card(
    patches: Sequence[tuple[str, EditPatch]], *, repo_id: str | None = None, license: str | None = None
) -> ModelCard:
    """The README.md of a stack of patches (a series): one card listing every patch and every edit, in order.

    Metadata as for a patch (`base_model` when all patches share one Hub id; tags with every editor and regularizer,
    and `patch-series`); the body tables the patches and every edit, with snippets that load the series and append.

    Example:
        ```python
        >>> stack_card(list(pm.patches.items()), repo_id="user/series").data.tags[:2]
        ['hf-edit-patch', 'model-editing']
        ```
    """
    bases = {p.config.base_model_name_or_path for _, p in patches}
    base = next(iter(bases)) if len(bases) == 1 else None
    tags = [LIBRARY_NAME, "model-editing", "knowledge-editing", "patch-series"]
    tags += list(dict.fromkeys(t for _, p in patches for t in patch_tags(p) if t not in tags))
    base_id = hub_model_id(base)
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=base_id, tags=tags,
                         license=license or KNOWN_LICENSES.get(base_id or ""),
                         base_model_relation="adapter" if base_id else None)  # fmt: skip
    rows, edits = [], []
    for i, (name, p) in enumerate(patches, 1):
        cfg = p.config
        reg = [f"{cfg.regularizer} {cfg.keep_ratio or ''}".strip()] if cfg.regularizer else []
        if cfg.stack_regularizer:
            reg.append("stack " + " ".join(f"{v}" for v in cfg.stack_regularizer.values()))
        reg += [f"consolidates {', '.join(c.get('name', '?') for c in cfg.consolidates)}"] if cfg.consolidates else []
        short = (cfg.content_hash or "–")[:19]
        rows.append((i, f"`{name}`", _cell(cfg.editor), _cell("; ".join(reg) or "none"), len(cfg.requests),
                     f"{p.nnz:,}", f"`{short}…`"))  # fmt: skip
        for req in cfg.requests:
            subject = str(req.get("subject", ""))
            prompt = str(req.get("prompt", "{}")).replace("{}", f"**{subject}**" if subject else "{}")
            edits.append((len(edits) + 1, f"`{name}`", _cell(prompt), _cell(req.get("target_new")),
                          _cell(req.get("target_true"))))  # fmt: skip
    shown, repo = base or "several base models", repo_id or "path/or/repo-id"
    imports, load = _base_snippet(
        base or "<base model>", patches[0][1].config.base_model_revision if patches else None
    )
    attach = f'model = PatchedModel.from_pretrained(base, "{repo}")'
    append = f'model.push_to_hub("{repo}", append=True)  # one commit: the new patch, the manifest, this card'
    facts = [("base model", f"`{shown}`"), ("patches", len(patches)), ("edits", len(edits)),
             ("changed entries (sum over patches)", f"{sum(p.nnz for _, p in patches):,}"),
             ("stored size", _size(sum(p.nbytes() for _, p in patches))),
             ("written by", f"hf_edit_patch {__version__}")]  # fmt: skip
    return ModelCard.from_template(
        data,
        template_str=_template(STACK_TEMPLATE),
        title=f"Edit patch series for {shown}",
        summary=f"{len(edits)} knowledge edit{'s' if len(edits) != 1 else ''} of `{shown}` in {len(patches)} "
        "patches, stacked in order: small, exactly removable sparse ΔW made with "
        "[hf_edit_patch](https://pypi.org/project/hf-edit-patch/), attached to the base model like PEFT adapters.",
        facts=facts,
        patches=rows,
        edits=edits,
        usage_python="```python\n" + "\n".join([*imports, "", load, attach, "print(model.active_patches)"]) + "\n```",
        usage_append="```python\n"
        + "\n".join([attach, 'model.edit(tokenizer, [request], method="rome")', append])
        + "\n```",
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _delta(base: Any, patched: Any) -> str:
    if not all(isinstance(v, (int, float)) for v in (base, patched)):
        return "–"
    return f"{patched - base:+.4f}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluation_results(results: Mapping[str, Any]) -> list[EvalResult]:
    """`EvalResult`s (the `model-index` entries) of an evaluation: each score before (`metric_config: base`) and
    after (`metric_config: patched`) the patch, editing metrics under the task "Knowledge editing" and general tasks
    under their datasets."""
    out: list[EvalResult] = []
    editing = results.get("editing") or {}
    n = (results.get("settings") or {}).get("requests")
    for metric in EDITING_METRICS:
        for side, label in (("base", "base model"), ("patched", "with the patch")):
            value = (editing.get(side) or {}).get(metric)
            if _number(value):
                out.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name="Knowledge editing",
                        dataset_type="edit-requests",
                        dataset_name=f"the patch's edit requests ({n})" if n else "the patch's edit requests",
                        metric_type=metric,
                        metric_value=round(float(value), 4),
                        metric_name=f"{metric} ({label})",
                        metric_config=side,
                    )
                )
    tasks = results.get("tasks") or {}
    limit = (results.get("settings") or {}).get("task_limit")
    for task in dict.fromkeys([*(tasks.get("base") or {}), *(tasks.get("patched") or {})]):
        pretty, dataset, dataset_name, config, split, metric, metric_name = TASK_CARDS.get(
            task, (task, task, task, None, "test", "score", "score")
        )
        for side, label in (("base", "base model"), ("patched", "with the patch")):
            value = (tasks.get(side) or {}).get(task)
            if _number(value):
                out.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name=pretty,
                        dataset_type=dataset,
                        dataset_name=dataset_name + (f" (first {limit})" if limit else ""),
                        dataset_config=config,
                        dataset_split=split,
                        metric_type=metric,
                        metric_value=round(float(value), 4),
                        metric_name=f"{metric_name} ({label})",
                        metric_config=side,
                    )
                )
    return out


def evaluation_card(
    results: Mapping[str, Any],
    *,
    patch: EditPatch | None = None,
    model_name: str | None = None,
    level: int = 1,
    images: str = "",
    plots: Sequence[tuple[str, str]] | None = None,
    license: str | None = None,
) -> ModelCard:
    """The card of an evaluation (`eval.json` of `hf_edit_patch.evaluation.report`): editing metrics and general-task
    scores before and after the patch, as tables, plots and `model-index` eval results.

    Args:
        results: the evaluation results.
        patch: the evaluated patch (for tags and the name); else read from `results["patch"]`.
        model_name: the name in `model-index` (the Hub repo id when known).
        level: the heading level of the title (2 when the card is a section of the patch card).
        images: prefix of the plot paths (the folder of the plots, relative to the card).
        plots: `(caption, file name)` pairs; defaults to the plots listed in `results["plots"]`.
        license: a Hub license id.

    Example:
        ```python
        >>> card = evaluation_card(json.load(open("out/eiffel/evaluation/eval.json")))
        >>> card.data.eval_results[0].metric_type
        'reliability'
        ```
    """
    info = results.get("patch") or {}
    base = results.get("base_model") or {}
    base_name = base.get("name_or_path") or (patch.config.base_model_name_or_path if patch is not None else None)
    base_id = hub_model_id(base_name)
    name = model_name or info.get("source") or "edit-patch"
    evals = evaluation_results(results)
    tags = patch_tags(patch) if patch is not None else [LIBRARY_NAME, "model-editing", "knowledge-editing"]
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_id,
        license=license or KNOWN_LICENSES.get(base_id or ""),
        tags=tags,
        model_name=name if evals else None,
        eval_results=evals or None,
    )
    settings = results.get("settings") or {}
    editing = results.get("editing") or {}
    edit_rows = [
        (m, _fmt(editing.get("base", {}).get(m)), _fmt(editing.get("patched", {}).get(m)),
         _delta(editing.get("base", {}).get(m), editing.get("patched", {}).get(m)))
        for m in EDITING_METRICS
        if any(_number((editing.get(s) or {}).get(m)) for s in ("base", "patched"))
    ]  # fmt: skip
    tasks = results.get("tasks") or {}
    task_rows = []
    for task in dict.fromkeys([*(tasks.get("base") or {}), *(tasks.get("patched") or {})]):
        pretty, _, dataset_name, _, split, _, metric_name = TASK_CARDS.get(
            task, (task, task, task, None, "", "score", "score")
        )
        b, p = (tasks.get("base") or {}).get(task), (tasks.get("patched") or {}).get(task)
        task_rows.append((pretty, f"{dataset_name} {split}".strip(), metric_name, _fmt(b), _fmt(p), _delta(b, p)))
    metric = settings.get("metric", "accuracy")
    editing_note = (
        "Token-level teacher-forced accuracy of the new target (ZsRE style): reliability on the edit prompts, "
        "generalization on their paraphrases, locality as agreement with the base model's own continuation of "
        "unrelated prompts (1.0 = unchanged)."
        if metric == "accuracy"
        else "Share of prompts on which the new target is more likely than the old one (CounterFact style); for "
        "locality, the share of unrelated prompts on which it is not."
    )
    limit = settings.get("task_limit")
    tasks_note = (
        "Zero-shot scores on the general-ability tasks of Gu et al. (2024) with the paper's prompts"
        + (f", on the first {limit} examples of each task" if limit else "")
        + ". A drop after the patch is damage the edit did to abilities it was not meant to touch."
    )
    shown = model_name or info.get("source")  # the repo the card is pushed to, else where the patch was read
    plot_list = list(plots) if plots is not None else [tuple(p) for p in results.get("plots") or []]
    settings_rows = [
        ("base model", f"`{base_name}`" + (f" (revision `{base['revision']}`)" if base.get("revision") else "")),
        ("patch", f"`{shown}`" if shown else "–"),
        ("patch content hash", f"`{info['content_hash']}`" if info.get("content_hash") else "–"),
        ("edit requests", settings.get("requests", "–")),
        ("editing metric", metric),
        ("task data", settings.get("task_data_dir") or ("public datasets" if task_rows else "–")),
        ("evaluated with", f"hf_edit_patch {results.get('library_version', __version__)}"),
    ]
    what = f"the patch `{shown}`" if shown else "an edit patch"
    return ModelCard.from_template(
        data,
        template_str=_template(EVALUATION_TEMPLATE),
        h="#" * level,
        title="Evaluation" if level > 1 else f"Evaluation of {what}",
        summary=f"Scores of `{base_name}` without and with {what} attached"
        + (f" ({info.get('editor')}, {_reg(info)})." if info.get("editor") else "."),
        editing=edit_rows,
        editing_note=editing_note,
        tasks=task_rows,
        tasks_note=tasks_note,
        plots=[(_cell(caption), images + path) for caption, path in plot_list],
        settings=[(k, _cell(v)) for k, v in settings_rows],
    )


def _reg(info: Mapping[str, Any]) -> str:
    if not info.get("regularizer"):
        return "no regularizer"
    return f"{info['regularizer']} keeping {info.get('keep_ratio')}"


# --------------------------------------------------------------------------------------------------------------------
# Cards a person edited are kept
# --------------------------------------------------------------------------------------------------------------------

CARD_MARKER = "<!-- hf_edit_patch card sha256:"


def card_with_marker(body: str) -> str:
    """Appends a marker holding the card's hash, so a later save can tell whether a person edited it."""
    return f"{body.rstrip()}\n\n{CARD_MARKER}{hashlib.sha256(body.rstrip().encode()).hexdigest()} -->\n"


def card_is_generated_and_unedited(text: str) -> bool:
    body, sep, tail = text.rpartition(CARD_MARKER)
    if not sep:
        return False
    return tail.strip().removesuffix("-->").strip() == hashlib.sha256(body.rstrip().encode()).hexdigest()


def keeps_existing_card(path: str, *, overwrite: bool) -> bool:
    """Whether `path` holds a README.md that a person edited and that is kept (not `overwrite`); logs why."""
    if os.path.exists(path) and not overwrite:
        with open(path, encoding="utf-8", errors="replace") as f:
            existing = f.read()
        if not card_is_generated_and_unedited(existing):
            logger.warning(
                "Keeping the existing %s (it was edited or not written by hf_edit_patch); pass "
                "overwrite_card=True to replace it.",
                path,
            )
            return True
    return False


def write_card(path: str, body: str, *, overwrite: bool, write: Callable[[str, str], None]) -> bool:
    """Writes README.md unless a person edited the existing one (then it is kept unless `overwrite`)."""
    if keeps_existing_card(path, overwrite=overwrite):
        return False
    write(path, card_with_marker(body))
    return True
