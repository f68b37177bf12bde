"""Distillation from a teacher's top-k: the divergence over k + 1 buckets.

A top-k cache knows the teacher's probabilities ``p_1 .. p_k`` of its ``k`` most likely tokens and the mass
left to all other tokens, ``p_tail = 1 - sum(p_i)``, but not how that tail is spread. Both distributions are
therefore compared on the same coarser event space of ``k + 1`` buckets: the ``k`` tokens, and one bucket for
"any other token", whose student probability is the student's mass outside the teacher's top-k,
``q_tail = 1 - sum_{i <= k} q_i`` (floored at 1e-5, see :func:`bucket_log_probs`). Forward KL
over the buckets is

    KL_k(p || q) = sum_{i <= k} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)

With ``k`` = the vocabulary size the tail is empty and this is the dense forward KL exactly. With smaller ``k``
it is a lower bound of the dense KL (merging events never increases a divergence) that still pulls the
student's tail mass towards the teacher's rather than ignoring it or renormalising the top-k to sum to 1.
The other divergences of :mod:`hf_kd.losses` are applied to the same bucket distributions.

Temperature: a cache stores ``log_softmax(teacher_logits / T)`` for the ``T`` it was made with; the student is
softened by the same ``T`` here, and a different training temperature is refused by
:class:`hf_kd.cached_teacher.CachedTeacher` (the teacher's logits are gone, so it cannot be changed).
"""

from __future__ import annotations

import math

import torch

from hf_kd.losses import IGNORE_INDEX, MIN_LOG_PROB, DistillationLossOutput, get_divergence

TAIL_TREATMENTS = ("bucket", "uniform")
# Smallest student tail mass the bucket divergence distinguishes (see bucket_log_probs).
STUDENT_TAIL_FLOOR = 1e-5


class CacheAlignmentError(ValueError):
    """The cache rows of a batch do not belong to its target tokens."""


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
    is larger); the term's weight is the teacher's tail, so with k = vocabulary the loss is still exactly dense.
    """
    student_top = student_top.clamp_min(MIN_LOG_PROB)
    top_mass = student_top.logsumexp(-1)
    student_tail = (-torch.expm1(top_mass)).clamp_min(STUDENT_TAIL_FLOOR).log()
    teacher_top = topk_logprobs.float().clamp_min(MIN_LOG_PROB)
    teacher_tail = tail_logmass.float().clamp_min(MIN_LOG_PROB)
    student = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)
    teacher = torch.cat([teacher_top, teacher_tail.unsqueeze(-1)], dim=-1)
    return student, teacher


def _uniform_tail_forward_kl(
    log_q_sum: torch.Tensor,
    vocab: int,
    student_top: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
) -> torch.Tensor:
    """Forward KL per token against the teacher's top-k plus its tail spread evenly over the other tokens.

    ``log_q_sum`` is ``sum_j log q_j`` over the whole vocabulary; minus the top-k's it is the tail's.
    """
    k = student_top.shape[-1]
    teacher_top = topk_logprobs.float().clamp_min(MIN_LOG_PROB)
    top = (teacher_top.exp() * (teacher_top - student_top.clamp_min(MIN_LOG_PROB))).sum(-1)
    if vocab == k:
        return top
    log_u = tail_logmass.float().clamp_min(MIN_LOG_PROB) - math.log(vocab - k)  # each tail token's share
    tail_log_q = log_q_sum - student_top.sum(-1)
    return top + log_u.exp() * ((vocab - k) * log_u - tail_log_q)


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    cache_batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    check_targets: bool = True,
    tail_treatment: str = "bucket",
) -> DistillationLossOutput:
    """:func:`hf_kd.losses.distillation_loss` with the teacher's logits replaced by cached top-k rows.

    Only what the bucket divergence needs is computed: one fused log-softmax over the vocabulary (two when
    ``temperature != 1``: the cross-entropy is at temperature 1) and ``k`` gathered values per target, so a step
    costs about what a cross-entropy step does. No row-selection copy of the logits is made;
    ``chunk_size`` is accepted for symmetry with the dense loss and not needed.

    Args:
        student_logits: ``[..., V]`` logits aligned with ``labels`` (sliced to the cache's vocabulary).
        cache_batch: ``topk_ids [N, k]``, ``topk_logprobs [N, k]``, ``tail_logmass [N]`` and optionally
            ``target_ids [N]``, one row per target token of the batch in row-major order (what
            :class:`hf_kd.cached_teacher.CacheCollator` puts in ``batch["teacher_cache"]``).
        labels: ``[...]`` target ids, -100 where not scored.
        check_targets: compare ``target_ids`` with the labels and raise :class:`CacheAlignmentError` when they
            differ (a cache joined to the wrong rows); costs one device sync.
        tail_treatment: ``"bucket"`` (default): the k + 1 bucket divergence above. ``"uniform"`` (forward KL
            only): the teacher's tail mass is spread evenly over the ``V - k`` other tokens and the forward KL
            is taken over the whole vocabulary, which also flattens the student's tail (a smoothing prior: the
            bucket loss leaves the shape of the student's tail free). Needs finite student logits.
        The other arguments are those of :func:`hf_kd.losses.distillation_loss`.
    """
    del chunk_size
    if tail_treatment not in TAIL_TREATMENTS:
        raise ValueError(f"tail_treatment={tail_treatment!r}: choose one of {TAIL_TREATMENTS}.")
    if tail_treatment == "uniform" and loss != "forward_kl":
        raise ValueError("tail_treatment='uniform' is implemented for loss='forward_kl' only.")
    divergence = get_divergence(loss, beta=beta, skew=skew)
    mask = labels.ne(IGNORE_INDEX)
    positions = mask.nonzero(as_tuple=True)  # row-major, the order of the cache rows
    target_ids = labels[mask]
    num_tokens = int(target_ids.numel())
    topk_ids, topk_lp, tail = cache_batch["topk_ids"], cache_batch["topk_logprobs"], cache_batch["tail_logmass"]
    if topk_ids.shape[0] != num_tokens:
        raise CacheAlignmentError(
            f"The batch has {num_tokens} target tokens but its cache rows hold {topk_ids.shape[0]}: the cache was "
            "made with other labels (or another label shift / padding) than the training batches use."
        )
    if check_targets and "target_ids" in cache_batch and not torch.equal(cache_batch["target_ids"].long(), target_ids):
        raise CacheAlignmentError(
            "The cache's target tokens differ from the batch's labels: its rows are joined to the wrong examples."
        )
    logits = student_logits.float()
    rows = tuple(index.unsqueeze(-1) for index in positions)
    kd_grad = torch.is_grad_enabled() and alpha < 1.0
    ce_grad = torch.is_grad_enabled() and alpha > 0.0

    # One fused log-softmax over the vocabulary (what a cross-entropy step computes too); at temperature 1 the
    # cross-entropy shares it, so it stays in the graph when either term needs it.
    with torch.set_grad_enabled(kd_grad or (ce_grad and temperature == 1.0)):
        log_q = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    with torch.set_grad_enabled(kd_grad):
        student_top = log_q[(*rows, topk_ids.long())]
        if tail_treatment == "bucket":
            s_bucket, t_bucket = bucket_log_probs(student_top, topk_lp, tail)
            kd_sum = divergence(s_bucket, t_bucket).sum()
        else:
            log_q_sum = log_q.sum(-1)[positions]
            kd_sum = _uniform_tail_forward_kl(log_q_sum, log_q.shape[-1], student_top, topk_lp, tail).sum()
    with torch.set_grad_enabled(ce_grad):
        log_q_ce = log_q if temperature == 1.0 else torch.log_softmax(logits, dim=-1)
        ce_sum = -log_q_ce[(*positions, target_ids)].sum()
    with torch.no_grad():
        # The cache keeps the top-k sorted, so column 0 is the teacher's top-1 token.
        agreement = (logits.argmax(-1)[positions] == topk_ids[:, 0].long()).sum()

    normalizer = num_items_in_batch if num_items_in_batch is not None else max(num_tokens, 1)
    if torch.is_tensor(normalizer):
        normalizer = normalizer.to(kd_sum.device)
    ce_term = alpha * ce_sum if alpha > 0.0 else 0.0
    kd_term = (1.0 - alpha) * temperature**2 * kd_sum if alpha < 1.0 else 0.0
    total = (ce_term + kd_term) / normalizer
    if num_tokens == 0:
        total = logits.flatten()[:0].sum()  # a zero tied to the graph, even with -inf logits
    return DistillationLossOutput(
        loss=total, kd_sum=kd_sum.detach(), ce_sum=ce_sum.detach(), num_tokens=num_tokens, agreement=agreement
    )
