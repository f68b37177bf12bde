"""Shared builders for trainer tests: small datasets, collators and configs (import as `helpers`)."""

from __future__ import annotations

from conftest import random_sentences
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

from hf_kd import DistillationConfig


def lm_dataset(tokenizer, n: int = 16, seed: int = 0) -> Dataset:
    return Dataset.from_dict({"input_ids": [tokenizer(s)["input_ids"] for s in random_sentences(n, seed=seed)]})


def seq2seq_dataset(tokenizer, n: int = 16, seed: int = 0) -> Dataset:
    src = random_sentences(n, seed=seed)
    tgt = random_sentences(n, seed=seed + 1000, min_len=2, max_len=8)
    return Dataset.from_dict(
        {"input_ids": [tokenizer(s)["input_ids"] for s in src], "labels": [tokenizer(t)["input_ids"] for t in tgt]}
    )


def lm_collator(tokenizer):
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def seq2seq_collator(tokenizer, model):
    return DataCollatorForSeq2Seq(tokenizer, model=model)


def config(tmp_path, **kwargs) -> DistillationConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    defaults.update(kwargs)
    return DistillationConfig(**defaults)
