"""What the subcommands share: exit codes, model loading, requests from flags or files, Hub options, output.

The library is imported inside the functions that need it, so that `hf-edit-patch --help` does not load torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error the command reports as one line on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def show_progress(args: argparse.Namespace) -> bool | None:
    """`show_progress` for the library: False with `--no-progress`, else None (bars on a terminal only)."""
    return False if getattr(args, "no_progress", False) else None


@contextlib.contextmanager
def library_bars_off(off: bool) -> Iterator[None]:
    """With `off` (`--no-progress`), also the bars of transformers (loading and writing weights) and of
    huggingface_hub (downloads) stay hidden while the command runs; they are turned back on after it."""
    if not off:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    hub_was_on = not hub_utils.are_progress_bars_disabled()
    transformers_was_on = hf_logging.is_progress_bar_enabled()
    hub_utils.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_was_on:
            hub_utils.enable_progress_bars()
        if transformers_was_on:
            hf_logging.enable_progress_bar()


def say(text: str = "") -> None:
    """A line of the command's result on stdout (logs and progress bars go to stderr)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def add_model_args(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument(
        "--model",
        required=required,
        default=None,
        help="base model: a Hub id or a folder saved with save_pretrained (default: the embedded "
        "SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--model-revision", default=None, help="branch, tag or commit of a Hub model")
    parser.add_argument("--dtype", default=None, help="weight dtype (float32, bfloat16, float16, auto)")
    parser.add_argument(
        "--device-map",
        default=None,
        help="spread the model over devices with accelerate: auto, balanced, sequential, a device (cuda:0), or a "
        'JSON object {module: device} inline or as @file.json ("cpu" and "disk" allowed)',
    )
    parser.add_argument("--offload-folder", default=None, help="where layers a --device-map puts on 'disk' go")


def device_map(text: str | None) -> str | dict[str, Any] | None:
    """`--device-map`: a strategy or device name, or a JSON object mapping module names to devices."""
    if text is None:
        return None
    if text.startswith(("{", "@")):
        return json_object(text, "--device-map")
    if not text.strip():
        raise CLIError("--device-map is empty: pass auto, balanced, sequential, a device or a JSON object")
    return text


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer named by `--model` (the default model without it); an unknown model is exit 2."""
    from ..hub.default_model import load_default_model

    placement = {"device_map": device_map(getattr(args, "device_map", None))}
    if getattr(args, "offload_folder", None) is not None:
        placement["offload_folder"] = args.offload_folder
    try:
        return load_default_model(args.model, dtype=args.dtype, revision=args.model_revision, **placement)
    except (OSError, ValueError) as exc:
        name = args.model or "the default model"
        raise CLIError(f"cannot load the model {name!r}: {exc}") from exc


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    """Options for reading patches from the Hub (they apply to every PATCH given as a Hub id)."""
    group = parser.add_argument_group("patches on the Hub")
    group.add_argument("--revision", default=None, help="branch, tag or commit of the patch repos")
    group.add_argument("--subfolder", default=None, help="folder of the patch inside the repo or folder")
    group.add_argument("--token", default=None, help="Hub token (default: the saved login or HF_TOKEN)")
    group.add_argument("--cache-dir", default=None, help="huggingface_hub cache folder")
    group.add_argument("--local-files-only", action="store_true", help="use only the local cache, no download")


def hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "revision": args.revision,
        "subfolder": args.subfolder,
        "token": args.token,
        "cache_dir": args.cache_dir,
        "local_files_only": args.local_files_only,
    }


def keep_ratio(text: str) -> float | str | None:
    """`--keep-ratio`: a fraction in (0, 1], `auto` (searched per edit), or `none` for an unregularized patch."""
    if text.lower() == "none":
        return None
    if text.lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], 'auto' or 'none', got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (or 'none'), got {value}")
    return value


def json_object(text: str | None, what: str) -> dict[str, Any]:
    """Inline JSON (`'{"layer": 5}'`) or `@file.json`, which must hold an object."""
    if not text:
        return {}
    source = text
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            source = f.read()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from exc
    if not isinstance(value, dict):
        raise CLIError(f"{what} must be a JSON object, got {text!r}")
    return value


def add_request_args(parser: argparse.ArgumentParser, *, help_file: str) -> None:
    group = parser.add_argument_group(
        "edit requests", "from a file (--requests), or one request from flags (--prompt, --subject, --target-new)"
    )
    group.add_argument("--requests", default=None, help=help_file)
    group.add_argument("--prompt", default=None, help="the prompt, with {} where the subject goes")
    group.add_argument("--subject", default=None, help="the subject the fact is about")
    group.add_argument("--target-new", default=None, help="the new continuation")
    group.add_argument("--target-true", default=None, help="the current continuation, if known")
    group.add_argument("--paraphrase", action="append", default=[], help="a paraphrased prompt (repeatable)")
    group.add_argument("--neighborhood", action="append", default=[], help="an unrelated prompt (repeatable)")
    group.add_argument("--limit", type=int, default=None, help="only the first N requests of the file")


def read_requests(args: argparse.Namespace, *, required: bool) -> list[Any] | None:
    """Requests from `--requests FILE` or the single-request flags; None when neither is given and not required."""
    from ..requests import EditRequest, load_requests

    flags = (args.prompt, args.subject, args.target_new)
    if args.requests is not None:
        if any(f is not None for f in flags):
            raise CLIError("give either --requests FILE or --prompt/--subject/--target-new, not both")
        return load_requests(args.requests, limit=args.limit)
    if all(f is None for f in flags):
        if required:
            raise CLIError("no edit request: give --requests FILE, or --prompt, --subject and --target-new")
        return None
    missing = [n for n, f in zip(("--prompt", "--subject", "--target-new"), flags, strict=True) if f is None]
    if missing:
        raise CLIError(f"one request from flags needs --prompt, --subject and --target-new; missing {missing}")
    return [
        EditRequest(
            prompt=args.prompt,
            subject=args.subject,
            target_new=args.target_new,
            target_true=args.target_true,
            paraphrases=args.paraphrase,
            neighborhood=args.neighborhood,
        )
    ]


def print_json(data: Any) -> None:
    say(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def local_folder(path: str) -> str | None:
    """`path` when it is an existing folder (a patch given by path), else None (a Hub id)."""
    return path if os.path.isdir(path) else None
