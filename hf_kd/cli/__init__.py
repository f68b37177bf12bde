"""The `hf-kd` command."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from hf_kd import evaluation, quickstart
from hf_kd.cli import make_student as student_cli
from hf_kd.recipe import run as recipe
from hf_kd.teachers import cache_writer as cache
from hf_kd.teachers import pseudo_label
from hf_kd.version import __version__


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors; the subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        # An abbreviation that matches one option under both its spellings is not ambiguous.
        return list({id(found[0]): found for found in super()._get_option_tuples(option_string)}.values())


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hf-kd",
        description="Knowledge distillation of text-generation models with the Hugging Face Trainer. Every option "
        "can be spelled --snake_case or --kebab-case.",
    )
    parser.add_argument("--version", action="version", version=f"hf-kd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    recipe.add_parser(subparsers)
    evaluation.add_parser(subparsers)
    quickstart.add_parser(subparsers)
    student_cli.add_parser(subparsers)
    cache.add_parser(subparsers)
    pseudo_label.add_parser(subparsers)
    accept_both_spellings(parser)
    return parser


def accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Let every long option (of ``parser`` and its subcommands) be given as --snake_case and as --kebab-case.

    The other spelling only parses: help lists each option once, as its module wrote it.
    """
    for action in parser._actions:
        for option in [o for o in action.option_strings if o.startswith("--")]:
            name = option[2:]
            for other in (f"--{name.replace('_', '-')}", f"--{name.replace('-', '_')}"):
                parser._option_string_actions.setdefault(other, action)
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                accept_both_spellings(subparser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command is a usage error, as a wrong one is
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
