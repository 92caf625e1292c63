"""Errors raised by hf_edit_patch.

Every error about bad input subclasses `ValueError`, so `except ValueError` catches them all; the subclasses let
callers tell a corrupt file from a patch that does not fit the model.
"""

from __future__ import annotations


class PatchError(ValueError):
    """Base class for every invalid-input error of hf_edit_patch."""


class PatchFormatError(PatchError):
    """A patch file or config is malformed, truncated, inconsistent or written in an unknown encoding."""


class PatchValidationError(PatchError):
    """A patch does not fit the model it is attached to (unknown module, shape, layout or dtype mismatch)."""


class FingerprintMismatchError(PatchValidationError):
    """The target weights differ from the ones the patch was computed on (raised with ``strict=True``)."""


class PatchNotFoundError(OSError):
    """A patch could be found neither in a local folder nor on the Hugging Face Hub."""


class StatsError(PatchError):
    """Invalid arguments or data for key statistics (a `ValueError`)."""


class StatsUnavailableError(StatsError):
    """No statistics are cached and there is no corpus to compute them from (or it cannot be reached)."""


class StatsFormatError(StatsError):
    """A corpus file, a statistics file or a statistics index is malformed or inconsistent."""


class EvaluationFormatError(PatchFormatError):
    """An evaluation (`eval.json`) or an experiment's results file (`results.json`) is malformed."""
