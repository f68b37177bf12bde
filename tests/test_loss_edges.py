"""Loss edge cases on every path (plain, chunked, fused, top-k) against a float64 reference, and the config's
refusal of NaN, infinite and out-of-range settings.

The reference is written in probability space with plain torch ops, in float64: logits = h @ W.T + b, softmaxes,
``sum a log(a / b)`` with ``0 log 0 = 0``. Every path is differentiated with respect to the same h, W and b.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from hf_kd import DistillationConfig
from hf_kd.cli import main
from hf_kd.losses import DIVERGENCES, IGNORE_INDEX, distillation_loss
from hf_kd.losses.chunked import OutputLayer, chunked_distillation_loss, fused_distillation_loss
from hf_kd.losses.topk import TopKRows, sparse_distillation_loss

VOCAB, HIDDEN = 13, 8
DENSE_PATHS = ("plain", "chunked", "fused")
TOPK_PATHS = ("sparse", "chunked-topk", "fused-topk")
INF = math.inf

# ---- the float64 reference ------------------------------------------------------------------------------------


def _kl(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    """sum_v a_v log(a_v / b_v) with 0 log(0 / b) = 0, NaN-free in backward where a_v = 0."""
    live = a_log > -INF
    a_safe, b_safe = a_log.where(live, 0.0), b_log.where(live, 0.0)
    return (a_safe.exp().where(live, 0.0) * (a_safe - b_safe)).sum(-1)


def _log_mix(a_log: torch.Tensor, b_log: torch.Tensor, w: float) -> torch.Tensor:
    m = w * a_log.exp() + (1.0 - w) * b_log.exp()
    return m.where(m > 0, 1.0).log().where(m > 0, -INF)


def _divergence(name: str, s: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    if name == "forward_kl":
        return _kl(t, s)
    if name == "reverse_kl":
        return _kl(s, t)
    if name == "jsd":
        m = _log_mix(t, s, beta)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if name == "skew_forward_kl":
        return _kl(t, _log_mix(t, s, skew))
    if name == "skew_reverse_kl":
        return _kl(s, _log_mix(s, t, skew))
    assert name == "tvd"
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


def _buckets(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[N, k + 1]: the top-k columns and the exact log-mass of all the others (no floor, no clamp)."""
    tail = log_p.scatter(1, ids, -INF).logsumexp(-1, keepdim=True)
    return torch.cat([log_p.gather(1, ids), tail], dim=-1)


def reference(logits, teacher, labels, *, loss, temperature, alpha, beta=0.5, skew=0.1, topk_ids=None):
    """(loss, kd_sum, ce_sum) in float64; ``topk_ids`` compares k + 1 buckets instead of the whole vocabulary."""
    mask = labels.ne(IGNORE_INDEX)
    z, y = logits.double()[mask], labels[mask]
    s_log = F.log_softmax(z / temperature, -1)
    t_log = F.log_softmax(teacher.double()[mask] / temperature, -1)
    if topk_ids is not None:
        s_log, t_log = _buckets(s_log, topk_ids), _buckets(t_log, topk_ids)
    kd = _divergence(loss, s_log, t_log, beta, skew).sum()
    ce = -F.log_softmax(z, -1).gather(1, y[:, None]).sum()
    total = (alpha * ce if alpha > 0 else 0.0) + ((1 - alpha) * temperature**2 * kd if alpha < 1 else 0.0)
    return total / y.numel(), kd, ce


# ---- the paths under test -------------------------------------------------------------------------------------


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 6, HIDDEN, generator=g)
    w = torch.randn(VOCAB, HIDDEN, generator=g) * 0.7
    b = torch.randn(VOCAB, generator=g)
    teacher = torch.randn(2, 6, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    return h, w, b, teacher, labels


def cache(teacher: torch.Tensor, labels: torch.Tensor, k: int, temperature: float) -> dict:
    lp = F.log_softmax(teacher[labels.ne(IGNORE_INDEX)] / temperature, -1)
    top_lp, top_ids = lp.topk(k, -1)
    return {"topk_ids": top_ids, "topk_logprobs": top_lp, "tail_logmass": lp.scatter(-1, top_ids, -INF).logsumexp(-1)}


def run(path, h, w, b, teacher, labels, *, tail="bucket", k=VOCAB, **kw):
    """The path's (loss, kd_sum, ce_sum) and its gradients with respect to h, W and b."""
    h, w, b = (t.clone().requires_grad_(True) for t in (h, w, b))
    logits = h @ w.t() + b
    rows = cache(teacher, labels, k, kw.get("temperature", 1.0)) if path in TOPK_PATHS else None
    if path == "plain":
        out = distillation_loss(logits, teacher, labels, **kw)
    elif path == "chunked":
        out = chunked_distillation_loss(logits, teacher, labels, chunk_size=4, **kw)
    elif path == "fused":
        out = fused_distillation_loss(h, OutputLayer(w, b), teacher, labels, chunk_size=4, **kw)
    elif path == "sparse":
        out = sparse_distillation_loss(logits, rows, labels, tail_treatment=tail, **kw)
    elif path == "chunked-topk":
        out = chunked_distillation_loss(logits, TopKRows.from_batch(rows, tail), labels, chunk_size=4, **kw)
    else:
        out = fused_distillation_loss(h, OutputLayer(w, b), TopKRows.from_batch(rows, tail), labels, chunk_size=4, **kw)
    return (out.loss, out.kd_sum, out.ce_sum), torch.autograd.grad(out.loss, (h, w, b)), rows


def run_reference(h, w, b, teacher, labels, **kw):
    h, w, b = (t.double().requires_grad_(True) for t in (h, w, b))
    values = reference(h @ w.t() + b, teacher, labels, **kw)
    return values, torch.autograd.grad(values[0], (h, w, b))


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-5) -> None:
    """Equal within ``rtol`` of the largest magnitude; finite wherever the reference is."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), actual
    err = (actual - expected).abs().max().item()
    assert err <= max(rtol * expected.abs().max().item(), 1e-9), (err, expected.abs().max().item())


def check(path, h, w, b, teacher, labels, *, ref_topk=False, **kw) -> None:
    values, grads, rows = run(path, h, w, b, teacher, labels, **kw)
    kw.pop("tail", None)
    kw.pop("k", None)
    ids = rows["topk_ids"] if ref_topk else None
    ref_values, ref_grads = run_reference(h, w, b, teacher, labels, topk_ids=ids, **kw)
    close(values[0], ref_values[0])  # the loss
    close(values[1], ref_values[1])  # kd_sum: the logged kd_loss
    for got, want in zip(grads, ref_grads, strict=True):
        close(got, want)


# ---- skew = 1: a constant divergence, zero gradient -----------------------------------------------------------


@pytest.mark.parametrize("path", DENSE_PATHS + TOPK_PATHS)
@pytest.mark.parametrize("loss", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_skew_one_is_zero_with_zero_gradient(path, loss, alpha):
    h, w, b, teacher, labels = setup(1)
    check(path, h, w, b, teacher, labels, loss=loss, skew=1.0, alpha=alpha, temperature=2.0)
    values, grads, _ = run(path, h, w, b, teacher, labels, loss=loss, skew=1.0, alpha=alpha)
    assert values[1].item() == 0.0
    if alpha == 0.0:
        assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_config_accepts_skew_one(tmp_path):
    assert DistillationConfig(output_dir=str(tmp_path), report_to=[], loss="skew_forward_kl", skew=1.0).skew == 1.0


# ---- alpha = 0 with an infinite cross-entropy; alpha = 1 with a NaN divergence --------------------------------


def _rule_out_a_target(b, teacher, labels, teacher_too: bool):
    """A -inf student logit (bias) at a target token, so that the CE of that target is inf."""
    col = int(labels[0, 2])
    b = b.clone()
    b[col] = -INF
    if teacher_too:
        teacher = teacher.clone()
        teacher[..., col] = -INF
    return b, teacher


# (path, loss, whether the teacher rules the token out too): KL(p || q) is infinite where only the student does.
INFINITE_CE_CASES = [
    *((path, loss, True) for path in DENSE_PATHS for loss in sorted(DIVERGENCES)),
    *((path, loss, False) for path in DENSE_PATHS for loss in sorted(DIVERGENCES) if loss != "forward_kl"),
    *((path, loss, loss == "forward_kl") for path in TOPK_PATHS for loss in ("forward_kl", "reverse_kl")),
]


@pytest.mark.parametrize("path, loss, teacher_too", INFINITE_CE_CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_alpha_zero_ignores_an_infinite_cross_entropy(path, loss, teacher_too, temperature):
    h, w, b, teacher, labels = setup(2)
    b, teacher = _rule_out_a_target(b, teacher, labels, teacher_too)
    values, _, _ = run(path, h, w, b, teacher, labels, loss=loss, alpha=0.0, temperature=temperature)
    assert values[2].item() == INF  # the logged CE shows the infinity; the loss must not
    check(path, h, w, b, teacher, labels, loss=loss, alpha=0.0, temperature=temperature)


@pytest.mark.parametrize("path", TOPK_PATHS)
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_alpha_zero_infinite_ce_topk_buckets(path, loss):
    """k < V: the bucket divergence, against the float64 bucket formula."""
    h, w, b, teacher, labels = setup(3)
    b, teacher = _rule_out_a_target(b, teacher, labels, teacher_too=loss == "forward_kl")
    check(path, h, w, b, teacher, labels, k=5, ref_topk=True, loss=loss, alpha=0.0, temperature=1.5)


@pytest.mark.parametrize("path", DENSE_PATHS)
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_alpha_one_ignores_a_nan_divergence(path, loss):
    """A teacher row with an overflowed (+inf) logit has a NaN divergence; alpha = 1 trains on the CE alone."""
    h, w, b, teacher, labels = setup(4)
    teacher = teacher.clone()
    teacher[0, 3, 5] = INF
    values, grads, _ = run(path, h, w, b, teacher, labels, loss=loss, alpha=1.0, temperature=2.0)
    assert values[1].isnan()  # the logged divergence shows it
    (ref_loss, _, _), ref_grads = run_reference(h, w, b, teacher, labels, loss=loss, alpha=1.0, temperature=2.0)
    close(values[0], ref_loss)
    for got, want in zip(grads, ref_grads, strict=True):
        close(got, want)


# ---- a top-k cache with k = V: the tail is empty ---------------------------------------------------------------


@pytest.mark.parametrize("path", TOPK_PATHS)
@pytest.mark.parametrize(
    "tail, loss",
    [("uniform", "forward_kl"), *(("bucket", loss) for loss in sorted(DIVERGENCES))],
)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_full_vocabulary_cache_is_the_dense_loss(path, tail, loss, alpha):
    h, w, b, teacher, labels = setup(5)
    check(path, h, w, b, teacher, labels, tail=tail, loss=loss, alpha=alpha, temperature=2.0, beta=0.3, skew=0.2)


def test_full_vocabulary_bucket_reverse_kl_adds_nothing():
    """The logged reverse KL per token equals the dense one: no floored tail bucket (1e-5 x 1e4 = 0.1 nats)."""
    h, w, b, teacher, labels = setup(6)
    (_, kd, _), _, _ = run("chunked-topk", h, w, b, teacher, labels, loss="reverse_kl", alpha=0.0)
    (_, ref_kd, _), _ = run_reference(h, w, b, teacher, labels, loss="reverse_kl", alpha=0.0, temperature=1.0)
    num_tokens = int(labels.ne(IGNORE_INDEX).sum())
    assert abs(kd.item() - ref_kd.item()) / num_tokens < 1e-5


# ---- the config refuses NaN, infinite and out-of-range numbers --------------------------------------------------


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("temperature", INF, ["temperature=inf", "finite", "> 0"]),
        ("temperature", -INF, ["temperature=-inf", "> 0"]),
        ("temperature", math.nan, ["temperature=nan", "> 0"]),
        ("alpha", math.nan, ["alpha=nan", "[0, 1]"]),
        ("beta", INF, ["beta=inf", "(0, 1)"]),
        ("skew", math.nan, ["skew=nan", "[0, 1]"]),
        ("skew", -0.5, ["skew=-0.5", "[0, 1]"]),
        ("lmbda", INF, ["lmbda=inf", "[0, 1]"]),
        ("generation_temperature", INF, ["generation_temperature=inf", ">= 0"]),
        ("generation_temperature", math.nan, ["generation_temperature=nan", ">= 0"]),
        ("uld_weight", INF, ["uld_weight=inf", ">= 0"]),
        ("uld_weight", -1.0, ["uld_weight=-1.0", ">= 0"]),
        ("hidden_state_loss_weight", INF, ["hidden_state_loss_weight=inf", ">= 0"]),
        ("learning_rate", INF, ["learning_rate=inf", "finite"]),
        ("weight_decay", math.nan, ["weight_decay=nan", "finite"]),
    ],
)
def test_config_refuses_non_finite_numbers(tmp_path, field, value, words):
    with pytest.raises(ValueError) as err:
        DistillationConfig(output_dir=str(tmp_path), report_to=[], **{field: value})
    assert all(word in str(err.value) for word in words), str(err.value)


@pytest.mark.parametrize("value", [".inf", ".nan", "1e999"])
def test_distill_refuses_an_infinite_temperature_in_one_line(tmp_path, capsys, value):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a b c"}\n')
    config = tmp_path / "c.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "data_files": {"train": str(data)}, "report_to": "none"}))
    assert main(["distill", "--config", str(config), "--temperature", value]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err + captured.out
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hf-kd distill: error: temperature=") and "finite number > 0" in err, err
    assert not out.exists()
