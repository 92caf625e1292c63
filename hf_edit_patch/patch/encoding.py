"""On-disk encodings of a `SparseDelta`, weight fingerprints and content hashes.

safetensors cannot hold sparse tensors, so each delta is stored as a few dense tensors named
`"<module>.<part>"`. Three exact encodings exist; `choose_encoding` picks the smallest for each module:

| encoding  | tensors (besides `values`)                                   | bytes (v = value size)  |
|-----------|--------------------------------------------------------------|-------------------------|
| `coo`     | `indices` int32 `[2, nnz]`                                   | nnz · (8 + v)           |
| `bitmask` | `mask` uint8: a bit per weight entry, row-major, LSB first   | numel / 8 + nnz · v     |
| `csr`     | `row_counts` int32 `[rows]`, `cols` uint16 (int32 if > 2¹⁶)  | 4 · rows + nnz · (2 + v)|

Example: a 576×1536 matrix at 40% kept with float16 values takes 10 B per kept entry as COO (3.5 MB) but
0.925 B per weight entry as a bitmask (0.82 MB), less than half the 1.77 MB of a dense float16 ΔW.

Values are stored in the patch's value dtype (they are already in it in memory), so a loaded patch is
bit-identical to the saved one.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..errors import PatchFormatError
from .config import ENCODINGS, ModuleRecord
from .sparse import SparseDelta

_INT32_MAX = 2**31 - 1
_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise PatchFormatError(f"unsupported floating dtype {dtype}; accepted: {sorted(_NAME_DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _NAME_DTYPES[name]
    except KeyError:
        raise PatchFormatError(f"unsupported dtype name {name!r}; accepted: {sorted(_NAME_DTYPES)}") from None


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The exact bytes of a tensor (on CPU, contiguous), for hashing."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def fingerprint(weight: torch.Tensor) -> str:
    """`'sha256:<hex>'` over a weight's dtype, shape and exact bytes (a 4096×11008 fp32 matrix: ~0.1 s on CPU)."""
    h = hashlib.sha256()
    h.update(f"{dtype_name(weight.dtype)}{list(weight.shape)}".encode())
    h.update(raw_bytes(weight))
    return "sha256:" + h.hexdigest()


def content_hash(deltas: dict[str, SparseDelta]) -> str:
    """`'sha256:<hex>'` of a patch's content (module names, shapes, positions, value dtypes and bits).

    It does not depend on the encoding chosen for storage, so it identifies a patch across saves.
    """
    h = hashlib.sha256()
    for name in sorted(deltas):
        d = deltas[name]
        h.update(f"{name}\0{list(d.shape)}\0{dtype_name(d.dtype)}\0{d.nnz}\0".encode())
        h.update(raw_bytes(d.flat_indices))
        h.update(raw_bytes(d.values))
    return "sha256:" + h.hexdigest()


def encoded_nbytes(delta: SparseDelta, encoding: str) -> int:
    """Bytes the tensors of `encoding` take for this delta (headers excluded)."""
    v = delta.values.element_size()
    rows, cols = delta.shape
    if encoding == "coo":
        return delta.nnz * (2 * (4 if max(rows, cols) <= _INT32_MAX else 8) + v)
    if encoding == "bitmask":
        return (delta.numel + 7) // 8 + delta.nnz * v
    if encoding == "csr":
        return 4 * rows + delta.nnz * ((2 if cols <= 65536 else 4) + v)
    raise PatchFormatError(f"unknown encoding {encoding!r}; accepted: {ENCODINGS}")


def choose_encoding(delta: SparseDelta) -> str:
    """The smallest exact encoding for this delta (ties go to the first of `ENCODINGS`)."""
    return min(ENCODINGS, key=lambda enc: encoded_nbytes(delta, enc))


def encode(name: str, delta: SparseDelta, encoding: str) -> dict[str, torch.Tensor]:
    """Tensors `{"<name>.<part>": tensor}` that store `delta` in `encoding` (on CPU)."""
    delta = delta.to("cpu")
    rows, cols = delta.shape
    out = {f"{name}.values": delta.values.contiguous()}
    if encoding == "coo":
        idx_dtype = torch.int32 if max(rows, cols) <= _INT32_MAX else torch.int64
        out[f"{name}.indices"] = delta.indices.to(idx_dtype).contiguous()
    elif encoding == "bitmask":
        bits = np.zeros(delta.numel, dtype=np.bool_)
        bits[delta.flat_indices.numpy()] = True
        out[f"{name}.mask"] = torch.from_numpy(np.packbits(bits, bitorder="little"))
    elif encoding == "csr":
        counts = torch.bincount(delta.indices[0], minlength=rows).to(torch.int32)
        col_dtype = torch.uint16 if cols <= 65536 else torch.int32
        out[f"{name}.row_counts"] = counts
        out[f"{name}.cols"] = delta.indices[1].to(torch.int32).to(col_dtype).contiguous()
    else:
        raise PatchFormatError(f"unknown encoding {encoding!r}; accepted: {ENCODINGS}")
    return out


PARTS = {"coo": ("indices", "values"), "bitmask": ("mask", "values"), "csr": ("row_counts", "cols", "values")}


def _expect(t: torch.Tensor, what: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None) -> None:
    if t.dtype not in dtypes:
        raise PatchFormatError(f"{what} has dtype {t.dtype}; expected one of {list(dtypes)}")
    if shape is not None and tuple(t.shape) != shape:
        raise PatchFormatError(f"{what} has shape {list(t.shape)}; expected {list(shape)}")


def decode(name: str, tensors: dict[str, torch.Tensor], record: ModuleRecord, value_dtype: torch.dtype) -> SparseDelta:
    """Rebuilds and fully validates one module's delta from its stored tensors and its config record.

    Raises:
        PatchFormatError: when a tensor is missing, has the wrong dtype or shape, disagrees with the record,
            holds out-of-range or repeated positions, or non-finite values.
    """
    where = f"module {name!r}"
    rows, cols = record.shape
    numel = rows * cols
    for part in PARTS[record.encoding]:
        if f"{name}.{part}" not in tensors:
            raise PatchFormatError(
                f"{where}: tensor '{name}.{part}' is missing from the file "
                f"(the config says encoding {record.encoding!r})"
            )
    values = tensors[f"{name}.values"]
    _expect(values, f"{where}: values", (value_dtype,), (record.nnz,))
    if record.encoding == "coo":
        indices = tensors[f"{name}.indices"]
        _expect(indices, f"{where}: indices", (torch.int32, torch.int64), (2, record.nnz))
        return SparseDelta(indices, values, record.shape, name=where)
    if record.encoding == "bitmask":
        mask = tensors[f"{name}.mask"]
        _expect(mask, f"{where}: mask", (torch.uint8,), ((numel + 7) // 8,))
        bits = np.unpackbits(mask.numpy(), bitorder="little")
        if bits[numel:].any():
            raise PatchFormatError(f"{where}: mask has bits set past the {numel} entries of shape {record.shape}")
        flat = torch.from_numpy(np.flatnonzero(bits[:numel]))
        if flat.numel() != record.nnz:
            raise PatchFormatError(
                f"{where}: mask selects {flat.numel()} entries but the config and values say {record.nnz}"
            )
        return SparseDelta.from_flat(flat, values, record.shape, name=where)
    counts = tensors[f"{name}.row_counts"]
    col_idx = tensors[f"{name}.cols"]
    _expect(counts, f"{where}: row_counts", (torch.int32,), (rows,))
    _expect(col_idx, f"{where}: cols", (torch.uint16, torch.int32), (record.nnz,))
    counts = counts.to(torch.int64)
    if bool((counts < 0).any()) or int(counts.sum()) != record.nnz:
        raise PatchFormatError(
            f"{where}: row_counts must be non-negative and sum to nnz={record.nnz}, got sum {int(counts.sum())}"
        )
    row_idx = torch.repeat_interleave(torch.arange(rows), counts)
    return SparseDelta(torch.stack((row_idx, col_idx.to(torch.int64))), values, record.shape, name=where)
