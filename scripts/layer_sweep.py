"""Layer sweep of ROME on SmolLM2-135M-Instruct: efficacy, generalization and locality per edited layer.

For each layer, each fact is edited on its own (one ROME request per patch) and measured with CounterFact's
criterion (the new target beats the old by mean token log-probability):

- efficacy: on the edit's own prompt;
- generalization: on a paraphrase ("X's capital city is", "Where is the Eiffel Tower? It is in the city of");
- locality: two unrelated known facts (other countries' capitals) still beat the edit's new target.

Key statistics come from ../shared/data/tasks/boolq_dev.jsonl (field "passage") when present, else from
model-sampled text, computed once for all swept layers in a `StatsCache` folder.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/layer_sweep.py --layers 2,3,4,5,6,7,8,10,12 \
        --mom2-n-samples 300 --stats-cache /tmp/bench/stats --keep-ratios none
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BOOLQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "boolq_dev.jsonl"
CAPITALS = [
    ("Japan", "Tokyo"),
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Russia", "Moscow"),
    ("Canada", "Ottawa"),
    ("China", "Beijing"),
    ("Greece", "Athens"),
    ("Austria", "Vienna"),
]


def facts(n_capitals: int) -> list[dict]:
    """Capital-of edits (each country gets the next one's capital) plus the Eiffel Tower -> Rome."""
    out = []
    for i in range(n_capitals):
        country, capital = CAPITALS[i]
        others = [CAPITALS[(i + k) % len(CAPITALS)] for k in (2, 3)]  # not the country whose capital is the target
        out.append(
            {
                "prompt": "The capital of {} is",
                "subject": country,
                "target_new": CAPITALS[(i + 1) % len(CAPITALS)][1],
                "target_true": capital,
                "paraphrase": f"{country}'s capital city is",
                "locality": [(f"The capital of {c} is", t) for c, t in others],
            }
        )
    out.append(
        {
            "prompt": "{} is located in the city of",
            "subject": "The Eiffel Tower",
            "target_new": "Rome",
            "target_true": "Paris",
            "paraphrase": "Where is the Eiffel Tower? It is in the city of",
            "locality": [("The Louvre museum is in the city of", "Paris"), ("The capital of Japan is", "Tokyo")],
        }
    )
    return out


def beats(model, tok, text: str, a: str, b: str) -> bool:
    from hf_edit_patch.editors.prompts import target_logprob

    return target_logprob(model, tok, text, a) > target_logprob(model, tok, text, b)


def scores(model, tok, f: dict) -> dict:
    new, old = f["target_new"], f["target_true"]
    loc = [beats(model, tok, text, true, new) for text, true in f["locality"]]
    return {
        "efficacy": beats(model, tok, f["prompt"].format(f["subject"]), new, old),
        "generalization": beats(model, tok, f["paraphrase"], new, old),
        "locality": sum(loc) / len(loc),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="2,3,4,5,6,7,8,10,12")
    p.add_argument("--n-capitals", type=int, default=7, help="capital facts (plus the Eiffel Tower)")
    p.add_argument("--keep-ratios", default="none", help="comma separated: none (whole update) and/or RECT ratios")
    p.add_argument("--mom2-n-samples", type=int, default=None, help="texts for the key statistics (default: hparams)")
    p.add_argument("--stats-cache", default=None, help="StatsCache folder (default: hf_edit_patch cache)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="write the per-edit results here")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import hf_edit_patch as hep
    from hf_edit_patch.editing.statistics import get_second_moments
    from hf_edit_patch.hub.stats_cache import StatsCache

    model, tok = hep.load_default_model()
    model.eval()
    cache = StatsCache(args.stats_cache) if args.stats_cache else StatsCache()
    skw = {"stats_cache": cache}
    if BOOLQ.is_file():
        skw.update(stats_dataset=str(BOOLQ), stats_text_field="passage")
    else:
        skw.update(allow_model_sampled_stats=True)
    hp = {"mom2_n_samples": args.mom2_n_samples} if args.mom2_n_samples else {}
    layers = [int(x) for x in args.layers.split(",")]
    ratios = [None if r.strip() == "none" else float(r) for r in args.keep_ratios.split(",")]
    fs = facts(args.n_capitals)

    t = time.perf_counter()
    from hf_edit_patch.editors.hparams import RomeHParams

    rh = RomeHParams(**hp)
    get_second_moments(
        model,
        tok,
        [f"model.layers.{i}.mlp.down_proj" for i in layers],
        stats_dataset=skw.get("stats_dataset"),
        text_field=skw.get("stats_text_field", "text"),
        sample_count=rh.mom2_n_samples,
        max_length=rh.mom2_max_length,
        cache=cache,
        allow_model_sampled=skw.get("allow_model_sampled_stats", False),
        show_progress=False,
    )
    print(f"# statistics for {len(layers)} layers: {time.perf_counter() - t:.0f} s", flush=True)
    pre = [scores(model, tok, f) for f in fs]
    print(f"# before editing: {pre}", flush=True)

    rows = []
    for ratio in ratios:
        for layer in layers:
            t = time.perf_counter()
            res = []
            for f in fs:
                req = {k: f[k] for k in ("prompt", "subject", "target_new", "target_true")}
                patch = hep.edit(
                    model, tok, [req], method="rome", keep_ratio=ratio, hparams={"layer": layer, **hp},
                    show_progress=False, **skw,
                )  # fmt: skip
                pm = hep.PatchedModel.from_pretrained(model, patch)
                res.append(scores(pm, tok, f))
                pm.unload()
            n = len(res)
            row = {
                "keep_ratio": ratio,
                "layer": layer,
                "efficacy": sum(r["efficacy"] for r in res) / n,
                "generalization": sum(r["generalization"] for r in res) / n,
                "locality": sum(r["locality"] for r in res) / n,
                "seconds_per_edit": (time.perf_counter() - t) / n,
                "edits": res,
            }
            rows.append(row)
            print(f"# {json.dumps({k: v for k, v in row.items() if k != 'edits'})}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"before": pre, "rows": rows}, indent=1))

    print(f"\n{len(fs)} facts per layer ({args.n_capitals} capitals + the Eiffel Tower); fractions of edits\n")
    print("| regularizer | layer | efficacy | generalization | locality | s per edit (incl. eval) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        reg = "none" if r["keep_ratio"] is None else f"RECT {r['keep_ratio']}"
        print(
            f"| {reg} | {r['layer']} | {r['efficacy']:.2f} | {r['generalization']:.2f} | {r['locality']:.2f} "
            f"| {r['seconds_per_edit']:.1f} |"
        )


if __name__ == "__main__":
    main()
