"""Training from a teacher cache: the trainer's loss with a full-vocabulary cache equals the live teacher's."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_t5
from datasets import Dataset
from helpers import config, seq2seq_collator, seq2seq_dataset
from transformers import DataCollatorForSeq2Seq

from hf_kd import DistillationTrainer
from hf_kd.cache import build_teacher_cache
from hf_kd.cached_teacher import BATCH_KEY, CacheMismatchError


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
