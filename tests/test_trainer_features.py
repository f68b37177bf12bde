"""Trainer features keep working: logs, evaluation, checkpoints, resume, save, model card, loading, bf16."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, tiny_gpt2, tiny_t5
from helpers import config, lm_collator, lm_dataset, seq2seq_collator, seq2seq_dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_kd import DistillationTrainer, TokenizerMismatchError


def causal_trainer(tmp_path, tokenizer, n=8, dropout=0.0, **kwargs):
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1, dropout=dropout), tiny_gpt2(vocab, seed=2, n_layer=3)
    data = lm_dataset(tokenizer, n=n)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, **kwargs), train_dataset=data, eval_dataset=data,
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    return trainer, student, teacher, data


def manual_stats(student, teacher, batch, temperature):
    """Token means of KL(teacher || student) at T, CE, and top-1 agreement, by a plain formula."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels.ne(-100)
    s, t = s[mask].double(), t[mask].double()
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="sum"
    )
    ce = F.cross_entropy(s, labels[mask], reduction="sum")
    agree = (s.argmax(-1) == t.argmax(-1)).sum()
    n = mask.sum()
    return (kl / n).item(), (ce / n).item(), (agree / n).item()


def test_logged_kd_and_ce_losses_match_manual(tmp_path, tokenizer):
    trainer, student, teacher, data = causal_trainer(
        tmp_path, tokenizer, n=8, per_device_train_batch_size=8, max_steps=1, temperature=2.0, alpha=0.25
    )
    batch = lm_collator(tokenizer)([data[i] for i in range(8)])
    kd, ce, agree = manual_stats(copy.deepcopy(student), teacher, batch, temperature=2.0)
    trainer.train()
    log = trainer.state.log_history[0]
    assert abs(log["kd_loss"] - kd) < 1e-5 and abs(log["ce_loss"] - ce) < 1e-5
    assert abs(log["teacher_agreement"] - agree) < 1e-6
    assert abs(log["loss"] - (0.25 * ce + 0.75 * 4.0 * kd)) < 1e-4


def test_evaluation_metrics_match_manual_and_reach_callbacks(tmp_path, tokenizer):
    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer, student, teacher, data = causal_trainer(tmp_path, tokenizer, n=8, per_device_eval_batch_size=8)
    trainer.add_callback(Recorder())
    metrics = trainer.evaluate()
    batch = lm_collator(tokenizer)([data[i] for i in range(8)])
    kd, ce, agree = manual_stats(student, teacher, batch, temperature=1.0)
    assert abs(metrics["eval_kd_loss"] - kd) < 1e-5
    assert abs(metrics["eval_ce_loss"] - ce) < 1e-5
    assert abs(metrics["eval_teacher_agreement"] - agree) < 1e-6
    assert abs(metrics["eval_loss"] - ce) < 1e-5  # one batch: its mean CE, what a Trainer reports
    assert abs(metrics["eval_distillation_loss"] - (0.5 * ce + 0.5 * kd)) < 1e-5
    assert any("eval_kd_loss" in logs for logs in seen)


def test_checkpoint_holds_the_student_alone_and_resume_continues_the_curve(tmp_path, tokenizer):
    # Uninterrupted: 6 steps. Interrupted: the same run stopped after the checkpoint at step 3, then resumed.
    full, *_ = causal_trainer(tmp_path / "full", tokenizer, n=16, dropout=0.1, max_steps=6)
    full.train()
    half, student, teacher, _ = causal_trainer(
        tmp_path / "half", tokenizer, n=16, dropout=0.1, max_steps=6, save_strategy="steps", save_steps=3
    )

    class StopAtThree(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    half.add_callback(StopAtThree())
    half.train()
    checkpoint = Path(half.args.output_dir) / "checkpoint-3"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert set(saved) <= set(student.state_dict()) and len(saved) > 0
    assert sum(t.numel() for t in saved.values()) < sum(p.numel() for p in teacher.parameters())
    assert not list(checkpoint.glob("pytorch_model*.bin")), "weights must be safetensors only"
    optimizer_params = sum(p.numel() for g in half.optimizer.param_groups for p in g["params"])
    assert optimizer_params == sum(p.numel() for p in student.parameters())

    resumed, *_ = causal_trainer(tmp_path / "half", tokenizer, n=16, dropout=0.1, max_steps=6)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def curve(trainer):
        return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}

    full_curve, resumed_curve = curve(full), curve(resumed)
    for step in (4, 5, 6):
        assert abs(full_curve[step] - resumed_curve[step]) < 1e-6, (step, full_curve, resumed_curve)


def test_save_model_saves_the_student_only(tmp_path, tokenizer):
    trainer, student, _, _ = causal_trainer(tmp_path, tokenizer)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def test_model_card_says_how_the_student_was_made(tmp_path, tokenizer):
    trainer, _, teacher, _ = causal_trainer(tmp_path, tokenizer, loss="jsd", beta=0.3, temperature=2.0, alpha=0.2)
    trainer.teacher_name = "some-org/teacher-large"  # as if loaded from the Hub
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card(dataset="random-words")
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: some-org/teacher-large" in front  # the student started from scratch: the teacher
    assert "- hf-kd" in front and "- distillation" in front
    for needle in ("generalized Jensen-Shannon divergence (beta = 0.3)", "| temperature T | 2.0 |",
                   "| alpha (CE weight) | 0.2 |", "random-words", "eval_kd_loss", "hf_kd 0.1.0"):  # fmt: skip
        assert needle in card, needle


def test_model_card_of_a_student_from_scratch_with_a_local_teacher(tmp_path, tokenizer):
    trainer, *_ = causal_trainer(tmp_path, tokenizer)
    trainer.train()
    trainer.create_model_card()
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]  # nothing on the Hub to point at
    assert "[](" not in card and "was trained from scratch" in card
    assert "| teacher | `GPT2LMHeadModel` |" in card


def test_teacher_loaded_from_a_local_folder(tmp_path, tokenizer):
    vocab = len(tokenizer)
    teacher = tiny_gpt2(vocab, seed=2)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = config(tmp_path, teacher_model_name_or_path=str(folder))
    trainer = DistillationTrainer(
        model=tiny_gpt2(vocab, seed=1), args=args, train_dataset=lm_dataset(tokenizer, n=4),
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(trainer.teacher.state_dict()[name], tensor)
    assert trainer.teacher_name == str(folder)

    # A teacher folder with another tokenizer is refused.
    make_tokenizer(words=["zebra", "yak", "xylophone"], name="zoo").save_pretrained(folder)
    with pytest.raises(TokenizerMismatchError, match=r"tiny-words.*\(54 tokens\).*teacher'\) \(7 tokens\)"):
        DistillationTrainer(model=tiny_gpt2(vocab, seed=1), args=args, processing_class=tokenizer)


def test_trust_remote_code_is_off_unless_asked(tmp_path, tokenizer, monkeypatch):
    import hf_kd.teachers.loading as teacher_module

    calls = []
    real = teacher_module.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_module.AutoConfig, "from_pretrained", spy)
    folder = tmp_path / "teacher"
    tiny_gpt2(len(tokenizer)).save_pretrained(folder)
    teacher_module.load_teacher(str(folder), config(tmp_path))
    assert calls and not any(calls)
    calls.clear()
    teacher_module.load_teacher(str(folder), config(tmp_path, teacher_trust_remote_code=True))
    assert calls[0] is True


def test_predict_with_generate_and_compute_metrics(tmp_path, tokenizer):
    vocab = len(tokenizer)
    student, teacher = tiny_t5(vocab, seed=1), tiny_t5(vocab, seed=2)
    data = seq2seq_dataset(tokenizer, n=8)
    calls = []

    def compute_metrics(prediction):
        calls.append(prediction.predictions.shape)
        return {"generated_length": float((prediction.predictions > 0).sum(-1).mean())}

    args = config(tmp_path, predict_with_generate=True, generation_max_length=6, per_device_eval_batch_size=8)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, eval_dataset=data,
        processing_class=tokenizer, data_collator=seq2seq_collator(tokenizer, student),
        compute_metrics=compute_metrics,
    )  # fmt: skip
    metrics = trainer.evaluate()
    assert calls and calls[0][0] == 8
    assert "eval_generated_length" in metrics
    # Generating, the loss is still the student's CE on the labels; the objective is reported beside it.
    assert abs(metrics["eval_loss"] - metrics["eval_ce_loss"]) < 1e-5  # one batch
    assert abs(metrics["eval_distillation_loss"] - 0.5 * (metrics["eval_ce_loss"] + metrics["eval_kd_loss"])) < 1e-5


def test_bf16_autocast_on_cpu_stays_finite(tmp_path, tokenizer):
    trainer, *_ = causal_trainer(tmp_path, tokenizer, bf16=True, max_steps=3, loss="skew_reverse_kl")
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    assert all(torch.isfinite(torch.tensor([log["loss"], log["kd_loss"], log["ce_loss"]])).all() for log in logs)
    assert json.dumps(trainer.state.log_history)  # serialisable for every report_to backend


def test_saved_student_runs_in_a_pipeline(tmp_path, tokenizer):
    from transformers import pipeline

    trainer, student, _, _ = causal_trainer(tmp_path, tokenizer)
    trainer.train()
    out = tmp_path / "student"
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    generator = pipeline("text-generation", model=str(out), device="cpu")
    generated = generator("the cat", max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    expected = student.eval().generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert list(generated) == expected[0].tolist()
