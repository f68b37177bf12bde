"""The `hf-kd` command."""

from __future__ import annotations

import argparse
import sys

from hf_kd import __version__, cache, evaluation, pseudo_label, quickstart, recipe, student_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-kd", description="Knowledge distillation of text-generation models with the Hugging Face Trainer."
    )
    parser.add_argument("--version", action="version", version=f"hf-kd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    recipe.add_parser(subparsers)
    evaluation.add_parser(subparsers)
    quickstart.add_parser(subparsers)
    student_cli.add_parser(subparsers)
    cache.add_parser(subparsers)
    pseudo_label.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
