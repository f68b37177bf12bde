"""`hf-kd evaluate`: a saved student beside its teacher on the same data.

For each model: parameter count, perplexity on the targets, ROUGE of greedy (or beam) generations for
encoder-decoder models, and generation speed; the numbers come from :mod:`hf_kd.metrics`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from hf_kd.metrics import count_parameters, generation_speed, perplexity, rouge
from hf_kd.recipe import _first_line, _load_config, task_of
from hf_kd.recipe_args import ConfigError, DataArguments, check_values, load_yaml_config
from hf_kd.recipe_data import check_columns, load_raw_datasets, tokenize_causal, tokenize_seq2seq

# The DataArguments fields `evaluate` takes from the command line (the training-only ones are left out).
DATA_OPTIONS = (
    "dataset_name",
    "dataset_config_name",
    "data_files",
    "source_column",
    "target_column",
    "text_column",
    "source_prefix",
    "max_source_length",
    "max_target_length",
    "block_size",
    "group_texts",
    "cache_dir",
)


def load_model(key: str, name_or_path: str, dtype: str, device: str, trust_remote_code: bool = False) -> Any:
    """A model with the Auto class its config asks for, in eval mode on ``device``."""
    config = _load_config(key, name_or_path, trust_remote_code, None)
    auto = AutoModelForSeq2SeqLM if task_of(config) == "seq2seq" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(f"{key}={name_or_path!r}: cannot load the weights ({_first_line(err)})") from None
    return model.to(device).eval()


def load_tokenizer(names: list[tuple[str, str]], trust_remote_code: bool = False) -> Any:
    """The first tokenizer that loads, from ``(key, name_or_path)`` candidates."""
    errors = []
    for key, name in names:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            errors.append(f"{key}={name!r}: {_first_line(err)}")
            continue
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    raise ConfigError("No tokenizer could be loaded: " + "; ".join(errors))


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    sources: list[str],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    max_input_length: int | None = None,
) -> list[str]:
    """Decoded generations of an encoder-decoder model, one per source, special tokens removed."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(sources), batch_size):
        inputs = tokenizer(
            sources[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=max_input_length is not None,
            max_length=max_input_length,
        ).to(device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        outputs += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return outputs


def evaluate_model(
    model: Any, tokenizer: Any, raw: Dataset, data_args: DataArguments, options: argparse.Namespace
) -> dict[str, float]:
    """The numbers of one model on ``raw`` (the evaluation rows, untokenised)."""
    task = task_of(model.config)
    results: dict[str, float] = {"parameters": count_parameters(model)}
    if task == "seq2seq":
        tokenized = tokenize_seq2seq(raw, tokenizer, data_args)
        sources = [data_args.source_prefix + (s or "") for s in raw[data_args.source_column]]
    else:
        limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        tokenized = tokenize_causal(raw, tokenizer, data_args, limit)
        sources = [t for t in raw[data_args.text_column] if t and t.strip()]
    results["perplexity"] = perplexity(model, tokenized, batch_size=options.batch_size)
    if task == "seq2seq" and not options.no_rouge:
        predictions = generate_texts(
            model,
            tokenizer,
            sources,
            batch_size=options.batch_size,
            max_new_tokens=options.max_new_tokens,
            num_beams=options.num_beams,
            max_input_length=data_args.max_source_length,
        )
        references = [t or "" for t in raw[data_args.target_column]]
        results.update(rouge(predictions, references))
    if not options.no_speed:
        speed = generation_speed(
            model,
            tokenizer,
            sources[: options.speed_samples],
            max_new_tokens=options.max_new_tokens,
            batch_size=options.batch_size,
            max_input_length=options.speed_input_length,
        )
        results["generation_tokens_per_second"] = speed["tokens_per_second"]
    return results


def _data_args(options: argparse.Namespace, recipe: dict[str, Any], split: str) -> DataArguments:
    """Data settings from the recipe config, overridden by the ones given on the command line."""
    values = {k: v for k, v in recipe.items() if k in DATA_OPTIONS}
    given = {k: getattr(options, k) for k in DATA_OPTIONS if getattr(options, k) is not None}
    files = given.get("data_files")
    if isinstance(files, str):
        if files.lstrip().startswith("{"):
            try:
                given["data_files"] = json.loads(files)
            except json.JSONDecodeError as err:
                raise ConfigError(f"--data_files: {files!r} is not valid JSON ({err.msg}).") from None
        else:
            given["data_files"] = {split: files}  # one file: it is the split evaluated
    values.update(check_values(given, "command line"))
    if "data_files" in given:
        values.pop("dataset_name", None)
    elif "dataset_name" in given:
        values.pop("data_files", None)
    return DataArguments(**values)


def evaluate_pair(options: argparse.Namespace) -> dict[str, dict[str, float]]:
    """``{"student": {...}, "teacher": {...}}`` (teacher only when one is named), as the options say."""
    recipe = load_yaml_config(options.config) if options.config else {}
    if options.config:
        check_values(recipe, options.config)
    teacher = options.teacher or recipe.get("teacher_model_name_or_path")
    split = options.split or recipe.get("eval_split") or "validation"
    data_args = _data_args(options, recipe, split)
    task = task_of(_load_config("--student", options.student, options.trust_remote_code, None))
    raw_splits = load_raw_datasets(data_args, task)
    if split not in raw_splits:
        raise ConfigError(f"--split {split!r} is not a split of the data: {sorted(raw_splits)}.")
    raw = raw_splits[split]
    if options.max_samples is not None:
        raw = raw.select(range(min(options.max_samples, len(raw))))
    if task == "seq2seq":
        check_columns(raw, {"source_column": data_args.source_column, "target_column": data_args.target_column})
    else:
        check_columns(raw, {"text_column": data_args.text_column})

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # (role, the option that named the model, its path)
    models = [("student", "--student", options.student)]
    if teacher:
        models.append(("teacher", "--teacher" if options.teacher else "teacher_model_name_or_path", teacher))
    for _, key, path in models:  # every model can be found, before any is evaluated
        found = task_of(_load_config(key, path, options.trust_remote_code, None))
        if found != task:
            raise ConfigError(f"{key}={path!r} is {found} but the student is {task}.")
    results = {}
    for role, key, path in models:
        others = [(k, p) for r, k, p in models if r != role]
        tokenizer = load_tokenizer([(key, path), *others], options.trust_remote_code)
        model = load_model(key, path, options.dtype, device, options.trust_remote_code)
        results[role] = evaluate_model(model, tokenizer, raw, data_args, options)
        del model
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table, one row per metric, one column per model (and student/teacher when both)."""
    roles = list(results)
    keys = list(dict.fromkeys(k for r in roles for k in results[r]))
    header = ["metric", *roles] + (["student/teacher"] if len(roles) == 2 else [])
    rows = [header]
    for key in keys:
        row = [key] + [_fmt(results[r].get(key)) for r in roles]
        if len(roles) == 2:
            s, t = results["student"].get(key), results["teacher"].get(key)
            row.append(_fmt(s / t) if s is not None and t else "")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.4g}"


# ---- the command line --------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `hf-kd evaluate` on the `hf-kd` subparsers."""
    parser = subparsers.add_parser(
        "evaluate",
        help="compare a saved student with its teacher: size, perplexity, ROUGE, generation speed",
        description=textwrap.fill(
            "Evaluate a saved student beside its teacher on the same rows: parameter count, perplexity on the "
            "targets (the text, for causal models), ROUGE F-measures of the generations (encoder-decoder "
            "models) and greedy generation speed (tokens/s, every row generating exactly --max_new_tokens). "
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
    models.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    models.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    models.add_argument("--trust_remote_code", action="store_true", help="only for repositories you have read")

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
    run_group.add_argument("--batch_size", type=int, default=8)
    run_group.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per row")
    run_group.add_argument("--num_beams", type=int, default=1, help="beams for the ROUGE generations")
    run_group.add_argument("--no_rouge", action="store_true", help="skip the generations for ROUGE")
    run_group.add_argument("--no_speed", action="store_true", help="skip the generation-speed measurement")
    run_group.add_argument("--speed_samples", type=int, default=32, help="rows timed for generation speed")
    run_group.add_argument("--speed_input_length", type=int, default=128, help="prompt tokens kept when timing")
    run_group.add_argument("--output", metavar="FILE.json", help="also write the results as JSON here")
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
    try:
        results = evaluate_pair(args)
    except ConfigError as err:
        print(f"hf-kd evaluate: error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0
