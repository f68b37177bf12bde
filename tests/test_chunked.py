"""The chunked and fused losses against the plain, unchunked hf_kd.losses.distillation_loss."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bart, tiny_gpt2, tiny_t5

from hf_kd.losses import DIVERGENCES, IGNORE_INDEX, chunked, distillation_loss
from hf_kd.losses.chunked import OutputLayer, chunked_distillation_loss, fused_distillation_loss
from hf_kd.losses.output_layer import UnfusableModelError, forward_without_logits, output_layer

RTOL = 1e-5
# Gradients that are exactly 0 in exact arithmetic (attention key biases: softmax ignores a shift) come out as
# ~1e-12 rounding noise under either path; relative error means nothing there.
ATOL = 1e-9


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal within ``rtol`` of the largest magnitude (elementwise relative error is meaningless near 0)."""
    err = (actual - expected).abs().max().item()
    assert err <= max(rtol * expected.abs().max().item(), ATOL), (err, expected.abs().max().item())


def _batch(vocab: int = 37, shape: tuple[int, int] = (3, 7), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, vocab, generator=g) * 3).requires_grad_(True)
    teacher = torch.randn(*shape, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, :] = IGNORE_INDEX  # a row without any target
    labels[2, -2:] = IGNORE_INDEX  # padding
    return student, teacher, labels


def _loss_and_grad(fn, student, *args, **kwargs):
    student.grad = None
    out = fn(student, *args, **kwargs)
    out.loss.backward()
    return out, student.grad.clone()


@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("min_run", [2, 64], ids=["sliced-runs", "gathered-rows"])
def test_chunked_equals_unchunked(loss: str, alpha: float, min_run: int, monkeypatch) -> None:
    monkeypatch.setattr(chunked, "MIN_RUN", min_run)
    student, teacher, labels = _batch()
    kwargs = dict(loss=loss, temperature=2.0, alpha=alpha, beta=0.3, skew=0.2)
    ref, ref_grad = _loss_and_grad(distillation_loss, student, teacher, labels, **kwargs)
    for chunk_size in (1, 4, 5, 1000):
        out, grad = _loss_and_grad(chunked_distillation_loss, student, teacher, labels, chunk_size=chunk_size, **kwargs)
        close(out.loss, ref.loss)
        close(grad, ref_grad)
        close(out.kd_sum, ref.kd_sum)
        close(out.ce_sum, ref.ce_sum)
        assert out.num_tokens == ref.num_tokens == 9
        assert out.agreement.item() == ref.agreement.item()


def test_num_items_in_batch_and_grad_output_scale() -> None:
    student, teacher, labels = _batch(seed=1)
    ref, ref_grad = _loss_and_grad(distillation_loss, student, teacher, labels, num_items_in_batch=torch.tensor(23))
    student.grad = None
    out = chunked_distillation_loss(student, teacher, labels, num_items_in_batch=torch.tensor(23), chunk_size=2)
    (3.0 * out.loss).backward()  # backward must scale the stored gradient by grad_output
    close(out.loss, ref.loss)
    close(student.grad, 3.0 * ref_grad)


def test_teacher_target_rows_only() -> None:
    student, teacher, labels = _batch(seed=2)
    ref, ref_grad = _loss_and_grad(distillation_loss, student, teacher, labels, loss="jsd")
    rows = teacher.reshape(-1, teacher.shape[-1])[labels.reshape(-1).ne(IGNORE_INDEX)]
    out, grad = _loss_and_grad(chunked_distillation_loss, student, rows, labels, loss="jsd", chunk_size=3)
    close(out.loss, ref.loss)
    close(grad, ref_grad)


def test_no_target_gives_zero_loss_and_grad() -> None:
    student, teacher, labels = _batch()
    labels.fill_(IGNORE_INDEX)
    out, grad = _loss_and_grad(chunked_distillation_loss, student, teacher, labels, chunk_size=4)
    assert out.loss.item() == 0.0 and out.num_tokens == 0
    assert torch.count_nonzero(grad) == 0


def test_no_grad_path_matches() -> None:
    student, teacher, labels = _batch()
    ref = distillation_loss(student, teacher, labels, loss="reverse_kl")
    with torch.no_grad():
        out = chunked_distillation_loss(student, teacher, labels, loss="reverse_kl", chunk_size=4)
    close(out.loss, ref.loss)
    assert not out.loss.requires_grad


@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
def test_fused_linear_with_bias_scale_and_narrow_vocab(loss: str) -> None:
    """Plain tensors: a 40-wide output layer, a bias, a scale, and a vocabulary of 37 columns."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, 16, generator=g).requires_grad_(True)
    weight = torch.randn(40, 16, generator=g).requires_grad_(True)
    bias = torch.randn(40, generator=g).requires_grad_(True)
    _, teacher, labels = _batch(vocab=37, seed=3)
    kwargs = dict(loss=loss, temperature=1.5, alpha=0.5, num_items_in_batch=11)

    logits = torch.nn.functional.linear(hidden * 0.25, weight) + bias
    ref = distillation_loss(logits[..., :37], teacher, labels, **kwargs)
    ref_grads = torch.autograd.grad(ref.loss, [hidden, weight, bias])
    layer = OutputLayer(weight=weight, bias=bias, scale=0.25)
    out = fused_distillation_loss(hidden, layer, teacher, labels, vocab_size=37, chunk_size=4, **kwargs)
    grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
    close(out.loss, ref.loss)
    for a, b in zip(grads, ref_grads, strict=True):
        close(a, b)
    assert out.agreement.item() == ref.agreement.item()


def _models():
    return {
        "gpt2": lambda: (tiny_gpt2(45, seed=0), tiny_gpt2(45, seed=1)),
        "t5_tied": lambda: (tiny_t5(45, seed=0), tiny_t5(45, seed=1)),
        "t5_untied": lambda: (tiny_t5(45, seed=0, tie_word_embeddings=False), tiny_t5(45, seed=1)),
        "bart": lambda: (_bart_with_bias(45, seed=0), tiny_bart(45, seed=1)),
    }


def _bart_with_bias(vocab: int, seed: int):
    model = tiny_bart(vocab, seed=seed)
    model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias))  # zero at init: make it count
    return model


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_fused_model_equals_unchunked(name: str, loss: str) -> None:
    """The fused loss on the model's hidden states reproduces its own logits, loss and every gradient."""
    student, teacher = _models()[name]()
    vocab = 41  # narrower than the 45-wide output layers
    g = torch.Generator().manual_seed(4)
    inputs = {"input_ids": torch.randint(4, vocab, (2, 9), generator=g), "attention_mask": torch.ones(2, 9).long()}
    inputs["attention_mask"][1, -3:] = 0
    labels = torch.randint(4, vocab, (2, 6), generator=g)
    labels[1, -2:] = IGNORE_INDEX
    if student.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(labels=labels)
    else:
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"].eq(0), IGNORE_INDEX)[:, 1:]

    def cut(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[..., :vocab]
        return logits if student.config.is_encoder_decoder else logits[:, :-1]

    with torch.no_grad():
        teacher_logits = cut(teacher(**inputs).logits)
    kwargs = dict(loss=loss, temperature=2.0, alpha=0.5)
    params = [p for p in student.parameters() if p.requires_grad]

    ref = distillation_loss(cut(student(**inputs).logits), teacher_logits, labels, **kwargs)
    ref_grads = torch.autograd.grad(ref.loss, params, allow_unused=True)

    hidden, outputs = forward_without_logits(student, inputs)
    assert outputs.logits.numel() == 0  # the model never formed its logits
    hidden = hidden if student.config.is_encoder_decoder else hidden[:, :-1]
    layer = output_layer(student)
    out = fused_distillation_loss(hidden, layer, teacher_logits, labels, vocab_size=vocab, chunk_size=3, **kwargs)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)

    close(out.loss, ref.loss)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b)


def test_forward_without_logits_restores_the_model() -> None:
    model = _bart_with_bias(45, seed=0)
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "decoder_input_ids": torch.tensor([[1, 5]])}
    before = model(**inputs).logits
    forward_without_logits(model, inputs)
    torch.testing.assert_close(model(**inputs).logits, before)
    assert output_layer(model).bias is model.final_logits_bias


def test_unfusable_model_is_refused() -> None:
    model = tiny_gpt2(45)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UnfusableModelError, match="fuse_output_layer=False"):
        output_layer(model)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_clamped_log_probs_match(loss: str, temperature: float) -> None:
    """Masked vocabulary (-inf / huge negative logits): the clamp at MIN_LOG_PROB acts as in losses.py."""
    student, teacher, labels = _batch(seed=5)
    with torch.no_grad():
        student[..., 30:33] = -2.0e4
        student[..., 33] = float("-inf")
    kwargs = dict(loss=loss, temperature=temperature, alpha=0.5)
    ref, ref_grad = _loss_and_grad(distillation_loss, student, teacher, labels, **kwargs)
    out, grad = _loss_and_grad(chunked_distillation_loss, student, teacher, labels, chunk_size=4, **kwargs)
    close(out.loss, ref.loss)
    close(grad, ref_grad)


def test_bfloat16_logits_get_bfloat16_gradient() -> None:
    student, teacher, labels = _batch(seed=6)
    student = student.detach().bfloat16().requires_grad_(True)
    teacher = teacher.bfloat16()
    ref, ref_grad = _loss_and_grad(distillation_loss, student, teacher, labels)
    out, grad = _loss_and_grad(chunked_distillation_loss, student, teacher, labels, chunk_size=4)
    assert grad.dtype == torch.bfloat16
    close(out.loss, ref.loss)
    close(grad.float(), ref_grad.float(), rtol=1e-2)  # both are rounded to bfloat16


def test_vocab_size_uses_leading_columns_of_wider_logits() -> None:
    """An output layer wider than the vocabulary: the extra columns get no loss and a zero gradient."""
    wide, teacher, labels = _batch(vocab=40, seed=7)
    teacher = teacher[..., :37]
    labels = labels.clamp_max(36).masked_fill(labels.eq(IGNORE_INDEX), IGNORE_INDEX)
    ref = distillation_loss(wide[..., :37], teacher, labels, loss="jsd", alpha=0.3)
    (ref_grad,) = torch.autograd.grad(ref.loss, wide)
    out = chunked_distillation_loss(wide, teacher, labels, loss="jsd", alpha=0.3, vocab_size=37, chunk_size=4)
    (grad,) = torch.autograd.grad(out.loss, wide)
    close(out.loss, ref.loss)
    close(grad, ref_grad)
    assert torch.count_nonzero(grad[..., 37:]) == 0


@pytest.mark.parametrize("size", [1, 3, 4, 100])
def test_chunks_cover_every_target_row_once(size: int, monkeypatch) -> None:
    monkeypatch.setattr(chunked, "MIN_RUN", 4)
    rows = torch.tensor([0, 1, 2, 5, 6, 7, 8, 9, 10, 20, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39])
    parts = chunked._chunks(rows, size)
    positions = torch.cat([torch.arange(pos.start, pos.stop) for pos, _ in parts])
    assert torch.equal(positions, torch.arange(rows.numel()))
    for pos, sel in parts:
        assert torch.equal(torch.arange(64)[sel], rows[pos]) and rows[pos].numel() <= size
    # runs of at least MIN_RUN rows are read as slices, the rest gathered
    assert any(isinstance(sel, slice) for _, sel in parts) and (
        size == 1 or any(torch.is_tensor(sel) for _, sel in parts)
    )
