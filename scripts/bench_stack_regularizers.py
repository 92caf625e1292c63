"""Benchmark (not a test) of the `prune` stack regularizer on one module, against an SVD baseline in the same run.

Applied per edit (`stack_regularizer="prune"`), `prune` runs on every edited module after every edit, so its cost
adds to each edit's: it needs σ_max(W) and the singular values of the accumulated update ΔW above τ, with their
vectors. The baseline computes them as the definition reads: `torch.linalg.matrix_norm(W, ord=2)` and a full
float32 SVD of ΔW. `prune_restrain` takes them from a float64 symmetric eigendecomposition of the Gram matrix on the
smaller side, skipping it when ‖ΔW‖_F ≤ τ, and remembers σ_max(W) for the weights it has seen.

Cases (`--cases`), weights W random normal with std 0.02 in the `nn.Linear` layout [out, in]:

* `smollm2`: SmolLM2-135M's `down_proj`, 576×1536;
* `llama7b`: LLaMA-7B's `down_proj`, 4096×11008;
* `llama70b`: LLaMA-70B's `down_proj`, 8192×28672 (minutes per run on a CPU).

Updates (`--updates`), each a matrix of W's shape with random singular vectors:

* `binding`: rank 200 with σᵢ = 2 σ_max(W) · 0.9^i, so its 14 largest exceed τ = 0.5 σ_max(W), as in a long
  stack of edits;
* `under`: rank 50 with every σᵢ = 0.45 σ_max(W): no singular value over τ, but ‖ΔW‖_F over it, so the spectrum
  must be computed to find that nothing changes;
* `small`: the `under` update scaled to ‖ΔW‖_F < τ.

Reported per (case, update), each time the median over `--repeats` runs after a warm-up run (`--no-warmup`: none):
the baseline; `largest_singular_value(W)`, which `prune_restrain` pays on the first edit of a weight; `prune_restrain`
on a later edit (σ_max(W) remembered); the speed-up of a later edit and of the first; and the largest difference
between the two results relative to max |ΔW|.

A second table times what per-edit stack regularization computes on every edit besides the regularizer: the weights
under the stack (`weights_under`), for `--stack-patches` dense patches and as many RECT 40% patches on one
SmolLM2-shaped matrix, against writing every patch's undo data back top first.

Usage:
    .venv/bin/python scripts/bench_stack_regularizers.py
    .venv/bin/python scripts/bench_stack_regularizers.py --cases llama7b --repeats 1 --no-warmup --threads 1
    .venv/bin/python scripts/bench_stack_regularizers.py --device cuda --cases llama7b llama70b
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

import hf_edit_patch as hep
from hf_edit_patch.patched_model.consolidate import weights_under
from hf_edit_patch.patched_model.stack import stack_of
from hf_edit_patch.regularizers.stack import largest_singular_value, prune_restrain

CASES = {"smollm2": (576, 1536), "llama7b": (4096, 11008), "llama70b": (8192, 28672)}
UPDATES = ("binding", "under", "small")
THRESHOLD = 0.5
WEIGHT_STD = 0.02


def prune_by_svd(delta: torch.Tensor, weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """The baseline: σ_max(W) by `matrix_norm(ord=2)` and a full float32 SVD of ΔW."""
    tau = threshold * float(torch.linalg.matrix_norm(weight.float(), ord=2))
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    big = s > tau
    if not bool(big.any()):
        return delta
    s_big = s[big]
    return delta - (u[:, big] * (s_big - tau * (1.0 + torch.log(s_big / tau)))) @ vh[big]


def update(kind: str, shape: tuple[int, int], sigma_w: float, gen: torch.Generator, device: str) -> torch.Tensor:
    rank = 200 if kind == "binding" else 50
    if kind == "binding":
        sigmas = 2.0 * sigma_w * 0.9 ** torch.arange(rank, dtype=torch.float64)
    else:
        sigmas = torch.full((rank,), 0.45 * sigma_w, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(shape[0], rank, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[1], rank, generator=gen, dtype=torch.float64))[0]
    delta = ((u * sigmas) @ v.T).float()
    if kind == "small":
        delta *= 0.9 * THRESHOLD * sigma_w / float(delta.norm())
    return delta.to(device)


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: str, warmup: bool) -> tuple[float, torch.Tensor]:
    def once() -> tuple[float, torch.Tensor]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    if warmup:
        once()
    runs = [once() for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["smollm2", "llama7b"])
    parser.add_argument("--updates", nargs="+", choices=UPDATES, default=list(UPDATES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="time the first run too (for the large cases on a CPU, where one run takes minutes)")
    parser.add_argument("--stack-patches", type=int, default=200,
                        help="patches in the stacks whose base weights are timed (0: skip that table)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = prune_table(args)
    stack_rows = stack_table(args) if args.stack_patches > 0 else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
                       "stack_rows": stack_rows}, f, indent=2)  # fmt: skip


def prune_table(args: argparse.Namespace) -> list[dict]:
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {args.device}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")  # fmt: skip
    print("| case | shape | update | over τ | SVD baseline s | σ_max(W) s | prune_restrain s | speed-up | "
          "first edit | max diff / max abs ΔW |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    for case in args.cases:
        shape = CASES[case]
        gen = torch.Generator().manual_seed(0)
        weight = (WEIGHT_STD * torch.randn(shape, generator=gen)).to(args.device)
        sigma_w = float(torch.linalg.matrix_norm(weight, ord=2))
        sigma_s, _ = timed(partial(largest_singular_value, weight), args.repeats, args.device, args.warmup)
        prune_restrain(torch.zeros_like(weight), weight, threshold=THRESHOLD)  # σ_max(W) remembered from here on
        for kind in args.updates:
            delta = update(kind, shape, sigma_w, gen, args.device)
            over = int((torch.linalg.svdvals(delta.double()) > THRESHOLD * sigma_w).sum())
            baseline = partial(prune_by_svd, delta, weight, THRESHOLD)
            ours = partial(prune_restrain, delta, weight, threshold=THRESHOLD)
            base_s, expected = timed(baseline, args.repeats, args.device, args.warmup)
            ours_s, got = timed(ours, args.repeats, args.device, args.warmup)
            diff = float((got - expected).abs().max() / delta.abs().max())
            first = base_s / (sigma_s + ours_s)
            row = {"case": case, "shape": list(shape), "update": kind, "over_tau": over, "baseline_s": base_s,
                   "sigma_max_s": sigma_s, "prune_restrain_s": ours_s, "speedup": base_s / ours_s,
                   "speedup_first_edit": first, "max_rel_diff": diff}  # fmt: skip
            rows.append(row)
            print(f"| {case} | {shape[0]}×{shape[1]} | {kind} | {over} | {base_s:.3f} | {sigma_s:.3f} | "
                  f"{ours_s:.3f} | {base_s / ours_s:.1f}× | {first:.1f}× | {diff:.1e} |")  # fmt: skip
    return rows


def under_top_first(model: nn.Module, stack, module: str) -> torch.Tensor:
    """The baseline: every patch's undo data written back, top patch first."""
    weight = model.get_submodule(module).weight.detach().clone()
    for name in reversed(list(stack.patches)):
        for applied in reversed(stack.applied.get(name, [])):
            if applied.module == module:
                weight.view(-1)[applied.flat] = applied.original.to(weight.dtype)
    return weight


def stack_table(args: argparse.Namespace) -> list[dict]:
    """The weights under a stack of `--stack-patches` edits of one SmolLM2-shaped matrix, needed by every edit."""
    rows_out, cols_in = CASES["smollm2"]
    print(f"\nThe weights under a stack of {args.stack_patches} patches on one {rows_out}×{cols_in} matrix "
          "(`weights_under`, what per-edit `stack_regularizer=` computes on every edit)")  # fmt: skip
    print("| patches | top-first baseline s | weights_under s | speed-up | equal |")
    print("|---|---|---|---|---|")
    rows = []
    for kind, kwargs in (("dense", {"regularizer": None}), ("rect 0.4", {"regularizer": "rect", "keep_ratio": 0.4})):
        model = nn.Sequential(nn.Linear(cols_in, rows_out, bias=False)).to(args.device)
        pm = hep.PatchedModel(model)
        gen = torch.Generator().manual_seed(1)
        for i in range(args.stack_patches):
            delta = 1e-4 * torch.randn(rows_out, cols_in, generator=gen)
            patch = hep.EditPatch.from_deltas({"0": delta}, model, value_dtype="float32", show_progress=False,
                                              **kwargs)  # fmt: skip
            pm.add_patch(patch, f"edit{i}")
        stack = stack_of(model)
        base_s, expected = timed(partial(under_top_first, model, stack, "0"), args.repeats, args.device, args.warmup)
        ours = partial(lambda m, st: weights_under(m, st, ["0"], 0)["0"], model, stack)
        ours_s, got = timed(ours, args.repeats, args.device, args.warmup)
        equal = torch.equal(got, expected)
        rows.append({"patches": kind, "n": args.stack_patches, "baseline_s": base_s, "weights_under_s": ours_s,
                     "speedup": base_s / ours_s, "equal": equal})  # fmt: skip
        print(f"| {args.stack_patches} {kind} | {base_s:.3f} | {ours_s:.3f} | {base_s / ours_s:.1f}× | {equal} |")
        pm.unload()
    return rows


if __name__ == "__main__":
    main()
