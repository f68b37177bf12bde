"""``hf-kd distill`` and the recipes/distill_*.py scripts: a recipe config (YAML) and ``--key value`` overrides in,
a student distilled by :func:`hf_kd.recipe.run.run_recipe` out."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hf_kd.cli.common import run_command
from hf_kd.config import DistillationConfig
from hf_kd.errors import ConfigError
from hf_kd.recipe.args import DataArguments, parse_recipe_config, recipe_parser
from hf_kd.recipe.run import TASKS, run_recipe
from hf_kd.saving import SaveError

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Distill a teacher into a student with the settings of a recipe config (YAML). Any key of the config can be "
    "overridden on the command line with --key value (values are read as YAML: 2, 5e-5, true, null, "
    "'{\"a\": 1}'). Keys: the student/data options of hf_kd.recipe.args plus every hf_kd.DistillationConfig / "
    "Seq2SeqTrainingArguments field; see docs/recipes.md."
)
EPILOG = (
    "examples:\n"
    "  hf-kd distill --config recipes/configs/quickstart_lm.yaml  (after hf-kd quickstart)\n"
    "  hf-kd distill --config recipes/configs/t5_large_to_t5_small_xsum.yaml --max_steps 100 --output_dir out\n"
    "multi-GPU: accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/distill_seq2seq.py CONFIG.yaml"
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `hf-kd distill` on the `hf-kd` subparsers."""
    parser = subparsers.add_parser(
        "distill",
        help="distill a student with a recipe config (YAML) and --key value overrides",
        usage="hf-kd distill [-h] --config FILE.yaml [--task {seq2seq,causal}] [--key value ...]",
        description=textwrap.fill(DESCRIPTION, 100),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, metavar="FILE.yaml", help="the recipe config")
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=None,
        help="refuse to run unless the models are of this kind (default: whatever the student is)",
    )
    parser.set_defaults(run=run, overrides=[])
    _take_unknown_options_as_overrides(parser)
    return parser


def _take_unknown_options_as_overrides(parser: argparse.ArgumentParser) -> None:
    """Keep the options argparse does not know as ``args.overrides`` instead of failing on them.

    The overridable keys are the hundred-odd fields of the recipe dataclasses; they are checked (names and
    types) by :func:`hf_kd.recipe.args.check_values`, which gives better errors than argparse would.
    """
    parse_known_args = parser.parse_known_args

    def parse(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):  # noqa: ANN202
        namespace, extras = parse_known_args(args, namespace)
        namespace.overrides = list(namespace.overrides) + list(extras)
        return namespace, []

    parser.parse_known_args = parse  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    """`hf-kd distill`: returns 0, or 2 after a one-line error naming the bad key, value or path."""
    body = lambda a: distill(a.config, a.overrides, getattr(a, "task", None))  # noqa: E731
    return run_command("hf-kd distill", body, args, errors=(ConfigError, SaveError))


def distill(config: str, overrides: Sequence[str], task: str | None) -> int:
    """Run the recipe ``config`` with ``--key value`` ``overrides``; say where the result went (once, from the
    main process, under a multi-process launch)."""
    model_args, data_args, training_args = parse_recipe_config(config, list(overrides))
    main_process = training_args.process_index == 0
    with _hf_kd_logging(main_process):
        metrics = run_recipe(model_args, data_args, training_args, task=task)
        if not main_process:
            return 0
        if data_args.save_tokenized_train:
            print(_tokenised_message(data_args, training_args, metrics["train_samples"]))
            return 0
        logger.info("Distillation finished: %s", metrics)
    print(f"Saved the student to {training_args.output_dir}")
    return 0


@contextmanager
def _hf_kd_logging(main_process: bool) -> Iterator[None]:
    """hf_kd's log lines (what the run does with each split, what it deletes ...) on stderr, from the main process
    only; the other processes say warnings and errors. A handler is added only when none is set up (the recipe
    scripts set one)."""
    hf_kd_logger = logging.getLogger("hf_kd")
    level, propagate = hf_kd_logger.level, hf_kd_logger.propagate
    hf_kd_logger.setLevel(logging.INFO if main_process else logging.WARNING)
    handler = None
    if not hf_kd_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        hf_kd_logger.addHandler(handler)
        hf_kd_logger.propagate = False  # a library may set up the root logger later: each line once
    try:
        yield
    finally:
        hf_kd_logger.setLevel(level)
        hf_kd_logger.propagate = propagate
        if handler is not None:
            hf_kd_logger.removeHandler(handler)


def _tokenised_message(data_args: DataArguments, args: DistillationConfig, rows: int) -> str:
    folder = data_args.save_tokenized_train
    teacher = args.teacher_model_name_or_path or "TEACHER"
    return (
        f"Saved the tokenised training split ({rows} rows) to {folder}; nothing was trained. Next: hf-kd "
        f"cache-teacher --teacher {teacher} --dataset {folder} --output CACHE, then train with --teacher_cache CACHE "
        "(docs/recipes.md, Training from a teacher cache)."
    )


def main(task: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of recipes/distill_{seq2seq,causal}.py: ``script.py CONFIG.yaml [--key value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = f"distill_{task}.py"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {script} CONFIG.yaml [--key value ...]\n\n{DESCRIPTION}\n\nKeys:\n")
        recipe_parser().print_help()
        return 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_command(script, lambda a: distill(a[0], a[1:], task), argv, errors=(ConfigError, SaveError))
