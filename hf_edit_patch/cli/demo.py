"""The demo: a real ROME edit on the default model, as a patch, end to end (`python -m hf_edit_patch.cli.demo`).

"The Eiffel Tower is located in the city of" → Rome with ROME and RECT at 40%: continuations before and after (the
prompt, a paraphrase, an unrelated fact), the patch's size against the model's, save → reload with
`PatchedModel.from_pretrained`, a second edit stacked on top (sequential editing), removal of the first, and proof
that `unload()` restores the base model bit for bit.

ROME needs key statistics (the second moment of the edited layer's inputs over some text). Without a corpus
(`--stats-dataset`), the demo computes them from text the model samples itself, says so, and caches them, so
later runs skip that step. Progress bars for the long steps go to stderr on a terminal (`--no-progress` turns them
off).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time

import torch

from ..editing.entry import DEFAULT_KEEP_RATIO, edit
from ..hub.default_model import load_default_model
from ..modules import model_source
from ..patch.encoding import raw_bytes
from ..patched_model import PatchedModel
from ..requests import EditRequest
from .common import library_bars_off

EIFFEL = EditRequest(
    prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris"
)
JAPAN = EditRequest(prompt="The capital of {} is", subject="Japan", target_new="Berlin", target_true="Tokyo")
PROBES = [
    EIFFEL.text,
    "Where is the Eiffel Tower? It is in the city of",
    "The Louvre museum is in the city of",
    JAPAN.text,
]


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def continuation(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).replace("\n", " ").strip()


def state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(raw_bytes(tensor))
    return h.hexdigest()


def _show(model, tokenizer, prompts: list[str], label: str) -> None:
    _say(f"  [{label}]")
    for p in prompts:
        _say(f"    {p!r} -> {continuation(model, tokenizer, p)!r}")


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Runs the demo with `argv` (default: `sys.argv[1:]`); `prog` names the command in its usage line."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model id or folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", default="out/demo", help="where the patches are saved (default: out/demo)")
    parser.add_argument(
        "--keep-ratio",
        type=float,
        default=float(DEFAULT_KEEP_RATIO),
        help=f"RECT keep ratio (default: {float(DEFAULT_KEEP_RATIO)}, as hf_edit_patch.edit)",
    )
    parser.add_argument(
        "--stats-dataset",
        default=None,
        help="corpus for the key statistics: a datasets id or a local .txt/.json/.jsonl file",
    )
    parser.add_argument("--stats-text-field", default="text", help="text field of a JSON corpus (default: text)")
    parser.add_argument(
        "--stats-samples",
        type=int,
        default=200,
        help="texts for the key statistics (default: 200; ROME's own default is 1000)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (default: on a terminal)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with library_bars_off(args.no_progress):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    progress = False if args.no_progress else None
    t0 = time.perf_counter()
    model, tokenizer = load_default_model(args.model)
    model_id, revision = model_source(model)
    _say(
        f"Loaded {model_id} ({revision or 'latest'}; {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
        f"parameters) from {model.name_or_path} in {time.perf_counter() - t0:.1f} s"
    )
    base_digest = state_digest(model)
    _show(model, tokenizer, PROBES, "base model")

    stats = {
        "stats_dataset": args.stats_dataset,
        "stats_text_field": args.stats_text_field,
        "allow_model_sampled_stats": args.stats_dataset is None,
        "hparams": {"mom2_n_samples": args.stats_samples},
        "show_progress": progress,
    }
    source = args.stats_dataset or f"{args.stats_samples} texts the model sampled itself (no corpus given)"
    _say(
        f"\n1. ROME edit: {EIFFEL.text!r} -> {EIFFEL.target_new!r}, RECT keeping {args.keep_ratio:.0%} of ΔW.\n"
        f"   Key statistics from {source}.\n"
        "   The first run computes them (about 1 min on an idle 2-core CPU, up to 20 min on a busy one); later runs\n"
        "   read them from the cache."
    )
    t1 = time.perf_counter()
    patch = edit(model, tokenizer, [EIFFEL], method="rome", keep_ratio=args.keep_ratio, regularizer="rect", **stats)
    layer = patch.config.editor_hparams["layer"]
    _say(f"   computed in {time.perf_counter() - t1:.1f} s: layer {layer}, {patch.nnz:,} entries changed")
    pm = PatchedModel.from_pretrained(model, patch)
    _show(pm, tokenizer, PROBES, "patched: " + ", ".join(pm.active_patches))
    patched_digest = state_digest(model)

    folder = os.path.join(args.output_dir, "eiffel")
    patch.save_pretrained(folder)
    tensor_bytes = os.path.getsize(os.path.join(folder, "patch_model.safetensors"))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_fp16 = sum(d.numel for d in patch.deltas.values()) * 2
    _say(
        f"\n2. Saved to {folder}: {tensor_bytes / 1e6:.2f} MB of tensors, encoding "
        f"{sorted(set(patch.encodings().values()))}: {tensor_bytes / model_bytes:.2%} of the model's "
        f"{model_bytes / 1e6:.0f} MB, {tensor_bytes / dense_fp16:.2f}x a dense fp16 ΔW ({dense_fp16 / 1e6:.2f} MB)"
    )

    model = pm.unload()
    pm = PatchedModel.from_pretrained(model, folder)
    same = state_digest(model) == patched_digest
    _say(
        f"\n3. Reloaded with PatchedModel.from_pretrained(model, {folder!r}): weights identical to before saving: "
        f"{same}"
    )

    _say(
        f"\n4. A second edit computed on the patched model and stacked (sequential editing): {JAPAN.text!r} -> "
        f"{JAPAN.target_new!r}"
    )
    second = pm.edit(tokenizer, [JAPAN], method="rome", keep_ratio=args.keep_ratio, patch_name="japan", **stats)
    _show(pm, tokenizer, PROBES, "patched: " + ", ".join(pm.active_patches))
    _say(f"   its parents: {[p['name'] for p in second.config.parent_patches]}")

    _say("\n5. Remove the first patch (from the bottom of the stack); the second stays")
    pm.remove_patch("default")
    _show(pm, tokenizer, PROBES, "patched: " + ", ".join(pm.active_patches))

    base = pm.unload()
    restored = state_digest(base) == base_digest
    _say(f"\n6. unload(): all {len(base.state_dict())} tensors bit-identical to the base model: {restored}")
    _say(f"\nDone in {time.perf_counter() - t0:.1f} s. Patches are in {args.output_dir}/.")
    return 0 if (same and restored) else 1


if __name__ == "__main__":
    sys.exit(main(prog="python -m hf_edit_patch.cli.demo"))
