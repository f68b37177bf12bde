"""Gradient accumulation: 4 micro-batches of 2 give the same update as one batch of 8."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_t5
from helpers import config, lm_collator, lm_dataset, seq2seq_collator, seq2seq_dataset

from hf_kd import DistillationTrainer


def one_step(tmp_path, tokenizer, kind, batch_size, accumulation, loss="forward_kl"):
    vocab = len(tokenizer)
    if kind == "causal":
        student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2)
        data, collator = lm_dataset(tokenizer, n=8, seed=3), lm_collator(tokenizer)
    else:
        student, teacher = tiny_t5(vocab, seed=1), tiny_t5(vocab, seed=2)
        data, collator = seq2seq_dataset(tokenizer, n=8, seed=3), seq2seq_collator(tokenizer, student)
    args = config(
        tmp_path / f"{batch_size}x{accumulation}",
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",  # SGD's step is linear in the gradient, so a mis-scaled loss shows
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        alpha=0.5,
        temperature=2.0,
        loss=loss,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer,
        data_collator=collator,
    )  # fmt: skip
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    trainer.train()
    return before, {k: v.detach().clone() for k, v in student.named_parameters()}, trainer


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_accumulated_step_equals_full_batch(tmp_path, tokenizer, kind, loss):
    before, full, _ = one_step(tmp_path, tokenizer, kind, batch_size=8, accumulation=1, loss=loss)
    before2, accumulated, trainer = one_step(tmp_path, tokenizer, kind, batch_size=2, accumulation=4, loss=loss)
    for name in before:
        torch.testing.assert_close(before[name], before2[name])
        assert not torch.equal(full[name], before[name]) or "position" in name, f"{name} did not move"
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-5, msg=name)


def test_micro_batches_hold_different_token_counts(tokenizer):
    """The equality above is only a test of normalisation if micro-batches differ in target tokens."""
    data, collator = lm_dataset(tokenizer, n=8, seed=3), lm_collator(tokenizer)
    counts = {int(collator([data[i], data[i + 1]])["labels"][:, 1:].ne(-100).sum()) for i in range(0, 8, 2)}
    assert len(counts) > 1
