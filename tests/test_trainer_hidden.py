"""Hidden-state distillation inside the trainer: the extra term, its projection's training and saving."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from conftest import tiny_gpt2, tiny_t5
from helpers import config, lm_collator, lm_dataset, seq2seq_collator, seq2seq_dataset
from safetensors.torch import load_file

from hf_kd import DistillationTrainer
from hf_kd.student.hidden import PROJECTION_FILE, HiddenStateDistiller, hidden_masks, hidden_states_of


def test_loss_adds_the_weighted_hidden_term(tmp_path, tokenizer):
    vocab = len(tokenizer)
    student, teacher = tiny_t5(vocab, seed=1, d_model=32), tiny_t5(vocab, seed=2, d_model=48)
    data = seq2seq_dataset(tokenizer, n=4)
    collator = seq2seq_collator(tokenizer, student)
    batch = collator([data[i] for i in range(4)])
    plain = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path / "a"), processing_class=tokenizer,
        data_collator=collator,
    )  # fmt: skip
    with_hidden = DistillationTrainer(
        model=student, teacher_model=teacher, processing_class=tokenizer, data_collator=collator,
        args=config(tmp_path / "b", hidden_state_loss_weight=0.7, hidden_state_loss="cosine"),
    )  # fmt: skip
    assert plain.hidden_distiller is None and len(list(with_hidden.hidden_distiller.parameters())) > 0
    student.train()  # the hidden term is a training term
    with torch.no_grad():
        base = plain.compute_loss(student, dict(batch))
        total = with_hidden.compute_loss(student, dict(batch))
        dec = student.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        common = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec)
        s = student(**common, output_hidden_states=True)
        t = teacher(**common, output_hidden_states=True)
        distiller = with_hidden.hidden_distiller
        expected = distiller(hidden_states_of(s, True), hidden_states_of(t, True), hidden_masks(batch, True))
    torch.testing.assert_close(total, base + 0.7 * expected)


def test_projection_is_trained_saved_beside_the_student_and_logged(tmp_path, tokenizer):
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1, n_embd=32), tiny_gpt2(vocab, seed=2, n_embd=48, n_layer=4)
    args = config(tmp_path, hidden_state_loss_weight=1.0, max_steps=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(tokenizer, n=8),
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    before = copy.deepcopy(trainer.hidden_distiller.state_dict())
    trainer.train()
    grouped = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in grouped for p in trainer.hidden_distiller.parameters())
    after = trainer.hidden_distiller.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the projection did not move"
    assert all("hidden_loss" in log for log in trainer.state.log_history if "loss" in log)

    trainer.save_model()
    out = Path(args.output_dir)
    saved = load_file(str(out / PROJECTION_FILE))
    for key, value in after.items():
        torch.testing.assert_close(saved[key], value)
    assert not any(k.startswith("projections") for k in load_file(str(out / "model.safetensors")))
    reloaded = HiddenStateDistiller.from_pretrained(out, student.config, teacher.config)
    for key, value in after.items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)


def test_hidden_term_is_gradient_accumulation_exact_for_equal_rows(tmp_path, tokenizer):
    """2 accumulated micro-batches of 2 give the same update as one batch of 4 (rows of equal length)."""
    from datasets import Dataset

    vocab = len(tokenizer)
    rows = [tokenizer(s)["input_ids"] for s in ["the cat sees a dog", "a big red car runs", "the sun and the moon",
                                                "fish eat the green tree"]]  # fmt: skip
    assert len({len(r) for r in rows}) == 1
    data = Dataset.from_dict({"input_ids": rows})

    def one_step(batch, accumulation):
        student, teacher = tiny_gpt2(vocab, seed=1, n_embd=32), tiny_gpt2(vocab, seed=2, n_embd=48, n_layer=4)
        args = config(
            tmp_path / f"{batch}x{accumulation}", per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
            lr_scheduler_type="constant", max_grad_norm=0.0, hidden_state_loss_weight=2.0,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer,
            data_collator=lm_collator(tokenizer),
        )  # fmt: skip
        trainer.train()
        return {**dict(student.named_parameters()), **dict(trainer.hidden_distiller.named_parameters())}

    full, accumulated = one_step(4, 1), one_step(2, 2)
    for name, value in full.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-5, msg=name)
