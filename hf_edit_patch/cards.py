"""The README.md card written next to a saved patch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .patch import EditPatch


def _yaml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def patch_card(patch: EditPatch) -> str:
    """Markdown card with YAML metadata: base model, tags, the edits, editor, regularizer, sparsity, size, usage."""
    cfg = patch.config
    tags = ["hf-edit-patch", "model-editing", "knowledge-editing"]
    if cfg.regularizer:
        tags.append(cfg.regularizer)
    if cfg.editor:
        tags.append(cfg.editor)
    meta = ["---", "library_name: hf-edit-patch"]
    if cfg.base_model_name_or_path and not cfg.base_model_name_or_path.startswith(("/", ".")):
        meta.append(f"base_model: {_yaml_str(cfg.base_model_name_or_path)}")
    meta.append("tags:")
    meta += [f"- {_yaml_str(t)}" for t in tags]
    meta.append("---")

    numel = sum(r.shape[0] * r.shape[1] for r in cfg.modules.values())
    reg = f"{cfg.regularizer}, keep ratio {cfg.keep_ratio}" if cfg.regularizer else "none (every nonzero entry kept)"
    lines = [
        *meta,
        "",
        "# Edit patch",
        "",
        f"A sparse weight edit of `{cfg.base_model_name_or_path or 'an unnamed model'}`"
        + (f" (revision `{cfg.base_model_revision}`)" if cfg.base_model_revision else "")
        + ", made with [hf_edit_patch](https://pypi.org/project/hf-edit-patch/).",
        "",
        "| | |",
        "|---|---|",
        f"| editor | {cfg.editor or 'unknown'} |",
        f"| regularizer | {reg} |",
        f"| modules | {len(cfg.modules)} |",
        f"| changed entries | {patch.nnz:,} of {numel:,} ({patch.nnz / max(numel, 1):.2%}) |",
        f"| stored size | {patch.nbytes() / 1e6:.2f} MB ({cfg.value_dtype} values) |",
        f"| parents | {', '.join(p.get('name', '?') for p in cfg.parent_patches) or 'none'} |",
        "",
    ]
    if cfg.requests:
        lines += ["## Edits", "", "| prompt | target (new) | target (old) |", "|---|---|---|"]
        for r in cfg.requests:
            prompt = str(r.get("prompt", "")).replace("{}", str(r.get("subject", "{}"))).replace("|", "\\|")
            lines.append(f"| {prompt} | {r.get('target_new', '')} | {r.get('target_true', '') or ''} |")
        lines.append("")
    lines += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from hf_edit_patch import PatchedModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{cfg.base_model_name_or_path or "<base model>"}")',
        'model = PatchedModel.from_pretrained(base, "<this repo or folder>")',
        "base = model.unload()  # takes the edit back off, bit for bit",
        "```",
        "",
        "## Limitations",
        "",
        "The patch changes the listed weight entries of the base model it was computed on; on other weights"
        " (another revision, dtype or quantization) it loads with a fingerprint warning and may not hold."
        " Model edits can have side effects on unrelated behaviour: evaluate before relying on it.",
    ]
    return "\n".join(lines) + "\n"
