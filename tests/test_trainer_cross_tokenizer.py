"""DistillationTrainer with cross_tokenizer=True: a T5-style student and a GPT-2-style teacher with other tokenizers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_t5
from cross_tokenizer_helpers import byte_bpe_tokenizer, corpus, sentencepiece_tokenizer
from datasets import Dataset

from hf_kd import DistillationConfig, DistillationTrainer


def _teacher():
    teacher = tiny_gpt2(len(byte_bpe_tokenizer()), seed=1)
    with torch.no_grad():
        teacher.transformer.ln_f.weight.mul_(20.0)  # a confident teacher: a random tiny one is nearly uniform
    return teacher


def _args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), cross_tokenizer=True, cross_tokenizer_prompt_column="source",
        cross_tokenizer_text_column="target",
        learning_rate=3e-3, per_device_train_batch_size=8, logging_steps=5, report_to=[], save_strategy="no",
        teacher_max_length=64, use_cpu=True,
    )  # fmt: skip
    return DistillationConfig(**{**defaults, **kwargs})


def _data():
    sentences = corpus(96, seed=5)
    return Dataset.from_dict({"source": sentences[:48], "target": sentences[48:]})


def test_an_encoder_decoder_student_learns_from_a_causal_teacher(tmp_path):
    data = _data()
    args = _args(tmp_path, alpha=0.0, max_steps=30, predict_with_generate=True, generation_max_length=8)
    trainer = DistillationTrainer(
        model=tiny_t5(len(sentencepiece_tokenizer()), seed=2), teacher_model=_teacher(), args=args,
        processing_class=sentencepiece_tokenizer(), teacher_processing_class=byte_bpe_tokenizer(),
        train_dataset=data, eval_dataset=data.select(range(8)),
    )  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert logs[-1]["kd_loss"] < 0.75 * logs[0]["kd_loss"]
    assert logs[-1]["teacher_agreement"] > logs[0]["teacher_agreement"]
    metrics = trainer.evaluate()  # generates with the student only: the teacher's inputs are left out
    assert metrics["eval_kd_loss"] > 0 and "eval_teacher_agreement" in metrics


def test_a_causal_student_on_policy(tmp_path):
    args = _args(tmp_path, alpha=0.1, max_steps=6, lmbda=1.0, max_new_tokens=6)
    trainer = DistillationTrainer(
        model=tiny_gpt2(len(sentencepiece_tokenizer()), seed=2), teacher_model=_teacher(), args=args,
        processing_class=sentencepiece_tokenizer(), teacher_processing_class=byte_bpe_tokenizer(),
        train_dataset=_data(),
    )  # fmt: skip
    trainer.train()
    assert all(log["kd_loss"] > 0 for log in trainer.state.log_history if "kd_loss" in log)


def test_without_the_flag_different_tokenizers_are_refused(tmp_path):
    from hf_kd.teachers.loading import TokenizerMismatchError

    with pytest.raises((TokenizerMismatchError, ValueError)):
        DistillationTrainer(
            model=tiny_gpt2(len(sentencepiece_tokenizer()), seed=2), teacher_model=_teacher(),
            args=DistillationConfig(output_dir=str(tmp_path), report_to=[]),
            processing_class=sentencepiece_tokenizer(), teacher_processing_class=byte_bpe_tokenizer(),
        )  # fmt: skip


def test_the_collator_the_trainer_builds_never_exceeds_the_students_positions(tmp_path):
    """A BART student has learned positions: its sources and targets are cut to max_position_embeddings (16 here)."""
    from conftest import tiny_bart

    student = tiny_bart(len(sentencepiece_tokenizer()), seed=2)
    student.config.max_position_embeddings = 16
    long = Dataset.from_dict({"source": [" ".join(corpus(12, seed=1))], "target": [" ".join(corpus(12, seed=2))]})
    trainer = DistillationTrainer(
        model=student, teacher_model=_teacher(), args=_args(tmp_path, max_steps=1),
        processing_class=sentencepiece_tokenizer(), teacher_processing_class=byte_bpe_tokenizer(), train_dataset=long,
    )  # fmt: skip
    batch = trainer.data_collator([long[0]])
    assert batch["input_ids"].shape[1] == 16 and batch["labels"].shape[1] == 16
    assert batch["input_ids"][0, -1] == sentencepiece_tokenizer().eos_token_id  # the source still ends with </s>
