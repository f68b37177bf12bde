"""Memory-lean distillation loss: the gradient is computed chunk by chunk during the forward pass.

:func:`hf_kd.losses.distillation_loss` can loop over chunks of target tokens, but autograd then keeps every
chunk's float32 log-probabilities alive until backward, so its memory still grows with tokens x vocabulary.
Here (in the manner of Liger-Kernel's fused linear losses) each chunk's loss is differentiated at once with
respect to its own student logits, the gradient is written into a buffer in the logits' dtype, and the float32
intermediates are freed before the next chunk; backward only scales the buffer. The math is that of
:mod:`hf_kd.losses` (same divergences, same :func:`~hf_kd.losses.log_probs`), so loss and gradients match it.

With :func:`fused_distillation_loss` the student's logits are not an input at all: the output layer is applied
to one chunk of hidden states at a time and its gradients (hidden states, weight, bias) accumulate per chunk.

Both take either the teacher's logits or a top-k cache's rows (:class:`hf_kd.losses.topk.TopKRows`); only the
per-chunk math differs (:func:`hf_kd.losses.topk.topk_chunk_loss`), the chunking and bookkeeping are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hf_kd.losses.base import (
    DEFAULT_CHUNK_MIB,
    DEFAULT_CHUNK_SIZE,
    IGNORE_INDEX,
    DistillationLossOutput,
    LossKeywords,
    LossSettings,
    chunk_rows,
    mix_terms,
    normalizer,
)
from hf_kd.losses.divergences import MIN_LOG_PROB, forward_kl, log_probs
from hf_kd.losses.output_layer import OutputLayer
from hf_kd.losses.topk import TopKRows, check_rows, check_tail_treatment, topk_chunk_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass(frozen=True)
class _Settings:
    divergence: Callable[..., torch.Tensor]
    temperature: float
    alpha: float
    normalizer: float
    chunk_size: int
    vocab_size: int
    scale: float


def _chunk_loss(
    logits: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, s: _Settings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normalized weighted loss of one chunk (in the graph of ``logits``) and its detached KD and CE sums."""
    # A term whose weight is 0 is still measured for the logs, but kept out of the graph (as in losses.py).
    with torch.set_grad_enabled(torch.is_grad_enabled() and s.alpha < 1.0):
        kd = s.divergence(log_probs(logits, s.temperature), log_probs(teacher, s.temperature)).sum()
    with torch.set_grad_enabled(torch.is_grad_enabled() and s.alpha > 0.0):
        ce = F.cross_entropy(logits.float(), ids, reduction="sum")
    total = mix_terms(ce, kd, s.alpha, s.temperature) / s.normalizer
    return total, kd.detach(), ce.detach()


def _forward_kl_closed_form(
    logits: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, s: _Settings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_chunk_loss` for forward KL, with its float32 gradient in closed form.

    Forward KL is the default and the cheapest case: with ``q = softmax(z / T)`` and the teacher's ``p``, the
    gradient of ``T**2 * KL(p || q)`` is ``T * (q * sum(p) - p)`` and that of the CE is ``softmax(z) - onehot``,
    so autograd's extra passes over ``[chunk, vocab]`` are not needed. Where ``log q`` is clamped at
    :data:`~hf_kd.losses.MIN_LOG_PROB` the gradient is 0, as autograd gives through the clamp.
    """
    t, n, alpha = s.temperature, s.normalizer, s.alpha
    z = logits.float()
    log_q = F.log_softmax(z / t if t != 1.0 else z, dim=-1)
    log_p = log_probs(teacher, t)
    p = log_p.exp()
    if log_q.min() < MIN_LOG_PROB:  # rare (masked vocabulary): log q is clamped, and its gradient is 0 there
        live = p.masked_fill(log_q < MIN_LOG_PROB, 0.0)
        live_sum = live.sum(-1, keepdim=True)
        kd = log_p.sub_(log_q.clamp_min(MIN_LOG_PROB)).mul_(p).sum()
    else:
        live, live_sum = p, 1.0  # sum(p) is 1 up to rounding; autograd's extra pass over the chunk buys nothing
        kd = log_p.sub_(log_q).mul_(p).sum()
    del log_p
    kd_weight = (1.0 - alpha) * t / n
    if t == 1.0:
        ce = -log_q.gather(1, ids[:, None]).sum()
        grad = log_q.exp_()  # q, shared by both terms: alpha * (q - onehot) / n + kd_weight * (q * sum(p) - p)
        grad.mul_(live_sum * kd_weight + alpha / n).sub_(live, alpha=kd_weight)
    else:
        grad = log_q.exp_().mul_(live_sum * kd_weight).sub_(live, alpha=kd_weight)
        log_q1 = F.log_softmax(z, dim=-1)
        ce = -log_q1.gather(1, ids[:, None]).sum()
        if alpha > 0.0:
            grad.add_(log_q1.exp_(), alpha=alpha / n)
    if alpha > 0.0:
        grad[torch.arange(ids.numel(), device=ids.device), ids] -= alpha / n
    total = mix_terms(ce, kd, alpha, t) / n
    return total, kd, ce, grad


def _loss_and_grad(
    logits: torch.Tensor, teacher: torch.Tensor | TopKRows, ids: torch.Tensor, s: _Settings, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk's loss, KD and CE sums, and (when ``need_grad``) the gradient with respect to its logits.

    Differentiating with respect to the chunk's logits only keeps the projection's gradients (fused path) to
    matrix products accumulated in place, never per-chunk tensors of the weight's size.
    """
    if isinstance(teacher, TopKRows):
        return topk_chunk_loss(
            logits, teacher, ids, divergence=s.divergence, temperature=s.temperature, alpha=s.alpha,
            normalizer=s.normalizer, need_grad=need_grad,
        )  # fmt: skip
    if not need_grad:
        return (*_chunk_loss(logits, teacher, ids, s), None)
    # alpha = 1 takes autograd, which keeps the weightless KD term out of the gradient; the closed form would
    # multiply it by 0, and a NaN KD (a teacher row with inf logits) would make the gradient NaN.
    if s.divergence is forward_kl and s.alpha < 1.0:
        return _forward_kl_closed_form(logits, teacher, ids, s)
    with torch.enable_grad():
        z = logits.detach().requires_grad_(True)
        total, kd, ce = _chunk_loss(z, teacher, ids, s)
        (g,) = torch.autograd.grad(total, z)
    return total, kd, ce, g


# A run of at least this many consecutive target rows becomes chunks of its own, read as views of the input; shorter
# runs (or scattered targets) are packed together and gathered, so that tiny chunks never multiply.
MIN_RUN = 64


def _chunks(rows: torch.Tensor, size: int) -> list[tuple[slice, slice | torch.Tensor]]:
    """(positions in ``rows``, rows of the input) per chunk of at most ``size`` target rows.

    Targets come in runs (the completion of each sequence): a long run is cut into slices of the input, which
    cost neither a gather in forward nor a scatter of the gradient; short runs are packed and gathered.
    """
    n = rows.numel()
    if n == 0:
        return []
    starts = [0, *((rows[1:] - rows[:-1]).ne(1).nonzero().squeeze(-1) + 1).tolist()]
    ends = [*starts[1:], n]
    firsts = rows[starts].tolist()
    chunks: list[tuple[slice, slice | torch.Tensor]] = []
    packed = (0, 0)  # positions [begin, end) of short runs waiting to be gathered together

    def flush() -> None:
        if packed[1] > packed[0]:
            chunks.append((slice(*packed), rows[packed[0] : packed[1]]))

    for start, end, first in zip(starts, ends, firsts, strict=True):
        if end - start >= min(MIN_RUN, size):
            flush()
            packed = (end, end)
            for a in range(start, end, size):
                b = min(a + size, end)
                chunks.append((slice(a, b), slice(first + a - start, first + b - start)))
            continue
        if end - packed[0] > size:
            flush()
            packed = (start, start)
        packed = (packed[0], end)
    flush()
    return chunks


class _ChunkedDistillation(torch.autograd.Function):
    """Loss over the rows ``rows`` of ``inputs`` (logits, or hidden states when ``weight`` is given)."""

    @staticmethod
    def forward(  # noqa: ANN205
        ctx,  # noqa: ANN001
        inputs: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        teacher: torch.Tensor,
        rows: torch.Tensor,
        target_ids: torch.Tensor,
        s: _Settings,
    ):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        flat = inputs.reshape(-1, inputs.shape[-1])
        teacher_is_rows = isinstance(teacher, TopKRows) or (teacher.dim() == 2 and teacher.shape[0] == rows.numel())
        if not teacher_is_rows:
            teacher = teacher.reshape(-1, teacher.shape[-1])
        grad_x = None
        if need_x:
            # Every target row is written below; only the others (and any columns past the vocabulary) need zeros.
            grad_x = torch.empty_like(flat)
            keep = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
            keep[rows] = True
            grad_x[~keep] = 0
            if weight is None and flat.shape[-1] > s.vocab_size:
                grad_x[:, s.vocab_size :] = 0
        w = weight[: s.vocab_size] if weight is not None else None
        b = bias.reshape(-1)[: s.vocab_size] if bias is not None else None
        full_w, grad_w = _gradient_buffers(weight, w) if need_w else (None, None)
        full_b, grad_b = _gradient_buffers(bias, b) if need_b else (None, None)
        kd_sum = torch.zeros((), dtype=torch.float32, device=flat.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=flat.device)
        loss = torch.zeros((), dtype=torch.float32, device=flat.device)
        agreement = torch.zeros((), dtype=torch.long, device=flat.device)

        for pos, sel in _chunks(rows, s.chunk_size):
            t_chunk = teacher[pos] if teacher_is_rows else teacher[sel]
            ids = target_ids[pos]
            x = flat[sel]
            h = x * s.scale if s.scale != 1.0 else x
            logits = x[:, : s.vocab_size] if w is None else F.linear(h, w.detach())
            if b is not None:
                logits = logits + b.detach()  # as BART: the bias is added after the projection
            total, kd, ce, g = _loss_and_grad(logits, t_chunk, ids, s, need_grad=need_x or need_w or need_b)
            if g is not None:
                if w is None:
                    grad_x[sel, : s.vocab_size] = g.to(grad_x.dtype)  # bf16 logits: DeepSpeed bf16
                else:
                    if need_b:
                        grad_b += g.sum(0, dtype=torch.float32)
                    g = g.to(logits.dtype)
                    if need_x:
                        gx = g @ w.to(g.dtype)
                        grad_x[sel] = gx * s.scale if s.scale != 1.0 else gx
                    if need_w:
                        hs = h.to(g.dtype)
                        if g.dtype == torch.float32:
                            grad_w.addmm_(g.t(), hs)
                        else:
                            grad_w += (g.t() @ hs).float()
                del g
            loss += total.detach()
            kd_sum += kd
            ce_sum += ce
            # A top-k cache keeps its rows sorted: column 0 is the teacher's top-1 token.
            top1 = t_chunk.ids[:, 0].long() if isinstance(t_chunk, TopKRows) else t_chunk.argmax(-1)
            agreement += (logits.argmax(-1) == top1).sum()

        for full, summed in ((full_w, grad_w), (full_b, grad_b)):
            if full is not None and full.dtype != torch.float32:
                full.view(-1)[: summed.numel()] = summed.view(-1)  # cast the float32 sum once, at the end
        ctx.grads = (grad_x.view_as(inputs) if grad_x is not None else None, full_w, full_b)
        ctx.mark_non_differentiable(kd_sum, ce_sum, agreement)
        return loss, kd_sum, ce_sum, agreement

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_unused: torch.Tensor):  # noqa: ANN205, ANN001
        grads = ctx.grads
        ctx.grads = None  # the buffers are handed over once; free them with the graph
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grads = tuple(g * grad_loss.to(g.dtype) if g is not None else None for g in grads)
        return (*grads, None, None, None, None)


def _gradient_buffers(param: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of ``param`` (zeros) and the float32 tensor the chunks add the gradient of ``used`` into.

    ``used`` is the leading part of ``param`` (the vocabulary's rows of a wider output layer). The gradient is a sum
    over chunks, so it is accumulated in float32: in the gradient itself when ``param`` is float32 (no second
    tensor of the weight's size: at 256k x 4096 that would be 4 GiB), else in a float32 sum cast at the end.
    """
    full = torch.zeros(param.shape, dtype=param.dtype, device=param.device)
    if param.dtype == torch.float32:
        return full, full.view(-1)[: used.numel()].view(used.shape)
    return full, torch.zeros(used.shape, dtype=torch.float32, device=param.device)


def _targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = labels.reshape(-1)
    rows = flat.ne(IGNORE_INDEX).nonzero().squeeze(-1)
    return rows, flat[rows]


def _check_teacher(teacher_logits: torch.Tensor, num_targets: int, num_rows: int, vocab: int) -> None:
    if teacher_logits.shape[-1] != vocab:
        raise ValueError(
            f"Teacher logits have {teacher_logits.shape[-1]} columns but the student's vocabulary has {vocab}: "
            "slice the teacher to the shared vocabulary (and pass vocab_size) first."
        )
    rows = teacher_logits.numel() // vocab
    if rows not in (num_targets, num_rows):
        raise ValueError(
            f"Teacher logits hold {rows} positions: expected the {num_rows} positions of the labels or only "
            f"their {num_targets} target rows."
        )


def _run(
    inputs: torch.Tensor,
    layer: OutputLayer | None,
    vocab: int,
    teacher_logits: torch.Tensor | TopKRows,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    chunk_mib: float | None = DEFAULT_CHUNK_MIB,
    **keywords: Unpack[LossKeywords],
) -> DistillationLossOutput:
    loss_settings = LossSettings(**keywords)
    rows, target_ids = _targets(labels)
    num_tokens = int(rows.numel())
    if isinstance(teacher_logits, TopKRows):
        check_tail_treatment(teacher_logits.tail_treatment, loss_settings.loss, teacher_logits)
        check_rows(teacher_logits, target_ids)
    else:
        _check_teacher(teacher_logits, num_tokens, labels.numel(), vocab)
    settings = _Settings(
        divergence=loss_settings.divergence,
        temperature=loss_settings.temperature,
        alpha=loss_settings.alpha,
        normalizer=float(normalizer(num_items_in_batch, num_tokens)),
        chunk_size=chunk_rows(chunk_size or DEFAULT_CHUNK_SIZE, chunk_mib, vocab),
        vocab_size=vocab,
        scale=layer.scale if layer is not None else 1.0,
    )
    weight = layer.weight if layer is not None else None
    bias = layer.bias if layer is not None else None
    total, kd_sum, ce_sum, agreement = _ChunkedDistillation.apply(
        inputs, weight, bias, teacher_logits, rows, target_ids, settings
    )
    return DistillationLossOutput(loss=total, kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=num_tokens, agreement=agreement)


def chunked_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKRows,
    labels: torch.Tensor,
    *,
    vocab_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    chunk_mib: float | None = DEFAULT_CHUNK_MIB,
    **keywords: Unpack[LossKeywords],
) -> DistillationLossOutput:
    """:func:`hf_kd.losses.distillation_loss`, with float32 memory bounded by one chunk, backward included.

    Arguments are those of :func:`hf_kd.losses.distillation_loss`, with two additions that spare copies of
    the logits: ``teacher_logits`` may be only the target rows, ``[num_targets, vocab]`` in the order of the
    flattened labels (the trainer keeps no more of the teacher) or a top-k cache's
    :class:`~hf_kd.losses.topk.TopKRows`, and ``vocab_size`` uses only the first columns of a wider
    ``student_logits`` without slicing it. The gradient with respect to ``student_logits``
    is formed during the forward pass (one buffer in the logits' dtype); backward scales it.

    A chunk holds ``chunk_size`` target tokens, or fewer where the vocabulary is large: as many as keep its float32
    work within ``chunk_mib`` MiB (:func:`hf_kd.losses.base.chunk_rows`; ``None``: no budget). Neither changes the
    result beyond float32 rounding.
    """
    vocab = vocab_size or student_logits.shape[-1]
    return _run(student_logits, None, vocab, teacher_logits, labels, num_items_in_batch=num_items_in_batch,
                chunk_size=chunk_size, chunk_mib=chunk_mib, **keywords)  # fmt: skip


def fused_distillation_loss(
    hidden_states: torch.Tensor,
    output_layer: OutputLayer,
    teacher_logits: torch.Tensor | TopKRows,
    labels: torch.Tensor,
    *,
    vocab_size: int | None = None,
    **options: Any,
) -> DistillationLossOutput:
    """The chunked loss with the student's output layer fused in: its logits never exist for more than a chunk.

    Args:
        hidden_states: ``[..., hidden]`` last hidden states; position ``i`` predicts ``labels[..., i]``.
        output_layer: the student's projection to logits, see :class:`OutputLayer` and
            :func:`hf_kd.losses.output_layer.output_layer`.
        teacher_logits: ``[..., vocab_size]`` aligned with ``labels``, or only the target rows.
        labels: target ids, :data:`~hf_kd.losses.IGNORE_INDEX` where there is no target.
        vocab_size: how many leading output columns to use (the whole output layer when ``None``).
        options: ``num_items_in_batch``, ``chunk_size``, ``chunk_mib`` and the loss keywords, as in
            :func:`chunked_distillation_loss`.
    """
    vocab = vocab_size or output_layer.weight.shape[0]
    return _run(hidden_states, output_layer, vocab, teacher_logits, labels, **options)
