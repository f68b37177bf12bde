"""`hf-kd evaluate`: a saved student beside its teacher on the same data.

For each model: parameter count, perplexity on the targets, ROUGE of greedy (or beam) generations for
encoder-decoder models, and generation speed; the numbers come from :mod:`hf_kd.metrics`. The functions take
the command's options as one object (an ``argparse.Namespace`` from :mod:`hf_kd.cli.evaluate`, or any object
with those attributes).
"""

from __future__ import annotations

import json
import numbers
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from hf_kd.errors import check_model_folder, check_source_path, first_line
from hf_kd.metrics import count_parameters, generation_speed, load_metric, perplexity
from hf_kd.recipe.args import ConfigError, DataArguments, check_values, load_yaml_config
from hf_kd.recipe.data import check_columns, load_raw_datasets, tokenize_causal, tokenize_seq2seq
from hf_kd.recipe.run import load_model_config, load_weights, task_of
from hf_kd.teachers.loading import (
    TokenizerMismatchError,
    check_same_tokenizer,
    load_named_tokenizer,
    load_saved_tokenizer,
)
from hf_kd.teachers.placement import check_offload, input_device, placement_options

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


def load_model(
    key: str, name_or_path: str, dtype: str, device: str, trust_remote_code: bool = False, **placement: Any
) -> Any:
    """A model with the Auto class its config asks for, in eval mode on ``device`` (or where ``placement``, keyword
    arguments of :func:`hf_kd.teachers.placement.placement_kwargs`, puts it); safetensors weights only
    (:func:`_model_configs` has checked a local folder's weights with :func:`hf_kd.errors.check_model_folder`)."""
    config = load_model_config(key, name_or_path, trust_remote_code, None)
    auto = AutoModelForSeq2SeqLM if task_of(config) == "seq2seq" else AutoModelForCausalLM
    model = load_weights(
        key, name_or_path, auto, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **placement
    )
    if placement.get("device_map") is not None:
        check_offload(model, placement.get("offload_folder"))
        return model.eval()
    return model.to(device).eval()


_MISMATCH_FIX = (
    "Their perplexities count different tokens and cannot be compared either; evaluate each model alone "
    "(without --teacher), or compare the student with a teacher of its tokenizer"
)


def load_tokenizers(models: list[tuple[str, str, str]], named: tuple[str, str] | None, trust: bool) -> dict[str, Any]:
    """``{role: tokenizer}`` for ``models`` (role, option, path), checked to be one vocabulary.

    The student's is ``named`` (option, path) when given, else its own, else the teacher's; the teacher's is its
    own, else the student's. A folder without tokenizer files has none (``load_saved_tokenizer``).
    """
    own = {
        role: load_saved_tokenizer(path, trust_remote_code=trust)
        for role, _, path in models
        if role != "student" or named is None
    }
    tokenizers = {"student": load_named_tokenizer(*named, trust) if named else own["student"] or own.get("teacher")}
    if tokenizers["student"] is None:
        raise ConfigError(
            f"--student={models[0][2]!r} has no tokenizer files (nor has a teacher); name one with --tokenizer"
        )
    for role, key, path in models[1:]:
        tokenizers[role] = own[role] or tokenizers["student"]
        try:
            check_same_tokenizer(tokenizers["student"], tokenizers[role], fix=_MISMATCH_FIX)
        except TokenizerMismatchError as err:
            raise ConfigError(f"{key}={path!r}: " + " ".join(str(err).split())) from None
    for tokenizer in tokenizers.values():
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizers


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
    device = input_device(model)
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
    model: Any,
    tokenizer: Any,
    raw: Dataset,
    data_args: DataArguments,
    options: Any,
    metric: Any = None,
    max_positions: int | None = None,
) -> dict[str, float]:
    """The numbers of one model on ``raw`` (the evaluation rows, untokenised).

    ``metric`` (an `evaluate` module) scores the generations of encoder-decoder models; by default hf_kd's ROUGE.
    ``max_positions`` caps a causal model's blocks (default: its own position limit); models compared are
    scored on the same blocks only with the same cap, the smallest of their limits (:func:`common_limit`).
    """
    task = task_of(model.config)
    results: dict[str, float] = {"parameters": count_parameters(model)}
    if task == "seq2seq":
        tokenized = tokenize_seq2seq(raw, tokenizer, data_args)
        sources = [data_args.source_prefix + (s or "") for s in raw[data_args.source_column]]
    else:
        limit = max_positions or position_limit(model.config)
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
        metric = metric if metric is not None else load_metric("rouge")
        results.update(_numbers(metric.compute(predictions=predictions, references=references)))
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


def position_limit(config: PretrainedConfig) -> int | None:
    """The positions a model has (``max_position_embeddings``, GPT-2's ``n_positions``); None for relative ones."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def common_limit(models: list[tuple[str, str, str]], configs: dict[str, PretrainedConfig]) -> tuple[int, str] | None:
    """The smallest position limit of ``models`` and the option naming that model, or None when none has one."""
    limits = [(position_limit(configs[role]), key) for role, key, _ in models]
    known = [(limit, key) for limit, key in limits if limit is not None]
    return min(known) if known else None


def check_lengths(
    limit: tuple[int, str] | None, tokenizer: Any, raw: Dataset, data_args: DataArguments, options: Any, task: str
) -> None:
    """Every sequence the evaluation feeds a model fits ``limit`` (positions, and the option naming the model
    that has so few), before any model runs: a one-line ConfigError naming the option to lower otherwise.

    Causal perplexity needs no check (its blocks are cut to the limit); the generations do."""
    if limit is None:
        return
    positions, key = limit
    where = f"{key} has {positions} positions"

    def longest(texts: list[str], cap: int) -> int:
        return min(cap, max((len(ids) for ids in tokenizer(texts)["input_ids"]), default=0))

    if task == "seq2seq":
        sources = [data_args.source_prefix + (s or "") for s in raw[data_args.source_column]]
        targets = [t or "" for t in raw[data_args.target_column]]
        for option, n in (
            ("--max_source_length", longest(sources, data_args.max_source_length)),
            ("--max_target_length", longest(targets, data_args.max_target_length)),
        ):
            if n > positions:
                raise ConfigError(f"{where}, and the data hold sequences of {n} tokens; pass {option} {positions}.")
        generates = not (options.no_rouge and options.no_speed)
        if generates and options.max_new_tokens + 1 > positions:  # the decoder's start token takes one
            raise ConfigError(
                f"{where} (one for the decoder's start token); pass --max_new_tokens {positions - 1} or less."
            )
        if not options.no_speed and longest(sources[: options.speed_samples], options.speed_input_length) > positions:
            raise ConfigError(f"{where}; pass --speed_input_length {positions} or less, or --no_speed.")
        return
    if options.no_speed:
        return
    texts = [t for t in raw[data_args.text_column] if t and t.strip()][: options.speed_samples]
    prompt = longest(texts, options.speed_input_length)
    if prompt + options.max_new_tokens > positions:  # a causal model's positions hold prompt and new tokens
        raise ConfigError(
            f"{where}, and the speed measurement needs {prompt + options.max_new_tokens} ({prompt} prompt tokens, "
            f"--max_new_tokens {options.max_new_tokens}); pass --speed_input_length "
            f"{max(1, positions - options.max_new_tokens)} or a smaller --max_new_tokens, or --no_speed."
        )


def _numbers(scores: dict[str, Any]) -> dict[str, float]:
    """The scalar scores of a metric's result (BLEU's list of n-gram precisions does not fit the table)."""
    return {k: float(v) for k, v in (scores or {}).items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _load_metric(name_or_path: str) -> Any:
    try:
        return load_metric(name_or_path)
    except Exception as err:  # evaluate raises many kinds (missing file, failed import, Hub) for one cause
        raise ConfigError(
            f"--metric {name_or_path!r} cannot be loaded ({first_line(err)}); pass rouge (hf_kd's own ROUGE), "
            "a local evaluate metric folder or script, or a Hub metric name already in evaluate's cache"
        ) from None


def _data_args(options: Any, recipe: dict[str, Any], split: str) -> DataArguments:
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


def evaluate_pair(options: Any) -> dict[str, dict[str, float]]:
    """``{"student": {...}, "teacher": {...}}`` (teacher only when one is named), as the options say."""
    recipe = load_yaml_config(options.config) if options.config else {}
    if options.config:
        check_values(recipe, options.config)
    teacher = options.teacher or recipe.get("teacher_model_name_or_path")
    split = options.split or recipe.get("eval_split") or "validation"
    data_args = _data_args(options, recipe, split)
    # (role, the option that named the model, its path)
    models = [("student", "--student", options.student)]
    if teacher:
        models.append(("teacher", "--teacher" if options.teacher else "teacher_model_name_or_path", teacher))
    configs = _model_configs(models, options.trust_remote_code)
    task = task_of(configs["student"])
    tokenizers = load_tokenizers(models, _named_tokenizer(options, recipe), options.trust_remote_code)
    scores_generations = task == "seq2seq" and not options.no_rouge
    metric = _load_metric(getattr(options, "metric", "rouge")) if scores_generations else None
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

    limit = common_limit(models, configs)
    check_lengths(limit, tokenizers["student"], raw, data_args, options, task)

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for role, key, path in models:
        placement = placement_options(options, torch.device(device))
        model = load_model(key, path, options.dtype, device, options.trust_remote_code, **placement)
        # Both models on the same blocks: the smallest position limit cuts them.
        cap = limit[0] if limit else None
        results[role] = evaluate_model(model, tokenizers[role], raw, data_args, options, metric, cap)
        del model
    return results


def _named_tokenizer(options: Any, recipe: dict[str, Any]) -> tuple[str, str] | None:
    if options.tokenizer:
        return "--tokenizer", options.tokenizer
    if recipe.get("tokenizer_name_or_path"):
        return "tokenizer_name_or_path", recipe["tokenizer_name_or_path"]
    return None


def _model_configs(models: list[tuple[str, str, str]], trust: bool) -> dict[str, PretrainedConfig]:
    """Every model's config (so every model can be found, before any is loaded), all of the student's kind."""
    configs = {}
    for role, key, path in models:
        check_source_path(key, path)
        check_model_folder(key, path, safetensors_only=True)
        configs[role] = load_model_config(key, path, trust, None)
        found, task = task_of(configs[role]), task_of(configs["student"])
        if found != task:
            raise ConfigError(f"{key}={path!r} is {found} but the student is {task}.")
    return configs


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
