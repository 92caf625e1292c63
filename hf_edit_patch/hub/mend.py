"""MEND editors on disk and on the Hub: a folder holds `mend_config.json`, `mend_model.safetensors` (the network's
weights and input statistics) and a README.md card; safetensors and JSON only.

Example:
    ```python
    from hf_edit_patch.editors import mend
    from hf_edit_patch.hub.mend import load_mend_editor, push_mend_editor, save_mend_editor

    editor = mend.train(model, tokenizer, records[:200], max_steps=400)
    save_mend_editor(editor, "out/mend-smollm2")
    push_mend_editor(editor, "user/mend-smollm2", private=True)
    editor = load_mend_editor("user/mend-smollm2")   # a folder or a Hub repo id
    ```
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from ..editors.mend.network import MEND_FORMAT, MEND_FORMAT_VERSION, MendConfig, MendEditor
from ..errors import PatchFormatError
from ..schema import AnyJSON, Enum, Float, Int, List, Map, Nullable, Object, Str, read_json, validate
from . import resolve
from .cards import card_with_marker, keeps_existing_card
from .files import FileData, atomic_write_files
from .push import PushOptions, push_folder

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .push import PushKwargs

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_mend_editor", "mend_card", "push_mend_editor", "save_mend_editor"]

CONFIG_NAME = "mend_config.json"
WEIGHTS_NAME = "mend_model.safetensors"
_TEXT = Str(max_length=4096)
# The declared schema of mend_config.json; `MendConfig` then checks how the fields fit together.
MEND_CONFIG_SCHEMA = Object(
    {
        "format": Str(max_length=64),
        "format_version": Int(1, 2**31 - 1),
        "hf_edit_patch": Str(max_length=64),
        "modules": List(Str(min_length=1, max_length=1024), min_length=1, max_length=4096),
        "layout": Enum(("linear", "conv1d")),
        "d_in": Int(1, 2**20),
        "d_out": Int(1, 2**20),
        "rank": Int(1, 2**20),
        "n_hidden": Int(0, 64),
        "edit_lr": Float(),
        "base_model_name_or_path": Nullable(_TEXT),
        "base_model_revision": Nullable(_TEXT),
        "model_type": Nullable(_TEXT),
        "training": Map(AnyJSON(), max_length=1024),
    },
    required=("format", "format_version", "modules", "layout", "d_in", "d_out"),
)


def save_mend_editor(editor: MendEditor, save_directory: str | os.PathLike, *, overwrite_card: bool = False) -> None:
    """
    Writes `mend_config.json`, `mend_model.safetensors` (weights and statistics) and a README.md card.

    A README.md that a person edited is kept unless `overwrite_card=True`. An editor that came from nowhere records
    the folder as where it is from (`editor.name_or_path`).

    Example:
        ```python
        >>> save_mend_editor(editor, "out/mend-smollm2")  # doctest: +SKIP
        ```
    """
    if not isinstance(editor, MendEditor):
        raise TypeError(f"save_mend_editor takes a MendEditor, got {type(editor).__name__}")
    directory = os.fspath(save_directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in editor.state_dict().items()}

    def write_weights(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": MEND_FORMAT, "format_version": str(MEND_FORMAT_VERSION)})

    files: dict[str, FileData] = {
        os.path.join(directory, WEIGHTS_NAME): write_weights,
        os.path.join(directory, CONFIG_NAME): json.dumps(editor.config.to_dict(), indent=2) + "\n",
    }
    readme = os.path.join(directory, "README.md")
    if not keeps_existing_card(readme, overwrite=overwrite_card):
        files[readme] = card_with_marker(mend_card(editor.config))
    atomic_write_files(files)  # one set: a kill leaves the previous editor or this one
    if editor.name_or_path is None:
        editor.name_or_path = directory


def mend_card(config: MendConfig) -> str:
    """The README.md of a saved editor: what it edits, for which model, and how it was trained."""
    base = config.base_model_name_or_path or "unknown"
    training = "\n".join(f"- {k}: {v}" for k, v in config.training.items()) or "- (not recorded)"
    header = "---\nlibrary_name: hf_edit_patch\ntags:\n- hf_edit_patch\n- model-editing\n- mend\n"
    if config.base_model_name_or_path and not os.path.isabs(base):
        header += f"base_model: {base}\n"
    return (
        f"{header}---\n\n# MEND editor for {base}\n\n"
        "A MEND editor network (Mitchell et al. 2022) trained with hf_edit_patch: it turns the fine-tuning "
        "gradient of an edit into a weight update of these modules:\n\n"
        + "".join(f"- `{m}`\n" for m in config.modules)
        + "\n```python\nimport hf_edit_patch as hep\n"
        f'patch = hep.edit(model, tokenizer, [request], method="mend", hparams={{"editor": REPO_ID}})\n```\n\n'
        f"## Training\n\n{training}\n"
    )


def load_mend_editor(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> MendEditor:
    """
    Loads an editor written by `save_mend_editor` from a folder or a Hub repo (safetensors and JSON only).

    Raises:
        PatchNotFoundError: the folder or repo has no `mend_config.json` / `mend_model.safetensors`.
        PatchFormatError: the files are not a MEND editor, or the weights do not match the config.

    Example:
        ```python
        >>> editor = load_mend_editor("out/mend-smollm2")  # doctest: +SKIP
        >>> editor.config.modules  # doctest: +SKIP
        ['model.layers.27.mlp.down_proj', 'model.layers.28.mlp.down_proj', 'model.layers.29.mlp.down_proj']
        ```
    """
    options = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    source = os.fspath(path_or_repo_id)
    config_path = resolve.resolve_file(source, CONFIG_NAME, **options)
    weights_path = resolve.resolve_file(source, WEIGHTS_NAME, **options)
    where = f"{CONFIG_NAME} of {source!r}"
    data = read_json(config_path, source=where)
    if isinstance(data, dict) and data.get("format") == MEND_FORMAT:  # anything else: MendConfig says what it is
        data = validate(MEND_CONFIG_SCHEMA, data, source=where)
    config = MendConfig.from_dict(data, source=where)
    _check_size(config, weights_path, source)  # before the network is allocated
    editor = MendEditor(config)
    try:
        state = load_file(weights_path)
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise PatchFormatError(f"{WEIGHTS_NAME} of {source!r} is not a readable safetensors file: {exc}") from exc
    expected = editor.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise PatchFormatError(
            f"{WEIGHTS_NAME} of {source!r} does not match its config: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {bad}"
        )
    if not all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()):
        raise PatchFormatError(f"{WEIGHTS_NAME} of {source!r} holds non-finite values")
    editor.load_state_dict(state)
    editor.name_or_path = source
    return editor.eval()


def _check_size(config: MendConfig, weights_path: str, source: str) -> None:
    """Refuses a config whose network would not fit in its weights file (float32 parameters and statistics)."""
    n, dim = len(config.modules), config.d_in + config.d_out
    rank = min(config.rank, dim)
    layer = 2 * dim * rank + dim + 2 * n * dim
    nbytes = 4 * ((config.n_hidden + 1) * layer + n + 2 * n * dim) + 8 * n
    size = os.path.getsize(weights_path)
    if nbytes > size:
        raise PatchFormatError(
            f"{CONFIG_NAME} of {source!r} describes a network of {nbytes:,} bytes, but {WEIGHTS_NAME} has {size:,}: "
            "the config does not belong to these weights"
        )


def push_mend_editor(editor: MendEditor, repo_id: str, **options: Unpack[PushKwargs]) -> Any:
    """
    Creates the Hub repo if needed and uploads the saved editor (files as `save_mend_editor` writes them) in one
    commit; returns the commit info.

    Args:
        editor: the editor to share.
        repo_id: the Hub repo, `"namespace/name"`.
        options: `private`, `revision`, `create_pr`, `commit_message`, `token`, `license`.

    Example:
        ```python
        >>> push_mend_editor(editor, "user/mend-smollm2", private=True)  # doctest: +SKIP
        ```
    """
    push = PushOptions.from_kwargs(options)
    if push.commit_message is None:
        push = dataclasses.replace(push, commit_message="Upload MEND editor with hf_edit_patch")
    return push_folder(lambda folder: save_mend_editor(editor, folder), repo_id, push)
