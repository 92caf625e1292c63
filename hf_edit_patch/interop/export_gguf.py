"""A model with its edits baked in, written as one GGUF file for llama.cpp-family runtimes and transformers.

Tensor names and metadata keys follow the `gguf` package (`gguf.get_tensor_name_map`, `GGUFWriter`); the layout
follows llama.cpp's converter: weights stay `[out, in]` row-major, and the rows of the query and key projections are
reordered per head from the two rotary halves `[x_0..x_{d/2-1}, x_{d/2}..x_{d-1}]` to interleaved pairs
`[x_0, x_{d/2}, x_1, x_{d/2+1}, ...]`, which transformers' GGUF loader undoes.

Two ways to produce the file:

- from the model alone: every tensor is encoded in one type (`f32`, `f16`, `bf16`, or a block quantization the
  `gguf` package can compute in Python: `q8_0`, `q5_1`, `q5_0`, `q4_1`, `q4_0`); 1-D tensors stay `f32`, and a
  matrix whose rows do not split into whole blocks falls back to `f16`. The tokenizer's vocabulary, merges and
  special tokens are read from its `tokenizer.json` (byte-level BPE, or BPE with byte fallback).
- from the GGUF the base model was converted from (`base_gguf`): its metadata, tokenizer and untouched tensors are
  copied byte for byte. With type `base`, an edited matrix keeps the base's own quantization type and only the
  quantization blocks that hold an edited entry are re-quantized; every other block keeps its original bytes.

What survives the encoding is measured per edited matrix: `ΔW_written = decode(encode(W + ΔW)) - decode(encode(W))`
against the intended `ΔW`, as a relative error and a cosine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PatchValidationError
from ..hub.cards import hub_model_id
from ..hub.files import atomic_path
from ..progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "GGUF_TYPES",
    "RECORD_KEY",
    "EditedMatrix",
    "MatrixSurvival",
    "can_encode",
    "check_architecture",
    "write_gguf",
]

GGUF_TYPES = ("base", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""`gguf_type` values: `base` keeps the base GGUF's own types (needs `base_gguf`); the others encode every matrix."""
RECORD_KEY = "hf_edit_patch.record"
"""GGUF metadata key holding the export record (base model, applied patches) as JSON."""
ARCHITECTURES = {"llama": "llama"}
"""transformers `model_type` -> GGUF architecture this writer supports."""
INSTALL_HINT = "pip install 'hf-edit-patch[gguf]' (or: pip install gguf)"
_PERMUTED = (".attn_q.", ".attn_k.")
_SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version",
                 "general.base_model.", "general.alignment", RECORD_KEY)  # fmt: skip


def _gguf() -> Any:
    try:
        return importlib.import_module("gguf")
    except ImportError as exc:
        raise ImportError(f"writing GGUF files needs the gguf package: {INSTALL_HINT}") from exc


@dataclass
class MatrixSurvival:
    """How much of the edit of one matrix the written encoding keeps.

    Attributes:
        module: the edited module (`model.layers.5.mlp.down_proj`).
        tensor: its GGUF tensor (`blk.5.ffn_down.weight`).
        ggml_type: the type it was written in (`Q4_1`, `F16`, ...).
        changed_entries: entries the patches change.
        blocks_rewritten: quantization blocks that hold a changed entry (re-encoded); 0 for float types.
        blocks: quantization blocks of the matrix; 0 for float types.
        relative_error: `||ΔW_written - ΔW|| / ||ΔW||` (Frobenius): 0 keeps the edit exactly, 1 loses it.
        cosine: cosine between `ΔW_written` and `ΔW`.
    """

    module: str
    tensor: str
    ggml_type: str
    changed_entries: int
    blocks_rewritten: int
    blocks: int
    relative_error: float
    cosine: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------- types
def _qtype(name: str) -> Any:
    return _gguf().GGMLQuantizationType[name.upper()]


@functools.cache
def can_encode(type_name: str) -> bool:
    """Whether the installed `gguf` package can encode this type in Python (`f16`, `q8_0`, ...)."""
    gguf = _gguf()
    qtype = _qtype(type_name)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except (NotImplementedError, KeyError):
        return False
    return True


def _encode(w: np.ndarray, qtype: Any) -> np.ndarray:
    gguf = _gguf()
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def _decode(data: np.ndarray, qtype: Any) -> np.ndarray:
    return np.asarray(_gguf().quants.dequantize(data, qtype), dtype=np.float32)


def _fits(shape: tuple[int, ...], qtype: Any) -> bool:
    """Whether a tensor can be stored in `qtype`: floats always; block types need 2-D rows of whole blocks."""
    gguf = _gguf()
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return block == 1 or (len(shape) == 2 and shape[-1] % block == 0)


def _file_type(gguf_type: str) -> int:
    gguf = _gguf()
    name = "ALL_F32" if gguf_type == "f32" else f"MOSTLY_{gguf_type.upper()}"
    return int(gguf.LlamaFileType[name])


# ----------------------------------------------------------------------------------------------------- names
class _Names:
    """transformers parameter names <-> GGUF tensor names for one model."""

    def __init__(self, model: nn.Module) -> None:
        gguf = _gguf()
        cfg = model.config
        model_type = getattr(cfg, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise PatchValidationError(
                f"GGUF export supports the model types {sorted(ARCHITECTURES)}, got {model_type!r}; export this "
                "model with format='hf' instead"
            )
        self.arch = ARCHITECTURES[model_type]
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch)
        self.map = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.to_gguf: dict[str, str] = {}
        for name in model.state_dict():
            if self.tied and name == "lm_head.weight":
                continue  # llama.cpp reads the output matrix from token_embd when the file has no output.weight
            stem, dot, suffix = name.rpartition(".")
            mapped = self.map.get_name(stem) if dot else None
            if mapped is None:
                logger.debug("no GGUF tensor for %s; not written", name)
                continue
            self.to_gguf[name] = f"{mapped}.{suffix}"
        self.to_hf = {g: h for h, g in self.to_gguf.items()}

    def heads_of(self, gguf_name: str) -> int | None:
        """Heads whose rotary halves are interleaved in this tensor (None: not a query or key projection)."""
        if ".attn_q." in gguf_name:
            return self.heads
        if ".attn_k." in gguf_name:
            return self.kv_heads
        return None


def check_architecture(model: nn.Module) -> str:
    """The GGUF architecture of `model`; raises `PatchValidationError` naming the supported ones otherwise."""
    return _Names(model).arch


def _interleave(w: np.ndarray, heads: int | None) -> np.ndarray:
    """transformers -> GGUF row order of a query/key projection (per head: rotary halves -> interleaved pairs)."""
    if heads is None:
        return w
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _deinterleave(w: np.ndarray, heads: int | None) -> np.ndarray:
    """GGUF -> transformers row order (the inverse of `_interleave`)."""
    if heads is None:
        return w
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------------- metadata
def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in (None, "default"):
        raise PatchValidationError(
            f"GGUF export writes plain rotary embeddings; this model uses rope_type {rope_type!r}. Export with "
            "base_gguf= (the model's own GGUF, whose metadata is copied) or with format='hf'"
        )
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def _add_model_metadata(writer: Any, model: nn.Module, name: str) -> None:
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)


def _tokenizer_kind(tokenizer_json: dict[str, Any]) -> str:
    model = tokenizer_json.get("model") or {}
    decoder = json.dumps(tokenizer_json.get("decoder"))
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model.get("type") == "BPE" and "ByteLevel" in decoder:
        return "gpt2"
    raise PatchValidationError(
        f"GGUF export writes byte-level BPE (GPT-2 style) or BPE-with-byte-fallback (Llama style) tokenizers; this "
        f"one is a {model.get('type')!r} model. Pass tokenizer=None for a file without a tokenizer, or export with "
        "base_gguf= (its tokenizer is copied)"
    )


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Vocabulary, token types, merges and special tokens from a transformers fast tokenizer."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PatchValidationError(
            f"GGUF export needs a fast tokenizer (with tokenizer.json), got {type(tokenizer).__name__}; pass "
            "tokenizer=None for a file without a tokenizer"
        )
    kind = _tokenizer_kind(json.loads(backend.to_str()))
    count = len(tokenizer)
    if count > vocab_size:
        raise PatchValidationError(f"the tokenizer has {count} tokens but the model's embedding only {vocab_size}")
    tokens = list(tokenizer.convert_ids_to_tokens(list(range(count))))
    types = [gguf.TokenType.NORMAL] * count
    for index, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if index < count:
            types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    if kind == "llama":
        for index, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[index] = gguf.TokenType.BYTE
    tokens += [f"[PAD{i}]" for i in range(count, vocab_size)]  # embedding rows no token uses
    types += [gguf.TokenType.UNUSED] * (vocab_size - count)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0 if kind == "gpt2" else -float(i) for i in range(vocab_size)])
    writer.add_token_types([int(t) for t in types])
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.vocab.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
    with _quiet(gguf):
        special.add_to_gguf(writer, quiet=True)


@contextlib.contextmanager
def _quiet(gguf: Any) -> Iterator[None]:
    """The gguf package logs every key it sets at INFO; keep that at DEBUG here."""
    lib = logging.getLogger(gguf.__name__)
    level = lib.level
    lib.setLevel(max(level, logging.WARNING) if not logger.isEnabledFor(logging.DEBUG) else level)
    try:
        yield
    finally:
        lib.setLevel(level)


def _copy_metadata(writer: Any, reader: Any) -> None:
    """Every key of the base file (tokenizer included) but those the writer sets itself."""
    gguf = _gguf()
    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_KEYS):
            continue
        types = list(field.types)
        if types[0] == gguf.GGUFValueType.ARRAY and len(types) > 2:
            logger.warning("not copying %s: nested arrays are not supported", key)
            continue
        sub_type = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), types[0], sub_type=sub_type)
    if "general.alignment" in reader.fields:
        writer.add_custom_alignment(int(reader.fields["general.alignment"].contents()))


def _add_provenance(writer: Any, record: Mapping[str, Any]) -> None:
    hub_id = hub_model_id(record.get("base_model"))
    if hub_id:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, hub_id)
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{hub_id}")
    writer.add_string(RECORD_KEY, json.dumps(record, ensure_ascii=False, sort_keys=True))


# ----------------------------------------------------------------------------------------------------- tensors
@dataclass
class EditedMatrix:
    """One edited matrix: which entries the patches change (transformers layout) and their summed ΔW."""

    module: str
    mask: torch.Tensor
    delta: torch.Tensor


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _survival(
    edit: EditedMatrix, gname: str, qtype: Any, merged: np.ndarray, base: np.ndarray, written: np.ndarray,
    base_written: np.ndarray, mask: np.ndarray,
) -> MatrixSurvival:  # fmt: skip
    gguf = _gguf()
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    intended = merged.astype(np.float64) - base
    kept = _decode(written, qtype).astype(np.float64) - _decode(base_written, qtype)
    norm = float(np.linalg.norm(intended))
    error = float(np.linalg.norm(kept - intended)) / norm if norm else 0.0
    cos = float((kept * intended).sum()) / (float(np.linalg.norm(kept)) * norm) if norm and kept.any() else 0.0
    rewritten = blocks = 0
    if block > 1:
        per_block = mask.reshape(mask.shape[0], -1, block).any(-1)
        rewritten, blocks = int(per_block.sum()), per_block.size
    return MatrixSurvival(edit.module, gname, qtype.name, int(mask.sum()), rewritten, blocks, error, cos)


def _splice(base_raw: np.ndarray, merged: np.ndarray, mask: np.ndarray, qtype: Any) -> np.ndarray:
    """The base's blocks, with only the blocks holding an edited entry re-quantized from the merged weights."""
    gguf = _gguf()
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = merged.shape[0]
    touched = mask.reshape(rows, -1, block).any(-1)
    out = np.array(base_raw, dtype=np.uint8, copy=True).reshape(rows, -1, type_size)
    hit = touched.any(1)
    if hit.any():
        fresh = _encode(merged[hit], qtype).reshape(int(hit.sum()), -1, type_size)
        out[hit] = np.where(touched[hit][..., None], fresh, out[hit])
    return out.reshape(base_raw.shape)


def _choose(shape: tuple[int, ...], wanted: Any) -> Any:
    gguf = _gguf()
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if _fits(shape, wanted):
        return wanted
    return gguf.GGMLQuantizationType.F16


def write_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    edits: Mapping[str, EditedMatrix],
    record: Mapping[str, Any],
    tokenizer: Any = None,
    gguf_type: str = "f16",
    edited_type: str | None = None,
    base_gguf: str | os.PathLike | None = None,
    decoded: dict[str, torch.Tensor] | None = None,
    show_progress: bool | None = None,
) -> list[MatrixSurvival]:
    """Writes `model` (its weights already holding the edits) to the GGUF file `path`, atomically.

    Args:
        model: a transformers causal LM of a supported architecture (`ARCHITECTURES`).
        path: the `.gguf` file to write.
        edits: per edited parameter (`model.layers.5.mlp.down_proj.weight`), its changed entries and total ΔW.
        record: the export record, stored under `RECORD_KEY`.
        tokenizer: the model's fast tokenizer (ignored with `base_gguf`, whose tokenizer is copied).
        gguf_type: one of `GGUF_TYPES`.
        edited_type: the type of the edited matrices (default: `gguf_type`; with `base`, each one's base type).
        base_gguf: the GGUF the model's base weights were converted from.
        decoded: when given, filled with the written values (decoded, transformers layout) of every model tensor
            the file holds in another encoding than the model: the edited matrices of a `base` file, every tensor
            otherwise. Keyed by parameter name.
        show_progress: a bar over the tensors (see `hf_edit_patch.progress`).

    Returns:
        one `MatrixSurvival` per edited matrix.
    """
    gguf = _gguf()
    names = _Names(model)
    state = model.state_dict()
    for param in edits:
        if param not in names.to_gguf:
            raise PatchValidationError(f"the edited parameter {param!r} has no tensor in a {names.arch} GGUF file")
    reader = gguf.GGUFReader(os.fspath(base_gguf)) if base_gguf is not None else None
    if reader is not None:
        arch = reader.fields["general.architecture"].contents()
        if arch != names.arch:
            raise PatchValidationError(
                f"base_gguf {os.fspath(base_gguf)!r} is a {arch!r} file; the model is {names.arch}"
            )
    elif gguf_type == "base":
        raise PatchValidationError("gguf_type='base' keeps the types of the base GGUF: pass base_gguf=")
    wanted = None if gguf_type == "base" else _qtype(gguf_type)
    edited_wanted = _qtype(edited_type) if edited_type is not None else wanted
    survival: list[MatrixSurvival] = []
    tensors: list[tuple[str, np.ndarray, Any]] = []
    base_tensors = {t.name: t for t in reader.tensors} if reader is not None else {}
    order = list(base_tensors) if reader is not None else [names.to_gguf[n] for n in state if n in names.to_gguf]
    missing = [g for g in names.to_hf if g not in order and names.to_hf[g] in edits]
    if missing:
        raise PatchValidationError(f"base_gguf has no tensor {missing[0]!r}, which the patches edit")

    for gname in progress_bar(order, desc="GGUF tensors", unit="tensor", show_progress=show_progress, min_items=64):
        hf = names.to_hf.get(gname)
        base_t = base_tensors.get(gname)
        heads = names.heads_of(gname)
        if hf is None or (hf not in edits and (wanted is None or hf not in state)):
            tensors.append((gname, base_t.data, base_t.tensor_type))  # not in the model, or kept as it is
            continue
        w = _interleave(_numpy(state[hf]), heads)
        if hf not in edits:
            qtype = _choose(w.shape, wanted)
            tensors.append((gname, _encode(w, qtype), qtype))
            _keep(decoded, hf, tensors[-1], heads)
            continue
        edit = edits[hf]
        mask = _interleave(edit.mask.cpu().numpy(), heads)
        if base_t is not None:
            base = _decode(base_t.data, base_t.tensor_type).reshape(w.shape)
            _check_base(edit, base, state[hf], heads, base_gguf)
        else:
            base = w.astype(np.float64) - _interleave(edit.delta.cpu().double().numpy(), heads)
        qtype = edited_wanted if edited_wanted is not None else base_t.tensor_type
        if not can_encode(qtype.name) or not _fits(w.shape, qtype):
            why = (
                f"the gguf package cannot encode {qtype.name} in Python"
                if not can_encode(qtype.name)
                else f"rows of {w.shape[-1]} do not split into {qtype.name} blocks"
            )
            q8 = gguf.GGMLQuantizationType.Q8_0
            fallback = q8 if _fits(w.shape, q8) else gguf.GGMLQuantizationType.F16
            logger.warning("%s: %s; writing this edited matrix as %s", gname, why, fallback.name)
            qtype = fallback
        if base_t is not None and qtype == base_t.tensor_type and gguf.GGML_QUANT_SIZES[qtype][0] > 1:
            data, base_data = _splice(base_t.data, w, mask, qtype), base_t.data
        else:
            data, base_data = _encode(w, qtype), _encode(base, qtype)
        survival.append(_survival(edit, gname, qtype, w, base.astype(np.float64), data, base_data, mask))
        tensors.append((gname, data, qtype))
        _keep(decoded, hf, tensors[-1], heads)

    with atomic_path(path) as tmp, _quiet(gguf):
        writer = gguf.GGUFWriter(tmp, names.arch)
        if reader is not None:
            _copy_metadata(writer, reader)
            file_type = reader.fields.get("general.file_type")
            if gguf_type != "base":
                writer.add_file_type(_file_type(gguf_type))
            elif file_type is not None:
                writer.add_file_type(int(file_type.contents()))
        else:
            _add_model_metadata(writer, model, str(record.get("name") or "model"))
            writer.add_file_type(_file_type(gguf_type))
            if tokenizer is not None:
                _add_tokenizer(writer, tokenizer, model.config.vocab_size)
            else:
                logger.warning("no tokenizer given: the GGUF file holds weights only (llama.cpp cannot run it)")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_provenance(writer, record)
        for gname, data, qtype in tensors:
            writer.add_tensor(gname, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return survival


def _keep(decoded: dict[str, torch.Tensor] | None, hf: str, written: tuple[str, np.ndarray, Any], heads: Any) -> None:
    if decoded is not None:
        _, data, qtype = written
        decoded[hf] = torch.from_numpy(_deinterleave(_decode(data, qtype), heads).copy())


def _check_base(edit: EditedMatrix, base: np.ndarray, weight: torch.Tensor, heads: int | None, path: Any) -> None:
    """The base GGUF must hold the weights the patches were applied to (equal wherever no patch wrote)."""
    expected = torch.from_numpy(_deinterleave(base, heads).copy()).to(weight.dtype)
    actual = weight.detach().cpu()
    differ = (expected != actual) & ~edit.mask.cpu()
    if bool(differ.any()):
        worst = float((expected.float() - actual.float()).abs()[differ].max())
        raise PatchValidationError(
            f"base_gguf {os.fspath(path)!r} does not hold this model's base weights: {int(differ.sum())} entries "
            f"of {edit.module} that no patch changes differ (largest difference {worst:.3g}). Pass the GGUF the "
            "model was converted from, or export without base_gguf"
        )
