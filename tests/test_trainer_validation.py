"""Bad input is refused at construction with an error that names the fix."""

from __future__ import annotations

import pytest
from conftest import make_tokenizer, tiny_gpt2, tiny_t5
from datasets import Dataset
from helpers import config, lm_collator, lm_dataset
from transformers import DataCollatorWithPadding, Seq2SeqTrainingArguments

from hf_kd import DistillationConfig, DistillationTrainer, TokenizerMismatchError


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("temperature", 0.0, "temperature"),
        ("temperature", -1.0, "temperature"),
        ("alpha", 1.5, "alpha"),
        ("alpha", -0.1, "alpha"),
        ("beta", 0.0, "forward_kl"),
        ("beta", 1.0, "reverse_kl"),
        ("skew", 1.2, "skew"),
        ("loss", "kl", "forward_kl"),
        ("loss_chunk_size", 0, "loss_chunk_size"),
        ("label_smoothing_factor", 0.1, "lower alpha"),
    ],
)
def test_config_rejects_out_of_range(tmp_path, field, value, needle):
    with pytest.raises(ValueError, match=needle):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], **{field: value})


def _trainer(tmp_path, tokenizer, student=None, teacher="default", **kwargs):
    vocab = len(tokenizer)
    student = student if student is not None else tiny_gpt2(vocab, seed=1)
    if isinstance(teacher, str) and teacher == "default":
        teacher = tiny_gpt2(vocab, seed=2)
    kwargs.setdefault("args", config(tmp_path))
    kwargs.setdefault("train_dataset", lm_dataset(tokenizer, n=4))
    kwargs.setdefault("data_collator", lm_collator(tokenizer))
    return DistillationTrainer(model=student, teacher_model=teacher, processing_class=tokenizer, **kwargs)


def test_no_teacher(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        _trainer(tmp_path, tokenizer, teacher=None)


def test_teacher_is_student(tmp_path, tokenizer):
    student = tiny_gpt2(len(tokenizer))
    with pytest.raises(ValueError, match="student object itself"):
        _trainer(tmp_path, tokenizer, student=student, teacher=student)


def test_teacher_of_another_kind(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="encoder-decoder.*causal|causal.*encoder-decoder"):
        _trainer(tmp_path, tokenizer, teacher=tiny_t5(len(tokenizer)))


def test_plain_training_arguments_are_refused(tmp_path, tokenizer):
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to=[])
    with pytest.raises(TypeError, match="DistillationConfig"):
        _trainer(tmp_path, tokenizer, args=args)


def test_labels_missing_while_alpha_positive(tmp_path, tokenizer):
    data = Dataset.from_dict({"input_ids": lm_dataset(tokenizer, n=4)["input_ids"]})
    with pytest.raises(ValueError, match="alpha=0.5.*labels.*alpha=0"):
        _trainer(tmp_path, tokenizer, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer))
    # The same data is fine for pure distillation.
    _trainer(
        tmp_path, tokenizer, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
        args=config(tmp_path, alpha=0.0),
    )  # fmt: skip


def test_different_tokenizers_are_refused_naming_both(tmp_path, tokenizer):
    other = make_tokenizer(words=list(reversed(tokenizer.get_vocab())), name="reversed-words")
    assert len(other) == len(tokenizer)  # same size, other tokens: the dangerous case
    with pytest.raises(TokenizerMismatchError, match="tiny-words.*reversed-words"):
        _trainer(tmp_path, tokenizer, teacher_processing_class=other)


def test_tokenizer_larger_than_output_layer(tmp_path, tokenizer):
    student = tiny_gpt2(len(tokenizer) - 5)
    with pytest.raises(TokenizerMismatchError, match="resize_token_embeddings"):
        _trainer(tmp_path, tokenizer, student=student)


def test_same_tokenizer_object_twice_is_fine(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, teacher_processing_class=make_tokenizer())
    assert trainer.vocab_size == len(tokenizer)
