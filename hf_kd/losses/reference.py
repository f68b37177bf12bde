"""The dense reference loss: autograd through float32 log-probabilities of every target row at once.

Readable and exact; the chunked and fused paths (:mod:`hf_kd.losses.chunked`) compute the same value and
gradient with bounded memory, and are what the trainer uses by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hf_kd.losses.base import IGNORE_INDEX, DistillationLossOutput, LossKeywords, LossSettings, finish
from hf_kd.losses.divergences import log_probs

if TYPE_CHECKING:
    from typing_extensions import Unpack


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    **keywords: Unpack[LossKeywords],
) -> DistillationLossOutput:
    """Token-level distillation loss over aligned logits.

    Args:
        student_logits: ``[..., vocab]`` logits; position ``i`` predicts ``labels[..., i]``. Any dtype.
        teacher_logits: same shape as ``student_logits`` (slice both to the shared vocabulary first).
        labels: ``[...]`` target ids; :data:`IGNORE_INDEX` (-100) marks positions that are not targets.
        num_items_in_batch: divide the summed loss by this instead of the number of target tokens; the
            Trainer passes the count over all gradient-accumulation micro-batches (and devices) here.
        chunk_size: compute over this many target tokens at a time (all at once when ``None``).
        keywords: ``loss``, ``temperature``, ``alpha``, ``beta``, ``skew``, as in
            :class:`~hf_kd.losses.base.LossSettings` (defaults: forward KL, 1, 0.5, 0.5, 0.1).
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape: align positions and slice both to the shared vocabulary first."
        )
    settings = LossSettings(**keywords)
    divergence, alpha, temperature = settings.divergence, settings.alpha, settings.temperature
    flat_labels = labels.reshape(-1)
    targets = flat_labels.ne(IGNORE_INDEX)
    # Only target positions are ever cast to float32: padding and prompt rows cost nothing.
    student = student_logits.reshape(-1, vocab)[targets]
    teacher = teacher_logits.reshape(-1, vocab)[targets]
    target_ids = flat_labels[targets]
    num_tokens = int(target_ids.numel())

    kd_sum = student.new_zeros((), dtype=torch.float32)
    ce_sum = student.new_zeros((), dtype=torch.float32)
    agreement = torch.zeros((), dtype=torch.long, device=student.device)
    step = chunk_size or max(num_tokens, 1)
    for start in range(0, num_tokens, step):
        s_chunk = student[start : start + step]
        t_chunk = teacher[start : start + step]
        # A term whose weight is 0 is still measured for the logs, but kept out of the graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1.0):
            kd_sum = kd_sum + divergence(log_probs(s_chunk, temperature), log_probs(t_chunk, temperature)).sum()
        with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0.0):
            ce_sum = ce_sum + F.cross_entropy(s_chunk.float(), target_ids[start : start + step], reduction="sum")
        with torch.no_grad():
            agreement += (s_chunk.argmax(-1) == t_chunk.argmax(-1)).sum()

    return finish(ce_sum, kd_sum, num_tokens, agreement, settings, num_items_in_batch, anchor=student)
