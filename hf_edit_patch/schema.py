"""Declared schemas for the JSON files hf_edit_patch reads, and a JSON reader bounded before it parses.

Every JSON document the library reads from a folder, the Hub or a file's metadata goes through `read_json` (or
`parse_json` for text it already holds) and then `validate`, against the one schema its file declares. Both raise
the library's format error (`PatchFormatError` unless told otherwise), naming the file, the field, the value received
(shortened) and what is accepted.

The reader bounds a document before it builds it:

- size: at most `max_bytes` bytes are read;
- nesting: brackets outside strings are counted before parsing, so the parser never recurses past `max_depth`;
- numbers: an integer of more than 20 digits (Python refuses to convert those of over 4,300 digits) or a float that
  overflows (`1e400`) is never converted; it is kept as an `OutOfRange` marker that every schema refuses, naming the
  field. `NaN` and `Infinity` are markers too: they are not JSON;
- keys: an object that repeats a key is refused (two readers could disagree on which one counts).

A schema is built from small parts: `Int`, `Float`, `Number`, `Str`, `Bool`, `Enum`, `Nullable`, `List`, `Map`,
`Object` and `AnyJSON` (any JSON value whose numbers fit in 64 bits). Each checks the type before comparing anything,
and sizes before looking at items. `Object` drops keys it does not know with a warning (a newer version wrote them),
keeps them, or refuses them.

Example:
    ```python
    >>> from hf_edit_patch.schema import List, Object, Str, parse_json, validate
    >>> STACK = Object({"patches": List(Str(max_length=64), max_length=100)}, required=("patches",))
    >>> validate(STACK, parse_json('{"patches": ["a", "b"]}', source="patch_stack.json"), source="patch_stack.json")
    {'patches': ['a', 'b']}
    >>> try:
    ...     validate(STACK, {"patches": "a"}, source="patch_stack.json")
    ... except ValueError as exc:
    ...     print(exc)
    patch_stack.json: patches must be a list of at most 100 items, each a string of at most 64 characters, got str 'a'
    ```
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import PatchError, PatchFormatError
from .version import __version__

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "AnyJSON",
    "Bool",
    "Enum",
    "Float",
    "Int",
    "List",
    "Map",
    "Nullable",
    "Number",
    "Object",
    "OutOfRange",
    "Schema",
    "Str",
    "parse_json",
    "read_json",
    "shorten",
    "validate",
]

MAX_FILE_BYTES = 32 << 20
MAX_DEPTH = 32
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
_MAX_INT_DIGITS = 20
_MAX_FLOAT_CHARS = 400
# A string token, closed or not (an unclosed one runs to the end, so that scanning stays linear), or a bracket.
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*+"?', re.DOTALL)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class OutOfRange:
    """A number the reader did not convert: an integer of over 20 digits, a float that overflows, NaN or Infinity."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        t = self.text
        return t if len(t) <= 24 else f"{t[:10]}…{t[-6:]} ({len(t)} characters)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutOfRange) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


class _Short(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring, self.maxother, self.maxlong = 60, 60, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 5
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr of an int over 4,300 digits raises; never build it
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


_SHORT = _Short()


def shorten(value: Any) -> str:
    """A short repr of `value` for error messages (strings, lists, dicts and huge integers cut)."""
    try:
        return _SHORT.repr(value)
    except Exception:  # a repr that fails must not hide the error being reported
        return f"<{type(value).__name__}>"


def _kind(value: Any) -> str:
    return "number" if isinstance(value, OutOfRange) else type(value).__name__


# ---------------------------------------------------------------------------------------------------- reading


def read_json(
    path: str | os.PathLike,
    *,
    source: str | None = None,
    error: type[PatchError] = PatchFormatError,
    max_bytes: int = MAX_FILE_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """The JSON document in the file at `path`, bounded in size, nesting depth and numbers before it is parsed.

    Args:
        path: the file. A missing or unreadable file raises the `OSError` as it is.
        source: how messages name the file (default: its path).
        error: the error class raised for a bad document (a `PatchError`, so a `ValueError`).
        max_bytes: the largest file accepted.
        max_depth: the deepest nesting of arrays and objects accepted.

    Raises:
        error: the file is too large, not UTF-8, not JSON, nests too deep or repeats a key in an object.

    Example:
        ```python
        >>> from hf_edit_patch.schema import read_json
        >>> read_json("out/eiffel/patch_config.json")["patch_type"]  # doctest: +SKIP
        'EDIT_PATCH'
        ```
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return parse_json(data, source=source or path, error=error, max_bytes=max_bytes, max_depth=max_depth)


def parse_json(
    text: str | bytes,
    *,
    source: str,
    error: type[PatchError] = PatchFormatError,
    max_bytes: int = MAX_FILE_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parses JSON text under the bounds of `read_json` (for JSON held elsewhere, e.g. in safetensors metadata).

    Example:
        ```python
        >>> from hf_edit_patch.schema import parse_json
        >>> parse_json('{"a": [1, 2.5, null]}', source="example")
        {'a': [1, 2.5, None]}
        >>> try:
        ...     parse_json("[" * 100 + "]" * 100, source="example")
        ... except ValueError as exc:
        ...     print(exc)
        example nests arrays and objects more than 32 levels deep; accepted: at most 32
        ```
    """
    if len(text) > max_bytes:
        raise error(f"{source} is over {max_bytes:,} bytes; accepted: at most {max_bytes:,} bytes")
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{source} is not valid JSON (not UTF-8: {exc}); the file is truncated or corrupt") from None
    _check_depth(text, source, error, max_depth)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            repeated = next(k for k, _ in items if k in seen or seen.add(k))
            raise error(f"{source}: an object repeats the key {shorten(repeated)}; accepted: each key once")
        return out

    try:
        return json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=OutOfRange, object_pairs_hook=pairs
        )
    except PatchError:
        raise
    except (ValueError, RecursionError) as exc:
        raise error(f"{source} is not valid JSON ({exc}); the file is truncated or corrupt") from None


def _check_depth(text: str, source: str, error: type[PatchError], max_depth: int) -> None:
    if text.count("[") + text.count("{") <= max_depth:
        return
    brackets = _NOT_BRACKET_RE.sub("", _STRING_RE.sub("", text))
    depth = 0
    for c in brackets:
        if c in "[{":
            depth += 1
            if depth > max_depth:
                raise error(
                    f"{source} nests arrays and objects more than {max_depth} levels deep; accepted: at most "
                    f"{max_depth}"
                )
        else:
            depth -= 1


def _parse_int(text: str) -> int | OutOfRange:
    if len(text) - text.startswith("-") > _MAX_INT_DIGITS:
        return OutOfRange(text)
    value = int(text)
    return value if INT_MIN <= value <= INT_MAX else OutOfRange(text)


def _parse_float(text: str) -> float | OutOfRange:
    if len(text) > _MAX_FLOAT_CHARS:
        return OutOfRange(text)
    value = float(text)
    return value if math.isfinite(value) else OutOfRange(text)


# ---------------------------------------------------------------------------------------------------- schemas


class _Invalid(Exception):
    def __init__(
        self,
        path: tuple[str | int, ...],
        value: Any,
        accepted: str,
        *,
        missing: str | None = None,
        unexpected: list[str] | None = None,
    ) -> None:
        super().__init__(accepted)
        self.path, self.value, self.accepted = path, value, accepted
        self.missing, self.unexpected = missing, unexpected


class _Context:
    def __init__(self) -> None:
        self.unknown: list[tuple[tuple[str | int, ...], list[str]]] = []


def format_path(path: Sequence[str | int]) -> str:
    """`modules['a.b'].shape[0]`: a field path as messages write it."""
    out = ""
    for i, part in enumerate(path):
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, _Key):
            out += f"[{str(part)!r}]" if len(part) <= 200 else f"[{shorten(str(part))}]"
        elif _IDENTIFIER_RE.match(part):
            out += part if i == 0 else f".{part}"
        else:
            out += f"[{shorten(part)}]"
    return out


class _Key(str):
    """A key of a `Map` (written `['key']` in a path, where an `Object`'s field is written `.field`)."""


class Schema:
    """A check of one JSON value; `description` says what is accepted."""

    description = "a JSON value"

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> Any:
        raise NotImplementedError

    def fail(self, value: Any, path: tuple[str | int, ...]) -> _Invalid:
        return _Invalid(path, value, self.description)


class Int(Schema):
    """An integer (not a bool) from `minimum` to `maximum`."""

    def __init__(self, minimum: int = INT_MIN, maximum: int = INT_MAX) -> None:
        self.minimum, self.maximum = minimum, maximum
        if minimum == INT_MIN and maximum == INT_MAX:
            self.description = "an integer"
        elif maximum == INT_MAX:
            self.description = f"an integer of at least {minimum}"
        else:
            self.description = f"an integer from {minimum} to {maximum}"

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> int:
        if type(value) is not int or not self.minimum <= value <= self.maximum:
            raise self.fail(value, path)
        return value


class Float(Schema):
    """A finite number (an int is accepted and becomes a float) in a range, its lower end open or not."""

    def __init__(self, minimum: float = -math.inf, maximum: float = math.inf, *, exclusive_minimum: bool = False):
        self.minimum, self.maximum, self.exclusive_minimum = minimum, maximum, exclusive_minimum
        if math.isinf(minimum) and math.isinf(maximum):
            self.description = "a finite number"
        else:
            self.description = f"a number in {'(' if exclusive_minimum else '['}{minimum:g}, {maximum:g}]"

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> float:
        if type(value) not in (int, float) or (type(value) is int and value.bit_length() > 1000):
            raise self.fail(value, path)
        low_ok = self.minimum < value if self.exclusive_minimum else self.minimum <= value
        if not (low_ok and value <= self.maximum and math.isfinite(value)):  # compared before any conversion
            raise self.fail(value, path)
        return float(value)


class Number(Schema):
    """A finite number within 64 bits, kept as it is (an int stays an int): for measurements read back as written."""

    description = "a finite number"

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> int | float:
        if type(value) is int:
            if not INT_MIN <= value <= INT_MAX:
                raise self.fail(value, path)
        elif type(value) is not float or not math.isfinite(value):
            raise self.fail(value, path)
        return value


class Bool(Schema):
    description = "true or false"

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> bool:
        if type(value) is not bool:
            raise self.fail(value, path)
        return value


class Str(Schema):
    """A string of `min_length` to `max_length` characters, matching `pattern` (described by `what`) if given."""

    def __init__(
        self, *, min_length: int = 0, max_length: int = 4096, pattern: str | None = None, what: str | None = None
    ) -> None:
        self.min_length, self.max_length = min_length, max_length
        self.pattern = re.compile(pattern) if pattern else None
        size = f"of at most {max_length} characters" if min_length == 0 else f"of {min_length}-{max_length} characters"
        self.description = f"a string {size}" + (f", {what}" if what else "")

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> str:
        if not isinstance(value, str) or not self.min_length <= len(value) <= self.max_length:
            raise self.fail(value, path)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise self.fail(value, path)
        return value


class Enum(Schema):
    """One of a few strings."""

    def __init__(self, choices: Iterable[str]) -> None:
        self.choices = tuple(choices)
        self.description = f"one of {self.choices}"

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise self.fail(value, path)
        return value


class Nullable(Schema):
    """`null` or what `inner` accepts."""

    def __init__(self, inner: Schema) -> None:
        self.inner = inner
        self.description = f"{inner.description} or null"

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> Any:
        if value is None:
            return None
        try:
            return self.inner.check(value, path, ctx)
        except _Invalid as exc:
            if exc.path == path and exc.missing is None and exc.unexpected is None:  # the value itself is wrong
                raise self.fail(value, path) from None
            raise


class List(Schema):
    """A list (a tuple is accepted too) of `min_length` to `max_length` items, each checked by `item`."""

    def __init__(self, item: Schema, *, max_length: int, min_length: int = 0) -> None:
        self.item, self.min_length, self.max_length = item, min_length, max_length
        if min_length == max_length:
            size = f"of exactly {max_length} items"
        elif min_length:
            size = f"of {min_length} to {max_length} items"
        else:
            size = f"of at most {max_length} items"
        self.description = f"a list {size}, each {item.description}"

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> list[Any]:
        if not isinstance(value, (list, tuple)) or not self.min_length <= len(value) <= self.max_length:
            raise self.fail(value, path)
        return [self.item.check(v, (*path, i), ctx) for i, v in enumerate(value)]


class Map(Schema):
    """A JSON object used as a mapping: at most `max_length` keys checked by `key`, values checked by `value`."""

    def __init__(self, value: Schema, *, max_length: int, key: Schema | None = None, what: str | None = None) -> None:
        self.key = key if key is not None else Str(max_length=1024)
        self.value, self.max_length = value, max_length
        self.description = (
            f"a mapping{f' of {what}' if what else ''} (a JSON object of at most {max_length} keys, each "
            f"{self.key.description})"
        )

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> dict[str, Any]:
        if not isinstance(value, dict) or len(value) > self.max_length:
            raise self.fail(value, path)
        out = {}
        for k, v in value.items():
            out[self.key.check(k, (*path, _Key(k) if isinstance(k, str) else k), ctx)] = self.value.check(
                v, (*path, _Key(k) if isinstance(k, str) else str(k)), ctx
            )
        return out


class AnyJSON(Schema):
    """Any JSON value: objects with string keys, lists, strings, finite numbers within 64 bits, booleans, null."""

    description = "a JSON value (numbers finite and within 64 bits)"

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> Any:
        self._walk(value, path, 0)
        return value

    def _walk(self, value: Any, path: tuple[str | int, ...], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Invalid(path, value, f"a JSON value nested at most {MAX_DEPTH} levels deep")
        if value is None or isinstance(value, (str, bool)):
            return
        if type(value) is int:
            if not INT_MIN <= value <= INT_MAX:
                raise self.fail(value, path)
        elif type(value) is float:
            if not math.isfinite(value):
                raise self.fail(value, path)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self._walk(v, (*path, i), depth + 1)
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise _Invalid((*path, str(k)), k, "a string key")
                self._walk(v, (*path, _Key(k)), depth + 1)
        else:
            raise self.fail(value, path)


class Object(Schema):
    """A JSON object with known fields.

    Args:
        fields: `{name: schema}` of every known field.
        required: the fields that must be present (the others may be left out).
        extra: what to do with other keys: "warn" (drop them with a warning: a newer version wrote them), "keep"
            (keep them, checked as JSON values), "ignore" (drop them: a file another program writes) or "forbid"
            (refuse the object).
        what: how the description names the object (default: "a JSON object").
    """

    def __init__(
        self,
        fields: Mapping[str, Schema],
        *,
        required: Iterable[str] = (),
        extra: str = "warn",
        what: str = "a JSON object",
    ) -> None:
        if extra not in ("warn", "keep", "ignore", "forbid"):
            raise ValueError(f"extra must be 'warn', 'keep', 'ignore' or 'forbid', got {extra!r}")
        self.fields, self.required, self.extra = dict(fields), tuple(required), extra
        self.description = what
        self._any = AnyJSON()

    def check(self, value: Any, path: tuple[str | int, ...], ctx: _Context) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(value, path)
        for name in self.required:
            if name not in value:
                raise _Invalid(path, value, self.fields[name].description, missing=name)
        unknown = [k for k in value if k not in self.fields]
        if unknown and self.extra == "forbid":
            raise _Invalid(path, value, f"the keys {sorted(self.fields)}", unexpected=sorted(map(str, unknown)))
        out = {}
        for k, v in value.items():
            if k in self.fields:
                out[k] = self.fields[k].check(v, (*path, k), ctx)
            elif self.extra == "keep":
                if not isinstance(k, str):
                    raise _Invalid((*path, str(k)), k, "a string key")
                out[k] = self._any.check(v, (*path, _Key(k)), ctx)
        if unknown and self.extra == "warn":
            ctx.unknown.append((path, [str(k) for k in unknown]))
        return out


def validate(
    schema: Schema,
    data: Any,
    *,
    source: str,
    error: type[PatchError] = PatchFormatError,
    path: Sequence[str | int] = (),
) -> Any:
    """`data` checked against `schema`: a new value holding what the schema knows (unknown keys dropped or kept).

    Keys an `Object(extra="warn")` does not know are dropped with one `UserWarning` per object, saying that a newer
    version of hf_edit_patch wrote them.

    Args:
        schema: the declared schema of the document (or of the part at `path`).
        data: the parsed document.
        source: how messages name the file.
        error: the error class raised.
        path: where `data` sits in its document, for the messages.

    Raises:
        error: naming the file, the field, the value received (shortened) and what is accepted.

    Example:
        ```python
        >>> from hf_edit_patch.schema import Int, Object, validate
        >>> try:
        ...     validate(Object({"n": Int(1, 9)}), {"n": True}, source="f.json")
        ... except ValueError as exc:
        ...     print(exc)
        f.json: n must be an integer from 1 to 9, got bool True
        ```
    """
    ctx = _Context()
    try:
        out = schema.check(data, tuple(path), ctx)
    except _Invalid as exc:
        raise error(_message(exc, source)) from None
    for where, keys in ctx.unknown:
        shown = sorted(keys)[:10] + (["..."] if len(keys) > 10 else [])
        place = f"{source}: {format_path(where)}" if where else source
        warnings.warn(
            f"Ignoring keys {shown} in {place}: they were written by a newer version of hf_edit_patch (this is "
            f"{__version__}); upgrade hf_edit_patch to read them.",
            stacklevel=3,
        )
    return out


def _message(exc: _Invalid, source: str) -> str:
    field = format_path(exc.path)
    place = f"{source}: {field}" if field else source
    if exc.missing is not None:
        return f"{place} is missing a required key {exc.missing!r} ({exc.accepted})"
    if exc.unexpected is not None:
        return f"{place} has unexpected keys {shorten(exc.unexpected)}; accepted: {exc.accepted}"
    if not field:
        return f"{source} must hold {exc.accepted}, got {_kind(exc.value)} {shorten(exc.value)}"
    return f"{source}: {field} must be {exc.accepted}, got {_kind(exc.value)} {shorten(exc.value)}"
