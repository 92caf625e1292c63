"""The eigendecomposition cache: AlphaEdit's eigenvectors of a second moment, stored next to the second moment.

AlphaEdit projects its update onto the null space of a layer's key statistics `C`: the eigenvectors of `C` whose
eigenvalues fall below a threshold. The eigendecomposition does not depend on the threshold, so it is cached once per
statistics entry: [`EigenCache`] keeps one safetensors file per [`StatsKey`] in the `nullspace/` subfolder of a
[`StatsCache`] (`eigenvalues` `[d]` float64, `eigenvectors` `[d, d]` float32, the key in the metadata), under the
same file name as the second moment it comes from. A file that cannot be read or does not match its key and width is
ignored with a warning (and recomputed by the caller).

Example:
    ```python
    >>> from hf_edit_patch.hub.nullspace import EigenCache
    >>> from hf_edit_patch.hub.stats_cache import StatsCache
    >>> eigen = EigenCache(StatsCache())
    >>> found = eigen.get(key, width=1536)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .files import atomic_path
from .stats_cache import StatsCache, StatsKey

logger = logging.getLogger(__name__)

__all__ = ["NULLSPACE_DIR", "EigenCache"]

NULLSPACE_DIR = "nullspace"
"""The subfolder of a statistics cache that holds eigendecompositions."""
EIGEN_FORMAT = "hf_edit_patch.nullspace"
EIGEN_FORMAT_VERSION = "1"


class EigenCache:
    """
    Eigendecompositions of cached second moments, in `<stats cache>/nullspace/`, keyed by the statistics' own key.

    Args:
        stats_cache (`StatsCache`): the statistics cache whose entries are decomposed.

    Example:

    ```python
    >>> import torch
    >>> from hf_edit_patch.hub.nullspace import EigenCache
    >>> from hf_edit_patch.hub.stats_cache import StatsCache, StatsKey
    >>> key = StatsKey("gpt2", None, "transformer.h.5.mlp.c_proj", "model-sampled:0:100", "", 100, 64)
    >>> eigen = EigenCache(StatsCache("/tmp/my_stats"))
    >>> values, vectors = torch.linalg.eigh(torch.eye(4, dtype=torch.float64))
    >>> eigen.put(key, values, vectors.float())  # doctest: +SKIP
    >>> eigen.get(key, width=4)[0]  # doctest: +SKIP
    tensor([1., 1., 1., 1.], dtype=torch.float64)
    ```
    """

    def __init__(self, stats_cache: StatsCache) -> None:
        self.stats_cache = stats_cache
        self.cache_dir = stats_cache.cache_dir / NULLSPACE_DIR

    def __repr__(self) -> str:
        return f"EigenCache({os.fspath(self.cache_dir)!r})"

    def path(self, key: StatsKey) -> Path:
        """Where the eigendecomposition of `key`'s second moment is (or would be) stored."""
        return self.cache_dir / key.filename()

    def get(self, key: StatsKey, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """
        `(eigenvalues, eigenvectors)` stored for `key`, or `None` if there are none or they are invalid.

        Args:
            key (`StatsKey`): the key of the second moment.
            width (`int`): the module's input width `d`; stored tensors of another shape are ignored.
        """
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                metadata = f.metadata() or {}
                values, vectors = f.get_tensor("eigenvalues"), f.get_tensor("eigenvectors")
        except Exception as exc:  # safetensors raises its own error type for malformed files
            logger.warning("ignoring the unreadable null-space file %s (it will be recomputed): %s", path, exc)
            return None
        ok = (
            metadata.get("format") == EIGEN_FORMAT
            and metadata.get("format_version") == EIGEN_FORMAT_VERSION
            and metadata.get("key") == json.dumps(key.to_dict(), sort_keys=True)
            and values.shape == (width,)
            and vectors.shape == (width, width)
            and bool(torch.isfinite(values).all())
            and bool(torch.isfinite(vectors).all())
        )
        if not ok:
            logger.warning("ignoring %s: it does not hold the eigendecomposition of %s (recomputing it)", path, key)
            return None
        logger.info("using the cached eigendecomposition of %s (%s)", key.module, path)
        return values, vectors

    def put(self, key: StatsKey, values: torch.Tensor, vectors: torch.Tensor) -> Path:
        """Stores `(values, vectors)` for `key`, replacing any previous file atomically; returns its path."""
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": EIGEN_FORMAT,
            "format_version": EIGEN_FORMAT_VERSION,
            "key": json.dumps(key.to_dict(), sort_keys=True),
        }
        tensors = {"eigenvalues": values.contiguous(), "eigenvectors": vectors.contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return path
