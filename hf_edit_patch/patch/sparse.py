"""`SparseDelta`: the kept entries of one ΔW matrix, in the module's own weight layout.

Entries are kept in canonical order (row-major, strictly increasing flat index), so two deltas with the same
content compare equal and every encoding round-trips to the same tensors.

Example:
    ```python
    >>> import torch
    >>> from hf_edit_patch import SparseDelta
    >>> d = SparseDelta(torch.tensor([[1, 0], [2, 0]]), torch.tensor([0.5, -1.0]), (3, 4))
    >>> d.indices.tolist(), d.values.tolist()   # sorted: (0, 0) comes before (1, 2)
    ([[0, 1], [0, 2]], [-1.0, 0.5])
    >>> d.to_dense()[1, 2].item()
    0.5
    ```
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import PatchFormatError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_shape(shape: Sequence[int], what: str) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list, torch.Size)) else ()
    if len(shape) != 2 or min(shape) <= 0 or max(shape) > 2**31 - 1:
        raise PatchFormatError(f"{what}: shape must be two positive integers of at most 2**31 - 1, got {shape!r}")
    return shape


def _describe_positions(mask: torch.Tensor, limit: int = 5) -> str:
    where = mask.nonzero().flatten()[:limit].tolist()
    return f"{int(mask.sum())} of {mask.numel()} (first at positions {where})"


class SparseDelta:
    """A sparse update of one weight matrix: `indices` `[2, nnz]` (row, col), `values` `[nnz]` and `shape`.

    Args:
        indices: integer tensor `[2, nnz]` of (row, col) positions in the module's own weight layout
            (GPT-2 `Conv1D` is `[in, out]`, `nn.Linear` is `[out, in]`).
        values: floating tensor `[nnz]`, finite.
        shape: the weight's shape.
        name: used in error messages only.

    Raises:
        PatchFormatError: (a `ValueError`) on out-of-range or repeated indices, non-finite values, or a
            values/indices mismatch. Nothing is kept from a rejected input.
    """

    __slots__ = ("_flat", "_indices", "shape", "values")

    def __init__(
        self, indices: torch.Tensor, values: torch.Tensor, shape: Sequence[int], *, name: str = "delta"
    ) -> None:
        shape = _check_shape(shape, name)
        if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError(
                f"{name}: indices and values must be torch tensors, got "
                f"{type(indices).__name__} and {type(values).__name__}"
            )
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise PatchFormatError(f"{name}: indices must be an integer tensor, got {indices.dtype}")
        if indices.dim() != 2 or indices.shape[0] != 2:
            raise PatchFormatError(f"{name}: indices must have shape [2, nnz], got {list(indices.shape)}")
        if values.dim() != 1 or values.shape[0] != indices.shape[1]:
            raise PatchFormatError(
                f"{name}: values must have shape [nnz] = [{indices.shape[1]}], got {list(values.shape)}"
            )
        if values.dtype not in FLOAT_DTYPES:
            raise PatchFormatError(f"{name}: values must be float16, bfloat16, float32 or float64, got {values.dtype}")
        indices = indices.to(torch.int64)
        rows, cols = indices[0], indices[1]
        bad = (rows < 0) | (rows >= shape[0]) | (cols < 0) | (cols >= shape[1])
        if bool(bad.any()):
            raise PatchFormatError(f"{name}: indices out of range for shape {shape}: {_describe_positions(bad)}")
        flat = rows * shape[1] + cols
        self._init_from_flat(flat, values, shape, name)

    def _init_from_flat(self, flat: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], name: str) -> None:
        nonfinite = ~torch.isfinite(values)
        if bool(nonfinite.any()):
            raise PatchFormatError(f"{name}: values must be finite; non-finite: {_describe_positions(nonfinite)}")
        if flat.numel() > 1:
            step = flat[1:] - flat[:-1]
            if not bool((step > 0).all()):
                flat, order = torch.sort(flat)
                values = values[order]
                repeated = flat[1:] == flat[:-1]
                if bool(repeated.any()):
                    first = int(flat[1:][repeated][0])
                    raise PatchFormatError(
                        f"{name}: repeated indices: {int(repeated.sum())} duplicates, first at "
                        f"(row {first // shape[1]}, col {first % shape[1]}); each entry may appear once"
                    )
        self.shape = shape
        self.values = values
        self._flat = flat
        self._indices = None

    @classmethod
    def _trusted(cls, flat: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> SparseDelta:
        """No checks: for producers that guarantee int64, strictly increasing, in-range positions and finite values."""
        out = cls.__new__(cls)
        out.shape, out.values, out._flat, out._indices = shape, values, flat, None
        return out

    @property
    def indices(self) -> torch.Tensor:
        """`[2, nnz]` int64 (row, col) positions, computed on first use."""
        if self._indices is None:
            self._indices = torch.stack((self._flat // self.shape[1], self._flat % self.shape[1]))
        return self._indices

    @classmethod
    def from_flat(
        cls, flat_indices: torch.Tensor, values: torch.Tensor, shape: Sequence[int], *, name: str = "delta"
    ) -> SparseDelta:
        """Builds a delta from row-major flat indices into the weight."""
        shape = _check_shape(shape, name)
        if flat_indices.dim() != 1 or values.dim() != 1 or flat_indices.numel() != values.numel():
            raise PatchFormatError(
                f"{name}: flat indices and values must be 1-D of the same length, got "
                f"{list(flat_indices.shape)} and {list(values.shape)}"
            )
        if flat_indices.dtype.is_floating_point or flat_indices.dtype == torch.bool:
            raise PatchFormatError(f"{name}: flat indices must be integers, got {flat_indices.dtype}")
        if values.dtype not in FLOAT_DTYPES:
            raise PatchFormatError(f"{name}: values must be a float tensor, got {values.dtype}")
        flat = flat_indices.to(torch.int64)
        bad = (flat < 0) | (flat >= shape[0] * shape[1])
        if bool(bad.any()):
            raise PatchFormatError(f"{name}: flat indices out of range for shape {shape}: {_describe_positions(bad)}")
        out = cls.__new__(cls)
        out._init_from_flat(flat, values, shape, name)
        return out

    @classmethod
    def from_dense(cls, dense: torch.Tensor, *, name: str = "delta") -> SparseDelta:
        """Keeps every nonzero entry of a dense 2-D delta (no regularization)."""
        if dense.dim() != 2:
            raise PatchFormatError(f"{name}: a dense delta must be 2-D, got shape {list(dense.shape)}")
        flat = torch.flatten(dense)
        nz = torch.nonzero(flat).flatten()
        return cls.from_flat(nz, flat[nz], tuple(dense.shape), name=name)

    @classmethod
    def from_sparse_coo(cls, tensor: torch.Tensor, *, name: str = "delta") -> SparseDelta:
        """Converts a 2-D `torch.sparse_coo_tensor` (duplicates are summed by coalescing)."""
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.sparse_coo or tensor.dim() != 2:
            raise PatchFormatError(f"{name}: expected a 2-D torch.sparse_coo tensor, got {tensor!r:.80}")
        tensor = tensor.coalesce()
        return cls(tensor.indices(), tensor.values(), tuple(tensor.shape), name=name)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def flat_indices(self) -> torch.Tensor:
        """Strictly increasing row-major indices into the flattened weight (int64)."""
        return self._flat

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense `[rows, cols]` tensor with zeros where no entry is stored."""
        out = torch.zeros(self.numel, dtype=dtype or self.dtype, device=self.device)
        out[self._flat] = self.values.to(out.dtype)
        return out.view(self.shape)

    def to_sparse_coo(self) -> torch.Tensor:
        return torch.sparse_coo_tensor(
            self.indices, self.values, self.shape, is_coalesced=True, check_invariants=False
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseDelta:
        """Copy on another device and/or with values cast to another dtype (indices are unchanged)."""
        flat = self._flat.to(device) if device is not None else self._flat
        return SparseDelta._trusted(flat, self.values.to(device=device, dtype=dtype or self.dtype), self.shape)

    def equal(self, other: SparseDelta) -> bool:
        """Same shape, positions, dtype and bit-identical values."""
        return (
            self.shape == other.shape
            and self.dtype == other.dtype
            and torch.equal(self._flat.cpu(), other._flat.cpu())
            and torch.equal(self.values.cpu(), other.values.cpu())
        )

    def __repr__(self) -> str:
        density = self.nnz / self.numel
        return f"SparseDelta(shape={self.shape}, nnz={self.nnz} ({density:.2%}), dtype={self.dtype})"
