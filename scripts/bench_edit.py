"""Time, peak memory and efficacy of ROME edits and MEMIT batches, with the value optimization of today (baseline) and
the new one side by side (SmolLM2-135M-Instruct on CPU by default).

Optimizers:

- ``baseline``: ROME's, as this package ran it before: Adam on δ, every step the whole prompts through the whole model
  with the blocks above the edited one checkpointed, one request at a time (``v_solver="adam"``,
  ``v_reuse_prefix=False``, ``checkpoint_blocks=True``, ``v_batch_tokens=1``).
- ``new``: the hyperparameters' defaults (the same Adam steps on the tokens and blocks δ reaches, with the prefix and
  the lower blocks computed once, and the requests of a MEMIT batch optimized together in chunks).

Each case runs in a fresh subprocess, so its peak RSS is its own; the table shows the edit's increment over the RSS
right after loading the model. Times are also given in units of one forward+backward pass of the model over a fixed
16×32 token batch (all weights' gradients), measured in a subprocess of its own just before and just after the case
(the median of both): a machine that is busier, or faster, scales both alike. Key statistics are computed once (the
"stats" case, the one-off cost) into a `StatsCache` folder; edit timings include loading them, not computing them.
Cases run interleaved (baseline, then new, per size), so both see the same machine.

Facts are ZsRE records of ``../shared/data/editing`` in file order (a MEMIT batch of 1,000 adds generated CounterFact-
style requests beyond the 900 records). Efficacy is ZsRE's reliability: the teacher-forced token accuracy of the new
answer after the question (``evaluation.scoring.score_edits``); generalization is the same on the paraphrase.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_edit.py         # ROME x5, MEMIT 10, 100, 1000; both optimizers
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_edit.py --memit-sizes 10,100 --optimizers new
    .venv/bin/python scripts/bench_edit.py --model HuggingFaceTB/SmolLM2-360M-Instruct --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BOOLQ = SHARED / "tasks" / "boolq_dev.jsonl"
ZSRE = SHARED / "editing" / "zsre_eval.json"
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
OPTIMIZERS = {
    "baseline": {"v_solver": "adam", "v_reuse_prefix": False, "checkpoint_blocks": True, "v_batch_tokens": 1},
    "new": {},
}
UNIT_SHAPE = (16, 32)


def requests_for(n: int) -> list:
    """The first `n` ZsRE records as requests; beyond the file, generated counterfactual requests (seed 0)."""
    from hf_edit_patch.counterfactuals import generate_counterfactuals
    from hf_edit_patch.requests import EditRequest

    if not ZSRE.is_file():
        raise SystemExit(f"{ZSRE} is missing: the benchmark edits ZsRE records from ../shared/data")
    reqs = [EditRequest.from_zsre(r) for r in json.loads(ZSRE.read_text())][:n]
    if len(reqs) < n:
        reqs += generate_counterfactuals(n - len(reqs), seed=0)
    return reqs


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def load(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import hf_edit_patch as hep

    if args.model == DEFAULT_MODEL:
        model, tok = hep.load_default_model(device=args.device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device)
    model.eval()
    return model, tok


def stats_kwargs(args) -> dict:
    from hf_edit_patch.hub.stats_cache import StatsCache

    cache = StatsCache(args.stats_cache) if args.stats_cache else StatsCache()
    if BOOLQ.is_file():
        return {"stats_dataset": str(BOOLQ), "stats_text_field": "passage", "stats_cache": cache}
    return {"allow_model_sampled_stats": True, "stats_cache": cache}


def sync(args) -> None:
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def unit_seconds(model, args, repeats: int = 3) -> list[float]:
    """Seconds of one forward+backward pass (all weights' gradients) over a fixed 16×32 batch of token ids."""
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, UNIT_SHAPE, generator=gen).to(args.device)
    times = []
    for i in range(repeats + 1):
        sync(args)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync(args)
        if i:  # the first pass warms up
            times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return times


def instrument(args) -> dict[str, float]:
    """Wraps the stages of an edit (statistics, contexts, keys, value optimization, solve) with timers."""
    import hf_edit_patch.editing.inputs as editing
    from hf_edit_patch.editors import rome, spread

    spent: dict[str, float] = {}

    def timed(module, name: str, label: str) -> None:
        fn = getattr(module, name, None)
        if fn is None:
            return

        def wrapper(*a, **k):
            sync(args)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(args)
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

        setattr(module, name, wrapper)

    timed(editing, "get_second_moments", "statistics (cached load)")
    for mod in (rome, spread):
        timed(mod, "context_templates", "context sampling")
        timed(mod, "optimize_value", "value optimization")
        timed(mod, "optimize_values", "value optimization")
        timed(mod, "subject_key", "keys")
        timed(mod, "subject_activations", "keys")
        timed(mod, "input_output_at", "keys")
        timed(mod, "solve_left", "C^-1 k solve")
    return spent


def run_case(args) -> dict:
    """Runs one case in this process and returns its measurements."""
    t0 = time.perf_counter()
    model, tok = load(args)
    out = {"case": args.one_case, "load_s": time.perf_counter() - t0, "rss_after_load_mb": rss_now_mb()}
    import hf_edit_patch as hep
    from hf_edit_patch.editing.statistics import get_second_moments
    from hf_edit_patch.editors import memit, rome
    from hf_edit_patch.editors.architectures import get_arch
    from hf_edit_patch.editors.hparams import MemitHParams, RomeHParams
    from hf_edit_patch.editors.layers import default_rome_layer
    from hf_edit_patch.evaluation.scoring import score_edits

    skw = stats_kwargs(args)
    mom2 = {"mom2_n_samples": args.mom2_n_samples} if args.mom2_n_samples else {}
    spec = get_arch(model)
    out["baseline_rss_mb"] = peak_rss_mb()
    if args.one_case == "stats":
        rome_hp = RomeHParams(**mom2)
        rome_hp.layer = default_rome_layer(model, spec)
        memit_hp = MemitHParams(**mom2)
        memit_hp.layers = memit.edited_layers(model, memit_hp, spec)
        names = sorted(set(rome.target_modules(model, rome_hp, spec) + memit.target_modules(model, memit_hp, spec)))
        t = time.perf_counter()
        get_second_moments(
            model,
            tok,
            names,
            stats_dataset=skw.get("stats_dataset"),
            text_field=skw.get("stats_text_field", "text"),
            sample_count=rome_hp.mom2_n_samples,
            max_length=rome_hp.mom2_max_length,
            cache=skw["stats_cache"],
            allow_model_sampled=skw.get("allow_model_sampled_stats", False),
            show_progress=False,
        )
        out.update(times=[time.perf_counter() - t], modules=names, n=len(names))
        out["source"] = skw.get("stats_dataset", "model-sampled text")
        out["peak_rss_mb"] = peak_rss_mb()
        return out
    if args.one_case == "unit":
        out["unit_times"] = unit_seconds(model, args)
        return out
    size, optimizer = args.one_case.split(":")
    method, _, n = size.partition("-")
    hparams = {**mom2, **OPTIMIZERS[optimizer]}
    if method == "rome":
        batches = [[r] for r in requests_for(args.rome_facts)]
    else:
        batches = [requests_for(int(n))]
    spent = instrument(args)
    times, scores = [], []
    for reqs in batches:
        sync(args)
        t = time.perf_counter()
        patch = hep.edit(model, tok, reqs, method=method, hparams=hparams, keep_ratio=None, show_progress=False, **skw)
        sync(args)
        times.append(time.perf_counter() - t)
        pm = hep.PatchedModel.from_pretrained(model, patch)
        scores.append(score_edits(pm, tok, reqs, batch_size=32))
        pm.unload()
    out["peak_rss_mb"] = peak_rss_mb()
    weight = [len(b) for b in batches]
    for key in ("reliability", "generalization"):
        vals = [(s[key], w) for s, w in zip(scores, weight, strict=True) if s[key] is not None]
        out[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals) if vals else None
    out.update(times=times, n=len(batches[0]), optimizer=optimizer)
    out["stages_s"] = {k: v / len(batches) for k, v in spent.items()}
    if args.device.startswith("cuda"):
        import torch

        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def subprocess_case(args, case: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--one-case",
        case,
        "--model",
        args.model,
        "--device",
        args.device,
    ]
    cmd += ["--threads", str(args.threads), "--rome-facts", str(args.rome_facts)]
    if args.stats_cache:
        cmd += ["--stats-cache", str(args.stats_cache)]
    if args.mom2_n_samples:
        cmd += ["--mom2-n-samples", str(args.mom2_n_samples)]
    print(f"# running {case} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"case {case} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"# {case}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def timed_case(args, case: str) -> dict:
    """`case` between two measurements of the fwd+bwd unit, each in its own subprocess (so that the unit's memory
    does not count towards the case's peak); the case's unit is the median of both."""
    before = subprocess_case(args, "unit")["unit_times"]
    result = subprocess_case(args, case)
    after = subprocess_case(args, "unit")["unit_times"]
    result["unit_s"] = statistics.median(before + after)
    return result


def per_fact(r: dict) -> float:
    """Seconds per fact: the median edit for ROME (one fact each), the batch over its size for MEMIT."""
    med = statistics.median(r["times"])
    return med if r["case"].startswith("rome") else med / r["n"]


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[dict], skipped: list[str]) -> str:
    rows = [
        "| case | optimizer | facts | time per edit or batch | per fact | per fact, fwd+bwd units | reliability "
        "| generalization | peak RSS (increment) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        inc = r["peak_rss_mb"] - r["rss_after_load_mb"]
        peak = f"{r['peak_rss_mb'] / 1024:.2f} GB ({inc:+.0f} MB)"
        if "cuda_peak_mb" in r:
            peak += f", GPU {r['cuda_peak_mb'] / 1024:.2f} GB"
        if r["case"] == "stats":
            rows.append(
                f"| key statistics, one-off ({r['n']} modules) | - | - | {r['times'][0]:.0f} s | | | | | {peak} |"
            )
            continue
        size = r["case"].split(":")[0]
        spread = f" ({min(r['times']):.1f}-{max(r['times']):.1f})" if len(r["times"]) > 1 else ""
        rows.append(
            f"| {size} | {r['optimizer']} | {r['n'] if size.startswith('memit') else len(r['times'])} "
            f"| {statistics.median(r['times']):.1f} s{spread} | {per_fact(r):.2f} s | {per_fact(r) / r['unit_s']:.1f} "
            f"| {fmt(r['reliability'])} | {fmt(r['generalization'])} | {peak} |"
        )
    rows += [f"| {s} | | | skipped | | | | | |" for s in skipped]
    return "\n".join(rows)


def ratios(results: list[dict]) -> list[str]:
    """new / baseline time per fact, side by side. A MEMIT size whose baseline was skipped is compared with the largest
    MEMIT baseline measured: the baseline optimizes requests one at a time, so its cost per fact does not depend on
    the batch size."""
    by = {(r["case"].split(":")[0], r.get("optimizer")): r for r in results}
    memit_baselines = sorted(
        (r["n"], r) for (size, o), r in by.items() if o == "baseline" and size.startswith("memit")
    )
    lines = []
    for (size, optimizer), new in by.items():
        if optimizer != "new":
            continue
        base, note = by.get((size, "baseline")), ""
        if base is None and size.startswith("memit") and memit_baselines:
            base = memit_baselines[-1][1]
            note = f" (baseline per fact from {base['case'].split(':')[0]})"
        if base is None:
            continue
        t_new, t_base = per_fact(new) / new["unit_s"], per_fact(base) / base["unit_s"]
        lines.append(
            f"- {size}: new / baseline time per fact = {t_new / t_base:.2f} in fwd+bwd units "
            f"({per_fact(new) / per_fact(base):.2f} in seconds){note}; reliability {fmt(new['reliability'])} vs "
            f"{fmt(base['reliability'])}, generalization {fmt(new['generalization'])} vs {fmt(base['generalization'])}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model id (default: %(default)s, loaded offline)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--optimizers", default="baseline,new", help="comma separated: baseline, new (default: both)")
    p.add_argument("--rome-facts", type=int, default=5, help="ROME edits, one fact each (default: %(default)s)")
    p.add_argument("--memit-sizes", default="10,100,1000", help="MEMIT batch sizes, comma separated ('' for none)")
    p.add_argument("--stats-cache", default=None, help="StatsCache folder (default: hf_edit_patch cache)")
    p.add_argument("--mom2-n-samples", type=int, default=None, help="texts for the key statistics (default: hparams)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-rome", action="store_true", help="skip the ROME cases")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=1800.0,
        help="skip a MEMIT case whose time, extrapolated linearly from the previous size with the same optimizer, "
        "exceeds this (default: %(default)s)",
    )
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--one-case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one_case:
        print(json.dumps(run_case(args)))
        return
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
        raise SystemExit(f"unknown optimizers {unknown}; accepted: {sorted(OPTIMIZERS)}")

    results, skipped = [subprocess_case(args, "stats")], []
    if not args.no_rome:
        results += [timed_case(args, f"rome:{o}") for o in optimizers]
    previous: dict[str, dict] = {}
    for size in sorted(int(s) for s in args.memit_sizes.split(",") if s.strip()):
        for o in optimizers:
            prev = previous.get(o)
            if prev is not None:
                estimate = statistics.median(prev["times"]) * size / prev["n"]
                if estimate > args.max_seconds:
                    skipped.append(f"memit-{size}, {o} (estimated {estimate:.0f} s from memit-{prev['n']})")
                    continue
            previous[o] = timed_case(args, f"memit-{size}:{o}")
            results.append(previous[o])

    unit = statistics.median(r["unit_s"] for r in results if "unit_s" in r)
    print(f"model {args.model} on {args.device}; statistics: {results[0]['source']}")
    print(
        f"one forward+backward pass over {UNIT_SHAPE[0]}x{UNIT_SHAPE[1]} tokens: {unit * 1000:.0f} ms "
        "(median over the cases)"
    )
    print(f"RSS after loading the model: {results[0]['rss_after_load_mb'] / 1024:.2f} GB\n")
    print(table(results, skipped))
    print()
    print("\n".join(ratios(results)))
    for r in results:
        if r.get("stages_s"):
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(r["stages_s"].items(), key=lambda kv: -kv[1]))
            print(f"- {r['case']} time per edit or batch by stage: {stages}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
