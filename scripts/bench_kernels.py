"""Benchmark RECT selection and the sparse add against baselines measured in the same run.

First table, by kind of update: for each matrix shape (`--kind-sizes`: SmolLM2's MLP matrices and a 7B model's),
keep ratio, dtype and kind of ΔW that editors produce (rank-one u·vᵀ as ROME returns, rank-32 as MEMIT's batched
update, dense as fine-tuning), the seed (NumPy `abs(divide)` + `argpartition`, then ΔW's values at the kept
positions; 16-bit inputs are widened to float32 first, inside the timed call, since NumPy has no bfloat16 and would
rank float16 ratios rounded to float16) against `hep.rect_sparsify`, timed alternately (median of `--repeats` each,
four times as many below 2^22 entries) with their ratio; with `--load N`, the same again while N busy processes,
started and stopped by this script, load the cores.

Second table, on a random dense ΔW: the seed, `torch.topk`, a `torch.kthvalue` threshold, our reference path and,
on CUDA, the Triton kernels, with the speedup of each against the seed. On CUDA the achieved bandwidth is reported
against the bytes that must move (read ΔW and W once and write the kept entries; for the sparse add: read index,
value and weight entry, write the weight entry and the saved original).

Example:
    ```bash
    python scripts/bench_kernels.py --device cpu --keep 0.1,0.2,0.4 --dtypes float32,float16,bfloat16 --load 1
    python scripts/bench_kernels.py --kind-sizes 576x1536 --skip-methods   # the first table, small matrices only
    python scripts/bench_kernels.py --device cuda --sizes 4096x11008 --keep 0.4
    ```
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from hf_edit_patch.kernels import rect_select_reference as ref
from hf_edit_patch.kernels.sparse_add_reference import restore_reference_, sparse_add_reference_
from hf_edit_patch.regularizers.matrix import keep_count, rect_sparsify


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up, in seconds."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seed_numpy(delta: torch.Tensor, weight: torch.Tensor, k: int) -> np.ndarray:
    """The seed implementation: relative change, then argpartition over the flattened matrix."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(np.divide(delta.cpu().numpy(), weight.cpu().numpy()))
    return np.argpartition(ratio.ravel(), -k)[-k:]


def seed_numpy_values(delta: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed returning what a patch stores: the kept positions (in argpartition's order) and ΔW's values there.

    16-bit inputs are widened to float32 first (NumPy has no bfloat16), and the values are taken from the widened ΔW.
    """
    if delta.dtype != torch.float32 or weight.dtype != torch.float32:
        delta, weight = delta.float(), weight.float()
    idx = seed_numpy(delta, weight, k)
    return idx, np.take(delta.cpu().numpy().reshape(-1), idx)


def seed_numpy_entries(delta: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed plus what a patch needs from it: sorted kept positions and their ΔW values."""
    idx = seed_numpy(delta, weight, k)
    mask = np.zeros(delta.numel(), dtype=bool)
    mask[idx] = True
    flat = np.flatnonzero(mask)
    return flat, np.take(delta.cpu().numpy().reshape(-1), flat)


def torch_topk(delta: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk((delta / weight).abs().reshape(-1), k, sorted=False).indices


def torch_kthvalue(delta: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    ratio = (delta / weight).abs().reshape(-1)
    threshold = torch.kthvalue(ratio.cpu() if ratio.is_cuda else ratio, ratio.numel() - k + 1).values
    return torch.nonzero(ratio >= threshold.to(ratio.device)).flatten()


def selection_floor_bytes(numel: int, k: int, elem: int) -> int:
    return 2 * numel * elem + k * (8 + elem)


SELECTORS = {
    "seed (numpy argpartition)": seed_numpy,
    "seed + sorted kept entries": seed_numpy_entries,
    "torch.topk": torch_topk,
    "torch.kthvalue threshold": torch_kthvalue,
    "hf_edit_patch reference": ref.rect_select_reference,
    "hep.rect_sparsify (checks + SparseDelta)": lambda delta, weight, k: rect_sparsify(
        delta, weight, k / delta.numel()
    ),
}


def selection_inputs(shape, device):
    gen = torch.Generator().manual_seed(0)
    delta = (torch.randn(shape, generator=gen) * 1e-2).to(device)
    weight = torch.randn(shape, generator=gen).to(device)
    return delta, weight


DELTA_KINDS = ("rank1", "lowrank", "dense")
LOW_RANK = 32  # MEMIT spreads a batch over one layer's keys: a rank of about the batch size


def kind_inputs(
    shape, kind: str, device: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """W like a trained weight and a ΔW of the given kind, about 1% of W's scale, in `dtype`.

    rank1: u·vᵀ (ROME); lowrank: U·Vᵀ with `LOW_RANK` columns (MEMIT); dense: i.i.d. Gaussian (fine-tuning).
    """
    rows, cols = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen) * 0.02
    if kind == "dense":
        delta = torch.randn(shape, generator=gen)
    else:
        rank = 1 if kind == "rank1" else LOW_RANK
        delta = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen) / math.sqrt(rank)
    delta *= 2e-4 / float(delta.std())
    return delta.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)


@contextlib.contextmanager
def background_load(processes: int, seconds: float):
    """`processes` busy Python processes for the duration of the block; each also stops by itself after
    `seconds`, so none outlives a benchmark that is killed."""
    busy = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(processes)]
    try:
        time.sleep(0.2 if procs else 0.0)  # let them get going
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def bench_kinds(shape, keep, kind, device, repeats, load: int, dtype: torch.dtype = torch.float32) -> dict:
    """Seed and `rect_sparsify`, timed alternately after a warm-up each; their selections are checked equal."""
    delta, weight = kind_inputs(shape, kind, device, dtype)
    k = keep_count(keep, delta.numel())
    if delta.numel() < 1 << 22:
        repeats *= 4
    runs = {
        "seed": lambda: seed_numpy_values(delta, weight, k),
        "rect_sparsify": lambda: rect_sparsify(delta, weight, keep),
    }
    seed_idx, _ = runs["seed"]()
    ours = runs["rect_sparsify"]()
    if ours.nnz == k and not np.array_equal(np.sort(seed_idx), ours.flat_indices.cpu().numpy()):
        # the seed's ties are arbitrary: compare the kept scores instead of the positions
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.abs(delta.float().cpu().numpy() / weight.float().cpu().numpy()).ravel()
        if not np.array_equal(np.sort(score[seed_idx]), np.sort(score[ours.flat_indices.cpu().numpy()])):
            raise SystemExit(f"{kind} {shape}: rect_sparsify keeps other scores than the seed")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {
        "shape": f"{shape[0]}x{shape[1]}",
        "keep": keep,
        "kind": kind,
        "dtype": str(dtype).removeprefix("torch."),
        "load": load,
        **{name: statistics.median(t) for name, t in times.items()},
    }


def print_kinds_table(rows: list[dict]) -> None:
    print("| shape | keep | ΔW | dtype | busy processes | seed (ms) | rect_sparsify (ms) | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['keep']} | {r['kind']} | {r['dtype']} | {r['load']} | {r['seed'] * 1e3:.2f} | "
            f"{r['rect_sparsify'] * 1e3:.2f} | {r['seed'] / r['rect_sparsify']:.2f}x |"
        )


def first_call(method: str, shape, keep: float) -> float:
    """Time of the first call in this process: its large buffers are fresh memory, faulted in as they are touched."""
    fn = SELECTORS[method]
    delta, weight = selection_inputs(shape, "cpu")
    k = keep_count(keep, delta.numel())
    start = time.perf_counter()
    fn(delta, weight, k)
    return time.perf_counter() - start


def bench_first_calls(shape, keep, runs) -> list[dict]:
    """Each selector's first call in `runs` fresh processes (median): a one-off call on memory not yet reused."""
    rows = []
    for method in SELECTORS:
        times = []
        for _ in range(runs):
            out = subprocess.run(
                [sys.executable, __file__, "--first-call", method, f"{shape[0]}x{shape[1]}", str(keep)],
                check=True,
                capture_output=True,
                text=True,
            )
            times.append(float(out.stdout.strip().splitlines()[-1]))
        rows.append(
            {
                "op": "select, first call",
                "shape": f"{shape[0]}x{shape[1]}",
                "keep": keep,
                "method": method,
                "seconds": statistics.median(times),
                "gbps": 0.0,
            }
        )
    return rows


def bench_selection(shape, keep, device, repeats) -> list[dict]:
    delta, weight = selection_inputs(shape, device)
    k = keep_count(keep, delta.numel())
    rows = []
    methods: list[tuple[str, Callable[[], object]]] = [
        (name, lambda fn=fn: fn(delta, weight, k)) for name, fn in SELECTORS.items()
    ]
    if device == "cuda":
        from hf_edit_patch.kernels.rect_select import rect_select_triton

        methods.append(("hf_edit_patch triton", lambda: rect_select_triton(delta, weight, k)))
        want = ref.rect_select_reference(delta, weight, k)[0]
        got = rect_select_triton(delta, weight, k)[0]
        if not torch.equal(want, got):
            raise SystemExit("Triton selection differs from the reference: not benchmarking a wrong kernel")
    floor = selection_floor_bytes(delta.numel(), k, 4)
    for name, fn in methods:
        seconds = timed(fn, device, repeats)
        rows.append(
            {
                "op": "select",
                "shape": f"{shape[0]}x{shape[1]}",
                "keep": keep,
                "method": name,
                "seconds": seconds,
                "gbps": floor / seconds / 1e9,
            }
        )
    return rows


def bench_sparse_add(shape, keep, device, repeats) -> list[dict]:
    from hf_edit_patch.kernels import sparse_add as sa

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=gen).to(device)
    numel = weight.numel()
    k = keep_count(keep, numel)
    flat = torch.sort(torch.randperm(numel, generator=gen)[:k]).values.to(device)
    values = (torch.randn(k, generator=gen) * 1e-2).half().to(device)
    cast = values.to(weight.dtype)
    rows = []
    paths = [("index_put_ (baseline, no undo)", lambda: weight.view(-1).index_put_((flat,), cast))]

    def attach_detach(add, restore):
        def run():
            original = add(weight, flat, values)
            restore(weight, flat, original)

        return run

    paths.append(("reference add+restore", attach_detach(sparse_add_reference_, restore_reference_)))
    if device == "cuda":
        paths.append(("triton add+restore", attach_detach(sa.sparse_add_triton_, sa.restore_triton_)))
    floor = sa.sparse_add_bytes(k, weight.dtype, values.dtype) + sa.restore_bytes(k, weight.dtype)
    for name, fn in paths:
        seconds = timed(fn, device, repeats)
        rows.append(
            {
                "op": "sparse add",
                "shape": f"{shape[0]}x{shape[1]}",
                "keep": keep,
                "method": name,
                "seconds": seconds,
                "gbps": floor / seconds / 1e9,
            }
        )
    return rows


def print_table(rows: list[dict], device: str) -> None:
    columns = ["op", "shape", "keep", "method", "time (ms)", "speedup vs first row"]
    if device == "cuda":
        columns.append("GB/s (floor bytes)")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    base = {}
    for r in rows:
        key = (r["op"], r["shape"], r["keep"])
        base.setdefault(key, r["seconds"])
        line = (
            f"| {r['op']} | {r['shape']} | {r['keep']} | {r['method']} | {r['seconds'] * 1e3:.1f} | "
            f"{base[key] / r['seconds']:.2f}x |"
        )
        if device == "cuda":
            line += f" {r['gbps']:.0f} |"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", default="576x1536,1600x6400,4096x11008", help="shapes of the second table")
    parser.add_argument(
        "--kind-sizes", default="576x1536,1536x576,4096x11008,11008x4096", help="shapes of the first table"
    )
    parser.add_argument("--dtypes", default="float32", help="dtypes of ΔW and W in the first table")
    parser.add_argument("--keep", default="0.1,0.2,0.4", help="comma-separated keep ratios")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--skip-sparse-add", action="store_true")
    parser.add_argument(
        "--kinds", default=",".join(DELTA_KINDS), help=f"kinds of ΔW for the first table, of {DELTA_KINDS} ('': skip)"
    )
    parser.add_argument(
        "--load", type=int, default=0, help="also time the first table while this many busy processes run"
    )
    parser.add_argument("--skip-methods", action="store_true", help="skip the second table (methods on a dense ΔW)")
    parser.add_argument(
        "--first-calls",
        type=int,
        default=3,
        help="CPU: also time each selector's first call in this many fresh processes (0: skip)",
    )
    parser.add_argument("--first-call", nargs=3, metavar=("METHOD", "SHAPE", "KEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_call:
        method, shape, keep = args.first_call
        print(first_call(method, tuple(int(x) for x in shape.split("x")), float(keep)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    keeps = [float(x) for x in args.keep.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, device {args.device} ({name}), "
        f"threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, median of {args.repeats} after a warm-up"
    )
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if unknown := sorted(set(kinds) - set(DELTA_KINDS)):
        raise SystemExit(f"--kinds: unknown kinds {unknown}, expected some of {DELTA_KINDS}")
    if kinds:
        kind_sizes = [tuple(int(x) for x in s.split("x")) for s in args.kind_sizes.split(",")]
        dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
        kind_rows = []
        for load in sorted({0, args.load}):
            with background_load(load, seconds=3600):
                for shape, dtype in itertools.product(kind_sizes, dtypes):
                    for keep, kind in itertools.product(keeps, kinds):
                        row = bench_kinds(shape, keep, kind, args.device, args.repeats, load, dtype)
                        kind_rows.append(row)
                        print(
                            f"  {row['shape']} keep {keep} {kind} {row['dtype']} load {load}: "
                            f"{row['seed'] / row['rect_sparsify']:.2f}x",
                            file=sys.stderr,
                            flush=True,
                        )
        print("By kind of ΔW (seed: argpartition of |ΔW/W| + values; timed alternately, medians):\n")
        print_kinds_table(kind_rows)
        for load in sorted({0, args.load}):
            rows_at = [r for r in kind_rows if r["load"] == load]
            worst = min(rows_at, key=lambda r: r["seed"] / r["rect_sparsify"])
            print(
                f"\nTarget: rect_sparsify >= 3x the seed on every kind, {load} busy processes: worst "
                f"{worst['seed'] / worst['rect_sparsify']:.2f}x ({worst['shape']}, keep {worst['keep']}, "
                f"{worst['kind']}, {worst['dtype']}); median "
                f"{statistics.median(r['seed'] / r['rect_sparsify'] for r in rows_at):.2f}x"
            )
        print()
    if args.skip_methods:
        return 0
    print("Speedup column: time of the first row of each group (the seed, or index_put_) / this row's time.\n")
    rows = []
    for shape in sizes:
        for keep in keeps:
            rows += bench_selection(shape, keep, args.device, args.repeats)
            if args.device == "cpu" and args.first_calls:
                rows += bench_first_calls(shape, keep, args.first_calls)
            if not args.skip_sparse_add:
                rows += bench_sparse_add(shape, keep, args.device, args.repeats)
    print_table(rows, args.device)
    print()
    for op in ("select", "select, first call"):
        big = [r for r in rows if r["op"] == op and r["shape"] == "4096x11008" and math.isclose(r["keep"], 0.4)]
        if big:
            seed = next(r["seconds"] for r in big if r["method"].startswith("seed"))
            ours = next(r["seconds"] for r in big if r["method"].startswith("hep.rect_sparsify"))
            print(
                f"Target (CPU, 4096x11008, keep 0.4, {op}): >= 3x the seed (aim 5x): {seed / ours:.2f}x "
                f"({seed:.3f} s vs {ours:.3f} s)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
