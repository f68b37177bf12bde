"""The `hf-kd` command."""

from __future__ import annotations

import argparse
import sys

from hf_kd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-kd", description="Knowledge distillation of text-generation models with the Hugging Face Trainer."
    )
    parser.add_argument("--version", action="version", version=f"hf-kd {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
