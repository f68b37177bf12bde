"""The `hf-kd` command: one module per subcommand (its options and its `run`), what they share in
:mod:`hf_kd.cli.common`. The library functions they call live in the domain modules, which never import this
package."""

from __future__ import annotations

import argparse
import sys

from hf_kd.cli import cache_teacher, distill, evaluate, make_student, pseudo_label, quickstart
from hf_kd.cli.common import Parser, accept_both_spellings
from hf_kd.version import __version__

# In the order `hf-kd --help` lists them.
COMMANDS = (distill, evaluate, quickstart, make_student, cache_teacher, pseudo_label)

__all__ = ["COMMANDS", "Parser", "accept_both_spellings", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hf-kd",
        description="Knowledge distillation of text-generation models with the Hugging Face Trainer. Every option "
        "can be spelled --snake_case or --kebab-case.",
    )
    parser.add_argument("--version", action="version", version=f"hf-kd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    accept_both_spellings(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command is a usage error, as a wrong one is
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)
