"""CounterFact-style counterfactual edit requests, generated from a seed: as many as a long editing run needs.

Each request rewrites one fact into a false one, in the shape of CounterFact (Meng et al. 2022): a prompt with
`{}` for the subject, the true object (`target_true`) and another object of the same relation (`target_new`),
paraphrases (the fact asked with the relation's other templates) and neighborhood prompts (other subjects with the
same true object, asked with the same template, which the edit should leave alone).

The facts ship with the package (`data/counterfactual_facts.json`): 13 relations named by their Wikidata property
(capital P36, official language P37, continent P30, a city's country P17, a landmark's city P131, a company's country
P495, a musician's instrument P1303, a football club's home city P159, an athlete's sport P641, a book's author P50,
a painting's painter P170, a product's developer P178, a work's composer P86), 557 subjects and 741 facts, all of
them well known and stable. The same seed gives the same requests on every platform (Python's `random.Random`, seeded,
over sorted data). Whether a model already states a generated counterfactual is a question for the model:
`hf_edit_patch.evaluation.counterfactuals.filter_unstated` keeps the requests it does not.

Example:
    ```python
    >>> from hf_edit_patch.counterfactuals import generate_counterfactuals
    >>> req = generate_counterfactuals(3, seed=0)[0]
    >>> req.prompt.count("{}"), req.target_new != req.target_true
    (1, True)
    ```
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .requests import EditRequest, EditRequestError

__all__ = ["ACCEPT_BATCH", "DATA_FILE", "Relation", "counterfactual_relations", "generate_counterfactuals"]

DATA_FILE = "counterfactual_facts.json"
ACCEPT_BATCH = 64
"""Candidates handed to `accept` at a time."""


@dataclass(frozen=True)
class Relation:
    """One relation of the shipped facts: its Wikidata property id, name, prompt templates and true facts."""

    id: str
    name: str
    prompts: tuple[str, ...]
    facts: dict[str, str]

    @property
    def objects(self) -> list[str]:
        """The distinct objects of the relation, sorted (the candidates for a counterfactual target)."""
        return sorted(set(self.facts.values()))


def counterfactual_relations() -> dict[str, Relation]:
    """The relations the generator draws from, by Wikidata property id (read from the package data).

    Example:
        ```python
        >>> counterfactual_relations()["P36"].facts["France"]
        'Paris'
        ```
    """
    text = resources.files("hf_edit_patch").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    out = {}
    for rid, rel in sorted(data["relations"].items()):
        prompts = tuple(rel["prompts"])
        if len(prompts) < 2 or any(p.count("{}") != 1 for p in prompts):
            raise EditRequestError(f"{DATA_FILE}: relation {rid} needs two or more prompts with one '{{}}' each")
        out[rid] = Relation(rid, rel["name"], prompts, dict(sorted(rel["facts"].items())))
    return out


def generate_counterfactuals(
    n: int | None = None,
    *,
    seed: int = 0,
    relations: Sequence[str] | None = None,
    distinct_subjects: bool = True,
    paraphrases: int = 2,
    neighbors: int = 3,
    exclude_subjects: Sequence[str] = (),
    accept: Callable[[list[EditRequest]], Sequence[bool]] | None = None,
) -> list[EditRequest]:
    """`n` counterfactual edit requests (None: every one the facts allow), the same for the same arguments.

    The facts of the chosen relations are shuffled with `seed`; each becomes a request with a prompt template drawn
    at random, a `target_new` drawn from the relation's other objects, up to `paraphrases` paraphrases (the other
    templates) and up to `neighbors` neighborhood prompts: subjects of the relation that no request of the list (nor
    `exclude_subjects`) edits, those with the same true object first; edited subjects only when no others are left.
    A request's subject is new to the list (or its subject and relation, with `distinct_subjects=False`) and not in
    `exclude_subjects` (compared case-insensitively); each subject is tried once.

    Args:
        n: how many requests; None for all.
        seed: the draw (0, 1, 2, ... give different orders and targets).
        relations: Wikidata property ids to draw from (default: all; see `counterfactual_relations`).
        distinct_subjects: at most one request per subject (as in CounterFact); False allows one per relation.
        paraphrases, neighbors: how many paraphrase and neighborhood prompts per request (at most).
        exclude_subjects: subjects already edited elsewhere (e.g. those of other records of the same run).
        accept: called on batches of candidates (prompt and targets drawn, no paraphrases or neighbors yet), returns
            which to keep, e.g. whether a model does not already state them
            (`hf_edit_patch.evaluation.counterfactuals.unstated_counterfactuals`).

    Raises:
        EditRequestError: an unknown relation, a negative count, or more requests asked for than the facts allow.

    Example:
        ```python
        >>> reqs = generate_counterfactuals(100, seed=1, relations=["P36", "P17"])
        >>> len({r.subject for r in reqs})
        100
        ```
    """
    known = counterfactual_relations()
    chosen = sorted(known) if relations is None else list(dict.fromkeys(relations))
    unknown = [r for r in chosen if r not in known]
    if unknown:
        raise EditRequestError(f"unknown relations {unknown}; accepted: {sorted(known)}")
    for name, value in (("n", n), ("paraphrases", paraphrases), ("neighbors", neighbors)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise EditRequestError(f"{name} must be a non-negative integer, got {value!r}")
    rng = random.Random(seed)
    pool = [(rid, subject) for rid in chosen for subject in known[rid].facts]
    rng.shuffle(pool)
    taken = {s.casefold() for s in exclude_subjects}
    seen: set[Any] = set()
    picked: list[tuple[Relation, str, int, str]] = []  # relation, subject, prompt index, new target
    batch: list[tuple[Relation, str, int, str]] = []

    def settle() -> None:
        if accept is not None and batch:
            keep = list(accept([_request(*item) for item in batch]))
            if len(keep) != len(batch):
                raise EditRequestError(f"accept returned {len(keep)} answers for {len(batch)} candidates")
        else:
            keep = [True] * len(batch)
        for item, ok in zip(batch, keep, strict=True):
            if ok and (n is None or len(picked) < n):
                picked.append(item)
        batch.clear()

    for rid, subject in pool:
        if n is not None and len(picked) >= n:
            break
        key = subject.casefold() if distinct_subjects else (subject.casefold(), rid)
        if key in seen or subject.casefold() in taken:
            continue
        seen.add(key)
        rel = known[rid]
        target = rng.choice([o for o in rel.objects if o != rel.facts[subject]])
        batch.append((rel, subject, rng.randrange(len(rel.prompts)), target))
        if accept is None or len(batch) >= ACCEPT_BATCH:
            settle()
    settle()
    if n is not None and len(picked) < n:
        raise EditRequestError(
            f"the facts of relations {chosen} give {len(picked)} counterfactual requests"
            + (" with distinct subjects" if distinct_subjects else "")
            + (" that pass `accept`" if accept is not None else "")
            + f"; {n} were asked for (use more relations, distinct_subjects=False, or fewer requests)"
        )
    edited = taken | {s.casefold() for _, s, _, _ in picked}
    return [_request(*item, rng=rng, paraphrases=paraphrases, neighbors=neighbors, edited=edited) for item in picked]


def _request(
    rel: Relation,
    subject: str,
    index: int,
    target: str,
    *,
    rng: random.Random | None = None,
    paraphrases: int = 0,
    neighbors: int = 0,
    edited: set[str] | None = None,
) -> EditRequest:
    """One request; its neighbors are subjects nobody edits if there are enough (same true object first)."""
    true = rel.facts[subject]
    prompt = rel.prompts[index]
    others = [p.format(subject) for i, p in enumerate(rel.prompts) if i != index][:paraphrases]
    near: list[str] = []
    if rng is not None and neighbors:
        edited = edited or set()
        candidates = [s for s in rel.facts if s != subject]
        ranked = [
            [s for s in candidates if s.casefold() not in edited and rel.facts[s] == true],
            [s for s in candidates if s.casefold() not in edited and rel.facts[s] != true],
            [s for s in candidates if s.casefold() in edited],
        ]
        for group in ranked:
            near += rng.sample(group, min(neighbors - len(near), len(group)))
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=target,
        target_true=true,
        paraphrases=others,
        neighborhood=[prompt.format(s) for s in near],
    )
