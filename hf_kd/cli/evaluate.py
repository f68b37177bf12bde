"""``hf-kd evaluate``: a saved student beside its teacher on the same rows, by :mod:`hf_kd.evaluation`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
from typing import Any

from hf_kd.cli.common import add_placement_options, run_command
from hf_kd.errors import check_output_file, write_text_atomic
from hf_kd.evaluation import DATA_OPTIONS, evaluate_pair, format_table
from hf_kd.recipe.args import DataArguments


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `hf-kd evaluate` on the `hf-kd` subparsers."""
    parser = subparsers.add_parser(
        "evaluate",
        help="compare a saved student with its teacher: size, perplexity, ROUGE, generation speed",
        description=textwrap.fill(
            "Evaluate a saved student beside its teacher on the same rows: parameter count, perplexity on the "
            "targets (the text, for causal models), --metric scores of the generations (ROUGE F-measures by "
            "default; encoder-decoder models) and greedy generation speed (tokens/s, every row generating "
            "exactly --max_new_tokens). "
            "Data options default to those of --config, a recipe config.",
            100,
        ),
        epilog=(
            "examples:\n"
            "  hf-kd evaluate --student out/t5-small-xsum --config recipes/configs/t5_large_to_t5_small_xsum.yaml\n"
            "  hf-kd evaluate --student out/student --teacher gpt2-large --dataset_name Salesforce/wikitext \\\n"
            "      --dataset_config_name wikitext-103-raw-v1 --split test --max_samples 200 --output eval.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = parser.add_argument_group("models")
    models.add_argument("--student", required=True, help="directory (or Hub id) of the distilled student")
    models.add_argument("--teacher", help="the teacher (default: teacher_model_name_or_path of --config)")
    models.add_argument("--config", metavar="FILE.yaml", help="recipe config to take the teacher and data from")
    models.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="the student's tokenizer (default: tokenizer_name_or_path of --config, else the student's own, else the "
        "teacher's)",
    )
    models.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="dtype the models are loaded in (default float32; auto: as saved)",
    )
    models.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    models.add_argument("--trust_remote_code", action="store_true", help="only for repositories you have read")
    add_placement_options(models, "each model")

    data = parser.add_argument_group("data (default: the --config's)")
    fields = {f.name: f for f in dataclasses.fields(DataArguments)}
    for name in DATA_OPTIONS:
        help_text = fields[name].metadata.get("help", "")
        if name == "group_texts":
            data.add_argument(f"--{name}", type=_bool, default=None, metavar="true|false", help=help_text)
        else:
            kind = int if name.startswith(("max_", "block")) else str
            data.add_argument(f"--{name}", type=kind, default=None, help=help_text)
    data.add_argument("--split", help="split to evaluate on (default: eval_split of --config, else validation)")
    data.add_argument("--max_samples", type=int, default=None, help="evaluate on the first N rows only")

    run_group = parser.add_argument_group("evaluation")
    run_group.add_argument("--batch_size", type=int, default=8, help="rows per batch (default 8)")
    run_group.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per row")
    run_group.add_argument("--num_beams", type=int, default=1, help="beams for the ROUGE generations")
    run_group.add_argument(
        "--metric",
        default="rouge",
        metavar="NAME_OR_PATH",
        help="evaluate metric for the generations: rouge (default, hf_kd's offline ROUGE), a local metric folder or "
        "script, or a Hub metric name already in evaluate's cache",
    )
    run_group.add_argument("--no_rouge", action="store_true", help="skip the generations scored by --metric")
    run_group.add_argument("--no_speed", action="store_true", help="skip the generation-speed measurement")
    run_group.add_argument("--speed_samples", type=int, default=32, help="rows timed for generation speed")
    run_group.add_argument("--speed_input_length", type=int, default=128, help="prompt tokens kept when timing")
    run_group.add_argument(
        "--output",
        metavar="FILE.json",
        help="also write the results as JSON here (replaces only an earlier hf-kd evaluate result; through a symlink, "
        "the file it points to)",
    )
    parser.set_defaults(run=run)
    return parser


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run(args: argparse.Namespace) -> int:
    """`hf-kd evaluate`: prints the table (and writes --output); 2 after a one-line error."""
    return run_command("hf-kd evaluate", _evaluate, args)


def is_result(data: Any) -> bool:
    """Whether ``data`` (a parsed --output file) is what `hf-kd evaluate` writes: numbers per model role."""
    return (
        isinstance(data, dict)
        and bool(data)
        and set(data) <= {"student", "teacher"}
        and all(isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()) for v in data.values())
    )


def _evaluate(args: argparse.Namespace) -> int:
    # Checked before the evaluation, which may take long: a path that cannot be written fails now.
    output = check_output_file("--output", args.output, is_result, "an hf-kd evaluate result") if args.output else None
    results = evaluate_pair(args)
    print(format_table(results))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, json.dumps(results, indent=2) + "\n")
    return 0
