"""MEMIT batch reliability on ZsRE, measured the way a user edits: `hep.edit(..., method="memit")`, then
teacher-forced token accuracy of the new answer after the question.

Each batch of `--batch-size` consecutive records of a split is edited from the unedited model in one MEMIT call
(`evaluate_edits(mode="batch")`, which runs `hep.edit` with the given hyperparameters and the default ones
otherwise) and scored:

- reliability: accuracy of `alt` after the question (`src`);
- generalization: the same after its paraphrase (`rephrase`);
- locality: the share of the base model's 5-token greedy continuation of the unrelated NQ question (`loc`) that
  the edited model still predicts.

The base model's reliability and generalization on the same records are printed next to them.

Splits of `zsre_eval.json` (900 records), fixed so that tuning never sees the held-out records:

- `tune`: records 0-299, the only ones used to choose MEMIT's default hyperparameters;
- `heldout`: records 300-899;
- `first`: the file from its start (records 0-39 with `--batch-size 40`: inside the tuning split);
- `A:B`: records A to B-1.

Records are used as the file orders them, several questions about one subject included: a batch then holds the same
subject with different new answers, which one MEMIT update cannot all satisfy (with `--distinct-subjects` only the
first record of each subject is kept, as the experiment runner's `load_zsre` does; that selection is why
docs/results.md's MEMIT batch scores higher). Key statistics default to 1,000 BoolQ passages of the development data
(`mom2_n_samples`), cached in the hf_edit_patch `StatsCache` unless `--stats-cache` names another folder.

Usage (the figures in docs/results.md, "MEMIT reliability: the figure a user gets"):
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/memit_reliability.py --split heldout --batch-size 40 --batches 0 \
        --threads 1 --json /tmp/rel/heldout.json   # all 15 batches of records 300-899, about 1.6 hours
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/memit_reliability.py --split first --batch-size 40 --threads 1 \
        --hparams '{"mom2_update_weight": 1536}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ZSRE = DATA / "editing" / "zsre_eval.json"
BOOLQ = DATA / "tasks" / "boolq_dev.jsonl"
SPLITS = {"tune": (0, 300), "heldout": (300, 900)}


def split_range(split: str, n_records: int) -> tuple[int, int]:
    """The records `[start, stop)` of a split name or an `A:B` range."""
    if split == "first":
        return 0, n_records
    if split in SPLITS:
        start, stop = SPLITS[split]
        return start, min(stop, n_records)
    try:
        start, stop = (int(x) for x in split.split(":"))
    except ValueError:
        raise SystemExit(f"--split must be one of first, {', '.join(SPLITS)} or A:B, got {split!r}") from None
    if not 0 <= start < stop <= n_records:
        raise SystemExit(f"--split {split!r} is outside the file's {n_records} records")
    return start, stop


def batches(records: list[dict], start: int, stop: int, size: int, count: int | None, distinct: bool) -> list:
    """`[(first record index, [EditRequest, ...]), ...]`: consecutive batches of usable records of the range."""
    from hf_edit_patch.requests import EditRequest, EditRequestError

    usable, seen = [], set()
    for i in range(start, stop):
        try:
            req = EditRequest.from_zsre(records[i])
        except EditRequestError:
            continue
        if distinct and req.subject.lower() in seen:
            continue
        seen.add(req.subject.lower())
        usable.append((i, req))
    groups = [usable[s : s + size] for s in range(0, len(usable), size)]
    groups = [g for g in groups if len(g) == size]
    if count is not None:
        groups = groups[:count]
    if not groups:
        raise SystemExit(f"records {start}-{stop - 1} hold no full batch of {size} usable records")
    return [(g[0][0], g[-1][0], [req for _, req in g]) for g in groups]


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ZSRE), help="ZsRE records (a JSON list)")
    p.add_argument("--split", default="heldout", help="first, tune (0-299), heldout (300-899) or A:B")
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--batches", type=int, default=1, help="batches of the split to run, from its start (0: all)")
    p.add_argument("--distinct-subjects", action="store_true", help="keep one record per subject")
    p.add_argument("--hparams", default="{}", help="MemitHParams overrides as JSON, e.g. '{\"layers\": [3, 4, 5]}'")
    p.add_argument("--stats-dataset", default=str(BOOLQ), help="corpus of the key statistics")
    p.add_argument("--stats-text-field", default="passage")
    p.add_argument("--stats-cache", default=None, help="StatsCache folder (default: the hf_edit_patch cache)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results, per request, to this file")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import hf_edit_patch as hep
    from hf_edit_patch.evaluation import evaluate_edits, score_edits
    from hf_edit_patch.hub.stats_cache import StatsCache

    records = json.loads(Path(args.data).read_text(encoding="utf-8"))
    start, stop = split_range(args.split, len(records))
    groups = batches(records, start, stop, args.batch_size, args.batches or None, args.distinct_subjects)
    hparams = json.loads(args.hparams)
    model, tok = hep.load_default_model()
    model.eval()
    cache = StatsCache(args.stats_cache) if args.stats_cache else StatsCache()

    rows = []
    for first, last, reqs in groups:
        base = score_edits(model, tok, reqs)
        t0 = time.perf_counter()
        scores, details = evaluate_edits(
            model,
            tok,
            reqs,
            method="memit",
            mode="batch",
            hparams=hparams or None,
            stats_dataset=args.stats_dataset,
            stats_text_field=args.stats_text_field,
            stats_cache=cache,
            return_details=True,
            show_progress=False,
        )
        seconds = time.perf_counter() - t0
        row = {"records": f"{first}-{last}", "n": len(reqs), "base": base, **scores, "seconds": seconds}
        row["requests"] = [{**r.to_dict(), **d} for r, d in zip(reqs, details, strict=True)]
        rows.append(row)
        print(f"# records {first}-{last}: {json.dumps({k: row[k] for k in scores})} in {seconds:.0f} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1), encoding="utf-8")

    print(f"\nMEMIT, batches of {args.batch_size}, split {args.split}, hparams {hparams or 'default'}\n")
    print("| records | base reliability | reliability | base generalization | generalization | locality | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['records']} | {fmt(r['base']['reliability'])} | {fmt(r['reliability'])} "
            f"| {fmt(r['base']['generalization'])} | {fmt(r['generalization'])} | {fmt(r['locality'])} "
            f"| {r['seconds']:.0f} |"
        )
    if len(rows) > 1:
        n = sum(r["n"] for r in rows)

        def mean(get) -> str:
            values = [(get(r), r["n"]) for r in rows if get(r) is not None]
            return fmt(sum(v * w for v, w in values) / sum(w for _, w in values) if values else None)

        print(
            f"| all {n} | {mean(lambda r: r['base']['reliability'])} | {mean(lambda r: r['reliability'])} "
            f"| {mean(lambda r: r['base']['generalization'])} | {mean(lambda r: r['generalization'])} "
            f"| {mean(lambda r: r['locality'])} | {sum(r['seconds'] for r in rows):.0f} |"
        )


if __name__ == "__main__":
    main()
