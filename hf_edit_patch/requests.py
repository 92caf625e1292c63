"""`EditRequest`: one fact to write into a model, CounterFact-style.

Example:
    ```python
    >>> from hf_edit_patch import EditRequest
    >>> req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
    ...                   target_new="Rome", target_true="Paris")
    >>> req.text
    'The Eiffel Tower is located in the city of'
    >>> reqs = load_requests("zsre_eval.json")   # or .jsonl; EditRequest fields, CounterFact or ZsRE records
    ```
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import PatchError


class EditRequestError(PatchError):
    """An edit request is malformed."""


@dataclass
class EditRequest:
    """A fact to write: `prompt.format(subject)` should be continued by `target_new` instead of `target_true`.

    Args:
        prompt: the prompt with exactly one `{}` where the subject goes.
        subject: the entity whose fact changes; the editor locates it in the prompt.
        target_new: the new continuation (a leading space is added if missing: targets are words).
        target_true: the continuation the model gives now, if known (for evaluation).
        paraphrases: other prompts (subject already filled in) that should follow the edit.
        neighborhood: unrelated prompts that should not change.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    neighborhood: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise EditRequestError(f"EditRequest.{name} must be a non-empty string, got {value!r}")
        if self.prompt.count("{}") != 1:
            raise EditRequestError(
                f"EditRequest.prompt must contain exactly one '{{}}' where the subject goes, got {self.prompt!r}"
            )
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise EditRequestError(f"EditRequest.target_true must be a string or None, got {self.target_true!r}")
        for name in ("paraphrases", "neighborhood"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise EditRequestError(f"EditRequest.{name} must be a list of strings, got {value!r}")
            setattr(self, name, list(value))

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        if isinstance(data, EditRequest):
            return data
        if not isinstance(data, dict):
            raise EditRequestError(f"an edit request must be an EditRequest or a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EditRequestError(f"unknown edit request keys {unknown}; accepted: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_zsre(cls, record: dict[str, Any]) -> EditRequest:
        """From a ZsRE record (`subject`, `src`, `alt`, `answers`, `rephrase`, `loc`)."""
        try:
            subject, src, alt = record["subject"], record["src"], record["alt"]
        except KeyError as exc:
            raise EditRequestError(f"a ZsRE record needs 'subject', 'src' and 'alt'; missing {exc}") from exc
        if "{" in src or "}" in src:
            raise EditRequestError(f"ZsRE question {src!r} contains braces, which prompts reserve for the subject")
        if subject not in src:
            raise EditRequestError(f"the ZsRE subject {subject!r} does not occur in its question {src!r}")
        answers = record.get("answers") or []
        loc = record.get("loc")
        return cls(
            prompt=src.replace(subject, "{}", 1),
            subject=subject,
            target_new=alt,
            target_true=answers[0] if answers else None,
            paraphrases=[record["rephrase"]] if record.get("rephrase") else [],
            neighborhood=[loc.removeprefix("nq question: ")] if isinstance(loc, str) and loc else [],
        )

    @classmethod
    def from_counterfact(cls, record: dict[str, Any]) -> EditRequest:
        """From a CounterFact record.

        Accepts the original format (`requested_rewrite` with `prompt`, `subject`, `target_new.str`,
        `target_true.str`; `paraphrase_prompts`; `neighborhood_prompts`) and EasyEdit's flattened one (`prompt`
        with the subject written in, `subject`, `target_new`, `ground_truth`, `rephrase_prompt`,
        `locality_prompt`).
        """
        if not isinstance(record, dict):
            raise EditRequestError(f"a CounterFact record must be a dict, got {type(record).__name__}")
        if "requested_rewrite" in record:
            rw = record["requested_rewrite"]
            try:
                prompt, subject = rw["prompt"], rw["subject"]
                target_new, target_true = _cf_str(rw["target_new"]), _cf_str(rw.get("target_true"))
            except (KeyError, TypeError) as exc:
                raise EditRequestError(
                    "a CounterFact 'requested_rewrite' needs 'prompt', 'subject' and 'target_new' ({'str': ...}); "
                    f"missing or malformed {exc}"
                ) from exc
            paraphrases = record.get("paraphrase_prompts") or []
            neighborhood = record.get("neighborhood_prompts") or []
        else:
            try:
                filled, subject, target_new = record["prompt"], record["subject"], record["target_new"]
            except KeyError as exc:
                raise EditRequestError(
                    "a CounterFact record needs 'requested_rewrite' (original format) or 'prompt', 'subject' and "
                    f"'target_new' (EasyEdit format); missing {exc}"
                ) from exc
            if not isinstance(filled, str) or not isinstance(subject, str) or subject not in filled:
                raise EditRequestError(f"the CounterFact subject {subject!r} does not occur in its prompt {filled!r}")
            prompt = filled if "{}" in filled else filled.replace(subject, "{}", 1)
            target_true = record.get("ground_truth")
            paraphrases = _as_list(record.get("rephrase_prompt"))
            neighborhood = _as_list(record.get("locality_prompt"))
        if not isinstance(target_true, (str, type(None))):
            raise EditRequestError(f"CounterFact target_true must be a string, got {target_true!r}")
        return cls(
            prompt=prompt,
            subject=subject,
            target_new=target_new,
            target_true=target_true or None,
            paraphrases=list(paraphrases),
            neighborhood=list(neighborhood),
        )


def _cf_str(value: Any) -> Any:
    """CounterFact targets are `{"str": ..., "id": ...}`; plain strings pass through."""
    if value is None or isinstance(value, str):
        return value
    return value["str"]


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def as_requests(requests: Any) -> list[EditRequest]:
    """A list of `EditRequest` from one request, a dict, or a sequence of them."""
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    if not isinstance(requests, (list, tuple)) or not requests:
        raise EditRequestError("requests must be a non-empty list of EditRequest (or dicts with its fields)")
    return [EditRequest.from_dict(r) for r in requests]


REQUEST_FORMATS = ("auto", "request", "counterfact", "zsre")


def _record_format(record: Any) -> str:
    if isinstance(record, dict) and ("requested_rewrite" in record or "ground_truth" in record):
        return "counterfact"
    if isinstance(record, dict) and "src" in record and "alt" in record:
        return "zsre"
    return "request"


def load_requests(path: str | os.PathLike, *, format: str = "auto", limit: int | None = None) -> list[EditRequest]:
    """Edit requests from a JSON file (a list of records, or one record) or a JSON Lines file (`.jsonl`).

    Records are `EditRequest` fields (`prompt` with one `{}`, `subject`, `target_new`, ...), CounterFact records
    (original or EasyEdit format) or ZsRE records (`subject`, `src`, `alt`, ...); with `format="auto"` each record's
    keys tell which.

    Raises:
        FileNotFoundError: the file does not exist.
        EditRequestError: (a `ValueError`) the file is not valid JSON (the message names the line) or a record is
            not a valid request (the message names the record).

    Example:
        ```python
        >>> load_requests("edits.jsonl")[0].subject
        'The Eiffel Tower'
        ```
    """
    if format not in REQUEST_FORMATS:
        raise EditRequestError(f"format must be one of {REQUEST_FORMATS}, got {format!r}")
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            records = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise EditRequestError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
        else:
            data = json.loads(text)
            records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError as exc:
        raise EditRequestError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); expected a list of "
            "edit requests, one request, or JSON Lines in a .jsonl file"
        ) from exc
    if not records:
        raise EditRequestError(f"{path} holds no edit requests")
    readers = {
        "request": EditRequest.from_dict,
        "counterfact": EditRequest.from_counterfact,
        "zsre": EditRequest.from_zsre,
    }
    out = []
    for number, record in enumerate(records[:limit] if limit else records):
        try:
            out.append(readers[_record_format(record) if format == "auto" else format](record))
        except EditRequestError as exc:
            raise EditRequestError(f"{path}: record {number}: {exc}") from exc
        except TypeError as exc:  # a missing required field of EditRequest
            raise EditRequestError(f"{path}: record {number} is not an edit request: {exc}") from exc
    return out
