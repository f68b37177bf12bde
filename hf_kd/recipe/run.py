"""Distillation recipes: a YAML config in, a distilled and saved student out.

The steps are the ones of transformers' example scripts: parse the arguments, load the student and the
data, tokenise, train with :class:`hf_kd.DistillationTrainer`, evaluate, save and write the model card. The
command lines that run it, `hf-kd distill` and recipes/distill_*.py, are in :mod:`hf_kd.cli.distill`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    PretrainedConfig,
    PreTrainedModel,
    default_data_collator,
)
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, get_last_checkpoint

from hf_kd.config import DistillationConfig
from hf_kd.errors import check_model_folder, check_source_path, first_line
from hf_kd.recipe.args import (
    STDLIB_DOCSTRINGS,
    ConfigError,
    DataArguments,
    ModelArguments,
    check_output_folder,
    missing_reason,
)
from hf_kd.recipe.data import (
    adopt_example_columns,
    check_columns,
    load_raw_datasets,
    select_splits,
    select_test,
    split_uses,
    tokenize_causal,
    tokenize_seq2seq,
)
from hf_kd.recipe.output import check_checkpoint_folders, clear_replaced_run, output_lock
from hf_kd.saving import SAVE_ERRORS, SaveError, save_elsewhere
from hf_kd.teachers.loading import has_vocabulary
from hf_kd.trainer import DistillationTrainer

logger = logging.getLogger(__name__)

TASKS = ("seq2seq", "causal")


def load_model_config(key: str, name_or_path: str, trust_remote_code: bool, cache_dir: str | None) -> PretrainedConfig:
    """The config of the model ``key`` names; a :class:`~hf_kd.errors.ConfigError` naming ``key`` if it cannot load."""
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{key}={name_or_path!r} cannot be loaded: not a model directory here and not found on the Hub "
            f"({first_line(err)})"
        ) from None


def task_of(config: PretrainedConfig) -> str:
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _student_config(
    model_args: ModelArguments, args: DistillationConfig, cache_dir: str | None
) -> tuple[str, str, PretrainedConfig]:
    """(the key that names the student's source, the source, its config)."""
    if model_args.student_model_name_or_path:
        key, source = "student_model_name_or_path", model_args.student_model_name_or_path
    elif model_args.student_config:
        key, source = "student_config", model_args.student_config
    elif args.teacher_model_name_or_path:
        key, source = "teacher_model_name_or_path", args.teacher_model_name_or_path
    else:
        raise ConfigError("No student: set student_model_name_or_path or student_config.")
    return key, source, load_model_config(key, source, trusts(key, model_args, args), cache_dir)


def trusts(key: str, model_args: ModelArguments, args: DistillationConfig) -> bool:
    """Whether the code of the repository ``key`` names may run: the teacher's option for the teacher's folder,
    the student's (``trust_remote_code``, as in the Transformers examples) for the others."""
    return args.teacher_trust_remote_code if key == "teacher_model_name_or_path" else model_args.trust_remote_code


def load_student(model_args: ModelArguments, args: DistillationConfig, cache_dir: str | None = None) -> PreTrainedModel:
    """The pretrained student, or a randomly initialised one from a config (the teacher's when none is named)."""
    key, source, config = _student_config(model_args, args, cache_dir)
    trust = trusts(key, model_args, args)
    auto = AutoModelForSeq2SeqLM if task_of(config) == "seq2seq" else AutoModelForCausalLM
    dtype = model_args.dtype or "float32"
    if model_args.student_model_name_or_path:
        return load_weights(key, source, auto, dtype=dtype, trust_remote_code=trust, cache_dir=cache_dir)
    for name, value in (model_args.student_config_overrides or {}).items():
        if not hasattr(config, name):
            raise ConfigError(f"student_config_overrides: {name!r} is not a field of {type(config).__name__}.")
        setattr(config, name, value)
    overrides = model_args.student_config_overrides or {}
    logger.info("Building a randomly initialised student from the config of %s (overrides: %s).", source, overrides)
    return auto.from_config(config, trust_remote_code=trust, dtype=None if dtype == "auto" else dtype)


def load_weights(key: str, source: str, auto: Any, **kwargs: Any) -> PreTrainedModel:
    """``auto.from_pretrained(source, **kwargs)``; a failure is a :class:`ConfigError` naming ``key``.

    Local folders are checked by :func:`hf_kd.errors.check_model_folder` first; this catches the rest (a Hub
    download that fails, a folder without weights).
    """
    try:
        return auto.from_pretrained(source, **kwargs)
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"{key}={source!r}: cannot load the weights ({first_line(err)})") from None


def load_tokenizer(model_args: ModelArguments, args: DistillationConfig, cache_dir: str | None = None) -> Any:
    """The named tokenizer, else the student's, else the teacher's."""
    candidates = [
        ("tokenizer_name_or_path", model_args.tokenizer_name_or_path),
        ("student_model_name_or_path", model_args.student_model_name_or_path),
        ("teacher_model_name_or_path", args.teacher_model_name_or_path),
    ]
    candidates = [(k, v) for k, v in candidates if v]
    if model_args.tokenizer_name_or_path:
        candidates = candidates[:1]  # asked for by name: no silent fallback
    errors = []
    for key, name in candidates:
        try:
            trust = trusts(key, model_args, args)
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust, cache_dir=cache_dir)
        except (OSError, ValueError) as err:
            errors.append(f"{key}={name!r}: {first_line(err)}")
            continue
        if has_vocabulary(tokenizer):  # transformers 5 builds an empty one for a folder without tokenizer files
            return tokenizer
        errors.append(f"{key}={name!r}: no tokenizer files there")
    raise ConfigError("No tokenizer could be loaded: " + "; ".join(errors or ["none named"]))


def _max_positions(*configs: PretrainedConfig) -> int | None:
    limits = [
        getattr(c, name)
        for c in configs
        for name in ("n_positions", "max_position_embeddings")
        if isinstance(getattr(c, name, None), int)
    ]
    return min(limits) if limits else None


def rouge_metrics(tokenizer: Any, metric: str = "rouge"):  # noqa: ANN201
    """compute_metrics for predict_with_generate: the `evaluate` ``metric`` of the decoded outputs.

    ``metric`` is ``"rouge"`` (hf_kd's offline ROUGE F-measures, :func:`hf_kd.metrics.load_rouge`), a local
    metric folder or a Hub metric name in evaluate's cache. It is loaded here, before any training.
    """
    from hf_kd.metrics import load_metric

    scorer = load_metric(metric)

    def compute(eval_pred: Any) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        pad = tokenizer.pad_token_id
        predictions = np.where(predictions < 0, pad, predictions)
        labels = np.where(labels < 0, pad, labels)
        decoded = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return scorer.compute(predictions=[p.strip() for p in decoded], references=[r.strip() for r in references])

    return compute


def _sources(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig) -> dict[str, str | None]:
    """The config keys that name something the recipe reads, and what they name."""
    files = data_args.data_files
    return {
        "teacher_model_name_or_path": args.teacher_model_name_or_path,
        "student_model_name_or_path": model_args.student_model_name_or_path,
        "student_config": model_args.student_config,
        "tokenizer_name_or_path": model_args.tokenizer_name_or_path,
        "teacher_cache": args.teacher_cache,
        "dataset_name": data_args.dataset_name,
        **({f"data_files ({k})": v for k, v in files.items()} if isinstance(files, dict) else {"data_files": files}),
    }


def input_paths(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig) -> dict[str, Path]:
    """The local files and folders the run reads (resolved), by the config key that names them."""
    sources = _sources(model_args, data_args, args)
    return {key: Path(path).resolve() for key, path in sources.items() if path and Path(path).exists()}


def check_paths(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig) -> None:
    """Before anything is loaded: the named paths exist and the model folders can be loaded."""
    sources = _sources(model_args, data_args, args)
    for key in ("teacher_model_name_or_path", "student_model_name_or_path", "student_config", "tokenizer_name_or_path"):
        check_source_path(key, sources[key])
        if key != "student_config" and sources[key] and Path(sources[key]).is_file():  # a config.json is fine there
            raise ConfigError(f"{key}={sources[key]!r} is a file; name the folder that holds it (or a Hub id).")
    for key, path in (("cache_dir", data_args.cache_dir), ("teacher_cache", args.teacher_cache)):
        if path and Path(path).exists() and not Path(path).is_dir():
            raise ConfigError(f"{key}={path!r} is a file; name a folder.")
        if path and not Path(path).exists() and "under" in missing_reason(path):
            raise ConfigError(f"{key}={path!r} {missing_reason(path)}; name a folder.")
    init_kwargs = args.teacher_model_init_kwargs or {}
    check_model_folder(
        "teacher_model_name_or_path", args.teacher_model_name_or_path, init_kwargs.get("use_safetensors", True)
    )
    check_model_folder("student_model_name_or_path", model_args.student_model_name_or_path)


def _resuming(args: DistillationConfig) -> bool:
    return args.resume_from_checkpoint not in (None, "", "false", "False")


def check_output(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig) -> None:
    """The folder written to is neither a source nor a finished run (unless overwrite_output_dir or
    resume_from_checkpoint says so), and this run's checkpoints replace or delete nothing it reads or the user made."""
    sources = _sources(model_args, data_args, args)
    overwrite = model_args.overwrite_output_dir
    if data_args.save_tokenized_train:
        check_output_folder("save_tokenized_train", data_args.save_tokenized_train, sources, overwrite)
        return
    check_output_folder("output_dir", args.output_dir, sources, overwrite, _resuming(args))
    saves = args.save_strategy != SaveStrategy.NO
    inputs = input_paths(model_args, data_args, args)
    check_checkpoint_folders(args.output_dir, inputs, saves, args.save_total_limit, _resuming(args))


def resume_point(args: DistillationConfig) -> str | None:
    """``resume_from_checkpoint`` as a checkpoint folder: ``true`` is output_dir's last checkpoint."""
    value = args.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if value in ("true", "True"):
        last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        if last is None:
            raise ConfigError(
                f"resume_from_checkpoint=true: output_dir={args.output_dir!r} holds no checkpoint-N folder; name "
                "the checkpoint folder, or leave resume_from_checkpoint unset to start a new run."
            )
        return last
    if not Path(value).is_dir():
        raise ConfigError(f"resume_from_checkpoint={value!r}: no such checkpoint folder.")
    return value


def prepare(
    model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig, task: str | None = None
) -> dict[str, Any]:
    """Everything the trainer takes: student, tokenizer, datasets, collator, compute_metrics; and the task and the
    tokenised test split (``predict_dataset``, None without do_predict).

    ``task`` ("seq2seq" / "causal"), when given, must be what the models are (the recipe scripts pass it).
    """
    if args.teacher_model_name_or_path is None and args.teacher_cache is None:
        raise ConfigError(
            "No teacher: set teacher_model_name_or_path, or teacher_cache (a folder written by hf-kd cache-teacher)."
        )
    cache_dir = data_args.cache_dir
    teacher_config = None
    if args.teacher_model_name_or_path is not None:
        teacher_config = load_model_config(
            "teacher_model_name_or_path", args.teacher_model_name_or_path, args.teacher_trust_remote_code, cache_dir
        )
    # Cheap checks first (configs, data files, columns), so that a mistake costs no model loading.
    key, source, student_config = _student_config(model_args, args, cache_dir)
    found = task_of(student_config)
    if task is not None and task != found:
        script = {"seq2seq": "recipes/distill_seq2seq.py", "causal": "recipes/distill_causal.py"}[found]
        raise ConfigError(f"{key}={source!r} is a {found} model but this recipe is for {task} models: use {script}.")
    if teacher_config is not None and task_of(teacher_config) != found:
        raise ConfigError(
            f"the student is {found} but teacher_model_name_or_path={args.teacher_model_name_or_path!r} is "
            f"{task_of(teacher_config)}: distill between models of the same kind."
        )
    with args.main_process_first(desc="loading the data"):
        raw = load_raw_datasets(data_args, found)
    train, evaluation = select_splits(raw, data_args)
    test = select_test(raw, data_args, args.do_predict)
    if evaluation is None and args.eval_strategy != IntervalStrategy.NO:
        if args.load_best_model_at_end:
            raise ConfigError(
                "load_best_model_at_end needs an eval split: give one, or set validation_split_percentage above 0."
            )
        logger.warning("No eval split (eval_split=%r): evaluation is off for this run.", data_args.eval_split)
        args.eval_strategy = IntervalStrategy.NO
    for line in split_uses(raw, data_args, evaluation is not None, args.do_predict):
        logger.info(line)
    adopt_example_columns(data_args, found)
    columns = (
        {"source_column": data_args.source_column, "target_column": data_args.target_column}
        if found == "seq2seq"
        else {"text_column": data_args.text_column}
    )
    for split in (train, evaluation, test):
        if split is not None:
            check_columns(split, columns)

    student = load_student(model_args, args, cache_dir)
    tokenizer = load_tokenizer(model_args, args, cache_dir)
    if found == "causal" and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; padded labels are -100 anyway
    with args.main_process_first(desc="tokenisation"):
        if found == "seq2seq":
            train, evaluation, test = (
                tokenize_seq2seq(split, tokenizer, data_args) if split is not None else None
                for split in (train, evaluation, test)
            )
            collator = DataCollatorForSeq2Seq(tokenizer, model=student, pad_to_multiple_of=8 if args.fp16 else None)
        else:
            limit = _max_positions(student.config, teacher_config)
            train, evaluation, test = (
                tokenize_causal(split, tokenizer, data_args, limit) if split is not None else None
                for split in (train, evaluation, test)
            )
            collator = (
                default_data_collator
                if data_args.group_texts
                else DataCollatorForLanguageModeling(tokenizer, mlm=False)
            )
    compute_metrics = rouge_metrics(tokenizer) if found == "seq2seq" and args.predict_with_generate else None
    return {
        "task": found,
        "model": student,
        "processing_class": tokenizer,
        "train_dataset": train,
        "eval_dataset": evaluation,
        "predict_dataset": test,
        "data_collator": collator,
        "compute_metrics": compute_metrics,
    }


def run_recipe(
    model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig, task: str | None = None
) -> dict[str, float]:
    """Distill, evaluate on the eval split (when there is one), predict on the test split (do_predict), save the
    student and its model card.

    The folder written is locked for the run (:func:`hf_kd.recipe.output.output_lock`; the main process holds it
    for all). Returns the train metrics merged with the eval and predict metrics.
    """
    check_paths(model_args, data_args, args)
    key = "save_tokenized_train" if data_args.save_tokenized_train else "output_dir"
    folder = data_args.save_tokenized_train or args.output_dir
    with output_lock(folder, key, active=args.process_index == 0):
        check_output(model_args, data_args, args)
        return _run(model_args, data_args, args, task)


def _run(
    model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig, task: str | None
) -> dict[str, float]:
    checkpoint = None if data_args.save_tokenized_train else resume_point(args)
    parts = prepare(model_args, data_args, args, task)
    found, test = parts.pop("task"), parts.pop("predict_dataset")
    if data_args.save_tokenized_train:
        parts["train_dataset"].save_to_disk(data_args.save_tokenized_train)
        return {"train_samples": len(parts["train_dataset"])}
    use_cache = getattr(parts["model"].config, "use_cache", None)
    try:
        trainer = DistillationTrainer(args=args, **parts)
    except ValueError as err:  # the trainer's refusals (TokenizerMismatchError too) name the setting and the fix
        raise ConfigError(" ".join(str(err).split())) from None
    if model_args.overwrite_output_dir and checkpoint is None and trainer.is_world_process_zero():
        clear_replaced_run(args.output_dir, list(input_paths(model_args, data_args, args).values()))
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except SAVE_ERRORS as err:  # a checkpoint could not be written; the student in memory still can be, elsewhere
        if not trainer.is_world_process_zero():
            raise
        what = f"training stopped at step {trainer.state.global_step}: no checkpoint in {args.output_dir}"
        raise _save_failed(trainer, err, what, "") from None
    if use_cache is not None:  # activation checkpointing turns the KV cache off; the saved student wants it on
        trainer.model.config.use_cache = use_cache
    metrics = dict(result.metrics)
    metrics["train_samples"] = len(parts["train_dataset"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    save_student(trainer)  # before the final evaluation: if that fails, the trained student is kept
    if parts["eval_dataset"] is not None:
        try:
            eval_metrics = _final_eval_metrics(trainer) or trainer.evaluate()
        except Exception:
            logger.error("The final evaluation failed; the trained student is saved in %s.", args.output_dir)
            raise
        eval_metrics["eval_samples"] = len(parts["eval_dataset"])
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    predict_metrics = predict(trainer, test, found) if test is not None else {}
    metrics.update(predict_metrics)
    on_hub = data_args.dataset_name not in (None, STDLIB_DOCSTRINGS)
    trainer.create_model_card(  # the base model is left to the trainer: it names Hub checkpoints only
        model_name=args.hub_model_id or None,
        tasks="text2text-generation" if found == "seq2seq" else "text-generation",
        dataset=data_args.dataset_name or "local files",
        dataset_tags=data_args.dataset_name if on_hub else None,
        dataset_args=data_args.dataset_config_name if on_hub else None,
        metrics=predict_metrics or None,
    )
    if args.push_to_hub:
        trainer.push_to_hub()
    return metrics


def save_student(trainer: DistillationTrainer) -> None:
    """``trainer.save_model()`` (atomic: see :mod:`hf_kd.saving`); when output_dir cannot take it, a
    :class:`~hf_kd.saving.SaveError` saying where the trained weights went instead."""
    try:
        trainer.save_model()
    except SAVE_ERRORS as err:
        if not trainer.is_world_process_zero():
            raise
        what = f"cannot save the student to {trainer.args.output_dir}"
        raise _save_failed(trainer, err, what, "; the files there are as before") from None


def _save_failed(trainer: DistillationTrainer, err: BaseException, what: str, note: str) -> SaveError:
    """The error of a failed save, after a second try into the system's temporary folder: where the weights are."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:  # the full weights are gathered in save_model only
        folder, again = None, "not tried: the weights are sharded across the processes"
    else:
        folder, again = save_elsewhere(trainer._save)
    if folder is not None:
        where = f"the student was saved to {folder} instead: move it where it belongs"
    else:
        out = trainer.args.output_dir
        last = get_last_checkpoint(out) if Path(out).is_dir() else None
        where = f"saving it to the temporary folder failed too ({again}): the trained weights are lost" + (
            f"; {last} holds those of its step" if last else ""
        )
    return SaveError(f"{what} ({type(err).__name__}: {first_line(err, 200)}){note}; {where}.")


def predict(trainer: DistillationTrainer, dataset: Any, task: str) -> dict[str, float]:
    """do_predict, as in transformers' run_summarization.py: ``predict_*`` metrics of the test split, saved to
    predict_results.json (and all_results.json), and with predict_with_generate (encoder-decoder models) the
    generations, one a line, in generated_predictions.txt."""
    args = trainer.args
    generate = task == "seq2seq" and args.predict_with_generate
    loss_only = args.prediction_loss_only
    args.prediction_loss_only = not generate  # otherwise every token's logits are gathered, for nothing
    try:
        output = trainer.predict(dataset, metric_key_prefix="predict")
    finally:
        args.prediction_loss_only = loss_only
    metrics = {**output.metrics, "predict_samples": len(dataset)}
    trainer.log_metrics("predict", metrics)
    trainer.save_metrics("predict", metrics)
    if generate and trainer.is_world_process_zero():
        tokenizer = trainer.processing_class
        ids = np.where(output.predictions < 0, tokenizer.pad_token_id, output.predictions)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        path = Path(args.output_dir) / "generated_predictions.txt"
        path.write_text("\n".join(text.strip() for text in texts), encoding="utf-8")
    return metrics


def _final_eval_metrics(trainer: DistillationTrainer) -> dict[str, float] | None:
    """The eval metrics the Trainer already logged at the last step (step-wise eval ends with one), if any."""
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") != trainer.state.global_step:
            break
        if "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"}
    return None
