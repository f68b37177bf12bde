"""The trainer's loss and gradients are the same with and without a chunked or fused loss."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bart, tiny_gpt2, tiny_t5
from helpers import config, lm_collator, lm_dataset, seq2seq_collator, seq2seq_dataset

from hf_kd import DistillationTrainer

# (student loss_chunk_size, fuse_output_layer) against the unchunked loss; "auto" (the default) fuses these students
VARIANTS = [(3, False), (1000, False), (3, True), (None, True), (3, "auto")]
MODELS = {
    "gpt2": lambda v: (tiny_gpt2(v + 5, seed=1), tiny_gpt2(v + 2, seed=2, n_layer=3)),
    "t5": lambda v: (tiny_t5(v + 7, seed=1), tiny_t5(v + 3, seed=2, d_model=48)),
    "bart": lambda v: (tiny_bart(v + 7, seed=1), tiny_bart(v + 3, seed=2, d_model=48)),
}


def _loss_and_grads(tmp_path, tokenizer, student, teacher, batch, chunk, fuse, **fields):
    student = copy.deepcopy(student)
    args = config(tmp_path, loss_chunk_size=chunk, fuse_output_layer=fuse, **fields)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    student.train()
    loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(29))
    loss.backward()
    sums = trainer._kd_sums["train"].clone()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}, sums


def _batch(name, tokenizer, student):
    if name == "gpt2":
        data = lm_dataset(tokenizer, n=5)
        batch = lm_collator(tokenizer)([data[i] for i in range(5)])
        batch["labels"][0, :3] = -100  # a prompt
    else:
        data = seq2seq_dataset(tokenizer, n=5)
        batch = seq2seq_collator(tokenizer, student)([data[i] for i in range(5)])
    assert (batch["labels"] == -100).any()
    return batch


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("loss", ["forward_kl", "skew_reverse_kl"])
def test_chunked_and_fused_trainer_match_unchunked(tmp_path, tokenizer, name, loss):
    student, teacher = MODELS[name](len(tokenizer))
    if name == "bart":  # final_logits_bias is zero at init: make it matter
        student.final_logits_bias.normal_()
    batch = _batch(name, tokenizer, student)
    fields = dict(loss=loss, alpha=0.4, temperature=2.0)
    ref_loss, ref_grads, ref_sums = _loss_and_grads(tmp_path, tokenizer, student, teacher, batch, None, False, **fields)
    for chunk, fuse in VARIANTS:
        loss_, grads, sums = _loss_and_grads(tmp_path, tokenizer, student, teacher, batch, chunk, fuse, **fields)
        torch.testing.assert_close(loss_, ref_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-9)
        assert grads.keys() == ref_grads.keys()
        for key, grad in grads.items():
            scale = ref_grads[key].abs().max().item()
            err = (grad - ref_grads[key]).abs().max().item()
            assert err <= max(1e-5 * scale, 1e-9), (chunk, fuse, key, err, scale)


def test_fused_evaluation_with_outputs_falls_back_to_logits(tmp_path, tokenizer):
    """prediction_step asks for the outputs (the logits): the fused path must still return them."""
    student, teacher = MODELS["gpt2"](len(tokenizer))
    batch = _batch("gpt2", tokenizer, student)
    args = config(tmp_path, loss_chunk_size=4, fuse_output_layer=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    student.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(student, dict(batch), return_outputs=True)
    assert outputs.logits.shape[-1] == student.config.vocab_size
    assert torch.isfinite(loss)
