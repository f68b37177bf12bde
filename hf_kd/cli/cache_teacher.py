"""``hf-kd cache-teacher``: a teacher's (or a teacher ensemble's) top-k log-probabilities over a tokenised data set,
written by :func:`hf_kd.teachers.cache_writer.build_teacher_cache`."""

from __future__ import annotations

import argparse
import math
from typing import Any

from torch import nn

from hf_kd.cli.common import (
    add_teacher_runtime_options,
    load_teachers,
    load_tokenised,
    rebuild_reporter,
    rebuilt_note,
    run_command,
)
from hf_kd.cli.workers import add_worker_options, worker_done, workers_from_args
from hf_kd.errors import ConfigError
from hf_kd.teachers.cache_writer import build_teacher_cache, cache_size, check_tokenised
from hf_kd.teachers.ensemble import TeacherEnsemble
from hf_kd.teachers.input_checks import check_cache_lengths, check_named_tokenizer
from hf_kd.teachers.shards import MANIFEST, check_inputs_outside


def _weights(text: str) -> list[float]:
    """``--teacher-weights 0.7,0.3``: positive numbers, one per teacher."""
    try:
        weights = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.7,0.3") from None
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise argparse.ArgumentTypeError(f"{text!r}: every weight must be a positive number, e.g. 0.7,0.3")
    return weights


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``hf-kd cache-teacher`` on the ``hf-kd`` subparsers."""
    parser = subparsers.add_parser(
        "cache-teacher",
        help="Run a teacher once over a tokenised data set and store its top-k log-probabilities.",
        description="Writes a resumable top-k teacher cache (see docs/cache.md); run it again to resume.",
    )
    parser.add_argument(
        "--teacher",
        required=True,
        action="extend",
        nargs="+",
        metavar="DIR",
        help="Teacher model folder or Hub id. Several (--teacher A B, or --teacher A --teacher B) cache their "
        "ensemble: the log of the weighted mean of their probabilities; they must share one tokenizer.",
    )
    parser.add_argument(
        "--teacher-weights",
        type=_weights,
        default=None,
        metavar="W1,W2,...",
        help="Weights of the ensemble's teachers, in --teacher order, e.g. 0.7,0.3 (normalised; default: equal).",
    )
    parser.add_argument("--dataset", required=True, help="A tokenised data set saved with save_to_disk.")
    parser.add_argument("--split", default=None, help="Split to cache when --dataset is a DatasetDict.")
    parser.add_argument(
        "--output", required=True, help="Cache folder (created; when it exists, verified, repaired and resumed)."
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the teacher's).")
    parser.add_argument("--k", type=int, default=64, help="Teacher tokens kept per position (default 64).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature of the cache.")
    parser.add_argument(
        "--tail-samples",
        type=int,
        default=0,
        help="Also draw this many tokens per position from the teacher's tail (2 bytes each), for the unbiased "
        "'sampled' tail treatment (default 0: none).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tail samples.")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per teacher forward pass (default 8).")
    parser.add_argument("--shard-size", type=int, default=1000, help="Rows per resumable shard.")
    add_teacher_runtime_options(parser)
    add_worker_options(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a cache made with other settings (deletes its manifest and shards, nothing else).",
    )
    parser.set_defaults(run=run)
    return parser


def _check_cli_numbers(args: argparse.Namespace) -> None:
    """Before any model is loaded: the settings that cannot be right whatever the teacher."""
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        raise ConfigError(f"--temperature {args.temperature} must be a positive number; use e.g. 1.0 or 2.0.")
    for option, value, least, example in (
        ("--k", args.k, 1, 64),
        ("--tail-samples", args.tail_samples, 0, 64),
        ("--batch-size", args.batch_size, 1, 8),
        ("--shard-size", args.shard_size, 1, 1000),
    ):
        if value < least:
            raise ConfigError(f"{option} {value} must be {least} or more; pass e.g. {option} {example}.")
    teachers, weights = len(args.teacher), args.teacher_weights
    if weights is not None and teachers < 2:
        raise ConfigError(
            "--teacher-weights weighs the teachers of an ensemble, and one --teacher was given; name two or more "
            "teachers, or leave --teacher-weights out."
        )
    if weights is not None and len(weights) != teachers:
        raise ConfigError(
            f"--teacher-weights has {len(weights)} values for {teachers} teachers; give one weight per --teacher, "
            "in the same order."
        )


def load_teacher_or_ensemble(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The teacher, or the :class:`TeacherEnsemble` of the teachers named, on ``--device``, and the cache's
    tokenizer (see :func:`hf_kd.cli.common.load_teachers`). Any failure is a ConfigError."""
    models, tokenizer = load_teachers(args, args.teacher)
    if len(models) == 1:
        return models[0], tokenizer
    try:
        return TeacherEnsemble(models, args.teacher_weights), tokenizer
    except ValueError as err:  # causal and encoder-decoder teachers mixed
        raise ConfigError(f"--teacher {' '.join(args.teacher)}: {err}") from None


def run(args: argparse.Namespace) -> int:
    """``hf-kd cache-teacher``: 0, or 2 after a one-line error."""
    return run_command("hf-kd cache-teacher", _cache_teacher, args)


def _cache_teacher(args: argparse.Namespace) -> int:
    _check_cli_numbers(args)
    workers = workers_from_args(args)
    inputs = {"--dataset": args.dataset, "--tokenizer": args.tokenizer}
    inputs.update({f"--teacher {name}": name for name in args.teacher})
    check_inputs_outside(args.output, inputs, ("shards", MANIFEST))
    dataset = load_tokenised(args.dataset, args.split)
    check_tokenised(dataset, f"--dataset {args.dataset}")
    teacher, tokenizer = load_teacher_or_ensemble(args)
    check_named_tokenizer(tokenizer, args.tokenizer, args.teacher, args.trust_remote_code)
    check_cache_lengths(dataset, teacher, f"--dataset {args.dataset}")
    rebuilt: list[int] = []
    written: list[int] = []
    path = build_teacher_cache(
        teacher,
        dataset,
        args.output,
        tokenizer=tokenizer,
        **{name: getattr(args, name) for name in ("k", "temperature", "tail_samples", "seed")},
        **{name: getattr(args, name) for name in ("batch_size", "shard_size", "overwrite")},
        on_rebuild=rebuild_reporter(args.output, rebuilt),
        workers=workers,
        on_shard=written.append,
    )
    line, report = worker_done(path, workers, written)
    if line is not None:
        print(line)
    if not report:
        return 0
    size = cache_size(path)
    per_token = size["bytes_per_target_token"]
    print(
        f"Cache written to {path}{rebuilt_note(rebuilt)}: {size['target_tokens']} target tokens, "
        f"{per_token:.0f} bytes each."
    )
    return 0
