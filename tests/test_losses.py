"""hf_kd.losses against references computed another way: float64, in probability space, from the textbook formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_kd.losses import (
    DIVERGENCES,
    MIN_LOG_PROB,
    distillation_loss,
    forward_kl,
    get_divergence,
    jsd,
    log_probs,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)

NAMES = sorted(DIVERGENCES)
FAST = settings(max_examples=50, deadline=None)
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: with two or more intra-op threads on a busy machine, thread handoffs cost ~30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- references: float64 probabilities, textbook formulas -----------------------------------------------------


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_v p log(p / q), with 0 log(0 / q) = 0 and p log(p / 0) = inf."""
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    return terms.sum(-1)


def ref_divergence(name: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """The divergence between teacher ``p`` and student ``q``, both float64 probabilities."""
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skew_forward_kl":
        return ref_kl(p, skew * p + (1 - skew) * q)
    if name == "skew_reverse_kl":
        return ref_kl(q, skew * q + (1 - skew) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise KeyError(name)


def probs64(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def ref_loss(student, teacher, labels, name="forward_kl", temperature=1.0, alpha=0.5, beta=0.5, skew=0.1, norm=None):
    """The whole distillation loss by a loop over target rows, in float64."""
    student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    ce = kd = student.new_zeros((), dtype=torch.float64)
    count = 0
    for row, label in enumerate(labels.reshape(-1).tolist()):
        if label == -100:
            continue
        count += 1
        ce = ce - torch.softmax(student[row].double(), -1)[label].log()
        p, q = probs64(teacher[row], temperature), probs64(student[row], temperature)
        kd = kd + ref_divergence(name, p, q, beta=beta, skew=skew)
    norm = norm if norm is not None else max(count, 1)
    return (alpha * ce + (1 - alpha) * temperature**2 * kd) / norm, kd, ce, count


# ---- strategies -----------------------------------------------------------------------------------------------


@st.composite
def logit_pair(draw, max_tokens: int = 6, max_vocab: int = 12, scale: float = 30.0):
    """Student and teacher float32 logits ``[tokens, vocab]``; sometimes identical, sometimes near one-hot."""
    tokens = draw(st.integers(1, max_tokens))
    vocab = draw(st.integers(2, max_vocab))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([0.1, 1.0, 5.0, scale]))
    student = torch.randn(tokens, vocab, generator=gen) * spread
    teacher = torch.randn(tokens, vocab, generator=gen) * spread
    if draw(st.integers(0, 3)) == 0:
        teacher = student.clone()
    return student, teacher


def labelled_batch(seed: int, batch: int = 3, length: int = 5, vocab: int = 11, masked: float = 0.4):
    """A ``[batch, length, vocab]`` student/teacher pair and labels with some -100."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=gen) * 3
    teacher = torch.randn(batch, length, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < masked] = -100
    return student, teacher, labels


def divergence_fn(name: str, beta: float = 0.5, skew: float = 0.1):
    return get_divergence(name, beta=beta, skew=skew)


# ---- properties of every divergence ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(pair=logit_pair(), beta=st.floats(0.05, 0.95), skew=st.floats(0.0, 1.0))
def test_matches_float64_reference(name, pair, beta, skew):
    student, teacher = pair
    got = divergence_fn(name, beta, skew)(log_probs(student), log_probs(teacher))
    want = ref_divergence(name, probs64(teacher), probs64(student), beta=beta, skew=skew)
    assert got.dtype == torch.float32 and got.shape == (student.shape[0],)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(pair=logit_pair(scale=200.0), beta=st.floats(0.05, 0.95), skew=st.floats(0.0, 1.0))
def test_nonnegative_and_bounded(name, pair, beta, skew):
    student, teacher = pair
    got = divergence_fn(name, beta, skew)(log_probs(student), log_probs(teacher))
    assert torch.isfinite(got).all()
    assert (got >= -1e-6).all()  # float32 rounding may leave a hair below 0 when p ~ q, never more
    if name == "tvd":
        assert (got <= 1 + 1e-6).all()
    if name == "jsd":  # the generalized JSD is bounded by the entropy of the mixture weights
        assert (got <= -beta * math.log(beta) - (1 - beta) * math.log1p(-beta) + 1e-5).all()


def test_bounds_are_reached_by_disjoint_distributions():
    student = torch.tensor([[50.0, -50.0]])
    teacher = torch.tensor([[-50.0, 50.0]])
    s, t = log_probs(student), log_probs(teacher)
    torch.testing.assert_close(jsd(s, t), torch.tensor([math.log(2)]))
    torch.testing.assert_close(tvd(s, t), torch.tensor([1.0]))


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(pair=logit_pair(scale=200.0), beta=st.floats(0.05, 0.95), skew=st.floats(0.0, 1.0))
def test_zero_for_equal_distributions(name, pair, beta, skew):
    student, _ = pair
    s = log_probs(student)
    got = divergence_fn(name, beta, skew)(s, s.clone())
    torch.testing.assert_close(got, torch.zeros_like(got), atol=1e-6, rtol=0)


@FAST
@given(pair=logit_pair(scale=100.0))
def test_jsd_half_is_symmetric(pair):
    s, t = (log_probs(x) for x in pair)
    torch.testing.assert_close(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5), atol=1e-6, rtol=1e-5)


@FAST
@given(pair=logit_pair(scale=100.0))
def test_forward_and_reverse_kl_match_torch_kl_div(pair):
    s, t = (log_probs(x) for x in pair)
    # F.kl_div(input, target) is KL(target || input) with input given as log-probabilities.
    torch.testing.assert_close(forward_kl(s, t), F.kl_div(s, t, reduction="none", log_target=True).sum(-1))
    torch.testing.assert_close(reverse_kl(s, t), F.kl_div(t, s, reduction="none", log_target=True).sum(-1))


@FAST
@given(pair=logit_pair(scale=100.0))
def test_skew_zero_is_plain_kl_and_skew_one_is_zero(pair):
    s, t = (log_probs(x) for x in pair)
    torch.testing.assert_close(skew_forward_kl(s, t, skew=0.0), forward_kl(s, t))
    torch.testing.assert_close(skew_reverse_kl(s, t, skew=0.0), reverse_kl(s, t))
    assert torch.equal(skew_forward_kl(s, t, skew=1.0), torch.zeros(s.shape[0]))
    assert torch.equal(skew_reverse_kl(s, t, skew=1.0), torch.zeros(s.shape[0]))


def test_directions_follow_distillm_convention():
    """Skew forward mixes the student into the teacher's KL target; skew reverse mixes the teacher in."""
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)  # teacher
    q = torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64)  # student
    s, t = q.log().float(), p.log().float()
    a = 0.3
    want_fwd = (p * (p / (a * p + (1 - a) * q)).log()).sum()
    want_rev = (q * (q / (a * q + (1 - a) * p)).log()).sum()
    torch.testing.assert_close(skew_forward_kl(s, t, skew=a).double(), want_fwd.reshape(1))
    torch.testing.assert_close(skew_reverse_kl(s, t, skew=a).double(), want_rev.reshape(1))
    assert not torch.allclose(want_fwd, want_rev)  # the example tells the two apart


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(pair=logit_pair(scale=1e4), temperature=st.sampled_from([0.5, 1.0, 2.0, 5.0]))
def test_gradients_finite_and_match_float64_reference(name, pair, temperature):
    student, teacher = pair
    student = student.requires_grad_()
    divergence_fn(name)(log_probs(student, temperature), log_probs(teacher, temperature)).sum().backward()
    assert torch.isfinite(student.grad).all()
    # References in probability space underflow (p = 0, NaN gradients) beyond this range.
    if max(student.detach().abs().max(), teacher.abs().max()) > 100:
        return
    ref_student = student.detach().double().requires_grad_()
    ref_divergence(name, probs64(teacher, temperature), probs64(ref_student, temperature)).sum().backward()
    torch.testing.assert_close(student.grad.double(), ref_student.grad, atol=ATOL, rtol=1e-3)


def test_unknown_divergence_and_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="Unknown loss"):
        get_divergence("kl")
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(torch.zeros(2, 5), torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))


# ---- distillation_loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    alpha=st.floats(0.0, 1.0),
    beta=st.floats(0.05, 0.95),
    skew=st.floats(0.0, 1.0),
)
def test_distillation_loss_matches_row_loop(name, seed, temperature, alpha, beta, skew):
    student, teacher, labels = labelled_batch(seed)
    out = distillation_loss(
        student, teacher, labels, loss=name, temperature=temperature, alpha=alpha, beta=beta, skew=skew
    )
    want, kd, ce, count = ref_loss(student, teacher, labels, name, temperature, alpha, beta, skew)
    torch.testing.assert_close(out.loss.double(), want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.kd_sum.double(), kd, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.ce_sum.double(), ce, atol=ATOL, rtol=RTOL)
    assert out.num_tokens == count == int(labels.ne(-100).sum())


def test_temperature_by_hand():
    """Two tokens, vocabulary of 2, T = 2: the divergence is taken at T, the CE at T = 1, the KD term times T**2."""
    ln3 = math.log(3)
    student = torch.tensor([[0.0, 0.0], [2 * ln3, 0.0]])  # at T=2: (1/2, 1/2) and (3/4, 1/4); at T=1 row 2 is (.9, .1)
    teacher = torch.tensor([[2 * ln3, 0.0], [0.0, 0.0]])  # at T=2: (3/4, 1/4) and (1/2, 1/2)
    labels = torch.tensor([0, 1])
    kl_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl_2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    ce_1, ce_2 = math.log(2), -math.log(0.1)
    out = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.25)
    assert out.kd_sum.item() == pytest.approx(kl_1 + kl_2, rel=1e-5)
    assert out.ce_sum.item() == pytest.approx(ce_1 + ce_2, rel=1e-5)
    assert out.loss.item() == pytest.approx((0.25 * (ce_1 + ce_2) + 0.75 * 4.0 * (kl_1 + kl_2)) / 2, rel=1e-5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(0.0, 1.0), temperature=st.sampled_from([1.0, 3.0]))
def test_alpha_mixes_ce_and_scaled_kd(seed, alpha, temperature):
    student, teacher, labels = labelled_batch(seed)
    student.requires_grad_()
    out = distillation_loss(student, teacher, labels, alpha=alpha, temperature=temperature)
    n = max(out.num_tokens, 1)
    want = (alpha * out.ce_sum + (1 - alpha) * temperature**2 * out.kd_sum) / n
    torch.testing.assert_close(out.loss.detach(), want)
    out.loss.backward()
    grad_mix = student.grad.clone()
    student.grad = None
    pure_ce = distillation_loss(student, teacher, labels, alpha=1.0, temperature=temperature).loss
    pure_ce.backward()
    grad_ce = student.grad.clone()
    student.grad = None
    pure_kd = distillation_loss(student, teacher, labels, alpha=0.0, temperature=temperature).loss
    pure_kd.backward()
    torch.testing.assert_close(grad_mix, alpha * grad_ce + (1 - alpha) * student.grad, atol=1e-6, rtol=1e-5)
    # alpha = 1 is plain fine-tuning: the gradient is exactly that of the token-mean cross-entropy.
    ref = student.detach().clone().requires_grad_()
    F.cross_entropy(ref.reshape(-1, ref.shape[-1]), labels.reshape(-1)).backward()
    torch.testing.assert_close(grad_ce, ref.grad)


def test_weightless_terms_are_still_measured():
    student, teacher, labels = labelled_batch(3)
    student.requires_grad_()
    for alpha in (0.0, 1.0):
        out = distillation_loss(student, teacher, labels, alpha=alpha)
        assert out.kd_sum > 0 and out.ce_sum > 0


@FAST
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(NAMES))
def test_masked_rows_are_ignored(seed, name):
    student, teacher, labels = labelled_batch(seed, masked=0.5)
    keep = labels.ne(-100)
    # Garbage in ignored rows must not matter: any value, even NaN-free extremes, changes nothing.
    student_noisy = torch.where(keep[..., None], student, torch.full_like(student, 1e4)).requires_grad_()
    full = distillation_loss(student_noisy, teacher, labels, loss=name, temperature=2.0)
    rows = student[keep].clone().requires_grad_()
    only = distillation_loss(rows, teacher[keep], labels[keep], loss=name, temperature=2.0)
    torch.testing.assert_close(full.loss, only.loss)
    torch.testing.assert_close(full.kd_sum, only.kd_sum)
    torch.testing.assert_close(full.ce_sum, only.ce_sum)
    assert full.num_tokens == only.num_tokens == int(keep.sum())
    assert full.agreement == only.agreement
    full.loss.backward()
    only.loss.backward()
    assert torch.equal(student_noisy.grad[~keep], torch.zeros_like(student_noisy.grad[~keep]))
    torch.testing.assert_close(student_noisy.grad[keep], rows.grad)


@FAST
@given(seed=st.integers(0, 2**31 - 1), extra=st.integers(0, 50), as_tensor=st.booleans())
def test_num_items_in_batch_normalises(seed, extra, as_tensor):
    student, teacher, labels = labelled_batch(seed, masked=0.2)
    out = distillation_loss(student, teacher, labels)
    n = out.num_tokens + extra
    norm = torch.tensor(n) if as_tensor else n
    scaled = distillation_loss(student, teacher, labels, num_items_in_batch=norm)
    torch.testing.assert_close(scaled.loss, out.loss * out.num_tokens / n)


@FAST
@given(seed=st.integers(0, 2**31 - 1), split=st.integers(1, 2), name=st.sampled_from(NAMES))
def test_micro_batches_with_num_items_sum_to_the_full_batch(seed, split, name):
    """Gradient accumulation: micro-batch losses over the total token count add up to the whole batch's loss."""
    student, teacher, labels = labelled_batch(seed, batch=3)
    whole_logits = student.clone().requires_grad_()
    whole = distillation_loss(whole_logits, teacher, labels, loss=name)
    whole.loss.backward()
    parts_logits = student.clone().requires_grad_()
    total = int(labels.ne(-100).sum())
    summed = sum(
        distillation_loss(parts_logits[sl], teacher[sl], labels[sl], loss=name, num_items_in_batch=total).loss
        for sl in (slice(0, split), slice(split, None))
    )
    summed.backward()
    torch.testing.assert_close(summed, whole.loss)
    torch.testing.assert_close(parts_logits.grad, whole_logits.grad)


@FAST
@given(seed=st.integers(0, 2**31 - 1), chunk=st.integers(1, 20), name=st.sampled_from(NAMES))
def test_chunking_changes_nothing(seed, chunk, name):
    student, teacher, labels = labelled_batch(seed)  # 15 positions, about 9 targets: chunks from 1 to > tokens
    a = student.clone().requires_grad_()
    b = student.clone().requires_grad_()
    plain = distillation_loss(a, teacher, labels, loss=name, temperature=2.0)
    chunked = distillation_loss(b, teacher, labels, loss=name, temperature=2.0, chunk_size=chunk)
    torch.testing.assert_close(chunked.loss, plain.loss)
    torch.testing.assert_close(chunked.kd_sum, plain.kd_sum)
    torch.testing.assert_close(chunked.ce_sum, plain.ce_sum)
    assert chunked.agreement == plain.agreement and chunked.num_tokens == plain.num_tokens
    plain.loss.backward()
    chunked.loss.backward()
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_logits(dtype, name):
    student, teacher, labels = labelled_batch(5, batch=4, length=8, vocab=50)
    half = student.to(dtype).requires_grad_()
    out = distillation_loss(half, teacher.to(dtype), labels, loss=name, temperature=2.0)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert half.grad.dtype == dtype and torch.isfinite(half.grad).all()
    # Same values as float32: the computation itself is float32, so only the input rounding differs.
    rounded = distillation_loss(half.detach().float(), teacher.to(dtype).float(), labels, loss=name, temperature=2.0)
    torch.testing.assert_close(out.loss, rounded.loss)
    exact = distillation_loss(student, teacher, labels, loss=name, temperature=2.0)
    torch.testing.assert_close(out.loss, exact.loss, atol=0.02, rtol=0.02)


def test_fp16_extremes_do_not_overflow():
    """fp16 logits near its max (65504) would overflow a softmax computed in fp16; the float32 cast avoids it."""
    student = torch.tensor([[6.0e4, 0.0, -6.0e4], [1.0, 2.0, 3.0]], dtype=torch.float16, requires_grad=True)
    teacher = torch.tensor([[-6.0e4, 6.0e4, 0.0], [3.0, 2.0, 1.0]], dtype=torch.float16)
    for name in NAMES:
        out = distillation_loss(student, teacher, torch.tensor([0, 2]), loss=name)
        (grad,) = torch.autograd.grad(out.loss, student)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), name


def _mask(x: torch.Tensor, columns: list[int], value: float = float("-inf")) -> torch.Tensor:
    x = x.clone()
    x[..., columns] = value
    return x


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [float("-inf"), -1e9, torch.finfo(torch.float32).min])
def test_shared_minus_inf_columns_are_dropped(name, value):
    """Both models rule out the same columns: the loss is that of the vocabulary without them, and finite."""
    student, teacher, labels = labelled_batch(7, vocab=12)
    masked = [2, 9, 11]
    kept = torch.tensor([c for c in range(12) if c not in masked])
    # Targets only on kept columns: ids in the narrow vocabulary, and the same tokens' ids in the full one.
    narrow_labels = torch.where(labels.eq(-100), labels, labels % len(kept))
    labels = torch.where(labels.eq(-100), labels, kept[narrow_labels.clamp_min(0)])
    s = _mask(student, masked, value).requires_grad_()
    out = distillation_loss(s, _mask(teacher, masked, value), labels, loss=name, temperature=2.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[..., masked], torch.zeros_like(s.grad[..., masked]))
    r = student[..., kept].clone().requires_grad_()
    ref = distillation_loss(r, teacher[..., kept], narrow_labels, loss=name, temperature=2.0)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(s.grad[..., kept], r.grad)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("side", ["teacher", "student"])
def test_one_sided_minus_inf_stays_finite(name, side):
    """Only one model rules a column out. Loss and gradients stay finite for every divergence.

    Where the true divergence is finite (the other model has no mass there, e.g. forward KL with -inf on the
    teacher side, and always for JSD, TVD and the skew KLs with skew in (0, 1)) it is computed exactly. Where it is
    +inf (KL(a || b) with b = 0 where a > 0) the log-probability clamp at MIN_LOG_PROB = -1e4 turns it into a large
    finite penalty of about a_c * (log a_c + 1e4) instead.
    """
    student, teacher, labels = labelled_batch(11, vocab=8)
    labels = labels.clamp_max(5)
    masked = [6, 7]
    s_logits = _mask(student, masked) if side == "student" else student
    t_logits = _mask(teacher, masked) if side == "teacher" else teacher
    s = s_logits.clone().requires_grad_()
    out = distillation_loss(s, t_logits, labels, loss=name, alpha=0.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()
    want, *_ = ref_loss(s_logits, t_logits, labels, name, alpha=0.0)
    infinite = (name, side) in {("reverse_kl", "teacher"), ("forward_kl", "student")}
    if infinite:
        assert math.isinf(want.item())
        assert out.loss.item() > 0.01 * -MIN_LOG_PROB  # finite, but far above any ordinary divergence
    else:
        torch.testing.assert_close(out.loss.double(), want, atol=ATOL, rtol=RTOL)


def test_target_ruled_out_by_the_student():
    """A target column at -inf for the student: the CE is +inf (not clamped); alpha = 0 ignores it, without NaN."""
    student = torch.tensor([[float("-inf"), 1.0, 2.0], [0.5, 0.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 0.5]])
    labels = torch.tensor([0, 2])
    assert math.isinf(distillation_loss(student, teacher, labels, alpha=0.5).loss.item())
    pure_kd = distillation_loss(student, teacher, labels, alpha=0.0)
    assert math.isinf(pure_kd.ce_sum.item())  # still reported for the logs
    pure_kd.loss.backward()
    assert torch.isfinite(pure_kd.loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(pure_kd.loss, pure_kd.kd_sum / 2)


@pytest.mark.parametrize("num_items", [None, 0, 7, torch.tensor(0), torch.tensor(7)])
def test_no_target_tokens(num_items):
    student, teacher, labels = labelled_batch(2)
    labels = torch.full_like(labels, -100)
    s = student.clone().requires_grad_()
    out = distillation_loss(s, teacher, labels, num_items_in_batch=num_items, chunk_size=4)
    assert out.loss.item() == 0.0 and out.num_tokens == 0 and out.agreement.item() == 0
    assert out.kd_sum.item() == 0.0 and out.ce_sum.item() == 0.0
    out.loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@FAST
@given(seed=st.integers(0, 2**31 - 1), chunk=st.sampled_from([None, 1, 4]))
def test_agreement_and_num_tokens_by_loop(seed, chunk):
    student, teacher, labels = labelled_batch(seed, batch=4, length=6, vocab=5)
    teacher = torch.where(torch.rand(teacher.shape[:-1] + (1,)) < 0.5, student + 0.1 * teacher, teacher)
    out = distillation_loss(student, teacher, labels, chunk_size=chunk)
    agree = count = 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            if labels[b, i] != -100:
                count += 1
                s_top = max(range(5), key=lambda v: student[b, i, v].item())
                t_top = max(range(5), key=lambda v: teacher[b, i, v].item())
                agree += int(s_top == t_top)
    assert out.num_tokens == count
    assert out.agreement.item() == agree
    assert out.agreement.dtype == torch.long and not out.agreement.requires_grad


def test_outputs_are_detached_and_float32():
    student, teacher, labels = labelled_batch(1)
    out = distillation_loss(student.to(torch.bfloat16).requires_grad_(), teacher, labels)
    assert out.loss.requires_grad and out.loss.dtype == torch.float32
    assert not out.kd_sum.requires_grad and not out.ce_sum.requires_grad
    assert out.kd_sum.dtype == out.ce_sum.dtype == torch.float32
