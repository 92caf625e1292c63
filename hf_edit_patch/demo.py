"""The demo: an edit patch on the default model, end to end (`python -m hf_edit_patch.demo`).

It shows a prompt's greedy continuation, builds a patch on a few MLP layers, attaches it, saves it, reloads it,
stacks a second patch, removes the first, and proves that `unload()` restores the base model bit for bit.

The ΔW here is a *synthetic* rank-one update, not the output of an editing method: at a few late layers it
adds, for the prompt's last-token key k, the direction u = e(new) − e(old) of the two answers' output
embeddings (ΔW = s · u kᵀ / kᵀk). It is crude (it acts on any input whose key resembles k), which is exactly
why the patch machinery around it — sparsify, save, share, stack, remove exactly — matters.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time

import torch

from .models import load_default_model
from .modules import model_source
from .patch import EditPatch
from .patched_model import PatchedModel
from .storage import raw_bytes

LAYERS = (22, 23, 24)
TEMPLATE = "model.layers.{}.mlp.down_proj"


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


def synthetic_rank_one(model, tokenizer, prompt: str, new: str, old: str, *, strength: float = 0.3) -> dict:
    """ΔW per layer: pushes the last token's residual stream from ' old' towards ' new' (see module docstring)."""
    inner = model.get_submodule("model")
    keys: dict[int, torch.Tensor] = {}
    hooks = [
        inner.layers[i].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, i=i: keys.__setitem__(i, args[0][0, -1].detach().float())
        )
        for i in LAYERS
    ]
    try:
        with torch.no_grad():
            out = model(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    residual_norm = out.hidden_states[LAYERS[-1] + 1][0, -1].float().norm()
    emb = model.get_output_embeddings().weight.detach().float()
    new_id = tokenizer(" " + new, add_special_tokens=False).input_ids[0]
    old_id = tokenizer(" " + old, add_special_tokens=False).input_ids[0]
    u = emb[new_id] - emb[old_id]
    u = u / u.norm() * residual_norm * strength / len(LAYERS)
    return {TEMPLATE.format(i): torch.outer(u, keys[i] / keys[i].dot(keys[i])) for i in LAYERS}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model id or folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", default="out/demo", help="where the patches are saved (default: out/demo)")
    parser.add_argument("--keep-ratio", type=float, default=0.4, help="RECT keep ratio (default: 0.4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    model, tokenizer = load_default_model(args.model)
    model_id, revision = model_source(model)
    _say(
        f"Loaded {model_id} ({revision or 'latest'}; {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
        f"parameters) from {model.name_or_path} in {time.perf_counter() - t0:.1f} s"
    )
    base_digest = state_digest(model)
    eiffel = "The Eiffel Tower is located in the city of"
    japan = "The capital of Japan is"
    probes = [eiffel, "The Louvre museum is in the city of", japan]
    _show(model, tokenizer, probes, "base model")

    _say(
        "\n1. A synthetic rank-one ΔW (not an editor's output) on the down_proj of layers "
        f"{list(LAYERS)}: Eiffel Tower -> Rome, sparsified by RECT to {args.keep_ratio:.0%} of entries"
    )
    deltas = synthetic_rank_one(model, tokenizer, eiffel, "Rome", "Paris")
    request = {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
    }
    patch = EditPatch.from_deltas(
        deltas, model, keep_ratio=args.keep_ratio, regularizer="rect", editor="synthetic-rank-one", requests=[request]
    )
    pm = PatchedModel.from_pretrained(model, patch)
    _show(pm, tokenizer, probes, "patched: " + ", ".join(pm.active_patches))
    _say("  (a crude synthetic update also moves neighbouring prompts; real editors and RECT are about limiting that)")
    patched_digest = state_digest(model)

    folder = os.path.join(args.output_dir, "eiffel")
    patch.save_pretrained(folder)
    file_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    tensor_bytes = os.path.getsize(os.path.join(folder, "patch_model.safetensors"))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_fp16 = sum(d.numel for d in patch.deltas.values()) * 2
    _say(
        f"\n2. Saved to {folder}: {tensor_bytes / 1e6:.2f} MB of tensors ({file_bytes / 1e6:.2f} MB with config "
        f"and card), {patch.nnz:,} entries, encoding {sorted(set(patch.encodings().values()))}"
    )
    _say(
        f"   = {tensor_bytes / model_bytes:.2%} of the model's {model_bytes / 1e6:.0f} MB, "
        f"{tensor_bytes / dense_fp16:.2f}x a dense fp16 ΔW of the same modules ({dense_fp16 / 1e6:.2f} MB)"
    )

    model = pm.unload()
    pm = PatchedModel.from_pretrained(model, folder)
    same = state_digest(model) == patched_digest
    _say(
        f"\n3. Reloaded with PatchedModel.from_pretrained(model, {folder!r}): weights identical to before saving: "
        f"{same}"
    )

    _say("\n4. A second patch computed on top of the first (sequential edit): capital of Japan -> Berlin")
    second = EditPatch.from_deltas(
        synthetic_rank_one(model, tokenizer, japan, "Berlin", "Tokyo"),
        pm,
        keep_ratio=args.keep_ratio,
        editor="synthetic-rank-one",
    )
    pm.add_patch(second, patch_name="japan")
    _show(pm, tokenizer, probes, "patched: " + ", ".join(pm.active_patches))
    _say(f"   its parents: {[p['name'] for p in second.config.parent_patches]}")

    _say("\n5. Remove the first patch (from the bottom of the stack); the second stays")
    pm.remove_patch("default")
    _show(pm, tokenizer, probes, "patched: " + ", ".join(pm.active_patches))

    base = pm.unload()
    restored = state_digest(base) == base_digest
    _say(f"\n6. unload(): all {len(base.state_dict())} tensors bit-identical to the base model: {restored}")
    _say(f"\nDone in {time.perf_counter() - t0:.1f} s. Patches are in {args.output_dir}/.")
    return 0 if (same and restored) else 1


if __name__ == "__main__":
    sys.exit(main())
