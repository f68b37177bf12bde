"""Token-level divergences between a teacher's and a student's next-token distributions.

The divergences are small pure functions of log-probabilities: each takes the student's and the teacher's
float32 log-probabilities of shape ``[tokens, vocab]`` and returns one value per token. Everything else, the
temperature, masking, the cross-entropy mix, chunking over tokens and the reduction, lives elsewhere
(:mod:`hf_kd.losses.base`, :mod:`hf_kd.losses.reference`, :mod:`hf_kd.losses.chunked`), shared by all of them.

Notation: ``p`` is the teacher's distribution, ``q`` the student's, ``m`` a mixture of the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

# Log-probabilities are clamped here so that -inf logits (masked vocabulary, fp16 overflow) never turn
# 0 * log(0) into NaN. exp(-1e4) is exactly 0 in float32, so no realistic value changes.
MIN_LOG_PROB = -1.0e4


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
