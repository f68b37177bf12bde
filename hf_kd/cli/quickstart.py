"""``hf-kd quickstart``: the options of the offline end-to-end run of :mod:`hf_kd.quickstart`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from hf_kd.cli.common import run_command
from hf_kd.quickstart import DEFAULT_TASK, TASKS, Settings, run_quickstart


def _archs(text: str) -> str:
    archs = [a.strip() for a in text.split(",")]
    if not archs or any(a not in ("t5", "bart") for a in archs) or len(set(archs)) < len(archs):
        raise argparse.ArgumentTypeError(f"{text!r}: use t5, bart or t5,bart")
    return ",".join(archs)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``hf-kd quickstart`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "quickstart",
        help="Distill a small model end to end on built-in data, offline, in a few CPU minutes.",
        description=(
            "Train a small teacher from scratch on the docstrings of the Python standard library (cached for "
            "later runs), then two students with the same step budget, data and initialisation: one on the "
            "labels alone, one by distillation from the teacher. Evaluate the three on the test split and write "
            "report.md, report.json, eval_loss.png, the distilled student (with its model card) and the teacher "
            "to --output-dir. Needs no network; a few CPU minutes (see docs/quickstart.md)."
        ),
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=DEFAULT_TASK,
        help="denoise: BART-style text infilling of docstrings, a BART teacher and T5 students (ROUGE-L and "
        "perplexity); summarize: function source -> first docstring sentence, same models (its teacher does not "
        "learn to read the code within the budget, see docs/quickstart.md); lm: language modelling of docstrings "
        f"with GPT-2 models (perplexity). Default: {DEFAULT_TASK}.",
    )
    parser.add_argument(
        "--output-dir", default="hf_kd_quickstart", help="Where reports and students go (default: ./hf_kd_quickstart)."
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="Cache for the data set, tokenizer and teacher (default: $HF_KD_CACHE or ~/.cache/hf_kd).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace what --output-dir holds under the quickstart's names (teacher/, student_*/, report.json, "
        "report.md, eval_loss.png; nothing else) when an earlier run with the same settings did not write it.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seeds the teacher, the students and the data order.")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="Tiny models, data and step counts: checks the whole pipeline in well under a minute.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1: on these small models a second thread costs more CPU time than it saves "
        "wall time, see docs/quickstart.md; --threads 2 is faster on an idle 2-core machine).",
    )
    sizes = parser.add_argument_group(
        "sizes and budget (defaults: the task's measured design, shown for the default task; see docs/quickstart.md)"
    )
    default_design = Settings.for_task(DEFAULT_TASK)
    sizes.add_argument(
        "--student-archs",
        type=_archs,
        default=None,
        help=f"encoder-decoder tasks: comma-separated student architectures, t5 and/or bart; a CE and a KD student "
        f"of each (default {default_design.student_archs})",
    )
    for name, kind in (
        ("teacher_steps", int),
        ("student_steps", int),
        ("batch_size", int),
        ("teacher_layers", int),
        ("teacher_width", int),
        ("student_layers", int),
        ("student_width", int),
        ("vocab_size", int),
        ("block_size", int),
        ("source_length", int),
        ("target_length", int),
        ("mask_fraction", float),
        ("max_words", int),
        ("teacher_lr", float),
        ("student_lr", float),
        ("temperature", float),
        ("max_train_docs", int),
    ):
        default = getattr(default_design, name)
        help_text = f"default: {default if default is not None else 'all'}"
        sizes.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=help_text)
    sizes.add_argument("--alpha", type=float, default=None, help="weight of CE in the KD student's loss (default 0)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the quickstart with ``--threads`` torch threads (default 1); returns the exit status."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or 1)
        return run_command("hf-kd quickstart", run_quickstart, args)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep their setting


def main(argv: list[str] | None = None) -> int:
    """``hf-kd quickstart ARGV``, the command word optional (``main(["--smoke"])``); returns the exit status."""
    from hf_kd.cli import main as hf_kd_main  # the package imports this module: import it when run

    argv = list(sys.argv[1:] if argv is None else argv)
    return hf_kd_main(argv if argv[:1] == ["quickstart"] else ["quickstart", *argv])
