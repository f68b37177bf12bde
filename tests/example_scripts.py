"""Stand-ins for the Transformers examples run_summarization.py and run_clm.py, changed as docs/getting-started.md
says (import hf_kd; DistillationConfig for the training arguments class; DistillationTrainer for the trainer).

Written here, not copied: the argument dataclasses carry the same field names, types and defaults as the examples'
ModelArguments / DataTrainingArguments (what a parser collision depends on), and the two ``main`` functions make
the same calls on the trainer in the same order (train with resume_from_checkpoint, save_model, log/save metrics
and state, evaluate, predict with metric_key_prefix="predict", perplexity = exp(eval_loss), the model card), on
local json files and tiny local models. Run as a script (``python example_scripts.py clm ARGS``, or under torchrun)
it writes OUTPUT_DIR/rank{RANK}.json with the run's world size and eval metrics.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)

import hf_kd  # the first changed line
from hf_kd import DistillationConfig, DistillationTrainer  # the arguments and trainer classes: the other two

# ---- run_summarization.py's arguments ------------------------------------------------------------------------


@dataclass
class SummarizationModelArguments:
    model_name_or_path: str = field(metadata={"help": "the model (a required option in the example)"})
    config_name: str | None = None
    tokenizer_name: str | None = None
    cache_dir: str | None = None
    use_fast_tokenizer: bool = True
    model_revision: str = "main"
    token: str | None = None
    trust_remote_code: bool = False
    resize_position_embeddings: bool | None = None


@dataclass
class SummarizationDataArguments:
    lang: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    text_column: str | None = None
    summary_column: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    overwrite_cache: bool = False
    preprocessing_num_workers: int | None = None
    max_source_length: int | None = 1024
    max_target_length: int | None = 128
    val_max_target_length: int | None = None
    pad_to_max_length: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_predict_samples: int | None = None
    num_beams: int | None = 1
    ignore_pad_token_for_loss: bool = True
    source_prefix: str | None = None
    forced_bos_token: str | None = None

    def __post_init__(self) -> None:
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


# ---- run_clm.py's arguments ----------------------------------------------------------------------------------


@dataclass
class ClmModelArguments:
    model_name_or_path: str | None = None
    model_type: str | None = None
    config_overrides: str | None = None
    config_name: str | None = None
    tokenizer_name: str | None = None
    cache_dir: str | None = None
    use_fast_tokenizer: bool = True
    model_revision: str = "main"
    token: str | None = None
    trust_remote_code: bool = False
    dtype: str | None = field(default=None, metadata={"choices": ["auto", "bfloat16", "float16", "float32"]})


@dataclass
class ClmDataArguments:
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    streaming: bool = False
    block_size: int | None = None
    overwrite_cache: bool = False
    validation_split_percentage: int | None = 5
    preprocessing_num_workers: int | None = None
    keep_linebreaks: bool = True


EXAMPLES = {
    "summarization": (SummarizationModelArguments, SummarizationDataArguments),
    "clm": (ClmModelArguments, ClmDataArguments),
}


def parse(example: str, argv: list[str]) -> tuple:
    model_class, data_class = EXAMPLES[example]
    return HfArgumentParser((model_class, data_class, DistillationConfig)).parse_args_into_dataclasses(argv)


def _report(trainer: DistillationTrainer, results: dict) -> None:
    trainer.log_metrics("train", results)
    trainer.save_metrics("train", results)
    trainer.save_state()


def _train(trainer: DistillationTrainer, args: DistillationConfig, rows: int) -> None:
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    _report(trainer, {**result.metrics, "train_samples": rows})


# ---- the summarization flow ----------------------------------------------------------------------------------


def summarization_main(argv: list[str]) -> DistillationTrainer:
    model_args, data_args, args = parse("summarization", argv)
    set_seed(args.seed)
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    raw = load_dataset("json", data_files={k: v for k, v in files.items() if v}, cache_dir=model_args.cache_dir)
    trust = model_args.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              trust_remote_code=trust)  # fmt: skip
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, trust_remote_code=trust)
    columns = next(iter(raw.values())).column_names
    text, summary = data_args.text_column or columns[0], data_args.summary_column or columns[1]
    prefix = data_args.source_prefix or ""

    def tokenize(split: str, target_length: int):  # noqa: ANN202
        def encode(batch: dict) -> dict:
            encoded = tokenizer([prefix + t for t in batch[text]], max_length=data_args.max_source_length,
                                truncation=True)  # fmt: skip
            encoded["labels"] = tokenizer(text_target=batch[summary], max_length=target_length, truncation=True)[
                "input_ids"
            ]
            return encoded

        return raw[split].map(encode, batched=True, remove_columns=columns)

    train = tokenize("train", data_args.max_target_length) if args.do_train else None
    evaluation = tokenize("validation", data_args.val_max_target_length) if args.do_eval else None
    test = tokenize("test", data_args.val_max_target_length) if args.do_predict else None
    pad_label = -100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=pad_label)

    def compute_metrics(prediction) -> dict:  # noqa: ANN001
        generated = np.where(prediction.predictions != -100, prediction.predictions, tokenizer.pad_token_id)
        return {"gen_len": float(np.mean([np.count_nonzero(g != tokenizer.pad_token_id) for g in generated]))}

    args.generation_max_length = args.generation_max_length or data_args.val_max_target_length
    args.generation_num_beams = data_args.num_beams if data_args.num_beams is not None else args.generation_num_beams
    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        data_collator=collator, compute_metrics=compute_metrics if args.predict_with_generate else None,
    )  # fmt: skip
    if args.do_train:
        _train(trainer, args, len(train))
    if args.do_eval:
        metrics = {**trainer.evaluate(metric_key_prefix="eval"), "eval_samples": len(evaluation)}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if args.do_predict:
        output = trainer.predict(test, metric_key_prefix="predict")
        metrics = {**output.metrics, "predict_samples": len(test)}
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero() and args.predict_with_generate:
            ids = np.where(output.predictions != -100, output.predictions, tokenizer.pad_token_id)
            lines = tokenizer.batch_decode(ids, skip_special_tokens=True)
            with open(os.path.join(args.output_dir, "generated_predictions.txt"), "w") as f:
                f.write("\n".join(line.strip() for line in lines))
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "summarization"}
    trainer.push_to_hub(**card) if args.push_to_hub else trainer.create_model_card(**card)
    return trainer


# ---- the causal LM flow --------------------------------------------------------------------------------------


def clm_main(argv: list[str]) -> DistillationTrainer:
    model_args, data_args, args = parse("clm", argv)
    set_seed(args.seed)
    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    files = {k: v for k, v in files.items() if v}
    raw = load_dataset("json", data_files=files, cache_dir=model_args.cache_dir)
    if "validation" not in raw:  # the first validation_split_percentage of the train file
        percent = data_args.validation_split_percentage
        raw["validation"] = load_dataset("json", data_files=files, split=f"train[:{percent}%]")
        raw["train"] = load_dataset("json", data_files=files, split=f"train[{percent}%:]")
    trust = model_args.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              trust_remote_code=trust)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, trust_remote_code=trust)
    columns = raw["train"].column_names
    text = "text" if "text" in columns else columns[0]
    block = min(data_args.block_size or 1024, tokenizer.model_max_length)

    def blocks(batch: dict) -> dict:  # concatenate, cut into blocks, labels = inputs
        joined = {k: list(chain(*batch[k])) for k in batch}
        usable = len(joined["input_ids"]) // block * block
        out = {k: [v[i : i + block] for i in range(0, usable, block)] for k, v in joined.items()}
        out["labels"] = [list(ids) for ids in out["input_ids"]]
        return out

    tokenized = raw.map(lambda b: tokenizer(b[text]), batched=True, remove_columns=columns)
    lm = tokenized.map(blocks, batched=True)
    train, evaluation = lm["train"], lm["validation"]

    def preprocess_logits_for_metrics(logits, labels):  # noqa: ANN001, ANN202
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)

    def compute_metrics(prediction) -> dict:  # noqa: ANN001
        predicted, labels = prediction.predictions[:, :-1].reshape(-1), prediction.label_ids[:, 1:].reshape(-1)
        return {"accuracy": float((predicted == labels).mean())}

    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=train if args.do_train else None,
        eval_dataset=evaluation if args.do_eval else None, processing_class=tokenizer,
        data_collator=default_data_collator, compute_metrics=compute_metrics if args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if args.do_eval else None,
    )  # fmt: skip
    if args.do_train:
        _train(trainer, args, len(train))
    if args.do_eval:
        metrics = {**trainer.evaluate(), "eval_samples": len(evaluation)}
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    trainer.push_to_hub(**card) if args.push_to_hub else trainer.create_model_card(**card)
    return trainer


MAINS = {"summarization": summarization_main, "clm": clm_main}

if __name__ == "__main__":
    assert hf_kd.DistillationTrainer is DistillationTrainer
    done = MAINS[sys.argv[1]](sys.argv[2:])
    last_eval = next((log for log in reversed(done.state.log_history) if "eval_loss" in log), {})
    report = {"world_size": done.args.world_size, "eval": last_eval}
    with open(os.path.join(done.args.output_dir, f"rank{os.environ.get('RANK', 0)}.json"), "w") as f:
        json.dump(report, f)
