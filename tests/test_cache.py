"""The top-k teacher cache, its validation, and the bucketed sparse divergence, against references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, random_sentences, tiny_gpt2, tiny_t5
from datasets import Dataset, load_from_disk
from transformers import DataCollatorForSeq2Seq

from hf_kd.losses import distillation_loss, log_probs
from hf_kd.losses.topk import CacheAlignmentError, sparse_distillation_loss
from hf_kd.teachers.cache import BATCH_KEY, CachedTeacher, CacheMismatchError
from hf_kd.teachers.cache_writer import build_teacher_cache, cache_size
from hf_kd.teachers.shards import ShardError

# ---- the sparse divergence ---------------------------------------------------------------------------------


def _topk_rows(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    lp = log_probs(teacher_logits, temperature)
    top_lp, top_ids = lp.topk(k, -1)
    # Tail computed another way than the cache does: 1 - sum of top-k probabilities, in float64.
    tail = torch.log1p(-top_lp.double().exp().sum(-1)).float()
    return {"topk_ids": top_ids, "topk_logprobs": top_lp, "tail_logmass": tail}


@pytest.mark.parametrize("tail_treatment", ["bucket", "uniform"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_sparse_with_full_k_equals_dense_forward_kl(alpha: float, tail_treatment: str) -> None:
    torch.manual_seed(0)
    n, vocab, temperature = 37, 50, 2.0
    student = torch.randn(n, vocab, requires_grad=True)
    teacher = torch.randn(n, vocab) * 3
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = -100
    rows = _topk_rows(teacher[labels.ne(-100)], vocab, temperature)
    rows["tail_logmass"] = torch.full_like(rows["tail_logmass"], float("-inf"))  # k = V: nothing left
    dense = distillation_loss(student, teacher, labels, temperature=temperature, alpha=alpha, num_items_in_batch=40)
    kwargs = {"temperature": temperature, "alpha": alpha, "num_items_in_batch": 40, "tail_treatment": tail_treatment}
    sparse = sparse_distillation_loss(student, rows, labels, **kwargs)
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse.kd_sum, dense.kd_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse.ce_sum, dense.ce_sum, rtol=1e-6, atol=1e-5)
    assert sparse.num_tokens == dense.num_tokens
    assert sparse.agreement == dense.agreement
    (g_dense,) = torch.autograd.grad(dense.loss, student)
    (g_sparse,) = torch.autograd.grad(sparse.loss, student)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_sparse_small_k_equals_manual_bucket_formula(k: int) -> None:
    torch.manual_seed(1)
    n, vocab, temperature, alpha = 23, 40, 1.5, 0.25
    student = torch.randn(n, vocab, dtype=torch.float64)
    teacher = torch.randn(n, vocab, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (n,))
    rows = _topk_rows(teacher.float(), k, temperature)
    result = sparse_distillation_loss(student.float(), rows, labels, temperature=temperature, alpha=alpha)

    # Reference in probability space, float64: p over the k tokens + tail; q over the same tokens + the rest.
    kd = 0.0
    for i in range(n):
        p = torch.softmax(teacher[i] / temperature, -1)
        q = torch.softmax(student[i] / temperature, -1)
        ids = rows["topk_ids"][i]
        rest = torch.ones(vocab, dtype=torch.bool)
        rest[ids] = False
        p_b = torch.cat([p[ids], p[rest].sum().view(1)])
        q_b = torch.cat([q[ids], q[rest].sum().view(1)])
        kd += float((p_b * (p_b.log() - q_b.log())).sum())
    ce = float(torch.nn.functional.cross_entropy(student, labels, reduction="sum"))
    expected = (alpha * ce + (1 - alpha) * temperature**2 * kd) / n
    assert result.kd_sum.item() == pytest.approx(kd, rel=1e-4)
    assert result.loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("k", [1, 7])
def test_uniform_tail_equals_dense_kl_against_spread_teacher(k: int) -> None:
    """tail_treatment="uniform": forward KL against top-k + tail spread evenly, computed densely in float64."""
    torch.manual_seed(3)
    n, vocab, temperature, alpha = 19, 25, 2.0, 0.4
    student = torch.randn(n, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    rows = _topk_rows(torch.randn(n, vocab) * 2, k, temperature)
    result = sparse_distillation_loss(
        student, rows, labels, temperature=temperature, alpha=alpha, tail_treatment="uniform"
    )
    spread = (rows["tail_logmass"].double().exp() / (vocab - k)).unsqueeze(-1).expand(n, vocab).clone()
    p = spread.scatter(1, rows["topk_ids"], rows["topk_logprobs"].double().exp())
    q_log = torch.log_softmax(student.double() / temperature, -1)
    kd = (p * (p.log() - q_log)).sum()
    ce = torch.nn.functional.cross_entropy(student.double(), labels, reduction="sum")
    expected = (alpha * ce + (1 - alpha) * temperature**2 * kd) / n
    assert result.kd_sum.item() == pytest.approx(kd.item(), rel=1e-4)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    (grad,) = torch.autograd.grad(result.loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-3, atol=1e-6)


def test_sparse_is_finite_for_extreme_students() -> None:
    """-inf logits inside the teacher's top-k, and a student whose top-k hold all its mass (tail rounds to 0)."""
    torch.manual_seed(2)
    student = torch.randn(6, 30) * 40
    student[0, :5] = float("-inf")
    student.requires_grad_(True)
    teacher = torch.randn(6, 30)
    rows = _topk_rows(teacher, 8)
    rows["topk_ids"][0, :2] = torch.tensor([0, 1])
    out = sparse_distillation_loss(student, rows, torch.randint(5, 30, (6,)), alpha=0.0)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_confident_student_tail_is_floored_not_rounding_noise() -> None:
    """A student with ~all its mass on the teacher's top-k: its float32 tail is rounding error, floored at 1e-5."""
    from hf_kd.losses.topk import STUDENT_TAIL_FLOOR

    torch.manual_seed(0)
    n, vocab, k = 64, 30, 8
    rows = _topk_rows(torch.randn(n, vocab), k)
    student = torch.randn(n, vocab).scatter_add(1, rows["topk_ids"], torch.full((n, k), 20.0))
    result = sparse_distillation_loss(student, rows, torch.randint(0, vocab, (n,)), alpha=0.0)
    q = torch.softmax(student.double(), -1)
    q_top = q.gather(1, rows["topk_ids"])
    q_tail = (1 - q_top.sum(1)).clamp_min(STUDENT_TAIL_FLOOR)  # true tail ~1e-7: floored
    p_top, p_tail = rows["topk_logprobs"].double().exp(), rows["tail_logmass"].double().exp()
    kd = (p_top * (p_top.log() - q_top.log())).sum() + (p_tail * (p_tail.log() - q_tail.log())).sum()
    assert result.kd_sum.item() == pytest.approx(kd.item(), rel=1e-4)


def test_sparse_refuses_misaligned_rows() -> None:
    student = torch.randn(4, 10)
    labels = torch.tensor([1, 2, 3, 4])
    rows = _topk_rows(torch.randn(4, 10), 3)
    with pytest.raises(CacheAlignmentError, match="3 target tokens but its cache rows hold 4"):
        sparse_distillation_loss(student, rows, torch.tensor([1, 2, 3, -100]))
    rows["target_ids"] = torch.tensor([1, 2, 4, 3])
    with pytest.raises(CacheAlignmentError, match="joined to the wrong examples"):
        sparse_distillation_loss(student, rows, labels)


# ---- building the cache -------------------------------------------------------------------------------------


def _causal_rows(tok, n: int = 11) -> Dataset:
    rows = []
    for i, text in enumerate(random_sentences(n, seed=3, min_len=4, max_len=12)):
        ids = tok(text)["input_ids"]
        labels = [-100] * (i % 3) + ids[i % 3 :]  # some prompt tokens not scored
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Dataset.from_list(rows)


def _seq2seq_rows(tok, n: int = 9) -> Dataset:
    src, tgt = random_sentences(n, seed=4), random_sentences(n, seed=5, max_len=6)
    pairs = zip(src, tgt, strict=True)
    rows = [{"input_ids": tok(s)["input_ids"], "labels": tok(t)["input_ids"] + [1]} for s, t in pairs]
    return Dataset.from_list(rows)


def test_cache_rows_equal_per_example_teacher_topk(tmp_path: Path, tok, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hf_kd.teachers.cache_writer.ROW_CHUNK", 7)  # several row chunks per batch
    teacher = tiny_gpt2(len(tok), seed=7).eval()
    data = _causal_rows(tok)
    unscored = {"input_ids": data[0]["input_ids"], "attention_mask": data[0]["attention_mask"]}
    data = data.add_item({**unscored, "labels": [-100] * len(unscored["input_ids"])})  # a row without targets
    build_teacher_cache(teacher, data, tmp_path / "c", tokenizer=tok, k=5, temperature=2.0, batch_size=4, shard_size=4)
    cache = CachedTeacher(tmp_path / "c")
    assert (cache.k, cache.temperature, len(cache.data)) == (5, 2.0, len(data))
    for i, row in enumerate(data):
        with torch.no_grad():
            logits = teacher(torch.tensor([row["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(row["labels"][1:])
        lp = torch.log_softmax(logits[targets.ne(-100)].double() / 2.0, -1)
        top, ids = lp.topk(5, -1)
        got = cache.data.with_format("torch")[i]
        assert torch.equal(got["target_ids"].long(), targets[targets.ne(-100)])
        assert torch.equal(got["topk_ids"].long().view(-1, 5), ids)
        torch.testing.assert_close(got["topk_logprobs"].double().view(-1, 5), top, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got["tail_logmass"].double(), torch.log1p(-top.exp().sum(-1)), atol=1e-4, rtol=1e-4)
    size = cache_size(tmp_path / "c")
    assert size["target_tokens"] == sum(sum(t != -100 for t in r[1:]) for r in data["labels"])


@pytest.mark.parametrize("tail_samples", [0, 5])
def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path, tok, tail_samples: int) -> None:
    teacher = tiny_gpt2(len(tok), seed=7).eval()
    data = _causal_rows(tok, n=10)
    kwargs = {"tokenizer": tok, "k": 4, "batch_size": 3, "shard_size": 3, "tail_samples": tail_samples}
    build_teacher_cache(teacher, data, tmp_path / "clean", **kwargs)

    def kill(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, data, tmp_path / "resumed", on_shard=kill, **kwargs)
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["0", "1"] and not manifest["complete"]
    with pytest.raises(ShardError, match="unfinished"):
        CachedTeacher(tmp_path / "resumed")
    (tmp_path / "resumed" / "shards" / "00002.tmp").mkdir()  # a half-written shard the kill left behind
    computed = []
    same_rows = data.map(lambda row: {})  # same content, another `datasets` fingerprint: still resumes
    assert same_rows._fingerprint != data._fingerprint
    build_teacher_cache(teacher, same_rows, tmp_path / "resumed", on_shard=computed.append, **kwargs)
    assert computed == [2, 3]  # only the missing shards
    clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert resumed["fingerprint"] == clean["fingerprint"] and resumed["shards"] == clean["shards"]
    assert CachedTeacher(tmp_path / "resumed").data.to_dict() == CachedTeacher(tmp_path / "clean").data.to_dict()


def test_refuses_other_tokenizer_dataset_temperature(tmp_path: Path, tok) -> None:
    teacher = tiny_gpt2(len(tok), seed=7).eval()
    data = _causal_rows(tok, n=6)
    build_teacher_cache(teacher, data, tmp_path / "c", tokenizer=tok, k=3, shard_size=4)
    cache = CachedTeacher(tmp_path / "c")
    other_tok = make_tokenizer(words=list(reversed(make_tokenizer().get_vocab())), name="other")
    with pytest.raises(CacheMismatchError, match="another tokenizer"):
        cache.attach(data, tokenizer=other_tok)
    with pytest.raises(CacheMismatchError, match="another data set: 6 rows, this one has 5"):
        cache.attach(data.select(range(5)), tokenizer=tok)
    changed = data.map(lambda r: {"labels": [-100] + r["labels"][1:]})
    with pytest.raises(CacheMismatchError, match="another data set: the tokenised rows"):
        cache.attach(changed, tokenizer=tok)
    with pytest.raises(CacheMismatchError, match="temperature 1.0, but training asks for 2.0"):
        cache.check_temperature(2.0)
    with pytest.raises(ShardError, match="other settings .*k"):
        build_teacher_cache(teacher, data, tmp_path / "c", tokenizer=tok, k=4, shard_size=4)


def test_detects_truncated_or_corrupt_cache(tmp_path: Path, tok) -> None:
    teacher = tiny_gpt2(len(tok), seed=7).eval()
    data = _causal_rows(tok, n=6)
    build_teacher_cache(teacher, data, tmp_path / "c", tokenizer=tok, k=3, shard_size=4)
    manifest_path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    arrow = next((tmp_path / "c" / "shards" / "00001").glob("*.arrow"))
    original = arrow.read_bytes()
    arrow.write_bytes(original[:-8] + bytes(8))
    with pytest.raises(ShardError, match="shard 1 fails its checksum"):
        CachedTeacher(tmp_path / "c")
    arrow.write_bytes(original)

    bad = json.loads(json.dumps(manifest))
    bad["shards"]["0"]["rows"] = 3
    manifest_path.write_text(json.dumps(bad))
    with pytest.raises(ShardError, match="manifest.json is damaged: shard 0 records 3 rows, not 4"):
        CachedTeacher(tmp_path / "c")
    manifest_path.write_text(json.dumps(manifest))

    (tmp_path / "c" / "shards" / "00001").rename(tmp_path / "moved")
    with pytest.raises(ShardError, match="shard 1 is missing"):
        CachedTeacher(tmp_path / "c")


# ---- training batches from the cache ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_collated_cache_with_full_k_matches_online_teacher(tmp_path: Path, tok, kind: str) -> None:
    """attach + collator on shuffled rows: the sparse loss equals the online dense loss (up to float16)."""
    make = tiny_gpt2 if kind == "causal" else tiny_t5
    teacher, student = make(len(tok), seed=7).eval(), make(len(tok), seed=8)
    data = _causal_rows(tok) if kind == "causal" else _seq2seq_rows(tok)
    vocab = len(tok)
    build_teacher_cache(teacher, data, tmp_path / "c", tokenizer=tok, k=vocab, batch_size=4, shard_size=5)
    cache = CachedTeacher(tmp_path / "c")
    train = cache.attach(data, tokenizer=tok).shuffle(seed=0)
    collate = cache.collator(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    assert BATCH_KEY not in collate([data[0], data[1]])  # rows without a cache (an eval set) pass through
    batch = collate([train[i] for i in range(6)])
    rows = batch.pop(BATCH_KEY)
    labels = batch.pop("labels")
    with torch.no_grad():
        if kind == "causal":
            s_logits = student(**batch).logits[:, :-1, :vocab]
            t_logits = teacher(**batch).logits[:, :-1, :vocab]
            labels = labels[:, 1:]
        else:
            dec = student.prepare_decoder_input_ids_from_labels(labels=labels)
            s_logits = student(**batch, decoder_input_ids=dec).logits[..., :vocab]
            t_logits = teacher(**batch, decoder_input_ids=dec).logits[..., :vocab]
    dense = distillation_loss(s_logits, t_logits, labels, alpha=0.5)
    sparse = cache.loss(s_logits, rows, labels, alpha=0.5, temperature=1.0)
    assert sparse.num_tokens == dense.num_tokens > 0
    assert sparse.loss.item() == pytest.approx(dense.loss.item(), rel=2e-3)
    assert sparse.agreement == dense.agreement


def test_cli_cache_teacher(tmp_path: Path, tok) -> None:
    from hf_kd.cli import main

    teacher = tiny_gpt2(len(tok), seed=7)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    _causal_rows(tok, n=5).save_to_disk(str(tmp_path / "data"))
    argv = ["cache-teacher", "--teacher", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data")]
    assert main([*argv, "--output", str(tmp_path / "c"), "--k", "4", "--device", "cpu"]) == 0
    cache = CachedTeacher(tmp_path / "c")
    assert cache.k == 4 and len(cache.data) == 5
    cache.attach(load_from_disk(str(tmp_path / "data")), tokenizer=tok)  # same rows after a disk round trip
    assert not math.isnan(cache_size(tmp_path / "c")["bytes_per_target_token"])


def test_batch_without_targets_gives_empty_columns(tok) -> None:
    from hf_kd.teachers.cache_writer import teacher_topk

    teacher = tiny_gpt2(len(tok), seed=7).eval()
    ids = torch.tensor([[5, 6, 7]])
    out = teacher_topk(teacher, {"input_ids": ids}, torch.full((1, 2), -100), k=3, temperature=1.0, vocab=len(tok))
    assert out["topk_ids"].shape == (0, 3) and out["topk_logprobs"].shape == (0, 3)
    assert out["tail_logmass"].shape == (0,) and out["target_ids"].shape == (0,)
