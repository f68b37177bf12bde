"""The Transformers examples run_summarization.py and run_clm.py, with three lines changed (tests/example_scripts.py
stands in for them), parse beside DistillationConfig, train, evaluate, predict, save, resume and run under torchrun."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from example_scripts import EXAMPLES, clm_main, parse, summarization_main
from recipe_helpers import save_tiny_models, write_json_rows
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    default_data_collator,
)

from hf_kd import DistillationConfig
from hf_kd.recipe.args import parse_recipe_config

SCRIPT = Path(__file__).with_name("example_scripts.py")
COMMON = ["--report_to", "none", "--use_cpu", "--seed", "0", "--disable_tqdm", "true", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from conftest import random_sentences

    root = tmp_path_factory.mktemp("data")
    out = {}
    for split, n, seed in (("train", 16, 0), ("validation", 6, 100), ("test", 5, 200)):
        sources, targets = random_sentences(n, seed=seed), random_sentences(n, seed=seed + 1, min_len=2, max_len=6)
        rows = [{"article": s, "highlights": t} for s, t in zip(sources, targets, strict=True)]
        out[split] = write_json_rows(root / f"{split}.json", rows)
        texts = [{"text": " ".join(random_sentences(4, seed=seed + i))} for i in range(n)]
        out[f"text_{split}"] = write_json_rows(root / f"text_{split}.json", texts)
    return out


# ---- parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_no_distillation_field_collides_with_the_examples_arguments(example):
    ours = {f.name for f in dataclasses.fields(DistillationConfig)}
    inherited = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    for arguments in EXAMPLES[example]:
        theirs = {f.name for f in dataclasses.fields(arguments)}
        assert not (ours - inherited) & theirs, f"{arguments.__name__} collides with DistillationConfig"
    HfArgumentParser((*EXAMPLES[example], DistillationConfig))  # argparse refuses a duplicate option here


def test_the_examples_command_lines_parse_beside_distillation_config(models, files, tmp_path):
    model_args, data_args, args = parse("summarization", [
        "--model_name_or_path", models["t5"]["student"], "--do_train", "--do_eval", "--train_file", files["train"],
        "--validation_file", files["validation"], "--source_prefix", "summarize: ", "--output_dir", str(tmp_path),
        "--per_device_train_batch_size=4", "--per_device_eval_batch_size=4", "--predict_with_generate",
        "--trust_remote_code", "true", "--teacher_model_name_or_path", models["t5"]["teacher"], "--alpha", "0.3",
    ])  # fmt: skip
    assert model_args.trust_remote_code is True and args.teacher_trust_remote_code is False  # the student's only
    assert (data_args.source_prefix, args.predict_with_generate, args.alpha) == ("summarize: ", True, 0.3)
    assert args.teacher_model_name_or_path == models["t5"]["teacher"]
    model_args, _, args = parse("clm", [
        "--model_name_or_path", models["gpt2"]["student"], "--train_file", files["text_train"], "--do_train",
        "--output_dir", str(tmp_path), "--teacher_trust_remote_code", "--temperature", "2",
    ])  # fmt: skip
    assert model_args.trust_remote_code is False and args.teacher_trust_remote_code is True
    assert args.temperature == 2.0


def test_the_old_trust_remote_code_still_works_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="teacher_trust_remote_code"):
        args = DistillationConfig(output_dir=str(tmp_path), trust_remote_code=True)
    assert args.teacher_trust_remote_code is True
    with pytest.warns(FutureWarning):
        assert args.trust_remote_code is True
    with pytest.raises(ValueError, match="disagree"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DistillationConfig(output_dir=str(tmp_path), trust_remote_code=True, teacher_trust_remote_code=False)
    # Not a field: an HfArgumentParser of DistillationConfig alone has no such option either.
    parser = HfArgumentParser(DistillationConfig)
    assert "--trust_remote_code" not in parser._option_string_actions
    assert "--teacher_trust_remote_code" in parser._option_string_actions


def test_recipes_split_trust_remote_code_and_keep_old_configs_working(models, files, tmp_path):
    base = {"teacher_model_name_or_path": models["gpt2"]["teacher"], "data_files": files["text_train"],
            "output_dir": str(tmp_path / "out")}  # fmt: skip
    with pytest.warns(FutureWarning, match="teacher_trust_remote_code"):  # an old recipe: both, as before
        model_args, _, args = parse_recipe_config(None, {**base, "trust_remote_code": True})
    assert model_args.trust_remote_code and args.teacher_trust_remote_code
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said explicitly: no warning
        model_args, _, args = parse_recipe_config(
            None, ["--trust_remote_code", "--teacher_trust_remote_code", "false", *_flat(base)]
        )
    assert model_args.trust_remote_code and not args.teacher_trust_remote_code


def _flat(values: dict) -> list[str]:
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


# ---- the flows -----------------------------------------------------------------------------------------------


def _summarization_argv(models, files, family, output_dir, *extra):
    return [
        "--model_name_or_path", models[family]["student"], "--teacher_model_name_or_path", models[family]["teacher"],
        "--train_file", files["train"], "--validation_file", files["validation"], "--test_file", files["test"],
        "--text_column", "article", "--summary_column", "highlights", "--do_train", "--do_eval", "--do_predict",
        "--predict_with_generate", "--max_source_length", "32", "--max_target_length", "8",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--output_dir", str(output_dir),
        "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--alpha", "0.5", "--temperature", "2",
        *COMMON, *extra,
    ]  # fmt: skip


def _plain_seq2seq_eval_loss(student_dir, files, tmp_path, prefix="") -> float:
    """A plain Seq2SeqTrainer's eval_loss for the saved student on the validation file, tokenized here."""
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(student_dir)
    rows = [json.loads(line) for line in open(files["validation"])]
    data = [
        {**tokenizer(prefix + r["article"], max_length=32, truncation=True),
         "labels": tokenizer(text_target=r["highlights"], max_length=8, truncation=True)["input_ids"]}
        for r in rows
    ]  # fmt: skip
    args = Seq2SeqTrainingArguments(str(tmp_path / "plain"), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                                    predict_with_generate=True, generation_max_length=8)  # fmt: skip
    trainer = Seq2SeqTrainer(model=model, args=args, eval_dataset=data, data_collator=DataCollatorForSeq2Seq(
        tokenizer, model=model, label_pad_token_id=-100))  # fmt: skip
    return trainer.evaluate()["eval_loss"]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_summarization_example_trains_evaluates_predicts_saves_and_resumes(models, files, tmp_path, family):
    out = tmp_path / "out"
    trainer = summarization_main(_summarization_argv(models, files, family, out))
    assert trainer.state.global_step == 4 and sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-4"
    ]  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    # eval_loss is what a plain Seq2SeqTrainer reports for the saved student; the objective has its own name.
    assert results["eval_loss"] == pytest.approx(_plain_seq2seq_eval_loss(out, files, tmp_path), rel=1e-5)
    assert results["eval_distillation_loss"] != pytest.approx(results["eval_loss"], rel=1e-3)
    assert {"predict_loss", "predict_gen_len", "predict_distillation_loss", "eval_gen_len"} <= set(results)
    assert (out / "generated_predictions.txt").read_text().count("\n") == 4  # 5 lines, empty from a tiny model
    card = (out / "README.md").read_text()
    for key in ("eval_loss", "eval_distillation_loss", "predict_loss", "predict_gen_len"):
        assert f"| {key} |" in card, key
    final = load_file(str(out / "model.safetensors"))

    # Resumed from the first checkpoint, the run ends with the same student as the uninterrupted one.
    resumed = summarization_main(_summarization_argv(
        models, files, family, out, "--resume_from_checkpoint", str(out / "checkpoint-2"),
    ))  # fmt: skip
    assert resumed.state.global_step == 4
    again = load_file(str(out / "model.safetensors"))
    for name, tensor in final.items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def _clm_argv(models, files, output_dir, *extra):
    return [
        "--model_name_or_path", models["gpt2"]["student"], "--teacher_model_name_or_path", models["gpt2"]["teacher"],
        "--train_file", files["text_train"], "--validation_file", files["text_validation"], "--block_size", "16",
        "--do_train", "--do_eval", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3",
        "--output_dir", str(output_dir), "--max_steps", "3", "--logging_steps", "1", "--alpha", "0.2",
        "--temperature", "2", "--save_strategy", "no", *COMMON, *extra,
    ]  # fmt: skip


def _model_eval_loss(student_dir, eval_dataset, batch_size=3) -> float:
    """The saved student's own loss on each evaluation batch, averaged over batches as the Trainer does.

    Not a plain Trainer's eval_loss: transformers 5.25's divides a causal LM's summed loss by the unshifted label
    count when the model's loss_type is unset (GPT-2's is), which reports (n - 1) / n of the mean CE on n-token rows.
    """
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(eval_dataset), batch_size):
            rows = [eval_dataset[i] for i in range(start, min(start + batch_size, len(eval_dataset)))]
            losses.append(model(**default_data_collator(rows)).loss.item())
    return sum(losses) / len(losses)


def test_clm_example_prints_the_students_true_perplexity(models, files, tmp_path):
    out = tmp_path / "out"
    trainer = clm_main(_clm_argv(models, files, out))
    results = json.loads((out / "eval_results.json").read_text())
    reference = _model_eval_loss(out, trainer.eval_dataset)
    assert len(trainer.eval_dataset) > 3  # several evaluation batches
    assert results["eval_loss"] == pytest.approx(reference, rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(reference), rel=1e-5)
    assert "eval_accuracy" in results and "eval_distillation_loss" in results
    card = (out / "README.md").read_text()
    assert "| eval_loss |" in card and "| eval_distillation_loss |" in card


@pytest.mark.slow
def test_clm_example_under_two_process_torchrun(models, files, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541"]
    argv = _clm_argv(models, files, out, "--ddp_backend", "gloo", "--max_steps", "2")
    result = subprocess.run([*launcher, str(SCRIPT), "clm", *argv], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["eval"]["eval_loss"] == ranks[1]["eval"]["eval_loss"]  # gathered over both processes
    results = json.loads((out / "all_results.json").read_text())
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert results["eval_loss"] == pytest.approx(_model_eval_loss(out, _eval_blocks(out, files)))


def _eval_blocks(student_dir, files):
    """The clm flow's evaluation blocks, rebuilt: 16-token pieces of the concatenated tokenized texts."""
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    ids = [i for line in open(files["text_validation"]) for i in tokenizer(json.loads(line)["text"])["input_ids"]]
    blocks = [ids[i : i + 16] for i in range(0, len(ids) // 16 * 16, 16)]
    return [{"input_ids": b, "attention_mask": [1] * 16, "labels": b} for b in blocks]
