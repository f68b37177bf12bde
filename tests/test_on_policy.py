"""On-policy distillation (GKD, lmbda) and sequence-level KD (seq_kd): targets written by a model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_t5
from datasets import Dataset
from helpers import config, seq2seq_collator, seq2seq_dataset
from test_trainer_loss import reference_loss
from transformers import DataCollatorForSeq2Seq

from hf_kd import DistillationTrainer
from hf_kd.generation import generate_causal_targets, generate_seq2seq_targets


def prompt_dataset(tokenizer, n=4):
    """Causal rows whose first tokens are a prompt (label -100) followed by a reference answer."""
    prompts = ["the cat sees", "a dog eats the", "big red", "the sun and the moon"][:n]
    answers = ["the bird", "fish", "car runs", "sings"][:n]
    rows = {"input_ids": [], "labels": []}
    for prompt, answer in zip(prompts, answers, strict=True):
        p, a = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        rows["input_ids"].append(p + a)
        rows["labels"].append([-100] * len(p) + a)
    return Dataset.from_dict(rows)


def causal_collator(tokenizer):
    return DataCollatorForSeq2Seq(tokenizer, padding=True)  # pads input_ids with pad, labels with -100


def test_causal_targets_equal_unbatched_greedy_generation(tokenizer):
    model = tiny_gpt2(len(tokenizer), seed=4).eval()
    data = prompt_dataset(tokenizer)
    batch = causal_collator(tokenizer)([data[i] for i in range(len(data))])
    out = generate_causal_targets(model, batch, tokenizer.pad_token_id, max_new_tokens=5, do_sample=False)
    for i, row in enumerate(data):
        prompt_len = sum(1 for x in row["labels"] if x == -100)
        prompt = torch.tensor([row["input_ids"][:prompt_len]])
        expected = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0]
        eos = (expected[prompt_len:] == tokenizer.eos_token_id).nonzero()
        end = prompt_len + int(eos[0]) + 1 if len(eos) else len(expected)
        n = int(out["attention_mask"][i].sum())
        assert out["input_ids"][i, :n].tolist() == expected[:end].tolist()
        assert out["labels"][i, :prompt_len].eq(-100).all()
        assert out["labels"][i, prompt_len:n].tolist() == expected[prompt_len:end].tolist()
        assert out["labels"][i, n:].eq(-100).all()


def test_seq2seq_targets_equal_unbatched_greedy_generation(tokenizer):
    model = tiny_t5(len(tokenizer), seed=4).eval()
    data = seq2seq_dataset(tokenizer, n=4)
    batch = seq2seq_collator(tokenizer, model)([data[i] for i in range(4)])
    out = generate_seq2seq_targets(model, batch, tokenizer.pad_token_id, max_new_tokens=6, do_sample=False)
    assert torch.equal(out["input_ids"], batch["input_ids"])
    for i in range(4):
        ids = torch.tensor([data[i]["input_ids"]])
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0, 1:].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        labels = out["labels"][i]
        assert labels[labels.ne(-100)].tolist() == expected


def test_rows_without_prompt_are_refused(tokenizer):
    model = tiny_gpt2(len(tokenizer))
    ids = torch.tensor([tokenizer("the cat")["input_ids"]])
    with pytest.raises(ValueError, match="label -100"):
        generate_causal_targets(model, {"input_ids": ids, "labels": ids.clone()}, 0, max_new_tokens=2)


@pytest.mark.parametrize("mode", ["on_policy", "seq_kd"])
def test_first_step_trains_on_the_generated_targets(tmp_path, tokenizer, mode):
    """The step's logged loss is the loss on the targets that the student (or teacher) writes greedily."""
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3)
    data = prompt_dataset(tokenizer)
    settings = {"lmbda": 1.0} if mode == "on_policy" else {"seq_kd": True}
    args = config(
        tmp_path, max_steps=1, per_device_train_batch_size=4, generation_temperature=0.0, max_new_tokens=4,
        alpha=0.5, temperature=2.0, **settings,
    )  # fmt: skip
    writer = copy.deepcopy(student if mode == "on_policy" else teacher).eval()
    initial_student = copy.deepcopy(student).eval()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer,
        data_collator=causal_collator(tokenizer),
    )  # fmt: skip
    trainer.train()

    batch = causal_collator(tokenizer)([data[i] for i in range(4)])
    generated = generate_causal_targets(writer, batch, tokenizer.pad_token_id, max_new_tokens=4, do_sample=False)
    assert not torch.equal(generated["labels"], batch["labels"][:, : generated["labels"].shape[1]])
    with torch.no_grad():
        inputs = {"input_ids": generated["input_ids"], "attention_mask": generated["attention_mask"]}
        s, t = initial_student(**inputs).logits, teacher(**inputs).logits
    expected = reference_loss(s[:, :-1], t[:, :-1], generated["labels"][:, 1:], 0.5, 2.0, vocab)
    assert abs(trainer.state.log_history[0]["loss"] - expected.item()) < 1e-5


def test_on_policy_draw_is_per_step_and_reproducible(tmp_path, tokenizer):
    vocab = len(tokenizer)
    trainer = DistillationTrainer(
        model=tiny_gpt2(vocab, seed=1), teacher_model=tiny_gpt2(vocab, seed=2),
        args=config(tmp_path, lmbda=0.5), processing_class=tokenizer,
    )  # fmt: skip
    draws = []
    for step in range(400):
        trainer.state.global_step = step
        draws.append(trainer._target_writer() is not None)
    again = []
    for step in range(400):
        trainer.state.global_step = step
        again.append(trainer._target_writer() is not None)
    assert draws == again
    assert 0.4 < sum(draws) / len(draws) < 0.6


def test_seq2seq_on_policy_training_runs_on_student_outputs(tmp_path, tokenizer):
    vocab = len(tokenizer)
    student, teacher = tiny_t5(vocab, seed=1), tiny_t5(vocab, seed=2)
    data = seq2seq_dataset(tokenizer, n=4)
    args = config(tmp_path, max_steps=1, per_device_train_batch_size=4, lmbda=1.0, generation_temperature=0.0,
                  max_new_tokens=3)  # fmt: skip
    initial = copy.deepcopy(student).eval()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer,
        data_collator=seq2seq_collator(tokenizer, student),
    )  # fmt: skip
    trainer.train()
    batch = seq2seq_collator(tokenizer, student)([data[i] for i in range(4)])
    generated = generate_seq2seq_targets(initial, batch, tokenizer.pad_token_id, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        dec = initial.prepare_decoder_input_ids_from_labels(labels=generated["labels"])
        common = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec)
        s, t = initial(**common).logits, teacher(**common).logits
    expected = reference_loss(s, t, generated["labels"], 0.5, 1.0, vocab)
    assert abs(trainer.state.log_history[0]["loss"] - expected.item()) < 1e-5
