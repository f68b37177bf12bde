"""Distillation from a teacher's top-k: the divergence over k + 1 buckets, and its sampled-tail variant.

A top-k cache knows the teacher's probabilities ``p_1 .. p_k`` of its ``k`` most likely tokens and the mass
left to all other tokens, ``p_tail = 1 - sum(p_i)``, but not how that tail is spread. Three treatments of the
tail (``tail_treatment``):

* ``"bucket"``: both distributions are compared on the same coarser event space of ``k + 1`` buckets: the ``k``
  tokens, and one bucket for "any other token", whose student probability is the student's mass outside the
  teacher's top-k, ``q_tail = 1 - sum_{i <= k} q_i`` (floored at 1e-5, see :func:`bucket_log_probs`). Forward KL
  over the buckets is

      KL_k(p || q) = sum_{i <= k} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)

  With ``k`` = the vocabulary size the tail is empty and left out: every divergence is the dense one. With
  smaller ``k`` it is a lower bound of the dense KL (merging events never increases a divergence) that pulls the
  student's tail mass towards the teacher's but leaves its shape free. Every divergence of :mod:`hf_kd.losses`
  is applied to the same bucket distributions.
* ``"uniform"`` (forward KL): the tail mass is spread evenly over the ``V - k`` other tokens.
* ``"sampled"`` (forward KL; needs a cache built with ``tail_samples = m > 0``): the cache also holds ``m`` tokens
  drawn from the teacher's tail (renormalised) and the tail's ``sum p log p``. The tail's cross-entropy
  ``-sum_{v in tail} p_v log q_v = p_tail * E_{v ~ tail}[-log q_v]`` is estimated by the sample mean, so loss and
  gradient are unbiased estimates of the dense forward KL (the stratified form of Anshumann et al. 2025,
  *Sparse Logit Sampling*: the head exact, the tail by Monte Carlo), where the other treatments are biased.

Temperature: a cache stores ``log_softmax(teacher_logits / T)`` for the ``T`` it was made with; the student is
softened by the same ``T`` here, and a different training temperature is refused by
:class:`hf_kd.teachers.cache.CachedTeacher` (the teacher's logits are gone, so it cannot be changed).

:func:`sparse_distillation_loss` is the readable reference; :func:`topk_chunk_loss` computes the same loss and
its gradient for one chunk of rows in closed form, which :mod:`hf_kd.losses.chunked` (the trainer's path) calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hf_kd.losses.base import IGNORE_INDEX, DistillationLossOutput, LossKeywords, LossSettings, finish, mix_terms
from hf_kd.losses.divergences import MIN_LOG_PROB

if TYPE_CHECKING:
    from typing_extensions import Unpack

TAIL_TREATMENTS = ("bucket", "uniform", "sampled")
# Smallest student tail mass the bucket divergence distinguishes (see bucket_log_probs).
STUDENT_TAIL_FLOOR = 1e-5


class CacheAlignmentError(ValueError):
    """The cache rows of a batch do not belong to its target tokens."""


@dataclass(frozen=True)
class TopKRows:
    """A batch's cached teacher rows, one per target token in row-major order, and how to read the tail.

    ``tail_ids [N, m]`` and ``tail_plogp [N]`` (the tail's ``sum p log p``) exist for caches built with tail
    samples; they are needed by ``tail_treatment="sampled"`` only. ``targets [N]``, the target ids the cache
    was made for, lets :func:`check_rows` catch rows joined to the wrong examples.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor
    tail_ids: torch.Tensor | None = None
    tail_plogp: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    tail_treatment: str = "bucket"

    @classmethod
    def from_batch(cls, cache_batch: dict[str, torch.Tensor], tail_treatment: str = "bucket") -> TopKRows:
        """The rows of ``batch["teacher_cache"]`` (see :class:`hf_kd.teachers.cache.CacheCollator`)."""
        return cls(
            ids=cache_batch["topk_ids"],
            logprobs=cache_batch["topk_logprobs"],
            tail_logmass=cache_batch["tail_logmass"],
            tail_ids=cache_batch.get("tail_ids"),
            tail_plogp=cache_batch.get("tail_plogp"),
            targets=cache_batch.get("target_ids"),
            tail_treatment=tail_treatment,
        )

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> TopKRows:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return t[index] if t is not None else None

        return replace(
            self,
            ids=self.ids[index],
            logprobs=self.logprobs[index],
            tail_logmass=self.tail_logmass[index],
            tail_ids=pick(self.tail_ids),
            tail_plogp=pick(self.tail_plogp),
            targets=pick(self.targets),
        )

    def columns(self) -> torch.Tensor:
        """The student columns the divergence reads: the top-k ids, then the tail samples when they are used."""
        if self.tail_treatment == "sampled":
            return torch.cat([self.ids, self.tail_ids], dim=-1).long()
        return self.ids.long()


def check_tail_treatment(tail_treatment: str, loss: str, rows: TopKRows | None = None) -> None:
    if tail_treatment not in TAIL_TREATMENTS:
        raise ValueError(f"tail_treatment={tail_treatment!r}: choose one of {TAIL_TREATMENTS}.")
    if tail_treatment != "bucket" and loss != "forward_kl":
        raise ValueError(
            f"tail_treatment={tail_treatment!r} is implemented for loss='forward_kl' only; use 'bucket' for {loss!r}."
        )
    if tail_treatment == "sampled" and rows is not None and (rows.tail_ids is None or rows.tail_plogp is None):
        raise ValueError(
            "tail_treatment='sampled' needs a cache built with tail samples (`hf-kd cache-teacher --tail-samples M`)."
        )


def check_rows(rows: TopKRows, target_ids: torch.Tensor, check_targets: bool = True) -> None:
    """Raise :class:`CacheAlignmentError` unless the cache rows are those of the batch's targets.

    ``check_targets`` also compares the cached target ids with the labels (one device sync).
    """
    if len(rows) != target_ids.numel():
        raise CacheAlignmentError(
            f"The batch has {target_ids.numel()} target tokens but its cache rows hold {len(rows)}: the cache was "
            "made with other labels (or another label shift / padding) than the training batches use."
        )
    if check_targets and rows.targets is not None and not torch.equal(rows.targets.long(), target_ids.long()):
        raise CacheAlignmentError(
            "The cache's target tokens differ from the batch's labels: its rows are joined to the wrong examples."
        )


def bucket_log_probs(
    student_top: torch.Tensor, topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities over the ``k + 1`` buckets, each ``[N, k + 1]``, float32.

    Args:
        student_top: ``[N, k]`` the student's log-probabilities of the teacher's top-k tokens.
        topk_logprobs: ``[N, k]`` the teacher's log-probabilities of those tokens.
        tail_logmass: ``[N]`` log of the teacher's mass on all other tokens.

    The student's tail is ``log(1 - sum(exp(student_top)))``: no second pass over the vocabulary. In float32 that
    difference is only accurate to ~1e-6, so it is floored at :data:`STUDENT_TAIL_FLOOR` (1e-5): below it
    rounding error would be divided by a rounding-sized number and give huge gradients. A tail below 1e-5 counts
    as 1e-5 and gets no gradient from this term (the top-k terms still push mass back when the teacher's tail
    is larger). With k = vocabulary there is no tail: :func:`topk_divergence` then leaves the bucket out, since
    a floored student tail would add ``1e-5 * (log 1e-5 + 1e4)``, about 0.1, to a reverse KL.
    """
    student_top = student_top.clamp_min(MIN_LOG_PROB)
    top_mass = student_top.logsumexp(-1)
    student_tail = (-torch.expm1(top_mass)).clamp_min(STUDENT_TAIL_FLOOR).log()
    teacher_top = topk_logprobs.float().clamp_min(MIN_LOG_PROB)
    teacher_tail = tail_logmass.float().clamp_min(MIN_LOG_PROB)
    student = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)
    teacher = torch.cat([teacher_top, teacher_tail.unsqueeze(-1)], dim=-1)
    return student, teacher


def topk_divergence(
    student_cols: torch.Tensor,
    log_q_sum: torch.Tensor | None,
    rows: TopKRows,
    divergence: Callable[..., torch.Tensor],
    vocab: int,
) -> torch.Tensor:
    """The divergence per token, ``[N]``, from the student's log-probabilities at ``rows.columns()``.

    ``log_q_sum`` (``sum_j log q_j`` over the vocabulary) is read by the uniform tail only. Everything here is
    ``[N, k (+ m)]``: cheap to differentiate with autograd, which :func:`topk_chunk_loss` relies on.
    """
    k = rows.ids.shape[-1]
    student_top = student_cols[:, :k].clamp_min(MIN_LOG_PROB)
    if rows.tail_treatment == "bucket":
        if k >= vocab:  # no tail, and a floored student tail bucket would not be empty (see bucket_log_probs)
            return divergence(student_top, rows.logprobs.float().clamp_min(MIN_LOG_PROB))
        return divergence(*bucket_log_probs(student_top, rows.logprobs, rows.tail_logmass))
    teacher_top = rows.logprobs.float().clamp_min(MIN_LOG_PROB)
    head = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    tail_log = rows.tail_logmass.float().clamp_min(MIN_LOG_PROB)
    if rows.tail_treatment == "sampled":
        samples = student_cols[:, k:].clamp_min(MIN_LOG_PROB)
        return head + rows.tail_plogp.float() - tail_log.exp() * samples.mean(-1)
    if k >= vocab:  # uniform, nothing left to spread
        return head
    log_u = tail_log - math.log(vocab - k)  # each tail token's share
    tail_log_q = log_q_sum - student_cols[:, :k].sum(-1)  # unclamped: the exact sum over the tail
    return head + log_u.exp() * ((vocab - k) * log_u - tail_log_q)


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    cache_batch: dict[str, torch.Tensor] | TopKRows,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    check_targets: bool = True,
    tail_treatment: str = "bucket",
    **keywords: Unpack[LossKeywords],
) -> DistillationLossOutput:
    """:func:`hf_kd.losses.distillation_loss` with the teacher's logits replaced by cached top-k rows.

    The readable reference: autograd through one log-softmax over ``[targets, vocab]``. The trainer uses the
    same math through :func:`hf_kd.losses.chunked.chunked_distillation_loss` with :class:`TopKRows`, whose gradient is
    formed in closed form chunk by chunk. ``chunk_size`` is accepted for symmetry with the dense loss and unused.

    Args:
        student_logits: ``[..., V]`` logits aligned with ``labels`` (sliced to the cache's vocabulary).
        cache_batch: ``topk_ids [N, k]``, ``topk_logprobs [N, k]``, ``tail_logmass [N]``, optionally
            ``target_ids [N]`` and the tail samples, one row per target token of the batch in row-major order
            (what :class:`hf_kd.teachers.cache.CacheCollator` puts in ``batch["teacher_cache"]``), or those rows
            as :class:`TopKRows` (whose own ``tail_treatment`` then applies).
        labels: ``[...]`` target ids, -100 where not scored.
        check_targets: compare ``target_ids`` with the labels and raise :class:`CacheAlignmentError` when they
            differ (a cache joined to the wrong rows); costs one device sync.
        tail_treatment: ``"bucket"``, ``"uniform"`` or ``"sampled"``, see the module docstring.
        The other arguments are those of :func:`hf_kd.losses.reference.distillation_loss`.
    """
    del chunk_size
    rows = cache_batch if isinstance(cache_batch, TopKRows) else TopKRows.from_batch(cache_batch, tail_treatment)
    tail_treatment = rows.tail_treatment
    settings = LossSettings(**keywords)
    alpha, temperature = settings.alpha, settings.temperature
    check_tail_treatment(tail_treatment, settings.loss, rows)
    divergence = settings.divergence
    mask = labels.ne(IGNORE_INDEX)
    positions = mask.nonzero(as_tuple=True)  # row-major, the order of the cache rows
    target_ids = labels[mask]
    num_tokens = int(target_ids.numel())
    check_rows(rows, target_ids, check_targets)
    logits = student_logits.float()
    index = tuple(i.unsqueeze(-1) for i in positions)
    kd_grad = torch.is_grad_enabled() and alpha < 1.0
    ce_grad = torch.is_grad_enabled() and alpha > 0.0

    with torch.set_grad_enabled(kd_grad or (ce_grad and temperature == 1.0)):
        log_q = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    with torch.set_grad_enabled(kd_grad):
        cols = log_q[(*index, rows.columns())]
        log_q_sum = log_q.sum(-1)[positions] if tail_treatment == "uniform" else None
        kd_sum = topk_divergence(cols, log_q_sum, rows, divergence, log_q.shape[-1]).sum()
    with torch.set_grad_enabled(ce_grad):
        log_q_ce = log_q if temperature == 1.0 else torch.log_softmax(logits, dim=-1)
        ce_sum = -log_q_ce[(*positions, target_ids)].sum()
    with torch.no_grad():
        # The cache keeps the top-k sorted, so column 0 is the teacher's top-1 token.
        agreement = (logits.argmax(-1)[positions] == rows.ids[:, 0].long()).sum()

    return finish(ce_sum, kd_sum, num_tokens, agreement, settings, num_items_in_batch, anchor=logits)


def topk_chunk_loss(
    logits: torch.Tensor,
    rows: TopKRows,
    target_ids: torch.Tensor,
    *,
    divergence: Callable[..., torch.Tensor],
    temperature: float,
    alpha: float,
    normalizer: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss, KD and CE sums, and the float32 gradient with respect to ``logits [C, V]`` of one chunk of rows.

    The divergence reads only ``s = log q`` at the cached columns (and ``sum_j log q_j`` for the uniform tail),
    so it is differentiated by autograd over those ``[C, k]`` values, ``g = dKD/ds``; log-softmax's backward
    then gives ``dKD/dz = (G - q * sum(G)) / T`` with ``G`` the scatter of ``g`` (plus ``dKD/d sum`` in every
    column). Only one ``[C, V]`` float32 buffer is formed, and it becomes the gradient in place: a step from
    the cache costs about what a cross-entropy step does. Same value and gradient as
    :func:`sparse_distillation_loss`.
    """
    t, n = temperature, normalizer
    z = logits.float()
    log_q = F.log_softmax(z / t if t != 1.0 else z, dim=-1)
    kd_live = need_grad and alpha < 1.0
    columns = rows.columns()
    cols = log_q.gather(1, columns).detach()
    # With k = V the uniform tail is empty and reads no sum: a leaf outside the graph would fail autograd.grad.
    uniform_tail = rows.tail_treatment == "uniform" and columns.shape[-1] < z.shape[-1]
    log_q_sum = log_q.sum(-1).detach() if uniform_tail else None
    with torch.enable_grad() if kd_live else nullcontext():
        leaves = [cols.requires_grad_(kd_live)]
        if log_q_sum is not None:
            leaves.append(log_q_sum.requires_grad_(kd_live))
        kd = topk_divergence(cols, log_q_sum, rows, divergence, z.shape[-1]).sum()
        kd_grads = torch.autograd.grad(kd, leaves) if kd_live else None
    kd = kd.detach()
    log_q1 = log_q if t == 1.0 else F.log_softmax(z, dim=-1)
    ce = -log_q1.gather(1, target_ids[:, None]).sum()
    total = mix_terms(ce, kd, alpha, t) / n
    if not need_grad:
        return total, kd, ce, None

    kd_weight = (1.0 - alpha) * t / n  # d(T^2 KD / n)/dz = T (G - q sum G) / n
    scale = torch.zeros(z.shape[0], device=z.device)  # the coefficient of q in the gradient, per row
    if kd_grads is not None:
        scale -= kd_weight * kd_grads[0].sum(-1)
        if log_q_sum is not None:
            scale -= kd_weight * z.shape[-1] * kd_grads[1]
    ce_shares_q = alpha > 0.0 and t == 1.0
    if ce_shares_q:
        scale += alpha / n
    grad = log_q.exp_().mul_(scale[:, None])  # log_q is not needed any more: its buffer becomes the gradient
    if kd_grads is not None:
        grad.scatter_add_(1, columns, kd_grads[0].mul_(kd_weight))  # tail samples may repeat: they add up
        if log_q_sum is not None:
            grad.add_(kd_grads[1].mul_(kd_weight)[:, None])
    if alpha > 0.0:
        if not ce_shares_q:
            grad.add_(log_q1.exp_(), alpha=alpha / n)
        grad[torch.arange(target_ids.numel(), device=z.device), target_ids] -= alpha / n
    return total, kd, ce, grad
