"""Push a saved patch folder, with its evaluation, to the Hugging Face Hub in one commit.

`EditPatch.push_to_hub` uploads a patch in memory; `push_patch_folder` uploads what `save_pretrained` (or
`PatchedModel.save_pretrained`) wrote, after loading and validating it, together with the evaluation written by
`hf_edit_patch.evaluation.report.write_evaluation`:

```
README.md                  the patch card, with the evaluation as a section and as model-index metadata
patch_config.json          \
patch_model.safetensors    /  the patch as saved (or one subfolder per patch and patch_stack.json for a stack)
evaluation/eval.json       the evaluation's results
evaluation/scores.png      its plot
evaluation/README.md       its card
```

Example:
    ```python
    from hf_edit_patch.evaluation.publish import push_patch_folder

    push_patch_folder("out/eiffel", "user/eiffel-rome-rect")   # evaluation found in out/eiffel/evaluation/
    ```
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard

from ..errors import PatchError, PatchFormatError, PatchNotFoundError
from ..hub.cards import card_is_generated_and_unedited, card_with_marker, evaluation_card, patch_card
from ..hub.files import committed_path
from ..hub.push import PushOptions, push_folder
from ..patch.config import CONFIG_NAME, STACK_NAME, check_patch_name, read_stack
from ..patch.edit_patch import EditPatch
from .report import CARD_FILE, EVAL_FILE, load_evaluation

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..hub.push import PushKwargs

logger = logging.getLogger(__name__)

__all__ = ["EVALUATION_DIR", "find_evaluation", "push_patch_folder", "stage_patch_folder"]

EVALUATION_DIR = "evaluation"


def find_evaluation(folder: str | os.PathLike) -> str | None:
    """`<folder>/evaluation` when it holds an `eval.json` (where `hf-edit-patch eval` writes by default), else None."""
    candidate = os.path.join(os.fspath(folder), EVALUATION_DIR)
    return candidate if os.path.isfile(os.path.join(candidate, EVAL_FILE)) else None


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def stage_patch_folder(
    folder: str | os.PathLike,
    staging_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    evaluation: str | os.PathLike | None = None,
    license: str | None = None,
    overwrite_card: bool = False,
) -> list[str]:
    """Lays out in `staging_dir` exactly what `push_patch_folder` uploads; returns the files, relative and sorted.

    The patch (or every patch of a stack) is loaded and validated first. Files of the folder are copied as they
    are (hidden files, the folder's own `evaluation/` and its README excepted), each as loading reads it: the new
    version when a save was cut short after its commit point, so an upload is never a torn mix of two saves. The
    README is the folder's when a person edited it (unless `overwrite_card`), else a fresh patch card with the
    evaluation (a stack gets the evaluation card, when there is one). The evaluation folder goes to `evaluation/`.
    """
    folder, staging_dir = os.fspath(folder), os.fspath(staging_dir)
    if os.path.exists(staging_dir) and (not os.path.isdir(staging_dir) or os.listdir(staging_dir)):
        raise PatchError(f"the staging folder {staging_dir!r} must be new or empty")
    if not os.path.isdir(folder):
        raise PatchNotFoundError(f"{folder!r} is not a folder; give the folder a patch was saved to")
    patch: EditPatch | None = None
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        patch = EditPatch.from_pretrained(folder)  # validated before anything is uploaded
    elif os.path.isfile(os.path.join(folder, STACK_NAME)):
        for name in _stack_names(folder):
            EditPatch.from_pretrained(folder, subfolder=name)
    else:
        raise PatchNotFoundError(
            f"{folder!r} has neither {CONFIG_NAME} (a patch) nor {STACK_NAME} (a stack saved by PatchedModel)"
        )
    evaluation = os.fspath(evaluation) if evaluation is not None else find_evaluation(folder)
    results, eval_dir = None, None
    if evaluation is not None:
        results = load_evaluation(evaluation)
        eval_dir = os.path.abspath(evaluation if os.path.isdir(evaluation) else os.path.dirname(evaluation))

    skip_eval = os.path.abspath(os.path.join(folder, EVALUATION_DIR))

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n.startswith(".")}
        if os.path.abspath(directory) == os.path.abspath(folder):
            skipped.add(CARD_FILE)
        skipped |= {n for n in names if os.path.abspath(os.path.join(directory, n)) in (skip_eval, eval_dir)}
        return skipped

    def copy_committed(src: str, dst: str) -> str:
        # a save cut short after its commit point: copy the new file it committed, not the old one still in place
        # (its own hidden temporary file, which `ignore` skips), so that the upload is the set the loader validated
        committed = committed_path(folder, os.path.relpath(src, folder))
        try:
            return shutil.copy2(committed, dst)
        except FileNotFoundError:
            if committed == src:
                raise
            return shutil.copy2(src, dst)  # the save was just completed: the new file is in place now

    shutil.copytree(folder, staging_dir, ignore=ignore, copy_function=copy_committed, dirs_exist_ok=True)
    if eval_dir is not None:
        shutil.copytree(
            eval_dir,
            os.path.join(staging_dir, EVALUATION_DIR),
            ignore=lambda _, names: {n for n in names if n.startswith(".")},
            dirs_exist_ok=True,
        )

    existing = _read_text(committed_path(folder, CARD_FILE))
    card: str | None
    if existing is not None and not overwrite_card and not card_is_generated_and_unedited(existing):
        logger.warning(
            "Uploading the README.md of %s as it is (a person edited it)%s; pass overwrite_card=True to replace it "
            "with a generated card.",
            folder,
            " without the evaluation section" if results is not None else "",
        )
        card = existing
    elif patch is not None:
        if license is None and existing is not None:  # keep the license the folder's generated card records
            license = ModelCard(existing, ignore_metadata_errors=True).data.license
        card = card_with_marker(str(patch_card(patch, repo_id=repo_id, license=license, evaluation=results)))
    elif results is not None:  # a stack: the evaluation card is the repo's card
        card = card_with_marker(str(evaluation_card(results, model_name=repo_id, images=f"{EVALUATION_DIR}/")))
    else:
        card = None
    if card is not None:
        with open(os.path.join(staging_dir, CARD_FILE), "w", encoding="utf-8") as f:
            f.write(card)
    return sorted(
        os.path.relpath(os.path.join(d, f), staging_dir).replace(os.sep, "/")
        for d, _, files in os.walk(staging_dir)
        for f in files
    )


def _stack_names(folder: str) -> list[str]:
    path = committed_path(folder, STACK_NAME)  # the committed stack, also while a save is being completed
    try:
        names = read_stack(path)
    except OSError as exc:
        raise PatchFormatError(f"{path} is not a valid patch stack ({exc})") from exc
    if not names:
        raise PatchFormatError(f"{path} must list the stack's patch names under 'patches'")
    for name in names:
        check_patch_name(name)
    return names


def push_patch_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    evaluation: str | os.PathLike | None = None,
    overwrite_card: bool = False,
    **options: Unpack[PushKwargs],
) -> Any:
    """Uploads a saved patch folder (or stack) and its evaluation to `repo_id` in one commit.

    The repo is created if needed; what is sent is laid out by `stage_patch_folder` in a temporary folder and
    uploaded with `HfApi.upload_folder`.

    Args:
        folder: a folder written by `EditPatch.save_pretrained` or `PatchedModel.save_pretrained`.
        repo_id: `"namespace/name"`.
        evaluation: a folder (or `eval.json`) written by `hf_edit_patch.evaluation.report.write_evaluation`;
            defaults to `<folder>/evaluation` when it exists.
        overwrite_card: replace a README.md that a person edited with a generated card.
        options: `private`, `revision`, `create_pr`, `commit_message`, `token`, `license`
            (`hf_edit_patch.hub.push.PushOptions`).

    Returns:
        The `CommitInfo` of the upload.

    Example:
        ```python
        >>> push_patch_folder("out/eiffel", "user/eiffel-rome-rect", private=True)
        ```
    """
    push = PushOptions.from_kwargs(options)
    message = push.commit_message or f"Upload edit patch from {os.path.basename(os.path.abspath(folder))}"
    push = dataclasses.replace(push, commit_message=message)
    return push_folder(
        lambda staging: stage_patch_folder(
            folder,
            staging,
            repo_id=repo_id,
            evaluation=evaluation,
            license=push.license,
            overwrite_card=overwrite_card,
        ),
        repo_id,
        push,
    )
