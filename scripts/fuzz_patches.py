"""Fuzz the patch loader: corrupt saved patch folders and count what loading and attaching them does.

Saves a patch of a tiny random Llama in every encoding (coo, bitmask, csr) and weight dtype (fp32, fp16, bf16),
then corrupts copies of those folders N times: `patch_config.json` mutated as JSON (wrong types, integers of
thousands of digits, 1e400, NaN, nesting 1,000 deep, oversize strings and lists, keys deleted or added, containers
emptied) or damaged as text (truncated, bytes flipped, keys repeated), or `patch_model.safetensors` damaged (with
the config's sha256 updated, so that the damage reaches the decoder). Each folder is loaded with
`EditPatch.from_pretrained` (and saved again when it loads) and attached with `PatchedModel.load_patch`, then
detached. Outcomes:

- loaded: the corrupted folder still holds a valid patch (a mutation that kept it valid);
- library error: a `PatchError` (a `ValueError`) was raised;
- other exception: anything else (a bug: the loader must raise the library's errors only);
- model changed: the weights differ from before the attempt (a bug: a refused attach must change nothing, and an
  accepted one must be removed exactly).

Usage:
    python scripts/fuzz_patches.py --n 10000 --seconds 600
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_edit_patch as hep  # noqa: E402
from hf_edit_patch.errors import PatchError  # noqa: E402
from hf_edit_patch.hub.files import file_sha256  # noqa: E402
from hf_edit_patch.patch.config import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402

TARGETS = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
KEEP_FOR_ENCODING = {"bitmask": 0.4, "csr": 0.018, "coo": 0.002}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RAW = {
    "int-5000-digits": "1" * 5000,
    "int-10**400": "1" + "0" * 400,
    "int-10**30": "1" + "0" * 30,
    "float-1e400": "1e400",
    "nan": "NaN",
    "infinity": "Infinity",
    "deep-1000": "[" * 1000 + "]" * 1000,
    "long-string": json.dumps("x" * 70_000),
    "long-list": json.dumps([1] * 20_000),
}


def tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def make_patch(model: torch.nn.Module, keep_ratio: float, seed: int) -> hep.EditPatch:
    gen = torch.Generator().manual_seed(seed)
    deltas = {t: torch.randn(model.get_submodule(t).weight.shape, generator=gen) * 0.05 for t in TARGETS}
    return hep.EditPatch.from_deltas(deltas, model, keep_ratio=keep_ratio, regularizer="rect")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------- corruptions


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice(["none", "bool", "int", "bigint", "float", "str", "list", "dict", "raw", "raw"])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, 2, 7, 2**31, 2**63, -(2**63) - 1, rng.randint(-(10**6), 10**6)])
    if kind == "bigint":
        return rng.randint(2**64, 2**200)
    if kind == "float":
        return rng.choice([0.0, -0.5, 0.4, 1.5, 1e308, -1e-308, rng.random()])
    if kind == "str":
        return rng.choice(["", "x", "sha256:00", "float64", "coo", "zstd", "EDIT_PATCH", "model.layers.0", "\u0000"])
    if kind in ("list", "dict") and depth < 2:
        items = [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return items if kind == "list" else {f"k{i}": v for i, v in enumerate(items)}
    return Raw(rng.choice(sorted(RAW)))


class Raw:
    def __init__(self, name: str) -> None:
        self.name = name


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):
            out += paths(v, (*prefix, i))
    return out


def mutate_json(rng: random.Random, text: str) -> str:
    doc = json.loads(text)
    raws: list[str] = []
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths(doc))
        op = rng.choice(["replace", "replace", "replace", "delete", "add-key", "empty"])
        value = random_value(rng)
        if not path:
            doc = value if op == "replace" else doc
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if op == "replace":
            parent[path[-1]] = value
        elif op == "delete":
            del parent[path[-1]]
        elif op == "add-key" and isinstance(parent[path[-1]], dict):
            parent[path[-1]][rng.choice(["new_key", "shape", "nnz", "encoding", "x" * 40])] = value
        elif op == "empty" and isinstance(parent[path[-1]], (dict, list)):
            parent[path[-1]] = type(parent[path[-1]])()

    def placeholder(value: Raw) -> str:  # JSON text no Python value produces goes in after dumping
        raws.append(RAW[value.name])
        return f"@@RAW{len(raws) - 1}@@"

    out = json.dumps(doc, default=placeholder)
    for i, raw in enumerate(raws):
        out = out.replace(f'"@@RAW{i}@@"', raw)
    return out


def damage_bytes(rng: random.Random, data: bytes) -> bytes:
    op = rng.choice(["truncate", "flip", "insert", "zero-run"])
    if not data:
        return b"\x00"
    at = rng.randrange(len(data))
    if op == "truncate":
        return data[:at]
    if op == "flip":
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
    if op == "insert":
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[at:]
    return data[:at] + b"\x00" * min(16, len(data) - at) + data[at + 16 :]


def repeat_key(rng: random.Random, text: str) -> str:
    doc = json.loads(text)
    key = rng.choice(sorted(doc))
    return json.dumps(doc)[:-1] + f", {json.dumps(key)}: {json.dumps(random_value(rng), default=lambda _: 0)}}}"


def corrupt(rng: random.Random, folder: Path) -> str:
    """Corrupts the patch in `folder` in place; returns the kind of corruption."""
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    kind = rng.choice(["json"] * 6 + ["config-bytes", "repeated-key", "weights", "weights-resealed"])
    if kind == "json":
        config.write_text(mutate_json(rng, config.read_text()))
    elif kind == "config-bytes":
        config.write_bytes(damage_bytes(rng, config.read_bytes()))
    elif kind == "repeated-key":
        config.write_text(repeat_key(rng, config.read_text()))
    else:
        weights.write_bytes(damage_bytes(rng, weights.read_bytes()))
        if kind == "weights-resealed":  # the config agrees with the damaged file, so the decoder sees the damage
            doc = json.loads(config.read_text())
            doc["tensors_sha256"] = file_sha256(str(weights))
            config.write_text(json.dumps(doc))
    return kind


# ---------------------------------------------------------------------------------------------------- the run


def attempt(folder: Path, pm: hep.PatchedModel, state: dict[str, torch.Tensor], scratch: Path) -> tuple[str, str]:
    """`(outcome, detail)` of loading, re-saving and attaching one folder."""
    detail = ""
    outcome = "loaded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            patch = hep.EditPatch.from_pretrained(folder)
            patch.save_pretrained(scratch / "resaved")
        except PatchError:
            outcome = "library error"
        except Exception as exc:  # a bug: recorded with where it came from
            outcome, detail = "other exception", _describe(exc)
        try:
            pm.load_patch(folder, "fuzzed")
        except PatchError:
            pass
        except Exception as exc:
            outcome, detail = "other exception", _describe(exc)
        else:
            pm.remove_patch("fuzzed")
    if not same(pm.base_model, state) or pm.active_patches != ["held"]:
        outcome, detail = "model changed", f"active {pm.active_patches}"
    return outcome, detail


def _describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {str(exc)[:120]} ({Path(where.filename).name}:{where.lineno})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="corrupted folders to try")
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long, whatever --n says")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz-patches-"))
    sources, held = {}, {}
    for dname, dtype in DTYPES.items():
        model = tiny_llama(dtype)
        pm = hep.PatchedModel(model)
        pm.add_patch(make_patch(model, 0.4, seed=99), "held")
        held[dname] = (pm, snapshot(model))
        for encoding, keep in KEEP_FOR_ENCODING.items():
            patch = make_patch(model, keep, seed=1)
            assert set(patch.encodings().values()) == {encoding}, patch.encodings()
            folder = work / f"{dname}-{encoding}"
            patch.save_pretrained(folder)
            sources[(dname, encoding)] = folder
    counts: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    bugs: list[tuple[str, str, str]] = []
    start = time.perf_counter()
    done = 0
    for i in range(args.n):
        if time.perf_counter() - start > args.seconds:
            break
        dname, encoding = rng.choice(sorted(sources))
        case = work / f"case{i}"
        shutil.copytree(sources[(dname, encoding)], case / "p")
        kind = corrupt(rng, case / "p")
        pm, state = held[dname]
        outcome, detail = attempt(case / "p", pm, state, case)
        counts[outcome] += 1
        by_kind[kind][outcome] += 1
        if outcome in ("other exception", "model changed"):
            bugs.append((f"{dname}-{encoding}-{kind}", outcome, detail))
        shutil.rmtree(case)
        done += 1
    seconds = time.perf_counter() - start
    shutil.rmtree(work)
    outcomes = ["loaded", "library error", "other exception", "model changed"]
    print(f"{done} corrupted patch folders in {seconds:.0f} s (seed {args.seed})\n")
    print(f"| corruption | {' | '.join(outcomes)} |\n|---|" + "---|" * len(outcomes))
    for kind in sorted(by_kind):
        print(f"| {kind} | " + " | ".join(str(by_kind[kind][o]) for o in outcomes) + " |")
    print("| **all** | " + " | ".join(f"**{counts[o]}**" for o in outcomes) + " |")
    for name, outcome, detail in bugs[:20]:
        print(f"{outcome}: {name}: {detail}")
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
