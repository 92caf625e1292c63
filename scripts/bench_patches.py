"""Benchmark (not a test) of edit-patch sizes and of save/load/attach/detach times; prints markdown tables.

Cases (each with a dense random ΔW = randn · 1e-2 per module, sparsified by `EditPatch.from_deltas(...,
regularizer="rect")` at every keep ratio; values in float16 by the "auto" value dtype):

* `smollm2-down_proj`: SmolLM2-135M's 30 `down_proj` matrices, `nn.Linear(1536, 576)` (weight 576×1536), with
  random float32 weights (no download), or the real model's weights with `--model PATH_OR_ID` (`--model default`
  loads `hf_edit_patch.load_default_model()`);
* `llama7b-down_proj`: one LLaMA-7B-shaped `down_proj`, `nn.Linear(11008, 4096)`, with random float32 weights.

Reported per (case, keep): nnz; bytes per weight element of each exact encoding (coo, bitmask, csr) next to a
dense fp16 ΔW (2.0), the encoding `save_pretrained` chooses and the size of `patch_model.safetensors`; the time of
`from_deltas` (RECT selection, fingerprints included), `save_pretrained`, `from_pretrained`, attach
(`PatchedModel.add_patch`, whose fingerprint check is timed on its own too), exact detach (`remove_patch`) and,
as the baseline, one plain `weight.view(-1).index_put_((flat,), values)` of the same entries. Each time is the
median of `--repeats` runs after one warm-up run. After every detach the weights are compared with a clone taken
before (`torch.equal`), and the loaded patch with the saved one.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_patches.py
    .venv/bin/python scripts/bench_patches.py --cases llama7b --keep 0.4 --repeats 3 --threads 2 --json bench.json
    .venv/bin/python scripts/bench_patches.py --cases smollm2 --model default   # real SmolLM2-135M-Instruct weights
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import hf_edit_patch as hep
from hf_edit_patch.patch import encoding as storage
from hf_edit_patch.patch.config import ENCODINGS, WEIGHTS_NAME

SMOLLM2_SHAPE = (576, 1536)  # nn.Linear layout [out, in]
SMOLLM2_LAYERS = 30
LLAMA7B_SHAPE = (4096, 11008)
DELTA_SCALE = 1e-2
WEIGHT_STD = 0.02
DENSE_FP16_BYTES = 2.0

TARGET_KEEP = 0.4
TARGET_BYTES_PER_ELEMENT = 1.0  # half of a dense fp16 ΔW
TARGET_ATTACH_DETACH_S = 0.3  # the 4096×11008 patch
TARGET_THREADS = 2
CONTENTION_WARN = 0.10  # warn when other processes used more than this share of the CPUs during the run

CASE_NAMES = {"smollm2": "smollm2-down_proj", "llama7b": "llama7b-down_proj"}


@dataclass
class Case:
    name: str
    model: nn.Module
    modules: list[str]
    weights_desc: str
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)


def _random_down_proj_model(n_layers: int, shape: tuple[int, int], gen: torch.Generator) -> nn.Module:
    """A bare module tree with `model.layers.{i}.mlp.down_proj` = `nn.Linear(in, out, bias=False)`, random weights."""
    out_features, in_features = shape
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList()
    for _ in range(n_layers):
        layer = nn.Module()
        layer.mlp = nn.Module()
        layer.mlp.down_proj = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)
        with torch.no_grad():
            layer.mlp.down_proj.weight.normal_(0.0, WEIGHT_STD, generator=gen)
        root.model.layers.append(layer)
    return root.eval()


def _names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith("mlp.down_proj") and isinstance(m, nn.Linear)]


def build_case(key: str, model_spec: str | None, gen: torch.Generator) -> Case:
    if key == "smollm2" and model_spec:
        model, _ = hep.load_default_model(None if model_spec == "default" else model_spec)
        modules = _names(model)
        if not modules:
            raise SystemExit(f"--model {model_spec}: no '*.mlp.down_proj' nn.Linear modules found")
        w = model.get_submodule(modules[0]).weight
        desc = f"{model_spec} ({len(modules)}× {list(w.shape)} {storage.dtype_name(w.dtype)})"
    elif key == "smollm2":
        model = _random_down_proj_model(SMOLLM2_LAYERS, SMOLLM2_SHAPE, gen)
        modules = _names(model)
        desc = f"random ({SMOLLM2_LAYERS}× {list(SMOLLM2_SHAPE)} float32)"
    elif key == "llama7b":
        model = _random_down_proj_model(1, LLAMA7B_SHAPE, gen)
        modules = _names(model)
        desc = f"random (1× {list(LLAMA7B_SHAPE)} float32)"
    else:
        raise SystemExit(f"unknown case {key!r}; accepted: {sorted(CASE_NAMES)}")
    case = Case(CASE_NAMES[key], model, modules, desc)
    for name in modules:
        shape = tuple(model.get_submodule(name).weight.shape)
        case.deltas[name] = torch.randn(shape, generator=gen) * DELTA_SCALE
    return case


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median seconds of `repeats` calls after one warm-up call; also the samples and the last result."""
    result = fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples, result


def bench(case: Case, keep: float, repeats: int, tmp_root: str) -> dict[str, Any]:
    weights = {n: case.model.get_submodule(n).weight for n in case.modules}
    numel = sum(w.numel() for w in weights.values())
    res: dict[str, Any] = {"case": case.name, "weights": case.weights_desc, "keep": keep, "modules": len(weights)}
    res["numel"] = numel
    times: dict[str, list[float]] = {}

    # ---- build (RECT selection, value dtype choice, fingerprints)
    def build() -> hep.EditPatch:
        return hep.EditPatch.from_deltas(
            case.deltas, case.model, keep_ratio=keep, regularizer="rect", show_progress=False
        )

    res["from_deltas_s"], times["from_deltas"], patch = _median_time(build, repeats)
    deltas = patch.deltas
    res["nnz"] = patch.nnz
    res["value_dtype"] = patch.config.value_dtype

    # ---- sizes
    for enc in ENCODINGS:
        res[f"bytes_per_elem_{enc}"] = sum(storage.encoded_nbytes(d, enc) for d in deltas.values()) / numel
    res["bytes_per_elem_dense_fp16"] = DENSE_FP16_BYTES
    counts = Counter(patch.encodings().values())
    res["encoding"] = ",".join(enc if n == len(deltas) else f"{enc}×{n}" for enc, n in sorted(counts.items()))
    res["bytes_per_elem_chosen"] = patch.nbytes() / numel

    # ---- save / load
    saves = iter(range(repeats + 1))
    folders: list[str] = []

    def save() -> None:
        folder = os.path.join(tmp_root, f"{case.name}-{keep}-{next(saves)}")
        patch.save_pretrained(folder)
        folders.append(folder)

    res["save_s"], times["save"], _ = _median_time(save, repeats)
    folder = folders[-1]
    res["file_bytes"] = os.path.getsize(os.path.join(folder, WEIGHTS_NAME))
    res["file_bytes_per_elem"] = res["file_bytes"] / numel
    res["load_s"], times["load"], loaded = _median_time(lambda: hep.EditPatch.from_pretrained(folder), repeats)
    res["roundtrip_exact"] = set(loaded.deltas) == set(deltas) and all(
        loaded.deltas[n].equal(d) for n, d in deltas.items()
    )
    del loaded
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)

    # ---- fingerprint of the target weights (the check that attach runs)
    res["fingerprint_s"], times["fingerprint"], _ = _median_time(
        lambda: [storage.fingerprint(w) for w in weights.values()], repeats
    )

    # ---- attach / detach on the model itself
    before = {n: w.detach().clone() for n, w in weights.items()}
    pm = hep.PatchedModel(case.model)
    attach_t, detach_t = [], []
    attach_ok = detach_exact = True
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        pm.add_patch(patch, "bench", strict=True)
        t1 = time.perf_counter()
        if i == 0:  # the warm-up checks that the patch went in: W[idx] = cast(f32(W[idx]) + f32(ΔW))
            for n, d in deltas.items():
                flat, w = d.flat_indices, weights[n].detach()
                expect = (before[n].view(-1)[flat].float() + d.values.float()).to(w.dtype)
                attach_ok &= torch.equal(w.view(-1)[flat], expect)
        t2 = time.perf_counter()
        pm.remove_patch("bench")
        t3 = time.perf_counter()
        detach_exact &= all(torch.equal(w.detach(), before[n]) for n, w in weights.items())
        if i:
            attach_t.append(t1 - t0)
            detach_t.append(t3 - t2)
    pm.unload()
    times["attach"], times["detach"] = attach_t, detach_t
    res["attach_s"], res["detach_s"] = statistics.median(attach_t), statistics.median(detach_t)
    res["attach_detach_s"] = statistics.median(a + d for a, d in zip(attach_t, detach_t, strict=True))
    res["attach_ok"], res["detach_exact"] = bool(attach_ok), bool(detach_exact)

    # ---- baseline: one plain index_put_ of the same entries (on clones, values already in the weight dtype)
    targets = {n: b.clone() for n, b in before.items()}
    puts = [(targets[n].view(-1), d.flat_indices, d.values.to(targets[n].dtype)) for n, d in deltas.items()]

    def index_put() -> None:
        for flat_w, flat, values in puts:
            flat_w.index_put_((flat,), values)

    res["index_put_s"], times["index_put"], _ = _median_time(index_put, repeats)
    res["ratio_vs_index_put"] = res["attach_detach_s"] / res["index_put_s"]
    res["times_s"] = times
    return res


# ---------------------------------------------------------------------- report
def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def environment(repeats: int) -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "torch": torch.__version__,
        "hf_edit_patch": hep.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "repeats": repeats,
    }


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall, CPU seconds busy on the whole machine, CPU seconds of this process), or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, own.user + own.system


def _others_share(start: tuple[float, float, float] | None) -> float | None:
    """Fraction of the machine's CPU capacity used by other processes (and the hypervisor) since `start`."""
    end = _cpu_seconds()
    if start is None or end is None or end[0] <= start[0]:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, others / ((end[0] - start[0]) * (os.cpu_count() or 1)))


def report(env: dict[str, Any], results: list[dict[str, Any]]) -> str:
    out = [
        f"torch {env['torch']}, hf_edit_patch {env['hf_edit_patch']}, Python {env['python']}, {env['platform']}",
        f"torch threads: {env['torch_threads']}, CPUs: {env['cpu_count']} (usable: {env['cpus_usable']}), "
        f"times: median of {env['repeats']} after 1 warm-up",
    ]
    share = env.get("others_cpu_share")
    if share is not None:
        out.append(f"CPU used by other processes during the run: {share:.0%} of the machine")
    if share is not None and share > CONTENTION_WARN:
        out.append(
            "WARNING: other processes competed for the CPUs (see the 'others' column); with torch threads "
            "competing for cores, times can be inflated several-fold and are noisy: rerun on an idle machine"
        )
    out.append("")
    cases = {r["case"]: r["weights"] for r in results}
    out += [f"- `{c}`: {w}" for c, w in cases.items()] + [""]
    out.append("### Size (bytes per weight element)")
    out.append("")
    header = ["case", "keep", "nnz", "values"]
    header += [*ENCODINGS, "dense fp16 ΔW", "chosen", "chosen B/el", "file B/el", "file MB"]
    rows = []
    for r in results:
        rows.append(
            [r["case"], f"{r['keep']:g}", f"{r['nnz']:,}", r["value_dtype"]]
            + [f"{r[f'bytes_per_elem_{enc}']:.3f}" for enc in ENCODINGS]
            + [f"{r['bytes_per_elem_dense_fp16']:.3f}", r["encoding"], f"{r['bytes_per_elem_chosen']:.3f}"]
            + [f"{r['file_bytes_per_elem']:.3f}", f"{r['file_bytes'] / 1e6:.2f}"]
        )
    out += [_table(header, rows), ""]
    out.append("### Time (ms)")
    out.append("")
    header = ["case", "keep", "from_deltas (RECT)", "save", "load", "attach", "of which fingerprint", "detach"]
    header += ["attach+detach", "index_put_", "(attach+detach)/index_put_", "load==save", "detach exact", "others"]
    rows = []
    for r in results:
        rows.append(
            [r["case"], f"{r['keep']:g}", _ms(r["from_deltas_s"]), _ms(r["save_s"]), _ms(r["load_s"])]
            + [_ms(r["attach_s"]), _ms(r["fingerprint_s"]), _ms(r["detach_s"]), _ms(r["attach_detach_s"])]
            + [_ms(r["index_put_s"]), f"{r['ratio_vs_index_put']:.1f}×"]
            + ["OK" if r["roundtrip_exact"] else "FAIL"]
            + ["OK" if r["detach_exact"] and r["attach_ok"] else "FAIL"]
            + [_pct(r.get("others_cpu_share"))]
        )
    out += [_table(header, rows), ""]
    out += targets(env, results)
    return "\n".join(out)


def targets(env: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    out = ["### Targets", ""]
    size_rows = [r for r in results if r["keep"] == TARGET_KEEP]
    if not size_rows:
        out.append(f"- size at keep {TARGET_KEEP}: not measured (add {TARGET_KEEP} to --keep)")
    for r in size_rows:
        ok = r["bytes_per_elem_chosen"] <= TARGET_BYTES_PER_ELEMENT
        out.append(
            f"- {r['case']}, keep {TARGET_KEEP}: {r['bytes_per_elem_chosen']:.3f} B/weight element ({r['encoding']}) "
            f"≤ {TARGET_BYTES_PER_ELEMENT:.1f} (half of dense fp16 ΔW): {'MET' if ok else 'NOT MET'}"
        )
    llama = [r for r in results if r["case"] == CASE_NAMES["llama7b"]]
    if not llama:
        out.append("- attach + detach of the 4096×11008 patch: not measured (add llama7b to --cases)")
    threads = env["torch_threads"]
    note = (
        "" if threads == TARGET_THREADS else f" (measured with {threads} threads, the target is for {TARGET_THREADS})"
    )
    for r in llama:
        ok = r["attach_detach_s"] <= TARGET_ATTACH_DETACH_S
        out.append(
            f"- {r['case']}, keep {r['keep']:g}: attach + detach {r['attach_detach_s']:.3f} s "
            f"≤ {TARGET_ATTACH_DETACH_S} s on {TARGET_THREADS} CPU cores: {'MET' if ok else 'NOT MET'}{note}"
        )
    bad = [f"{r['case']}@{r['keep']:g}" for r in results if not (r["detach_exact"] and r["attach_ok"])]
    bad += [f"{r['case']}@{r['keep']:g} (load)" for r in results if not r["roundtrip_exact"]]
    verdict = "FAIL: " + ", ".join(bad) if bad else "OK"
    out.append(f"- exactness (attach values, bit-identical detach, load == save): {verdict}")
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _case_keys(text: str) -> list[str]:
    keys = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [k for k in keys if k not in CASE_NAMES]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown}; accepted: {','.join(CASE_NAMES)}")
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=_case_keys, default=list(CASE_NAMES), help="default: smollm2,llama7b")
    parser.add_argument("--keep", type=_floats, default=[0.2, 0.4], help="keep ratios (default: 0.2,0.4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--model", default=None, help="real model for the smollm2 case (path, Hub id or 'default')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and ΔW (default 0)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the raw results to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(args.repeats)

    run_start = _cpu_seconds()
    results = []
    gen = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_patches-") as tmp_root:
        for key in args.cases:
            t0 = time.perf_counter()
            case = build_case(key, args.model, gen)
            print(f"[{case.name}] built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            for keep in args.keep:
                t0 = time.perf_counter()
                start = _cpu_seconds()
                results.append(bench(case, keep, args.repeats, tmp_root))
                results[-1]["others_cpu_share"] = _others_share(start)
                print(f"[{case.name}] keep {keep:g}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            del case
            gc.collect()

    env["others_cpu_share"] = _others_share(run_start)
    print(report(env, results))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)
            f.write("\n")
    ok = all(r["detach_exact"] and r["attach_ok"] and r["roundtrip_exact"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
