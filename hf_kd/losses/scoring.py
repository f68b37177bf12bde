"""The one scoring function: what the student produced and the teacher's rows for its targets, to the loss.

Every teacher source hands over rows of one of three kinds, and the path is picked here, once, by the rows' kind
and the :class:`~hf_kd.losses.base.LossSettings`:

=====================================  ==================================================================
rows                                   path
=====================================  ==================================================================
``None`` (no teacher for the batch)    cross-entropy only (a cache-trained student's evaluation rows)
:class:`AlignedRows`                   :func:`~hf_kd.losses.cross_tokenizer.cross_tokenizer_loss`
dense ``[targets, V]`` or              fused (the student's hidden states given), else chunked
:class:`~hf_kd.losses.topk.TopKRows`   (``chunk_size``), else the unchunked reference
=====================================  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hf_kd.losses.base import IGNORE_INDEX, DistillationLossOutput, LossSettings
from hf_kd.losses.chunked import chunked_distillation_loss, fused_distillation_loss
from hf_kd.losses.cross_tokenizer import AlignedRows, cross_tokenizer_loss
from hf_kd.losses.output_layer import OutputLayer
from hf_kd.losses.reference import distillation_loss
from hf_kd.losses.topk import TopKRows, sparse_distillation_loss

TeacherRows = torch.Tensor | TopKRows | AlignedRows | None
"""What a teacher source returns for a batch (see :mod:`hf_kd.teachers`)."""


@dataclass(frozen=True)
class StudentOutput:
    """The student's side of the loss: its logits, or (fused) its last hidden states and output layer."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor | None = None
    output_layer: OutputLayer | None = None


def score(
    student: StudentOutput,
    rows: TeacherRows,
    labels: torch.Tensor,
    settings: LossSettings,
    vocab_size: int | None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> DistillationLossOutput:
    """The distillation loss of a batch.

    Args:
        student: what the student produced, see :class:`StudentOutput`.
        rows: the teacher's rows for the batch's targets: dense ``[targets, vocab_size]`` logits in the order of
            the flattened labels, :class:`TopKRows`, :class:`AlignedRows`, or ``None`` (cross-entropy only).
        labels: ``[batch, seq]`` target ids aligned with the student's output positions (a causal student's
            labels shifted left and padded with -100 at the end), -100 where there is no target.
        settings: the loss settings.
        vocab_size: how many leading columns of the student's output to use (ignored for aligned rows).
        num_items_in_batch: the normaliser passed by the Trainer, see :func:`hf_kd.losses.base.normalizer`.
    """
    keywords = {**settings.keywords(), "num_items_in_batch": num_items_in_batch}
    if isinstance(rows, AlignedRows):
        return cross_tokenizer_loss(
            student.logits, rows.logits, rows.alignment, vocab_map=rows.vocab_map, labels=labels,
            uld_weight=settings.uld_weight, chunk_size=settings.chunk_size, **keywords,
        )  # fmt: skip
    chunk = {"vocab_size": vocab_size, "chunk_size": settings.chunk_size, "chunk_mib": settings.chunk_mib}
    if student.hidden_states is not None:
        return fused_distillation_loss(student.hidden_states, student.output_layer, rows, labels, **chunk, **keywords)
    mask = labels.ne(IGNORE_INDEX)
    logits = student.logits[..., :vocab_size][mask] if rows is None or not settings.chunk_size else None
    if rows is None:
        result = distillation_loss(logits, logits.detach(), labels[mask], **{**keywords, "alpha": 1.0})
        return replace(result, kd_sum=None, agreement=None)  # there was no teacher to compare with
    if settings.chunk_size:
        return chunked_distillation_loss(student.logits, rows, labels, **chunk, **keywords)
    if isinstance(rows, TopKRows):
        return sparse_distillation_loss(logits, rows, labels[mask], **keywords)
    return distillation_loss(logits, rows, labels[mask], **keywords)
