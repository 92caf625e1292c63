"""Edit patches as PEFT SHiRA adapters (Sparse High Rank Adapters), and SHiRA adapters as edit patches.

A SHiRA adapter is what an edit patch is: a sparse ΔW per `nn.Linear`, added to the base weight. PEFT stores it in
two files that `peft.PeftModel.from_pretrained(base, folder)` reads without hf_edit_patch installed:

- `adapter_config.json`: `peft_type: "SHIRA"`, `r`, `target_modules` (here the exact module names), ...
- `adapter_model.safetensors`: per module, `base_model.model.<module>.shira_weight` (the values, `[r·(m+n)]`) and
  `base_model.model.<module>.shira_indices` (int32 `[2, r·(m+n)]`, (row, col) in the `[out, in]` weight).

PEFT allocates exactly r·(m+n) entries per m×n module, with one r for the whole adapter (peft 0.21 has no per-module
rank). Exporting therefore takes the smallest r that holds every module's entries and pads each module with
explicit zero-valued entries at the first row-major positions it does not hold yet: ΔW is unchanged and no entry is
ever dropped. The patch's config travels in the safetensors metadata (strings PEFT ignores), so importing an
adapter written here drops exactly the padding and gives back the same patch (content hash checked). Any other
SHiRA adapter is imported with its zero-valued entries dropped (they change nothing), given the model for the
weight shapes, which SHiRA does not store.

Example:
    ```python
    patch.to_peft("out/eiffel-shira")                        # or patch.save_pretrained(folder, format="peft")
    peft_model = peft.PeftModel.from_pretrained(base, "out/eiffel-shira")
    patch = hep.EditPatch.from_peft("out/eiffel-shira")      # exactly the patch exported
    patch = hep.EditPatch.from_peft("user/shira-adapter", model=base)   # anyone's SHiRA adapter
    ```
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import PatchError, PatchFormatError, PatchNotFoundError
from ..hub.files import atomic_write_files
from ..hub.resolve import resolve_file
from ..modules import model_source, resolve_weight, unwrap_peft
from ..patch import encoding as storage
from ..patch.config import MAX_DIM, MAX_MODULES, ModuleRecord, PatchConfig
from ..patch.sparse import SparseDelta
from ..schema import Int, List, Map, Nullable, Object, Str, parse_json, read_json, validate

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the base model's module names
META_CONFIG = "hf_edit_patch_config"  # the patch's PatchConfig, as JSON
META_ZEROS = "hf_edit_patch_zeros"  # {module: [flat indices]} of the patch's own zero-valued entries, if any
# What is read of a PEFT adapter_config.json (PEFT writes many more keys, which are not needed here).
ADAPTER_CONFIG_SCHEMA = Object(
    {
        "peft_type": Nullable(Str(max_length=64)),
        "r": Nullable(Int(0, MAX_DIM)),
        "mask_type": Nullable(Str(max_length=256)),
        "peft_version": Nullable(Str(max_length=256)),
        "base_model_name_or_path": Nullable(Str(max_length=4096)),
        "revision": Nullable(Str(max_length=256)),
    },
    extra="ignore",
    what="a JSON object (a PEFT adapter config)",
)
ZEROS_SCHEMA = Map(
    List(Int(0, MAX_DIM * MAX_DIM), max_length=MAX_DIM), max_length=MAX_MODULES, what="module name to flat indices"
)
_KEY_RE = re.compile(r"^(?P<module>.+)\.shira_(?P<part>weight|indices)$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHIRA_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def shira_rank(deltas: Mapping[str, SparseDelta], r: int | None = None) -> int:
    """The SHiRA `r` that holds every module's entries: the smallest, or `r` itself after checking it suffices.

    Raises:
        PatchError: when `r` is too small for a module, or when a module would need more than its m·n entries.
    """
    needed = {name: max(1, math.ceil(d.nnz / (d.shape[0] + d.shape[1]))) for name, d in deltas.items()}
    if r is None:
        r = max(needed.values())
    elif isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise PatchError(f"r must be a positive integer or None (the smallest that fits), got {r!r}")
    else:
        short = {n: k for n, k in needed.items() if k > r}
        if short:
            name = max(short, key=short.get)
            d = deltas[name]
            raise PatchError(
                f"r={r} gives {r * sum(d.shape)} SHiRA entries to {name!r} ({d.shape[0]}×{d.shape[1]}), which holds "
                f"{d.nnz}; entries are never dropped: use r >= {short[name]} or r=None"
            )
    for name, d in deltas.items():
        m, n = d.shape
        if r * (m + n) > m * n:
            raise PatchError(
                f"SHiRA stores r·(m+n) entries per module with one r for the whole adapter; r={r} gives {r * (m + n)} "
                f"entries to {name!r} ({m}×{n}), more than its {m * n} weights (it needs r <= {m * n // (m + n)}"
                + (f"; r={needed[name]} is needed by the densest module" if r == max(needed.values()) else "")
                + "). The patch is too dense for SHiRA: sparsify it (keep_ratio=...), export its modules as separate "
                "patches, or save it in the native format (save_pretrained(folder))"
            )
    return r


def _pad(delta: SparseDelta, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(flat, values)` of `delta` plus explicit zeros at the first row-major positions it lacks, `size` in all."""
    flat, values = delta.flat_indices, delta.values
    missing = size - delta.nnz
    if missing == 0:
        return flat, values
    # the first `missing` free positions lie among the first nnz + missing = size positions
    taken = torch.zeros(size, dtype=torch.bool)
    taken[flat[flat < size]] = True
    free = (~taken).nonzero().flatten()[:missing]
    flat = torch.cat((flat, free))
    values = torch.cat((values, torch.zeros(missing, dtype=values.dtype)))
    flat, order = torch.sort(flat)
    return flat, values[order]


def write_shira(
    save_directory: str | os.PathLike,
    deltas: Mapping[str, SparseDelta],
    config: PatchConfig,
    *,
    r: int | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> str:
    """Writes `adapter_config.json` and `adapter_model.safetensors` of a SHiRA adapter, atomically. Returns the folder.

    Raises:
        PatchError: for a module that is not an `nn.Linear` (SHiRA supports nothing else), or a patch too dense
            for SHiRA's r·(m+n) entries per module.
    """
    if not deltas:
        raise PatchError("the patch has no modules: there is nothing to export")
    not_linear = {name: rec.layout for name, rec in config.modules.items() if rec.layout != "linear"}
    if not_linear:
        name, layout = next(iter(not_linear.items()))
        kind = "a GPT-2 Conv1D" if layout == "conv1d" else "an nn.Embedding"
        raise PatchError(
            f"module {name!r} is {kind} (layout {layout!r}), but PEFT's SHiRA adapters support nn.Linear layers only"
            + (f" ({len(not_linear)} such modules in this patch)" if len(not_linear) > 1 else "")
            + ". Save the patch in the native format instead (patch.save_pretrained(folder), attached with "
            "hf_edit_patch.PatchedModel), or merge it into the model (PatchedModel(model).add_patch(patch)"
            ".merge_and_unload()) and share the merged model"
        )
    r = shira_rank(deltas, r)
    tensors: dict[str, torch.Tensor] = {}
    zeros: dict[str, list[int]] = {}
    for name, delta in deltas.items():
        delta = delta.to("cpu")
        own_zeros = delta.flat_indices[delta.values == 0]
        if own_zeros.numel():
            zeros[name] = own_zeros.tolist()
        flat, values = _pad(delta, r * sum(delta.shape))
        cols = delta.shape[1]
        tensors[f"{KEY_PREFIX}{name}.shira_weight"] = values.contiguous()
        tensors[f"{KEY_PREFIX}{name}.shira_indices"] = torch.stack((flat // cols, flat % cols)).to(torch.int32)
    recorded = replace(config, tensors_sha256=None)  # that hash is of the native file
    metadata = {"format": "pt", META_CONFIG: recorded.to_json_string()}
    if zeros:
        metadata[META_ZEROS] = json.dumps(zeros)
    revision = config.base_model_revision
    adapter_config = {
        "peft_type": "SHIRA",
        "task_type": task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        # PEFT passes it to from_pretrained of the base model: only a commit, not a description like "gguf:..."
        "revision": revision if revision and _COMMIT_RE.match(revision) else None,
        "r": r,
        "mask_type": "random",  # the mask PEFT draws at load time is replaced by the saved shira_indices
        "random_seed": 0,
        "target_modules": list(deltas),
        "fan_in_fan_out": False,
        "init_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise PatchError(f"save_directory {save_directory!r} is a file; give a folder path")
    os.makedirs(save_directory, exist_ok=True)

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")

    atomic_write_files(
        {
            os.path.join(save_directory, ADAPTER_WEIGHTS_NAME): lambda tmp: save_file(tensors, tmp, metadata=metadata),
            os.path.join(save_directory, ADAPTER_CONFIG_NAME): write_config,
        }
    )
    return save_directory


def _read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise PatchFormatError(f"{path} is not a readable safetensors file: {exc}") from exc


def _entries(tensors: dict[str, torch.Tensor], path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (indices [2, N] int64, values [N])}` from PEFT's keys, checked for kinds, shapes and pairing."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            other.append(key)
            continue
        module = match["module"].removeprefix(KEY_PREFIX)
        parts.setdefault(module, {})[match["part"]] = tensor
    if other:
        raise PatchFormatError(
            f"{path} holds tensors that are not SHiRA weights ({other[:5]}{', ...' if len(other) > 5 else ''}): "
            "modules_to_save or other adapters cannot become a sparse edit patch"
        )
    if not parts:
        raise PatchFormatError(f"{path} holds no SHiRA tensors (<module>.shira_weight / <module>.shira_indices)")
    out = {}
    for module, p in parts.items():
        where = f"{path}: module {module!r}"
        if set(p) != {"weight", "indices"}:
            missing = sorted({"weight", "indices"} - set(p))
            raise PatchFormatError(f"{where}: shira_{missing[0]} is missing")
        values, indices = p["weight"], p["indices"]
        if values.dtype not in _SHIRA_VALUE_DTYPES or values.dim() != 1:
            raise PatchFormatError(
                f"{where}: shira_weight must be a 1-D float16, bfloat16 or float32 tensor, got {values.dtype} of "
                f"shape {list(values.shape)}"
            )
        if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] != values.numel():
            raise PatchFormatError(
                f"{where}: shira_indices must have shape [2, {values.numel()}] (one (row, col) per shira_weight "
                f"entry), got {list(indices.shape)}"
            )
        if indices.dtype.is_floating_point:  # PEFT saves them as float32 on Windows
            if not bool((indices == indices.round()).all()):
                raise PatchFormatError(f"{where}: shira_indices are floats that are not whole numbers")
            indices = indices.to(torch.int64)
        elif indices.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
            raise PatchFormatError(f"{where}: shira_indices must be integers, got {indices.dtype}")
        out[module] = (indices.to(torch.int64), values)
    return out


def read_shira(
    path_or_repo_id: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    keep_zeros: bool = False,
    use_metadata: bool = True,
    **hub_kwargs: Any,
) -> tuple[dict[str, SparseDelta], PatchConfig]:
    """`(deltas, config)` of a SHiRA adapter in a local folder or Hub repo (see `EditPatch.from_peft`)."""
    config_path = resolve_file(path_or_repo_id, ADAPTER_CONFIG_NAME, **hub_kwargs)
    adapter_config = validate(ADAPTER_CONFIG_SCHEMA, read_json(config_path), source=config_path)
    peft_type = adapter_config.get("peft_type")
    if peft_type != "SHIRA":
        raise PatchFormatError(
            f"{config_path} describes a {peft_type!r} adapter; only SHiRA adapters (peft_type 'SHIRA') are sparse "
            "weight deltas that become edit patches (a LoRA adapter can stay in the model: PatchedModel accepts a "
            "PeftModel)"
        )
    weights_path = resolve_file(path_or_repo_id, ADAPTER_WEIGHTS_NAME, missing_ok=True, **hub_kwargs)
    if weights_path is None:
        raise PatchNotFoundError(
            f"{os.fspath(path_or_repo_id)!r} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME} (a pickled "
            "adapter_model.bin is never read: re-save the adapter with PEFT's safe_serialization=True)"
        )
    tensors, metadata = _read_tensors(weights_path)
    entries = _entries(tensors, weights_path)
    if use_metadata and META_CONFIG in metadata:
        return _ours(entries, metadata, weights_path)
    return _anyones(entries, adapter_config, path_or_repo_id, model, keep_zeros, weights_path, hub_kwargs)


def _ours(
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]], metadata: dict[str, str], path: str
) -> tuple[dict[str, SparseDelta], PatchConfig]:
    """An adapter written by `write_shira`: the recorded patch, its padding dropped, checked by content hash."""
    source = f"{path}: metadata {META_CONFIG!r}"
    config = PatchConfig.from_dict(parse_json(metadata[META_CONFIG], source=source), source=source)
    source = f"{path}: metadata {META_ZEROS!r}"
    zeros = validate(ZEROS_SCHEMA, parse_json(metadata.get(META_ZEROS, "{}"), source=source), source=source)
    if set(entries) != set(config.modules):
        raise PatchFormatError(
            f"{path} holds SHiRA tensors for {sorted(entries)} but its hf_edit_patch metadata describes "
            f"{sorted(config.modules)}; pass use_metadata=False (and model=...) to read it as a plain SHiRA adapter"
        )
    value_dtype = storage.dtype_from_name(config.value_dtype)
    deltas = {}
    for name, (indices, values) in entries.items():
        rec = config.modules[name]
        full = SparseDelta(indices, values.to(value_dtype), rec.shape, name=f"{path}: module {name!r}")
        keep = full.values != 0
        own = torch.tensor(zeros.get(name, []), dtype=torch.int64)
        if own.numel():
            keep |= torch.isin(full.flat_indices, own)
        deltas[name] = SparseDelta._trusted(full.flat_indices[keep], full.values[keep], rec.shape)
    recorded = config.content_hash
    config = replace(config, content_hash=None)
    if storage.content_hash(deltas) != recorded:
        raise PatchFormatError(
            f"the SHiRA tensors in {path} differ from the edit patch recorded in its metadata (content hash "
            "differs: the adapter was changed after export); pass use_metadata=False (and model=...) to read the "
            "tensors as a plain SHiRA adapter"
        )
    return deltas, replace(config, content_hash=recorded)


def _anyones(
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]],
    adapter_config: dict[str, Any],
    source: str | os.PathLike,
    model: nn.Module | None,
    keep_zeros: bool,
    path: str,
    hub_kwargs: dict[str, Any],
) -> tuple[dict[str, SparseDelta], PatchConfig]:
    """A SHiRA adapter from anywhere: shapes from `model`, provenance from the adapter config."""
    if model is None:
        raise PatchError(
            f"{os.fspath(source)!r} is a SHiRA adapter not written by hf_edit_patch: SHiRA does not store the "
            "weight shapes, so pass the base model: EditPatch.from_peft(..., model=base_model)"
        )
    if getattr(model, "is_patched_model", False):
        model = model.base_model
    model = unwrap_peft(model)
    dtypes = {values.dtype for _, values in entries.values()}
    value_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # float16/bfloat16 -> float32 is exact
    deltas, records = {}, {}
    for name, (indices, values) in entries.items():
        _, weight, layout = resolve_weight(model, name)
        if layout != "linear":
            raise PatchFormatError(
                f"{path}: module {name!r} is a {layout} layer in the model, but SHiRA adapters hold nn.Linear "
                "deltas ([out, in]): the adapter was made for another model"
            )
        delta = SparseDelta(indices, values.to(value_dtype), tuple(weight.shape), name=f"{path}: module {name!r}")
        if not keep_zeros:
            keep = delta.values != 0
            delta = SparseDelta._trusted(delta.flat_indices[keep], delta.values[keep], delta.shape)
        deltas[name] = delta
        records[name] = ModuleRecord(
            shape=delta.shape, layout="linear", nnz=delta.nnz, encoding=storage.choose_encoding(delta)
        )
    provenance = {
        "source": os.fspath(source),
        "revision": hub_kwargs.get("revision"),
        "subfolder": hub_kwargs.get("subfolder"),
        "r": adapter_config.get("r"),
        "mask_type": adapter_config.get("mask_type"),
        "peft_version": adapter_config.get("peft_version"),
    }
    base_id, base_revision = adapter_config.get("base_model_name_or_path"), adapter_config.get("revision")
    config = PatchConfig(
        base_model_name_or_path=base_id if isinstance(base_id, str) else model_source(model)[0],
        base_model_revision=base_revision if isinstance(base_revision, str) else None,
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        modules=records,
        editor="peft-shira",
        editor_hparams={k: v for k, v in provenance.items() if v is not None},
        value_dtype=storage.dtype_name(value_dtype),
    )
    return deltas, config
