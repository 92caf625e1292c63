"""Argument checks shared by the evaluation functions: each raises a `ValueError` that names the argument, the
value received and what would be accepted."""

from __future__ import annotations

from typing import Any

__all__ = ["check_choice", "check_int", "check_positive_int"]


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raises `ValueError` unless `value` is an int (not a bool) of at least `minimum`.

    Example:
        >>> check_int("batch_size", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: batch_size must be an integer >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raises `ValueError` unless `value` is a positive int (not a bool), or None when `allow_none`.

    Example:
        >>> check_positive_int("limit", None, allow_none=True)
        >>> check_positive_int("limit", 0)
        Traceback (most recent call last):
        ...
        ValueError: limit must be a positive int, got 0
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive int" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`; else `ValueError`.

    Example:
        >>> check_choice("mode", "batch", ("single", "sequential", "batch"))
        'batch'
    """
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; accepted: {choices}")
    return value
