"""The record of a model with patches baked in: its base model and every applied patch, as data and as a card.

`hf_edit_patch_merged.json` (written beside an exported or merged model) and the model card (`README.md`) say the
same thing: the base model (id, revision, and whether its weights were converted from a quantized file) and each
applied patch in order (name, content hash, editor, regularizer, requests). A GGUF export carries the same record in
its metadata.

Example:
    ```python
    record = merged_record(model, {"eiffel": patch})
    record["patches"][0]["content_hash"] == patch.config.content_hash   # True
    write_merged_record("out/merged", record)
    ```
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from ..hub.cards import KNOWN_LICENSES, LIBRARY_NAME, hub_model_id
from ..hub.files import atomic_write_files
from ..modules import SOURCE_ATTRIBUTE, model_source
from ..patch.edit_patch import EditPatch
from ..requests import as_requests
from ..version import __version__

__all__ = [
    "MERGED_RECORD",
    "RECORD_VERSION",
    "merged_card",
    "merged_record",
    "named_patches",
    "patch_requests",
    "record_json",
    "write_merged_record",
]

MERGED_RECORD = "hf_edit_patch_merged.json"
"""The record file in a merged folder: base model, applied patches (with content hashes), files."""
RECORD_VERSION = 1
_REQUEST_ROWS = 50

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ base_line }} with {{ patches | length }} knowledge edit patch{{ "es" if patches | length != 1 else "" }} \
baked into its weights by hf-edit-patch. It is a plain transformers model: loading or serving it needs no \
hf-edit-patch.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ repo }}")
tokenizer = AutoTokenizer.from_pretrained("{{ repo }}")
```
{% if converted_from %}
**Base weights.** {{ converted_from }}
{% endif %}
## Applied patches, in order

| # | patch | editor | regularizer | entries changed | content hash |
|---|---|---|---|---|---|
{% for p in patches -%}
| {{ loop.index }} | {{ p.name }} | {{ p.editor }} | {{ p.regularizer_text }} | {{ p.nnz }} | `{{ p.content_hash }}` |
{% endfor %}
## Edits
{% if requests %}
| prompt | new target | was |
|---|---|---|
{% for prompt, new, old in requests -%}
| {{ prompt }} | {{ new }} | {{ old }} |
{% endfor %}{% if more_requests %}
… and {{ more_requests }} more.
{% endif %}{% else %}
The patches record no edit requests (their ΔW was computed elsewhere).
{% endif %}
The same record, as data, is in `hf_edit_patch_merged.json`.
"""


# ------------------------------------------------------------------------------------------------------- record
def patch_requests(patch: EditPatch) -> list[Any]:
    """The patch's recorded requests as `EditRequest`s (none for deltas computed elsewhere)."""
    return as_requests(patch.config.requests) if patch.config.requests else []


def named_patches(patches: Sequence[EditPatch] | Mapping[str, EditPatch]) -> list[tuple[str, EditPatch]]:
    items = (
        list(patches.items()) if isinstance(patches, Mapping) else [(f"patch{i}", p) for i, p in enumerate(patches)]
    )
    for name, patch in items:
        if not isinstance(patch, EditPatch):
            raise TypeError(f"patches must be EditPatch objects, got {type(patch).__name__} for {name!r}")
    return items


def _base_model(model: nn.Module, patches: list[tuple[str, EditPatch]]) -> dict[str, Any]:
    name, revision = model_source(model)
    if not name and patches:
        name, revision = patches[0][1].config.base_model_name_or_path, patches[0][1].config.base_model_revision
    recorded = getattr(getattr(model, "config", None), SOURCE_ATTRIBUTE, None)
    weights = recorded.get("note") if isinstance(recorded, dict) else None
    return {"base_model": name, "base_model_revision": revision, "base_model_weights": weights}


def merged_record(
    model: nn.Module,
    patches: Sequence[EditPatch] | Mapping[str, EditPatch],
    *,
    sources: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The record of a merged model: its base model and every applied patch, in order.

    Keys: `base_model` (id or path), `base_model_revision`, `base_model_weights` (how converted weights were
    made, e.g. "dequantized from 4-bit GGUF", else None), `library_version`, and `patches`: per patch its `name`,
    `content_hash`, `editor`, `regularizer`, `keep_ratio`, `nnz`, `modules`, the model it was `computed_on`,
    `requests` (how many) and `edits` (prompt, new and old target of each), and `source` when known.

    Args:
        model: the model the patches were applied to (a plain model or a `PatchedModel`'s `base_model`).
        patches: the applied patches in order, as `{name: EditPatch}` or a list.
        sources: where each patch was loaded from (`{name: folder or Hub id}`), recorded when given.

    Returns:
        a JSON-serializable dict (what `hf_edit_patch_merged.json` holds).

    Example:
        ```python
        >>> record = merged_record(model, {"eiffel": patch})
        >>> record["patches"][0]["content_hash"] == patch.config.content_hash
        True
        ```
    """
    named = named_patches(patches)
    entries = []
    for name, patch in named:
        cfg = patch.config
        entry = {
            "name": name,
            "content_hash": cfg.content_hash,
            "editor": cfg.editor,
            "regularizer": cfg.regularizer,
            "keep_ratio": cfg.keep_ratio,
            "nnz": patch.nnz,
            "modules": list(cfg.modules),
            "computed_on": cfg.base_model_name_or_path,
            "computed_on_revision": cfg.base_model_revision,
            "requests": len(cfg.requests),
            "edits": [
                {"prompt": r.text, "target_new": r.target_new, "target_true": r.target_true}
                for r in patch_requests(patch)
            ],
        }
        if sources and name in sources:
            entry["source"] = sources[name]
        entries.append(entry)
    return {
        "record_version": RECORD_VERSION,
        "library_version": __version__,
        **_base_model(model, named),
        "patches": entries,
    }


def record_json(record: Mapping[str, Any]) -> str:
    """The text of `hf_edit_patch_merged.json` for `record`."""
    return json.dumps(record, indent=2, ensure_ascii=False) + "\n"


def write_merged_record(folder: str | os.PathLike, record: Mapping[str, Any]) -> str:
    """Writes `record` to `folder/hf_edit_patch_merged.json` (atomically) and returns its path."""
    path = os.path.join(os.fspath(folder), MERGED_RECORD)
    atomic_write_files({path: record_json(record)})
    return path


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|") if value not in (None, "") else "–"


def merged_card(record: Mapping[str, Any], repo: str, license: str | None) -> str:
    hub_id = hub_model_id(record.get("base_model"))
    shown = record.get("base_model") or "an unnamed base model"
    link = f"[{shown}](https://huggingface.co/{hub_id})" if hub_id else f"`{shown}`"
    revision = record.get("base_model_revision")
    weights = record.get("base_model_weights")
    converted = (
        f"The base weights were {weights} ({revision}), not the original {shown} checkpoint: the edits were "
        "applied to those weights."
        if weights
        else None
    )
    patches = [
        {
            "name": _cell(p["name"]),
            "editor": _cell(p.get("editor")),
            "regularizer_text": _cell(
                f"{p['regularizer']} keeping {p['keep_ratio']}" if p.get("regularizer") else None
            ),
            "nnz": f"{p['nnz']:,}",
            "content_hash": p.get("content_hash") or "–",
        }
        for p in record["patches"]
    ]
    requests = [
        (_cell(r["prompt"]), _cell(r["target_new"]), _cell(r.get("target_true")))
        for p in record["patches"]
        for r in p.get("edits", [])
    ]
    data = ModelCardData(
        base_model=hub_id,
        base_model_relation="finetune" if hub_id else None,
        library_name="transformers",
        license=license or KNOWN_LICENSES.get(hub_id or ""),
        tags=[LIBRARY_NAME, "model-editing", "knowledge-editing", "merged-edits"],
    )
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        title=f"{shown.rsplit('/', 1)[-1]} + {len(patches)} edit patch{'es' if len(patches) != 1 else ''}",
        base_line=f"{link} (revision `{revision}`)" if revision else link,
        repo=repo,
        converted_from=converted,
        patches=patches,
        requests=requests[:_REQUEST_ROWS],
        more_requests=max(len(requests) - _REQUEST_ROWS, 0),
    )
    return str(card)
