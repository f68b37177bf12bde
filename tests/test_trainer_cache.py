"""Training from a teacher cache: the trainer's loss with a full-vocabulary cache equals the live teacher's."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_t5
from datasets import Dataset
from helpers import config, seq2seq_collator, seq2seq_dataset
from transformers import DataCollatorForSeq2Seq

from hf_kd import DistillationTrainer
from hf_kd.teachers.cache import BATCH_KEY, CacheMismatchError
from hf_kd.teachers.cache_writer import build_teacher_cache


def causal_rows(tokenizer, n=8):
    ids = [tokenizer(s)["input_ids"] for s in ["the cat sees the dog", "a big red car", "the sun sings", "fish eat"]]
    rows = [ids[i % 4] + ids[(i + 1) % 4] for i in range(n)]
    return Dataset.from_dict({"input_ids": rows, "labels": [[-100] * 2 + r[2:] for r in rows]})


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_full_vocabulary_cache_gives_the_live_teachers_loss(tmp_path, tokenizer, kind):
    vocab = len(tokenizer)
    if kind == "causal":
        student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3)
        data, collator = causal_rows(tokenizer), DataCollatorForSeq2Seq(tokenizer, padding=True)
    else:
        student, teacher = tiny_t5(vocab, seed=1), tiny_t5(vocab, seed=2)
        data, collator = seq2seq_dataset(tokenizer, n=8), seq2seq_collator(tokenizer, tiny_t5(vocab))
    build_teacher_cache(teacher, data, tmp_path / "cache", tokenizer=tokenizer, k=vocab, batch_size=3, shard_size=5)

    args = config(tmp_path / "cached", alpha=0.3, per_device_train_batch_size=8, max_steps=1)
    cached = DistillationTrainer(
        model=student, args=args, teacher_cache=str(tmp_path / "cache"), train_dataset=data,
        processing_class=tokenizer, data_collator=collator,
    )  # fmt: skip
    live = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path / "live", alpha=0.3), processing_class=tokenizer,
        data_collator=collator,
    )  # fmt: skip
    assert cached.teacher is None
    batch = next(iter(cached.get_train_dataloader()))
    assert BATCH_KEY in batch
    plain = {k: v for k, v in batch.items() if k != BATCH_KEY}
    student.eval()
    with torch.no_grad():
        from_cache = cached.compute_loss(student, dict(batch))
        from_teacher = live.compute_loss(student, plain)
    torch.testing.assert_close(from_cache, from_teacher, rtol=1e-4, atol=1e-5)

    cached.train()  # and it trains, logging the divergence against the cache
    assert "kd_loss" in cached.state.log_history[0]


@pytest.mark.parametrize("path", [{"loss_chunk_size": None}, {"loss_chunk_size": 5}, {"fuse_output_layer": True}])
def test_every_loss_path_from_the_cache_gives_the_live_teachers_gradient(tmp_path, tokenizer, path):
    """Unchunked reference, chunked closed form and fused output layer: with k = vocabulary, each one's loss and
    gradient equal the live teacher's (default chunked path)."""
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3)
    data, collator = causal_rows(tokenizer), DataCollatorForSeq2Seq(tokenizer, padding=True)
    build_teacher_cache(teacher, data, tmp_path / "cache", tokenizer=tokenizer, k=vocab, batch_size=4)
    cached = DistillationTrainer(
        model=student, args=config(tmp_path / "c", alpha=0.3, per_device_train_batch_size=8, **path),
        teacher_cache=str(tmp_path / "cache"), train_dataset=data, processing_class=tokenizer, data_collator=collator,
    )  # fmt: skip
    live = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path / "l", alpha=0.3), processing_class=tokenizer,
        data_collator=collator,
    )  # fmt: skip
    batch = next(iter(cached.get_train_dataloader()))
    plain = {k: v for k, v in batch.items() if k != BATCH_KEY}
    student.train()
    grads = []
    for trainer, inputs in ((cached, batch), (live, plain)):
        loss = trainer.compute_loss(student, dict(inputs))
        grads.append((loss.detach(), torch.autograd.grad(loss, list(student.parameters()))))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    # The cache keeps float16 log-probabilities: gradients agree to ~3e-4 of their norm, not to float32.
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert (a - b).norm() <= 6e-4 * b.norm() + 1e-8


def test_tail_treatment_follows_the_config_and_the_cache(tmp_path, tokenizer):
    vocab = len(tokenizer)
    data = causal_rows(tokenizer)
    teacher = tiny_gpt2(vocab, seed=2)
    build_teacher_cache(teacher, data, tmp_path / "plain", tokenizer=tokenizer, k=4)
    build_teacher_cache(teacher, data, tmp_path / "sampled", tokenizer=tokenizer, k=4, tail_samples=3)

    def trainer(cache, **kwargs):
        return DistillationTrainer(
            model=tiny_gpt2(vocab), args=config(tmp_path / cache, **kwargs), teacher_cache=str(tmp_path / cache),
            train_dataset=data, processing_class=tokenizer,
        )  # fmt: skip

    def tail_of(t):
        return t.teacher_source.tail_treatment

    assert tail_of(trainer("plain")) == "bucket"
    assert tail_of(trainer("sampled")) == "sampled"
    assert tail_of(trainer("sampled", loss="jsd")) == "bucket"  # sampled is forward KL only
    assert tail_of(trainer("sampled", teacher_cache_tail="uniform")) == "uniform"
    with pytest.raises(CacheMismatchError, match="--tail-samples"):
        trainer("plain", teacher_cache_tail="sampled")
    with pytest.raises(ValueError, match="forward_kl"):
        trainer("plain", teacher_cache_tail="uniform", loss="reverse_kl")
    with pytest.raises(ValueError, match="teacher_cache_tail"):
        config(tmp_path, teacher_cache_tail="tail")
    sampled = trainer("sampled", max_steps=2)
    batch = next(iter(sampled.get_train_dataloader()))
    assert batch[BATCH_KEY]["tail_ids"].shape == (batch[BATCH_KEY]["topk_ids"].shape[0], 3)
    sampled.train()
    assert all(math.isfinite(entry["loss"]) for entry in sampled.state.log_history if "loss" in entry)


def test_cache_for_another_dataset_is_refused(tmp_path, tokenizer):
    vocab = len(tokenizer)
    data = causal_rows(tokenizer)
    build_teacher_cache(tiny_gpt2(vocab, seed=2), data, tmp_path / "cache", tokenizer=tokenizer, k=4)
    other = causal_rows(tokenizer, n=6)
    with pytest.raises(CacheMismatchError, match="another data set"):
        DistillationTrainer(
            model=tiny_gpt2(vocab), args=config(tmp_path), teacher_cache=str(tmp_path / "cache"),
            train_dataset=other, processing_class=tokenizer,
        )  # fmt: skip
    with pytest.raises(ValueError, match="not both"):
        DistillationTrainer(
            model=tiny_gpt2(vocab), teacher_model=tiny_gpt2(vocab), args=config(tmp_path),
            teacher_cache=str(tmp_path / "cache"), train_dataset=data, processing_class=tokenizer,
        )  # fmt: skip
    with pytest.raises(ValueError, match="lmbda > 0 needs a live teacher"):
        DistillationTrainer(
            model=tiny_gpt2(vocab), args=config(tmp_path, lmbda=0.5), teacher_cache=str(tmp_path / "cache"),
            train_dataset=data, processing_class=tokenizer,
        )  # fmt: skip
