"""The trainer's loss on a batch equals a hand-computed reference, for causal and encoder-decoder models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bart, tiny_gpt2, tiny_t5
from helpers import config, lm_collator, lm_dataset, seq2seq_collator, seq2seq_dataset

from hf_kd import DistillationTrainer


def reference_loss(student_logits, teacher_logits, labels, alpha, temperature, vocab):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student), token mean, in float64 probability space."""
    mask = labels.ne(-100)
    s = student_logits[..., :vocab][mask].double()
    t = teacher_logits[..., :vocab][mask].double()
    p = torch.softmax(t / temperature, -1)
    q = torch.softmax(s / temperature, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    ce = F.cross_entropy(s, labels[mask], reduction="mean")
    return alpha * ce + (1 - alpha) * temperature**2 * kl


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.0, 1.0), (1.0, 3.0), (0.3, 0.7)])
def test_causal_loss_matches_reference(tmp_path, tokenizer, alpha, temperature):
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3)
    args = config(tmp_path, alpha=alpha, temperature=temperature)
    data = lm_dataset(tokenizer, n=6)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer,
        data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    batch = lm_collator(tokenizer)([data[i] for i in range(6)])
    assert (batch["labels"] == -100).any(), "the batch must contain padding for the test to mean something"
    student.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = reference_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], alpha, temperature, vocab)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make_model", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_encoder_decoder_loss_matches_reference(tmp_path, tokenizer, make_model):
    vocab = len(tokenizer)
    # Output layers wider than the vocabulary, like T5's 32128 columns for 32100 tokens.
    student, teacher = make_model(vocab + 7, seed=1), make_model(vocab + 3, seed=2, d_model=48)
    args = config(tmp_path, alpha=0.4, temperature=2.0)
    data = seq2seq_dataset(tokenizer, n=6)
    collator = seq2seq_collator(tokenizer, student)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer,
        data_collator=collator,
    )  # fmt: skip
    assert trainer.vocab_size == vocab
    batch = collator([data[i] for i in range(6)])
    student.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
        dec = student.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        common = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec)
        s = student(**common).logits
        t = teacher(**common).logits
    expected = reference_loss(s, t, batch["labels"], 0.4, 2.0, vocab)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_student_gets_gradient_and_teacher_none(tmp_path, tokenizer):
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2)
    data = lm_dataset(tokenizer, n=4)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, alpha=0.0), train_dataset=data,
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    batch = lm_collator(tokenizer)([data[i] for i in range(4)])
    trainer.compute_loss(student, dict(batch)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    assert not trainer.teacher.training


def test_alpha_zero_without_labels_distills_on_attention_mask(tmp_path, tokenizer):
    """With alpha = 0 a causal batch needs no labels: every attended next token is a target."""
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2)
    data = lm_dataset(tokenizer, n=4)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, alpha=0.0), train_dataset=data,
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    batch = lm_collator(tokenizer)([data[i] for i in range(4)])
    with torch.no_grad():
        with_labels = trainer.compute_loss(student, dict(batch))
        no_labels = trainer.compute_loss(student, {k: v for k, v in batch.items() if k != "labels"})
    torch.testing.assert_close(with_labels, no_labels)
