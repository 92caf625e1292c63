"""The `hf-edit-patch` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _experiment(args: argparse.Namespace) -> int:
    from .evaluation.experiment import main

    return main(args=args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import main

    return main(args.demo_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-edit-patch", description="Knowledge edits as small, shareable, exactly removable patches."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from .evaluation.experiment import build_parser as experiment_parser

    exp = sub.add_parser(
        "experiment",
        help="edit a model step by step and measure editing metrics, drift, weight changes and tasks",
        description="Edit a model step by step and measure what it costs (resumable; JSON results and PNG plots).",
    )
    experiment_parser(exp)
    exp.set_defaults(func=_experiment)

    demo = sub.add_parser("demo", help="the demo edit on the default model", add_help=False)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
