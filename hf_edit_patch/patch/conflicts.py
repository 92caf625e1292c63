"""What the patches of a stack do to each other: facts edited twice, contradicting requests, overlapping entries.

`find_conflicts` reads a stack of patches in application order (their recorded requests and the positions of their
entries; no model is needed) and reports:

- **superseded** edits: a later patch edits the same subject and relation as an earlier one, so the later target
  is the one that holds (or both ask for the same target: the later edit is redundant);
- **contradictions**: one patch asks for two different targets for the same subject and relation, which no single
  update can satisfy;
- **overlaps**: per module that several patches change, how many entries more than one patch writes, their share of
  the entries the stack changes there, and for a handful of patches the shared entries of each pair.

Two requests are about the same fact when their subjects match (case and spacing aside) and so does the relation:
the same prompt template (case, spacing and trailing punctuation aside), or one request's prompt is among the
other's paraphrases.

Example:
    ```python
    >>> report = find_conflicts([("p1", patch1), ("p2", patch2)])   # doctest: +SKIP
    >>> print(report)                                               # doctest: +SKIP
    2 patches: 1 fact edited again, no contradictions, overlapping entries in 1 module
    ...
    ```
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PatchError

if TYPE_CHECKING:
    from .edit_patch import EditPatch

__all__ = [
    "MAX_PAIR_PATCHES",
    "Contradiction",
    "EditRef",
    "ModuleOverlap",
    "PairOverlap",
    "StackConflicts",
    "Superseded",
    "find_conflicts",
    "request_contradictions",
]

MAX_PAIR_PATCHES = 16
"""Pairwise overlaps are listed for modules that at most this many patches change (beyond, only the totals)."""
_SHOWN = 20  # entries of each list that `str()` shows


@dataclass(frozen=True)
class EditRef:
    """One request of one patch: the patch's name, the request's position in it, and what it asks."""

    patch: str
    index: int
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)


@dataclass(frozen=True)
class Superseded:
    """`later` edits the fact `earlier` edited, in a patch above it: the later target holds."""

    earlier: EditRef
    later: EditRef

    @property
    def same_target(self) -> bool:
        """Both ask for the same target (the later edit is redundant rather than a change of mind)."""
        return _norm(self.earlier.target_new) == _norm(self.later.target_new)


@dataclass(frozen=True)
class Contradiction:
    """One patch asks for two different targets for the same fact."""

    patch: str
    first: EditRef
    second: EditRef


@dataclass(frozen=True)
class PairOverlap:
    """Entries of one module that both patches change; `share` is of the smaller patch's entries there."""

    first: str
    second: str
    shared: int
    share: float


@dataclass(frozen=True)
class ModuleOverlap:
    """Entries of `module` that more than one of `patches` changes.

    Attributes:
        changed: entries any of the patches changes.
        overlapping: entries two or more of them change.
        share: overlapping / changed.
        max_depth: the most patches that change one entry.
        pairs: the pairs that share entries (listed when at most `MAX_PAIR_PATCHES` patches change the module).
    """

    module: str
    patches: tuple[str, ...]
    changed: int
    overlapping: int
    share: float
    max_depth: int
    pairs: tuple[PairOverlap, ...] = ()


@dataclass(frozen=True)
class StackConflicts:
    """The result of `find_conflicts`; true when anything was found, and `str()` is a readable report."""

    patches: tuple[str, ...]
    superseded: tuple[Superseded, ...] = ()
    contradictions: tuple[Contradiction, ...] = ()
    overlaps: tuple[ModuleOverlap, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.superseded or self.contradictions or any(o.overlapping for o in self.overlaps))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of everything found."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        n = len(self.patches)
        edited = len(self.superseded)
        modules = sum(1 for o in self.overlaps if o.overlapping)
        found = (
            f"{_count(edited, 'fact edited again', 'facts edited again')}, "
            f"{_count(len(self.contradictions), 'contradiction', 'contradictions')}, "
            f"overlapping entries in {_count(modules, 'module', 'modules')}"
        )
        lines = [f"{_count(n, 'patch', 'patches')}: {found if self else 'no conflicts'}"]
        if self.superseded:
            lines.append("Superseded (a later patch edits the same subject and relation):")
            for s in self.superseded[:_SHOWN]:
                how = "again, same target" if s.same_target else "now"
                lines.append(
                    f"  {s.later.text!r}: {s.earlier.patch} {s.earlier.target_new!r} -> {s.later.patch} "
                    f"{s.later.target_new!r} ({how})"
                )
            lines += _more(len(self.superseded))
        if self.contradictions:
            lines.append("Contradictions (one patch asks for two targets):")
            for c in self.contradictions[:_SHOWN]:
                lines.append(
                    f"  {c.patch}: {c.first.text!r} -> {c.first.target_new!r} (request {c.first.index}) and "
                    f"{c.second.target_new!r} (request {c.second.index})"
                )
            lines += _more(len(self.contradictions))
        shown = [o for o in self.overlaps if o.overlapping]
        if shown:
            lines.append("Overlapping entries (changed by more than one patch):")
            for o in shown[:_SHOWN]:
                names = ", ".join(o.patches[:6]) + (", ..." if len(o.patches) > 6 else "")
                lines.append(
                    f"  {o.module}: {o.overlapping:,} of {o.changed:,} changed entries ({o.share:.1%}) by "
                    f"{len(o.patches)} patches ({names}); at most {o.max_depth} on one entry"
                )
                lines += [
                    f"    {p.first} & {p.second}: {p.shared:,} shared ({p.share:.1%} of the smaller)" for p in o.pairs
                ]
            lines += _more(len(shown))
        return "\n".join(lines)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _more(n: int) -> list[str]:
    return [f"  ... and {n - _SHOWN} more"] if n > _SHOWN else []


def _norm(text: str | None) -> str:
    return " ".join(str(text or "").casefold().split())


def _template(prompt: str) -> str:
    return re.sub(r"[\s.:;,?!]+$", "", _norm(prompt))


def _same_relation(a: EditRef, b: EditRef, paraphrases: dict[tuple[str, int], set[str]]) -> bool:
    if _template(a.prompt) == _template(b.prompt):
        return True
    return _norm(a.text) in paraphrases[(b.patch, b.index)] or _norm(b.text) in paraphrases[(a.patch, a.index)]


def request_contradictions(requests: Sequence[Any]) -> list[tuple[int, int]]:
    """Pairs `(i, j)`, i < j, of `requests` (`EditRequest`s or their dicts) that ask for different targets for the
    same subject and relation (see the module docstring): no single update states both.

    Example:
        ```python
        >>> a = EditRequest(prompt="{} was designed by", subject="Toodyay Fire Station", target_new="Wyndham Lewis")
        >>> b = EditRequest(prompt="{} was designed by", subject="Toodyay Fire Station", target_new="Ken Duncan")
        >>> request_contradictions([a, b])  # doctest: +SKIP
        [(0, 1)]
        ```
    """
    records = [r.to_dict() if hasattr(r, "to_dict") else r for r in requests]
    return sorted((a.index, b.index) for group in _facts([("", records)]) for a, b in _contradicting(group))


def _contradicting(group: list[EditRef]) -> list[tuple[EditRef, EditRef]]:
    """Pairs of one fact's requests, earlier first, that one patch records with different targets."""
    return [
        (a, b)
        for j, b in enumerate(group)
        for a in group[:j]
        if a.patch == b.patch and _norm(a.target_new) != _norm(b.target_new)
    ]


def _facts(patches: Sequence[tuple[str, Sequence[Any]]]) -> list[list[EditRef]]:
    """Requests (`(patch name, its request records)`) grouped by fact (subject and relation), each group in stack
    order."""
    refs: dict[str, list[EditRef]] = {}
    paraphrases: dict[tuple[str, int], set[str]] = {}
    for name, records in patches:
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                continue
            subject, prompt, target = record.get("subject"), record.get("prompt"), record.get("target_new")
            if not all(isinstance(v, str) for v in (subject, prompt, target)):
                continue  # a record without the fields of a request says nothing about facts
            ref = EditRef(name, i, subject, prompt, target, record.get("target_true"))
            refs.setdefault(_norm(subject), []).append(ref)
            others = record.get("paraphrases") or []
            paraphrases[(name, i)] = {_norm(p) for p in others if isinstance(p, str)}
    groups: list[list[EditRef]] = []
    for same_subject in refs.values():
        parent = list(range(len(same_subject)))  # union-find over the requests about one subject
        for i, a in enumerate(same_subject):
            for j in range(i):
                if _same_relation(a, same_subject[j], paraphrases):
                    parent[_root(parent, i)] = _root(parent, j)
        clusters: dict[int, list[EditRef]] = {}
        for i, ref in enumerate(same_subject):
            clusters.setdefault(_root(parent, i), []).append(ref)
        groups += [c for c in clusters.values() if len(c) > 1]
    return groups


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _overlaps(patches: Sequence[tuple[str, EditPatch]]) -> list[ModuleOverlap]:
    by_module: dict[str, list[tuple[str, torch.Tensor, int]]] = {}
    for name, patch in patches:
        for module, delta in patch.deltas.items():
            by_module.setdefault(module, []).append((name, delta.flat_indices.cpu(), delta.numel))
    out = []
    for module, entries in by_module.items():
        if len(entries) < 2:
            continue
        numel = entries[0][2]
        counts = torch.zeros(numel, dtype=torch.int16 if len(entries) < 2**15 else torch.int32)
        for _, flat, _ in entries:
            counts[flat] += 1  # a patch holds each position once
        changed = int((counts > 0).sum())
        overlapping = int((counts > 1).sum())
        pairs = []
        if overlapping and len(entries) <= MAX_PAIR_PATCHES:
            for j, (b, flat_b, _) in enumerate(entries):
                for a, flat_a, _ in entries[:j]:
                    shared = int(torch.isin(flat_a, flat_b).sum())
                    if shared:
                        smaller = max(1, min(flat_a.numel(), flat_b.numel()))
                        pairs.append(PairOverlap(a, b, shared, shared / smaller))
        out.append(
            ModuleOverlap(
                module=module,
                patches=tuple(n for n, _, _ in entries),
                changed=changed,
                overlapping=overlapping,
                share=overlapping / changed if changed else 0.0,
                max_depth=int(counts.max()),
                pairs=tuple(pairs),
            )
        )
    return out


def find_conflicts(patches: Sequence[tuple[str, EditPatch]]) -> StackConflicts:
    """Facts edited twice, contradicting requests and overlapping entries in a stack of `(name, patch)`, in order.

    Across patches, the later edit of a fact supersedes the earlier one (`superseded`, one entry per consecutive pair
    of edits of the fact); inside one patch, two different targets for one fact are a `contradictions` entry. See
    the module docstring for when two requests are about the same fact.

    Example:
        ```python
        >>> report = find_conflicts(list(pm.patches.items()))   # what PatchedModel.conflicts() returns
        >>> [(s.earlier.patch, s.later.patch) for s in report.superseded]   # doctest: +SKIP
        [('p1', 'p3')]
        ```
    """
    patches = list(patches)
    names = [n for n, _ in patches]
    if len(set(names)) != len(names):
        raise PatchError(f"patch names repeat: {names}")
    superseded, contradictions = [], []
    for group in _facts([(name, patch.config.requests) for name, patch in patches]):
        for earlier, later in zip(group, group[1:], strict=False):
            if earlier.patch != later.patch:
                superseded.append(Superseded(earlier, later))
        contradictions += [Contradiction(a.patch, a, b) for a, b in _contradicting(group)]
    order = {n: i for i, n in enumerate(names)}
    superseded.sort(key=lambda s: (order[s.later.patch], s.later.index))
    contradictions.sort(key=lambda c: (order[c.patch], c.first.index, c.second.index))
    return StackConflicts(tuple(names), tuple(superseded), tuple(contradictions), tuple(_overlaps(patches)))
