"""Time, peak memory and efficacy of ROME edits and MEMIT batches (SmolLM2-135M-Instruct on CPU by default).

Each case runs in a fresh subprocess, so its peak RSS (``resource.getrusage(...).ru_maxrss``) is its own; the RSS
right after loading the model is reported too, and the table shows the edit's increment over it. The key
statistics are computed once (a separate "stats" case, timed as the one-off cost) into a `StatsCache` folder, and
the edit timings are warm: they include loading the cached statistics, not computing them.

Efficacy is CounterFact's: after the edit, the new target beats the old one by mean token log-probability on the
edit's own prompt. Facts are capitals of countries (and the Eiffel Tower); MEMIT batches use distinct subjects,
and batches larger than the set of facts the model knows use further countries whose capital the model may not
know (the "known before" column counts those where the true capital beat the new target before the edit).

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_edit.py                  # ROME x3, MEMIT 10 and 100
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_edit.py --memit-sizes 10 --mom2-n-samples 300 \
        --stats-cache /tmp/bench_stats
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

BOOLQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "boolq_dev.jsonl"
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Capitals SmolLM2-135M-Instruct states correctly (tests/test_integration_editors.py), first; then more countries.
KNOWN = [
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
MORE = [
    ("Egypt", "Cairo"), ("England", "London"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Czechia", "Prague"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Jordan", "Amman"),
    ("Saudi Arabia", "Riyadh"), ("India", "Delhi"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("South Korea", "Seoul"), ("North Korea", "Pyongyang"),
    ("Mongolia", "Ulaanbaatar"), ("Afghanistan", "Kabul"), ("Kenya", "Nairobi"), ("Ethiopia", "Addis Ababa"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Morocco", "Rabat"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Libya", "Tripoli"), ("Sudan", "Khartoum"),
    ("Uganda", "Kampala"), ("Tanzania", "Dodoma"), ("Zimbabwe", "Harare"), ("Angola", "Luanda"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Bolivia", "La Paz"), ("Uruguay", "Montevideo"),
    ("Paraguay", "Asuncion"), ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Jamaica", "Kingston"),
    ("Brazil", "Brasilia"), ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Albania", "Tirana"), ("Iceland", "Reykjavik"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Belarus", "Minsk"),
    ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"), ("Kazakhstan", "Astana"),
    ("Uzbekistan", "Tashkent"), ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"),
    ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"), ("Myanmar", "Naypyidaw"), ("Sri Lanka", "Colombo"),
    ("Qatar", "Doha"), ("Kuwait", "Kuwait City"), ("Oman", "Muscat"), ("Yemen", "Sanaa"),
    ("Israel", "Jerusalem"),
]  # fmt: skip
FACTS = KNOWN + MORE
EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
BASELINE_TEXT = (
    "Baseline (../shared/BENCHMARKS.md; EasyEdit on SmolLM2-135M, measured at another time on a machine like "
    "this one, not in this run): ROME median 27.2 s per edit (warm), 2.2 GB peak RSS, efficacy 5/5; MEMIT batch "
    "of 5 facts 59.3 s, efficacy 4/5, 2.8 GB peak."
)
EASYEDIT = {"rome": (27.2, 2.2), "memit": (59.3, 2.8)}


def capital_requests(n: int) -> list[dict]:
    """`n` capital-of requests with distinct subjects; each gets the capital of the next country of its block."""
    if n > len(FACTS):
        raise SystemExit(f"at most {len(FACTS)} distinct subjects are available, asked for {n}")
    facts = FACTS[:n]
    block = len(KNOWN) if n > len(KNOWN) else n  # targets cycle within blocks of 10 countries
    reqs = []
    for i, (country, capital) in enumerate(facts):
        start = (i // block) * block
        size = min(block, n - start)
        new = facts[start + (i - start + 1) % size][1] if size > 1 else facts[(i + 1) % n][1]
        reqs.append({"prompt": "The capital of {} is", "subject": country, "target_new": new, "target_true": capital})
    return [r for r in reqs if r["target_new"] != r["target_true"]]


def rome_requests(count: int) -> list[dict]:
    """One single-fact request per repeat: the Eiffel Tower, then capitals."""
    return [EIFFEL, *capital_requests(10)][:count]


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def load(args):
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
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


def new_beats_old(model, tok, req: dict) -> bool:
    from hf_edit_patch.editors.prompts import target_logprob

    text = req["prompt"].format(req["subject"])
    return target_logprob(model, tok, text, req["target_new"]) > target_logprob(model, tok, text, req["target_true"])


def sync(args) -> None:
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def instrument(args) -> dict[str, float]:
    """Wraps the stages of an edit (statistics, contexts, keys, value optimization, solve) with timers."""
    import hf_edit_patch.editing.inputs as editing
    from hf_edit_patch.editors import prompts, rome, spread

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
    timed(prompts, "keys_at", "keys")
    for mod in (rome, spread):
        timed(mod, "context_templates", "context sampling")
        timed(mod, "optimize_value", "value optimization")
        timed(mod, "input_output_at", "keys")
        timed(mod, "solve_left", "C^-1 k solve")
    return spent


def run_case(args) -> dict:
    """Runs one case in this process and returns its measurements."""
    t0 = time.perf_counter()
    model, tok = load(args)
    out = {"case": args.one_case, "load_s": time.perf_counter() - t0, "baseline_rss_mb": peak_rss_mb()}
    out["rss_after_load_mb"] = rss_now_mb()
    import hf_edit_patch as hep
    from hf_edit_patch.editing.statistics import get_second_moments
    from hf_edit_patch.editors import memit, rome
    from hf_edit_patch.editors.architectures import get_arch
    from hf_edit_patch.editors.hparams import MemitHParams, RomeHParams
    from hf_edit_patch.editors.layers import default_rome_layer

    skw = stats_kwargs(args)
    mom2 = {"mom2_n_samples": args.mom2_n_samples} if args.mom2_n_samples else {}
    spec = get_arch(model)
    if args.one_case == "stats":
        rome_hp = RomeHParams(**mom2)
        rome_hp.layer = default_rome_layer(model, spec)
        memit_hp = MemitHParams(**mom2)
        memit_hp.layers = memit.edited_layers(model, memit_hp, spec)
        names = rome.target_modules(model, rome_hp, spec) + memit.target_modules(model, memit_hp, spec)
        names = sorted(set(names))
        cache = skw["stats_cache"]
        cached_before = len(list(Path(cache.cache_dir).glob("*.safetensors")))
        t = time.perf_counter()
        get_second_moments(
            model,
            tok,
            names,
            stats_dataset=skw.get("stats_dataset"),
            text_field=skw.get("stats_text_field", "text"),
            sample_count=rome_hp.mom2_n_samples,
            max_length=rome_hp.mom2_max_length,
            cache=cache,
            allow_model_sampled=skw.get("allow_model_sampled_stats", False),
            show_progress=False,
        )
        out.update(times=[time.perf_counter() - t], modules=names, n=len(names), files_before=cached_before)
        out["source"] = skw.get("stats_dataset", "model-sampled text")
    else:
        method, _, size = args.one_case.partition("-")
        if method == "rome":
            batches = [[r] for r in rome_requests(args.repeats)]
        else:
            batches = [capital_requests(int(size))] * args.repeats
        spent = instrument(args)
        times, wins, known, total = [], 0, 0, 0
        for reqs in batches:
            known += sum(not new_beats_old(model, tok, r) for r in reqs)
            sync(args)
            t = time.perf_counter()
            patch = hep.edit(model, tok, reqs, method=method, hparams=mom2 or None, show_progress=False, **skw)
            sync(args)
            times.append(time.perf_counter() - t)
            pm = hep.PatchedModel.from_pretrained(model, patch)
            wins += sum(new_beats_old(pm, tok, r) for r in reqs)
            total += len(reqs)
            pm.unload()
        out.update(times=times, wins=wins, total=total, known_before=known, n=len(batches[0]))
        out["stages_s"] = {k: v / len(batches) for k, v in spent.items()}
    out["peak_rss_mb"] = peak_rss_mb()
    if args.device.startswith("cuda"):
        import torch

        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def subprocess_case(args, case: str, repeats: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one-case", case, "--repeats", str(repeats)]
    cmd += ["--model", args.model, "--device", args.device, "--threads", str(args.threads)]
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
    print(f"# {case}: {result}", file=sys.stderr, flush=True)
    return result


def fmt_times(times: list[float]) -> str:
    med = statistics.median(times)
    return f"{med:.1f} s" if len(times) == 1 else f"{med:.1f} s ({min(times):.1f}-{max(times):.1f})"


def table(results: list[dict], skipped: list[str]) -> str:
    rows = [
        "| case | n requests | time, median (min-max) | efficacy (new beats old) | known before | peak RSS "
        "| RSS increment |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        inc = r["peak_rss_mb"] - r["baseline_rss_mb"]
        if r["case"] == "stats":
            eff, known = "-", "-"
            name = f"key statistics, one-off ({r['n']} modules)"
        else:
            eff, known = f"{r['wins']}/{r['total']}", f"{r['known_before']}/{r['total']}"
            name = f"{r['case']} ({len(r['times'])} run{'s' if len(r['times']) > 1 else ''}, warm)"
        peak = f"{r['peak_rss_mb'] / 1024:.2f} GB"
        if "cuda_peak_mb" in r:
            peak += f" (GPU {r['cuda_peak_mb'] / 1024:.2f} GB)"
        rows.append(f"| {name} | {r['n']} | {fmt_times(r['times'])} | {eff} | {known} | {peak} | {inc:.0f} MB |")
    for s in skipped:
        rows.append(f"| {s} | | skipped | | | | |")
    return "\n".join(rows)


def ratios(results: list[dict]) -> str:
    lines = []
    for r in results:
        method = r["case"].split("-")[0]
        if method not in EASYEDIT:
            continue
        t_ref, m_ref = EASYEDIT[method]
        med = statistics.median(r["times"])
        ref = "ROME per edit" if method == "rome" else "MEMIT 5-fact batch"
        lines.append(
            f"- {r['case']}: time {med:.1f} s vs EasyEdit {ref} {t_ref} s = {med / t_ref:.2f}x; "
            f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB vs {m_ref} GB = {r['peak_rss_mb'] / 1024 / m_ref:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model id (default: %(default)s, loaded offline)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--memit-sizes", default="10,100", help="MEMIT batch sizes, comma separated ('' for none)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per case (default: 3 for ROME, 1 for MEMIT)")
    p.add_argument("--stats-cache", default=None, help="StatsCache folder (default: hf_edit_patch cache)")
    p.add_argument("--mom2-n-samples", type=int, default=None, help="texts for the key statistics (default: hparams)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-rome", action="store_true", help="skip the ROME case")
    p.add_argument(
        "--max-memit-seconds",
        type=float,
        default=480.0,
        help="skip a MEMIT size whose time, extrapolated linearly from the previous size, exceeds this",
    )
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--one-case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one_case:
        args.repeats = args.repeats or (3 if args.one_case == "rome" else 1)
        print(json.dumps(run_case(args)))
        return

    results, skipped = [subprocess_case(args, "stats", 1)], []
    if not args.no_rome:
        results.append(subprocess_case(args, "rome", args.repeats or 3))
    prev = None
    for size in sorted(int(s) for s in args.memit_sizes.split(",") if s.strip()):
        if prev is not None:
            estimate = statistics.median(prev["times"]) * size / prev["n"]
            if estimate > args.max_memit_seconds:
                skipped.append(f"memit-{size} (estimated {estimate:.0f} s from memit-{prev['n']})")
                continue
        prev = subprocess_case(args, f"memit-{size}", args.repeats or 1)
        results.append(prev)

    print(f"model {args.model} on {args.device}; statistics: {results[0]['source']}")
    print(f"baseline RSS after loading the model: {results[0]['baseline_rss_mb'] / 1024:.2f} GB\n")
    print(table(results, skipped))
    print()
    print(BASELINE_TEXT)
    print(ratios(results))
    for r in results:
        if "stages_s" in r:
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(r["stages_s"].items(), key=lambda kv: -kv[1]))
            print(f"- {r['case']} time per run by stage: {stages}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
