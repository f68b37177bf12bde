"""The cross-tokenizer loss: the student's and the teacher's next-token distributions at aligned positions.

:func:`cross_tokenizer_loss` compares them at the positions an alignment pairs (see
:mod:`hf_kd.teachers.cross_tokenizer`): over the shared strings by one of the divergences of
:mod:`hf_kd.losses.divergences`, with one extra bucket holding the probability of everything else, and over the
tokens that have no counterpart by ULD (Boizard et al. 2024): the L1 distance between the two sorted probability
vectors. The vocabulary map (:class:`hf_kd.teachers.cross_tokenizer.VocabularyMap`) says which tokens are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hf_kd.losses.base import IGNORE_INDEX, DistillationLossOutput, LossKeywords, LossSettings, finish
from hf_kd.losses.divergences import log_probs

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass(frozen=True)
class AlignedRows:
    """A teacher's rows for a student with another tokenizer: its logits on its own tokens, which of its
    positions shares a context with which student position, and the vocabulary map."""

    logits: torch.Tensor
    alignment: Any
    vocab_map: Any


@dataclass
class CrossTokenizerLossOutput(DistillationLossOutput):
    """:class:`hf_kd.losses.base.DistillationLossOutput` plus the parts of the cross-tokenizer divergence.

    ``kd_sum`` is summed over the aligned positions; like ``ce_sum`` it is divided by the number of the
    student's target tokens (``num_tokens``), so positions without a counterpart add nothing to the divergence.
    ``agreement`` counts aligned positions where both models' most likely token is the same shared string.
    """

    num_aligned: int = 0
    """How many student target positions have a teacher position with the same context."""
    shared_sum: torch.Tensor | None = None
    """The divergence over the shared strings (plus the rest bucket), summed over aligned positions, detached."""
    uld_sum: torch.Tensor | None = None
    """ULD over the unshared tokens (unweighted), summed over aligned positions, detached."""


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD (Boizard et al. 2024): ``sum_i |sort(p)_i - sort(q)_i|`` per row, the shorter vector padded with zeros.

    Sorting forgets which token is which, so the two vocabularies need not match; what is taught is the shape of
    the distribution (how confident, how spread). It is the Wasserstein-1 distance when every pair of tokens is
    taken to be equally far apart.
    """
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    s = F.pad(student_probs.sort(dim=-1, descending=True).values, (0, width - student_probs.shape[-1]))
    t = F.pad(teacher_probs.sort(dim=-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (s - t).abs().sum(-1)


def grouped_log_probs(log_p: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``log sum_{i in g} p_i`` for each group ``g`` of ``group`` (``[rows, vocab]`` to ``[rows, num_groups]``).

    Probabilities below float32's smallest normal number count as that number: such a string is impossible
    for practical purposes, and the log stays finite with finite gradients.
    """
    probs = log_p.new_zeros(log_p.shape[0], num_groups).index_add_(1, group, log_p.exp())
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def cross_tokenizer_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    vocab_map: Any,
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per aligned row: ``(divergence over shared strings + rest bucket, ULD over unshared tokens, agreement)``.

    Args:
        student_logits: ``[rows, student_vocab]`` (columns past the tokenizer's length are dropped).
        teacher_logits: ``[rows, teacher_vocab]``, row ``r`` having the same context as the student's row ``r``.
        vocab_map: the token pairing.
        settings: ``loss`` (computed on the ``num_shared + 1`` buckets), ``temperature``, ``beta``, ``skew`` and
            ``uld_weight`` (the weight of the ULD term in the returned total; 0 skips it) are read.
    Returns:
        ``(total, shared, uld)``: ``shared + uld_weight * uld``, and the two parts, each of shape ``[rows]``.
    """
    s_group, t_group, s_unmatched, t_unmatched = vocab_map.tensors(student_logits.device)
    s_log = log_probs(student_logits[:, : vocab_map.student_size], settings.temperature)
    t_log = log_probs(teacher_logits[:, : vocab_map.teacher_size], settings.temperature)
    buckets = vocab_map.num_shared + 1  # the last bucket: every token without a counterpart
    uld_weight = settings.uld_weight
    shared = settings.divergence(grouped_log_probs(s_log, s_group, buckets), grouped_log_probs(t_log, t_group, buckets))
    if uld_weight == 0.0 or (s_unmatched.numel() == 0 and t_unmatched.numel() == 0):
        uld = torch.zeros_like(shared)
    else:
        uld = uld_distance(s_log[:, s_unmatched].exp(), t_log[:, t_unmatched].exp())
    return shared + uld_weight * uld, shared, uld


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alignment: Any,
    *,
    vocab_map: Any,
    labels: torch.Tensor,
    uld_weight: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    **keywords: Unpack[LossKeywords],
) -> CrossTokenizerLossOutput:
    """``alpha * CE + (1 - alpha) * T**2 * D`` where ``D`` compares the aligned positions across tokenizers.

    Args:
        student_logits: ``[batch, rows, student_vocab]``; row ``i`` predicts ``labels[:, i]`` (for a causal
            student, the logits without their last position and the labels without their first).
        teacher_logits: ``[batch, teacher_rows, teacher_vocab]``, the teacher's raw output on its own inputs.
        alignment: a :class:`hf_kd.teachers.cross_tokenizer.inputs.TokenAlignment` (``batch_index``, ``student_index``,
            ``teacher_index``): which student row and which teacher row share a context.
        vocab_map: pairs the two vocabularies' tokens, see :class:`VocabularyMap`.
        labels: ``[batch, rows]`` the student's target ids, -100 where there is none.
        keywords: ``loss`` (applied to the shared strings), ``temperature``, ``alpha``, ``beta``, ``skew``, as in
            :class:`~hf_kd.losses.base.LossSettings`.
        uld_weight: the weight of the ULD term on the tokens without a counterpart.
        num_items_in_batch: the normalizer (the Trainer's count of target tokens over accumulated batches);
            the batch's own number of target tokens when ``None``.
        chunk_size: compute over this many aligned positions at a time.
    """
    settings = LossSettings(**keywords, uld_weight=uld_weight)
    alpha = settings.alpha
    s_vocab = vocab_map.student_size
    if student_logits.shape[-1] < s_vocab or teacher_logits.shape[-1] < vocab_map.teacher_size:
        raise ValueError(
            f"The logits ({student_logits.shape[-1]} student, {teacher_logits.shape[-1]} teacher columns) do not "
            f"cover the tokenizers ({s_vocab} and {vocab_map.teacher_size} tokens): resize the model's embeddings "
            "with model.resize_token_embeddings(len(tokenizer))."
        )
    student_logits = student_logits[..., :s_vocab]
    targets = labels.ne(IGNORE_INDEX)
    num_tokens = int(targets.sum())
    b, s_idx, t_idx = alignment.batch_index, alignment.student_index, alignment.teacher_index
    num_aligned = int(b.numel())

    zero = student_logits.new_zeros((), dtype=torch.float32)
    kd_sum, shared_sum, uld_sum = zero, zero.detach(), zero.detach()
    agreement = torch.zeros((), dtype=torch.long, device=student_logits.device)
    s_group, t_group, _, _ = vocab_map.tensors(student_logits.device)
    step = chunk_size or max(num_aligned, 1)
    for start in range(0, num_aligned, step):
        rows = slice(start, start + step)
        s_rows = student_logits[b[rows], s_idx[rows]]
        t_rows = teacher_logits[b[rows], t_idx[rows]].detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1.0):
            total, shared, uld = cross_tokenizer_divergence(s_rows, t_rows, vocab_map, settings)
            kd_sum = kd_sum + total.sum()
        shared_sum = shared_sum + shared.detach().sum()
        uld_sum = uld_sum + uld.detach().sum()
        with torch.no_grad():
            s_top = s_group[s_rows.argmax(-1)]
            t_top = t_group[t_rows[:, : vocab_map.teacher_size].argmax(-1)]
            agreement += ((s_top == t_top) & (s_top < vocab_map.num_shared)).sum()

    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0.0):
        ce_sum = (
            F.cross_entropy(student_logits[targets].float(), labels[targets], reduction="sum") if num_tokens else zero
        )

    result = finish(ce_sum, kd_sum, num_tokens, agreement, settings, num_items_in_batch, anchor=student_logits)
    return CrossTokenizerLossOutput(**vars(result), num_aligned=num_aligned, shared_sum=shared_sum, uld_sum=uld_sum)
