"""What evaluation reports: eval_loss is the student's CE on the labels (what a Trainer user reads it as), the
distillation objective is eval_distillation_loss, best-model selection and early stopping work on either; the
model card carries every prefix's metrics; steps without a target token are named in a warning."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_t5
from datasets import Dataset
from helpers import config, lm_collator, lm_dataset, seq2seq_collator, seq2seq_dataset
from safetensors.torch import load_file
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, EarlyStoppingCallback, Seq2SeqTrainer

from hf_kd import DistillationTrainer
from hf_kd.card import card_metrics
from hf_kd.teachers.cache_writer import build_teacher_cache


def _batches(data, collator, size):
    return [collator([data[i] for i in range(s, min(s + size, len(data)))]) for s in range(0, len(data), size)]


def _own_loss(model, batches) -> float:
    """The model's own loss per batch (its forward with labels), averaged as the Trainer averages them: each
    batch repeated per_device_eval_batch_size times, a short last batch too."""
    with torch.no_grad():
        losses = [model.eval()(**b).loss.item() for b in batches]
    return sum(losses) / len(losses)


def _objective(student, teacher, batches, alpha, temperature) -> float:
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student), summed over every target token, per token."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            s, t = student(**inputs).logits[:, :-1].double(), teacher(**inputs).logits[:, :-1].double()
            labels = b["labels"][:, 1:]
            mask = labels.ne(-100)
            s, t, labels = s[mask], t[mask], labels[mask]
            kl = (F.softmax(t / temperature, -1) * (F.log_softmax(t / temperature, -1) - F.log_softmax(
                s / temperature, -1))).sum()  # fmt: skip
            total += alpha * F.cross_entropy(s, labels, reduction="sum").item() + (1 - alpha) * temperature**2 * kl
            tokens += int(mask.sum())
    return float(total / tokens)


def test_causal_eval_loss_is_the_students_own_loss_and_the_objective_has_its_name(tmp_path, tokenizer):
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3)
    data = lm_dataset(tokenizer, n=7)  # rows of different lengths, in batches of 3, 3 and 1
    args = config(tmp_path, alpha=0.3, temperature=2.0, per_device_eval_batch_size=3)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=data,
                                  processing_class=tokenizer, data_collator=lm_collator(tokenizer))  # fmt: skip
    metrics = trainer.evaluate()
    batches = _batches(data, lm_collator(tokenizer), 3)
    assert metrics["eval_loss"] == pytest.approx(_own_loss(student, batches), rel=1e-5)
    assert metrics["eval_distillation_loss"] == pytest.approx(_objective(student, teacher, batches, 0.3, 2.0), abs=2e-6)
    assert metrics["eval_distillation_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-2)


@pytest.mark.parametrize("generate", [False, True], ids=["forward", "predict_with_generate"])
def test_seq2seq_eval_loss_equals_a_plain_seq2seq_trainers(tmp_path, tokenizer, generate):
    vocab = len(tokenizer)
    student, teacher = tiny_t5(vocab, seed=1), tiny_t5(vocab, seed=2, d_model=48)
    data, collator = seq2seq_dataset(tokenizer, n=7), seq2seq_collator(tokenizer, student)
    common = dict(per_device_eval_batch_size=3, predict_with_generate=generate, generation_max_length=6)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, alpha=0.3, **common),
                                  eval_dataset=data, processing_class=tokenizer, data_collator=collator)  # fmt: skip
    metrics = trainer.evaluate()
    plain = Seq2SeqTrainer(model=student, args=config(tmp_path / "plain", **common), eval_dataset=data,
                           processing_class=tokenizer, data_collator=collator)  # fmt: skip
    assert metrics["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-5)
    expected = 0.3 * metrics["eval_ce_loss"] + 0.7 * metrics["eval_kd_loss"]  # token means over the whole set
    assert metrics["eval_distillation_loss"] == pytest.approx(expected, rel=1e-5)


def test_causal_batches_without_labels_report_the_loss_on_their_next_tokens(tmp_path, tokenizer):
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2)
    data = lm_dataset(tokenizer, n=5)
    args = config(tmp_path, alpha=0.0, per_device_eval_batch_size=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=data,
                                  processing_class=tokenizer,
                                  data_collator=DataCollatorWithPadding(tokenizer))  # fmt: skip
    metrics = trainer.evaluate()
    # The same rows with labels, as DataCollatorForLanguageModeling makes them.
    batches = _batches(data, lm_collator(tokenizer), 2)
    assert metrics["eval_loss"] == pytest.approx(_own_loss(student, batches), rel=1e-5)
    assert metrics["eval_distillation_loss"] == pytest.approx(_objective(student, teacher, batches, 0.0, 1.0), abs=2e-6)


def test_cache_trained_evaluation_without_a_cache_reports_the_ce_alone(tmp_path, tokenizer):
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2)
    rows = [tokenizer(s)["input_ids"] for s in ("the cat sees the dog", "a big red car runs", "the sun sings")]
    train = Dataset.from_dict({"input_ids": rows, "labels": rows})
    build_teacher_cache(teacher, train, tmp_path / "cache", tokenizer=tokenizer, k=8, batch_size=2)
    texts = lm_dataset(tokenizer, n=5, seed=3)["input_ids"]
    evaluation = Dataset.from_dict({"input_ids": texts, "labels": texts})  # rows the cache does not hold
    trainer = DistillationTrainer(
        model=student, args=config(tmp_path, per_device_eval_batch_size=2), teacher_cache=str(tmp_path / "cache"),
        train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )  # fmt: skip
    metrics = trainer.evaluate()
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    assert metrics["eval_loss"] == pytest.approx(_own_loss(student, _batches(evaluation, collator, 2)), rel=1e-5)
    assert "eval_distillation_loss" not in metrics and "eval_kd_loss" not in metrics  # no teacher to compare with


# ---- best model and early stopping on either metric ------------------------------------------------------------


def _fitted_student(tokenizer, data):
    """A student that has learned the labels: distilling it from a random teacher raises its CE and lowers the
    divergence, so the two metrics rank the checkpoints in opposite orders."""
    student = tiny_gpt2(len(tokenizer), seed=1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    batch = lm_collator(tokenizer)([data[i] for i in range(len(data))])
    for _ in range(30):
        student(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return student


def _selection_trainer(tmp_path, tokenizer, metric, callbacks=()):
    data = lm_dataset(tokenizer, n=8)
    args = config(
        tmp_path, alpha=0.0, temperature=1.0, learning_rate=3e-2, max_steps=4, per_device_train_batch_size=8,
        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
        metric_for_best_model=metric,
    )  # fmt: skip
    return DistillationTrainer(
        model=_fitted_student(tokenizer, data), teacher_model=tiny_gpt2(len(tokenizer), seed=7), args=args,
        train_dataset=data, eval_dataset=data, processing_class=tokenizer, data_collator=lm_collator(tokenizer),
        callbacks=list(callbacks),
    )  # fmt: skip


@pytest.mark.parametrize("metric", ["loss", "distillation_loss"])
def test_the_best_checkpoint_is_the_one_the_named_metric_ranks_first(tmp_path, tokenizer, metric):
    trainer = _selection_trainer(tmp_path, tokenizer, metric)
    trainer.train()
    evals = {log["step"]: log for log in trainer.state.log_history if "eval_loss" in log}
    ce_best = min(evals, key=lambda s: evals[s]["eval_loss"])
    objective_best = min(evals, key=lambda s: evals[s]["eval_distillation_loss"])
    assert ce_best != objective_best, "the data must make the two metrics disagree for this test to mean something"
    best = ce_best if metric == "loss" else objective_best
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    assert trainer.state.best_metric == pytest.approx(evals[best][f"eval_{metric}"])
    loaded = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    for name, param in trainer.model.named_parameters():
        if name in loaded:
            torch.testing.assert_close(param.detach(), loaded[name], msg=name)


@pytest.mark.parametrize("metric", ["loss", "distillation_loss"])
def test_early_stopping_watches_the_named_metric(tmp_path, tokenizer, metric):
    trainer = _selection_trainer(tmp_path, tokenizer, metric, [EarlyStoppingCallback(early_stopping_patience=1)])
    trainer.train()
    evals = [log[f"eval_{metric}"] for log in trainer.state.log_history if "eval_loss" in log]
    worsened = next((i for i in range(1, len(evals)) if evals[i] >= min(evals[:i])), None)
    # Stopped at the first evaluation that did not improve on the best so far, else ran all 4 steps.
    assert trainer.state.global_step == (4 if worsened is None else worsened + 1)
    assert metric == "loss" and worsened is not None or metric == "distillation_loss" and worsened is None


# ---- the model card ----------------------------------------------------------------------------------------------


def test_card_metrics_keep_every_prefix():
    history = [
        {"loss": 2.0, "kd_loss": 1.0, "step": 1},
        {"eval_loss": 3.0, "eval_acc": 0.1, "eval_runtime": 0.5, "step": 1},
        {"eval_val2_loss": 4.0, "eval_val2_runtime": 0.5, "eval_val2_samples_per_second": 9.0, "step": 1},
        {"eval_loss": 2.5, "eval_runtime": 0.5, "step": 2},  # the last evaluation under eval_ replaces the first
        {"dev_loss": 5.0, "dev_rouge1": 0.3, "dev_runtime": 0.1, "step": 2},  # any metric_key_prefix
        {"train_runtime": 9.0, "train_loss": 2.2, "total_flos": 1.0, "step": 2},
    ]
    extra = {"predict_loss": 6.0, "predict_gen_len": 4.0, "predict_runtime": 0.2, "test_bleu": 1.0}
    assert card_metrics(history, extra) == {
        "eval_val2_loss": 4.0, "eval_loss": 2.5, "dev_loss": 5.0, "dev_rouge1": 0.3,
        "predict_loss": 6.0, "predict_gen_len": 4.0, "test_bleu": 1.0,
    }  # fmt: skip


def test_the_card_lists_what_predict_measured(tmp_path, tokenizer):
    vocab = len(tokenizer)
    data = seq2seq_dataset(tokenizer, n=4)
    student = tiny_t5(vocab, seed=1)
    trainer = DistillationTrainer(model=student, teacher_model=tiny_t5(vocab, seed=2), args=config(tmp_path),
                                  train_dataset=data, eval_dataset=data, processing_class=tokenizer,
                                  data_collator=seq2seq_collator(tokenizer, student))  # fmt: skip
    trainer.evaluate()
    measured = trainer.predict(data, metric_key_prefix="predict").metrics
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    for key in ("eval_loss", "eval_distillation_loss", "predict_loss", "predict_distillation_loss"):
        assert f"| {key} |" in card, key
    assert f"| predict_loss | {measured['predict_loss']:.4g} |" in card
    assert "predict_runtime" not in card


# ---- steps without a target token ---------------------------------------------------------------------------------


def test_steps_without_a_target_token_are_named_once(tmp_path, tokenizer, caplog):
    vocab = len(tokenizer)
    ids = tokenizer("the cat sees the dog")["input_ids"]
    full, empty = ids, [-100] * len(ids)
    # Batches of 1, 2 per step (in order): step 1 has one empty micro-batch among targets (fine); 2 and 4 have none.
    labels = [full, empty, empty, empty, full, full, empty, empty]
    data = Dataset.from_dict({"input_ids": [ids] * len(labels), "labels": labels})
    args = config(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=4,
                  train_sampling_strategy="sequential")  # fmt: skip
    trainer = DistillationTrainer(model=tiny_gpt2(vocab, seed=1), teacher_model=tiny_gpt2(vocab, seed=2), args=args,
                                  train_dataset=data, processing_class=tokenizer,
                                  data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_kd.trainer"):
        trainer.train()
    said = [r.getMessage() for r in caplog.records if r.name == "hf_kd.trainer" and r.levelno == logging.WARNING]
    assert len(said) == 2, said
    assert said[0].startswith("Optimizer step 2 had no target token: every label of its batches is -100")
    assert said[1] == "In all, 2 optimizer steps had no target token (see the warning above): steps 2, 4."
    losses = {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}
    assert losses[2] == losses[4] == 0.0 and losses[1] > 0 and math.isfinite(losses[3])
