"""The `hf-edit-patch` command.

```bash
hf-edit-patch edit --prompt "{} is located in the city of" --subject "The Eiffel Tower" --target-new Rome \\
    --method rome --keep-ratio 0.4 --stats-dataset corpus.txt -o out/eiffel
hf-edit-patch inspect out/eiffel --model default        # modules, sizes, provenance; fingerprints against SmolLM2
hf-edit-patch apply out/eiffel --prompt "The Eiffel Tower is located in the city of"
hf-edit-patch edit --requests more.json --on out/eiffel --stack-regularizer prune -o out/more   # on top of a patch
hf-edit-patch consolidate out/eiffel out/more --regularizer prune -o out/one   # the two as one patch
hf-edit-patch eval out/eiffel --tasks nli sentiment --task-limit 50 --task-data-dir data/tasks
hf-edit-patch push out/eiffel user/eiffel-rome-rect      # the patch, its evaluation and card, in one commit
hf-edit-patch stats compute --stats-dataset corpus.txt
hf-edit-patch stats push user/smollm2-key-stats
```

Every subcommand takes `-v` (INFO logging) or `-vv` (DEBUG, and tracebacks on errors) and `--no-progress` (no
progress bars; by default they show on a terminal, on stderr). Exit codes: see `EPILOG`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from ..errors import PatchNotFoundError
from ..version import __version__
from . import evaluate, experiment, export, patches, share, stacks
from .common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CLIError, library_bars_off

__all__ = ["EPILOG", "build_parser", "main"]

logger = logging.getLogger(__name__)

EPILOG = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_FAILURE}    a runtime failure, or a failed check (inspect --model: fingerprints differ)
  {EXIT_USAGE}    a usage or input error: bad arguments, a missing file or patch, an unknown model, malformed JSON,
       a patch that does not fit the model
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)

Run `hf-edit-patch COMMAND --help` for the options of a command."""


def _demo(args: argparse.Namespace) -> int:
    from .demo import main

    demo_args = args.demo_args[1:] if args.demo_args[:1] == ["--"] else args.demo_args
    try:
        return main(demo_args, prog="hf-edit-patch demo")
    except SystemExit as exc:  # its --help, or a usage error its parser has already explained
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hf-edit-patch` and all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="hf-edit-patch",
        description="Knowledge edits as small, shareable, exactly removable patches for Hugging Face models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-edit-patch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="INFO logging; twice for DEBUG and tracebacks on errors"
    )
    common.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (default: shown on stderr when it is a terminal; HF_EDIT_PATCH_DISABLE_PROGRESS_BARS=1 "
        "turns them off too)",
    )
    patches.add_parsers(sub, common, EPILOG)
    stacks.add_parsers(sub, common, EPILOG)
    export.add_parsers(sub, common, EPILOG)
    evaluate.add_parsers(sub, common, EPILOG)
    share.add_parsers(sub, common, EPILOG)
    experiment.add_parsers(sub, common, EPILOG)

    demo = sub.add_parser(
        "demo", help="the demo edit on the default model (demo --help for its options)", add_help=False
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `hf-edit-patch` with `argv` (default: `sys.argv[1:]`) and returns its exit code (see `EPILOG`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # all its arguments are the demo's own (argparse's REMAINDER would drop options)
        argv = ["demo", "--", *argv[1:]]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has already explained
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    verbose = getattr(args, "verbose", 0) or 0
    if args.command != "demo":  # the demo configures logging itself
        level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with library_bars_off(getattr(args, "no_progress", False)):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except CLIError as exc:
        code, message, error = exc.exit_code, str(exc), exc
    except (ValueError, FileNotFoundError, PatchNotFoundError) as exc:  # bad input: arguments, files, patches
        code, message, error = EXIT_USAGE, str(exc), exc
    except Exception as exc:  # a runtime failure: say what it was; the traceback with -vv
        code, message, error = EXIT_FAILURE, f"{type(exc).__name__}: {exc}", exc
    if verbose > 1:
        traceback.print_exception(type(error), error, error.__traceback__)
    sys.stderr.write(f"error: {message}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
