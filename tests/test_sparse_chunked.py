"""The chunked top-k loss (closed-form gradient) against the autograd reference, and the sampled tail's
unbiasedness, computed exactly by enumerating every possible sample."""

from __future__ import annotations

import pytest
import torch

from hf_kd.losses import distillation_loss, log_probs
from hf_kd.losses.chunked import OutputLayer, chunked_distillation_loss, fused_distillation_loss
from hf_kd.losses.topk import TopKRows, sparse_distillation_loss
from hf_kd.teachers.cache_writer import sample_tail


def cache_rows(teacher_logits: torch.Tensor, k: int, temperature: float, m: int = 0, seed: int = 0) -> dict:
    lp = log_probs(teacher_logits, temperature)
    top_lp, top_ids = lp.topk(k, -1)
    rows = {
        "topk_ids": top_ids,
        "topk_logprobs": top_lp,
        "tail_logmass": lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1),
    }
    if m:
        ids, plogp = sample_tail(lp, top_ids, m, torch.Generator().manual_seed(seed))
        rows.update(tail_ids=ids, tail_plogp=plogp)
    return rows


def batch(seed: int = 0, b: int = 3, t: int = 9, vocab: int = 40):
    torch.manual_seed(seed)
    student = torch.randn(b, t, vocab) * 2
    teacher = torch.randn(b, t, vocab) * 3
    labels = torch.randint(0, vocab, (b, t))
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return student, teacher, labels


@pytest.mark.parametrize("tail", ["bucket", "uniform", "sampled"])
@pytest.mark.parametrize(("alpha", "temperature"), [(0.0, 1.0), (0.4, 1.0), (0.4, 2.0), (1.0, 1.5)])
@pytest.mark.parametrize("chunk", [4, 1024])
def test_chunked_topk_equals_reference(tail: str, alpha: float, temperature: float, chunk: int) -> None:
    student, teacher, labels = batch()
    mask = labels.ne(-100)
    rows = cache_rows(teacher[mask], k=6, temperature=temperature, m=5 if tail == "sampled" else 0)
    kwargs = {"temperature": temperature, "alpha": alpha, "num_items_in_batch": 30}
    x = student.clone().requires_grad_(True)
    ref = sparse_distillation_loss(x, rows, labels, tail_treatment=tail, **kwargs)
    (g_ref,) = torch.autograd.grad(ref.loss, x)
    y = student.clone().requires_grad_(True)
    got = chunked_distillation_loss(y, TopKRows.from_batch(rows, tail), labels, chunk_size=chunk, **kwargs)
    (g_got,) = torch.autograd.grad(got.loss, y)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.kd_sum, ref.kd_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.ce_sum, ref.ce_sum, rtol=1e-5, atol=1e-5)
    assert got.agreement == ref.agreement and got.num_tokens == ref.num_tokens
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "tvd"])
def test_chunked_bucket_matches_reference_for_other_divergences(loss: str) -> None:
    student, teacher, labels = batch(seed=1)
    rows = cache_rows(teacher[labels.ne(-100)], k=5, temperature=1.0)
    x = student.clone().requires_grad_(True)
    ref = sparse_distillation_loss(x, rows, labels, loss=loss, alpha=0.2)
    (g_ref,) = torch.autograd.grad(ref.loss, x)
    y = student.clone().requires_grad_(True)
    got = chunked_distillation_loss(y, TopKRows.from_batch(rows), labels, loss=loss, alpha=0.2, chunk_size=7)
    (g_got,) = torch.autograd.grad(got.loss, y)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_fused_topk_equals_reference_on_the_projected_logits() -> None:
    torch.manual_seed(3)
    hidden, weight, bias = torch.randn(2, 7, 8), torch.randn(45, 8), torch.randn(45)  # head wider than vocab 40
    teacher = torch.randn(2, 7, 40) * 3
    labels = torch.randint(0, 40, (2, 7))
    labels[1, 4:] = -100
    rows = cache_rows(teacher[labels.ne(-100)], k=6, temperature=1.0, m=4)
    h1, w1, b1 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    logits = ((h1 * 0.5) @ w1.t() + b1)[..., :40]
    ref = sparse_distillation_loss(logits, rows, labels, alpha=0.3, tail_treatment="sampled")
    ref_grads = torch.autograd.grad(ref.loss, (h1, w1, b1))
    h2, w2, b2 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    layer = OutputLayer(weight=w2, bias=b2, scale=0.5)
    got = fused_distillation_loss(h2, layer, TopKRows.from_batch(rows, "sampled"), labels, vocab_size=40, alpha=0.3)
    got_grads = torch.autograd.grad(got.loss, (h2, w2, b2))
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sampled_tail_is_unbiased_for_dense_forward_kl() -> None:
    """With one sample, the expectation over every possible draw (weighted by the teacher's renormalised tail)
    of the sampled loss and gradient equals the dense forward KL and its gradient, in float64."""
    torch.manual_seed(5)
    vocab, k, temperature = 12, 4, 1.5
    student = torch.randn(1, vocab, dtype=torch.float64) * 2
    teacher = torch.randn(1, vocab, dtype=torch.float64) * 2
    labels = torch.tensor([3])
    x = student.clone().requires_grad_(True)
    dense = distillation_loss(x, teacher, labels, temperature=temperature, alpha=0.0)
    (g_dense,) = torch.autograd.grad(dense.loss, x)
    rows = cache_rows(teacher, k, temperature, m=1)
    p = log_probs(teacher, temperature).exp()[0]
    tail_p = p.clone()
    tail_p[rows["topk_ids"][0]] = 0
    expected_loss, expected_grad = 0.0, torch.zeros_like(student)
    for token in tail_p.nonzero().squeeze(-1).tolist():  # every possible draw
        rows["tail_ids"] = torch.tensor([[token]])
        y = student.clone().requires_grad_(True)
        out = sparse_distillation_loss(y, rows, labels, temperature=temperature, alpha=0.0, tail_treatment="sampled")
        (g,) = torch.autograd.grad(out.loss, y)
        weight = tail_p[token] / tail_p.sum()
        expected_loss = expected_loss + weight * out.loss.detach()
        expected_grad += weight * g
    torch.testing.assert_close(expected_loss, dense.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected_grad, g_dense, rtol=1e-4, atol=1e-6)
    # The bucket treatment, for contrast, is biased: its gradient differs from the dense one.
    rows.pop("tail_ids")
    z = student.clone().requires_grad_(True)
    bucket = sparse_distillation_loss(z, rows, labels, temperature=temperature, alpha=0.0)
    (g_bucket,) = torch.autograd.grad(bucket.loss, z)
    assert (g_bucket - g_dense).abs().max() > 1e-3


def test_tail_samples_follow_the_teachers_tail() -> None:
    """Systematic sampling: never a top-k token, each token drawn floor or ceil of m times its tail share, and
    the right share on average over rows (unbiased) even with few samples."""
    torch.manual_seed(6)
    lp = torch.log_softmax(torch.randn(2, 30) * 2, -1)
    top_lp, top_ids = lp.topk(5, -1)
    m = 2000
    ids, plogp = sample_tail(lp, top_ids, m, torch.Generator().manual_seed(0))
    for row in range(2):
        assert not torch.isin(ids[row], top_ids[row]).any()
        p = lp[row].exp().double()
        tail = p.clone()
        tail[top_ids[row]] = 0
        counts = torch.bincount(ids[row], minlength=30).double()
        assert ((counts - m * tail / tail.sum()).abs() < 1 + 1e-6).all()
        torch.testing.assert_close(plogp[row], (tail * lp[row].double()).sum().float())
    rows = 4000  # one teacher row repeated: each gets its own uniform offset
    few, _ = sample_tail(lp[:1].expand(rows, -1), top_ids[:1].expand(rows, -1), 3, torch.Generator().manual_seed(1))
    share = lp[0].exp().double().index_fill(0, top_ids[0], 0.0)
    share /= share.sum()
    mean_counts = torch.bincount(few.flatten(), minlength=30).double() / rows
    torch.testing.assert_close(mean_counts, 3 * share, atol=0.04, rtol=0)
