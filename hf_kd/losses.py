"""Token-level divergences between a teacher's and a student's next-token distributions.

The divergences are small pure functions of log-probabilities: each takes the student's and the teacher's
float32 log-probabilities of shape ``[tokens, vocab]`` and returns one value per token. Everything else, the
temperature, the float32 cast, masking, the cross-entropy mix, chunking over tokens and the reduction, lives in
one place, :func:`distillation_loss`, which all of them share.

Notation: ``p`` is the teacher's distribution, ``q`` the student's, ``m`` a mixture of the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

# Log-probabilities are clamped here so that -inf logits (masked vocabulary, fp16 overflow) never turn
# 0 * log(0) into NaN. exp(-1e4) is exactly 0 in float32, so no realistic value changes.
MIN_LOG_PROB = -1.0e4

IGNORE_INDEX = -100


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _mixture(a_log: torch.Tensor, b_log: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space."""
    if weight_a <= 0.0:
        return b_log
    if weight_a >= 1.0:
        return a_log
    return torch.logaddexp(a_log + math.log(weight_a), b_log + math.log1p(-weight_a))


def forward_kl(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q): mean-seeking; the student covers every mode of the teacher (Hinton et al. 2015)."""
    return _kl(teacher_log, student_log)


def reverse_kl(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """KL(q || p): mode-seeking; the student puts its mass where the teacher is confident (MiniLLM)."""
    return _kl(student_log, teacher_log)


def jsd(student_log: torch.Tensor, teacher_log: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024).

    ``m = beta * p + (1 - beta) * q`` and ``JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)``;
    ``beta = 0.5`` is the symmetric JSD, bounded by log 2.
    """
    mix = _mixture(teacher_log, student_log, beta)
    return beta * _kl(teacher_log, mix) + (1.0 - beta) * _kl(student_log, mix)


def skew_forward_kl(student_log: torch.Tensor, teacher_log: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024): KL(p || skew * p + (1 - skew) * q)."""
    if skew >= 1.0:
        # KL(p || p) = 0 whatever the student. An empty slice of its log-probabilities ties the zero to the
        # student's graph, so that backward gives zero gradients instead of finding nothing to differentiate.
        return student_log[..., :0].sum(-1)
    return _kl(teacher_log, _mixture(teacher_log, student_log, skew))


def skew_reverse_kl(student_log: torch.Tensor, teacher_log: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(q || skew * q + (1 - skew) * p)."""
    return _kl(student_log, _mixture(student_log, teacher_log, skew))


def tvd(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """Total variation distance: 0.5 * sum |p - q|, bounded by 1."""
    return 0.5 * (teacher_log.exp() - student_log.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def get_divergence(name: str, beta: float = 0.5, skew: float = 0.1) -> Callable[..., torch.Tensor]:
    """The per-token divergence called ``name``, with its parameter bound."""
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown loss {name!r}: choose one of {sorted(DIVERGENCES)}.")
    if name == "jsd":
        return partial(jsd, beta=beta)
    if name.startswith("skew_"):
        return partial(DIVERGENCES[name], skew=skew)
    return DIVERGENCES[name]


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 log-softmax of ``logits / temperature``, clamped at :data:`MIN_LOG_PROB`."""
    logits = logits.float()
    if temperature != 1.0:  # a pass over [tokens, vocab] saved in the common case
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1).clamp_min(MIN_LOG_PROB)


def mix_terms(ce: torch.Tensor, kd: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """``alpha * ce + (1 - alpha) * temperature**2 * kd``, a term whose weight is 0 left out.

    Left out rather than multiplied by 0: an infinite CE (a target the student rules out with -inf) would
    otherwise make an alpha = 0 loss NaN.
    """
    if alpha <= 0.0:
        return temperature**2 * kd
    if alpha >= 1.0:
        return ce
    return alpha * ce + (1.0 - alpha) * temperature**2 * kd


@dataclass
class DistillationLossOutput:
    """The combined loss and the sums it was made of, kept for logging."""

    loss: torch.Tensor
    """alpha * CE + (1 - alpha) * temperature**2 * divergence, each summed over target tokens and divided by
    the normalizer (``num_items_in_batch`` when given, else the number of target tokens)."""
    kd_sum: torch.Tensor | None
    """Divergence at the temperature, summed over target tokens (no temperature**2 factor), detached; None when
    there was no teacher to compare with."""
    ce_sum: torch.Tensor
    """Cross-entropy of the student against the labels, summed over target tokens, detached."""
    num_tokens: int
    """How many target tokens the batch held."""
    agreement: torch.Tensor | None
    """How many target tokens have the same top-1 token under student and teacher, detached; None without a
    teacher."""


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> DistillationLossOutput:
    """Token-level distillation loss over aligned logits.

    Args:
        student_logits: ``[..., vocab]`` logits; position ``i`` predicts ``labels[..., i]``. Any dtype.
        teacher_logits: same shape as ``student_logits`` (slice both to the shared vocabulary first).
        labels: ``[...]`` target ids; :data:`IGNORE_INDEX` (-100) marks positions that are not targets.
        loss: the divergence, a key of :data:`DIVERGENCES`.
        temperature: both distributions are softened by it; the divergence is scaled by its square so that
            its gradients keep their size (Hinton et al. 2015).
        alpha: weight of the cross-entropy term; ``1 - alpha`` weighs the divergence.
        beta: the ``jsd`` mixture weight.
        skew: the skew of ``skew_forward_kl`` and ``skew_reverse_kl``.
        num_items_in_batch: divide the summed loss by this instead of the number of target tokens; the
            Trainer passes the count over all gradient-accumulation micro-batches (and devices) here.
        chunk_size: compute over this many target tokens at a time (all at once when ``None``).
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape: align positions and slice both to the shared vocabulary first."
        )
    divergence = get_divergence(loss, beta=beta, skew=skew)
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

    normalizer = num_items_in_batch if num_items_in_batch is not None else max(num_tokens, 1)
    if torch.is_tensor(normalizer):
        normalizer = normalizer.to(kd_sum.device)
    total = mix_terms(ce_sum, kd_sum, alpha, temperature) / normalizer
    if num_tokens == 0:
        # No target token: a zero tied to the student's graph, so that backward gives zero gradients; not the
        # quotient, which is 0 / 0 = NaN when num_items_in_batch counts no target either.
        total = student.sum().float()
    return DistillationLossOutput(
        loss=total,
        kd_sum=kd_sum.detach(),
        ce_sum=ce_sum.detach(),
        num_tokens=num_tokens,
        agreement=agreement,
    )
