"""Chunks sized by a memory budget (``chunk_mib`` / ``loss_chunk_mib``): the same loss and gradients as the
unchunked reference at any number of rows per chunk, and working memory that stays flat in the vocabulary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sparse_chunked import cache_rows

from hf_kd.losses import IGNORE_INDEX, LossSettings, chunked, distillation_loss
from hf_kd.losses.base import CHUNK_ARRAYS, chunk_rows
from hf_kd.losses.chunked import OutputLayer, chunked_distillation_loss, fused_distillation_loss
from hf_kd.losses.topk import TopKRows, sparse_distillation_loss

VOCAB = 37


def budget_for(rows: int, vocab: int = VOCAB) -> float:
    """The chunk_mib at which chunk_rows gives exactly ``rows`` rows."""
    return rows * CHUNK_ARRAYS * 4 * vocab / 2**20


def test_chunk_rows_keep_the_chunk_within_the_budget() -> None:
    assert chunk_rows(1024, 512, 32000) == 1024  # small vocabularies keep loss_chunk_size
    assert chunk_rows(1024, 512, 50257) == 667
    assert chunk_rows(1024, 512, 262144) == 128
    assert chunk_rows(1024, None, 10**7) == 1024  # no budget
    assert chunk_rows(1024, 1e-9, 10) == 1  # never an empty chunk
    for vocab in (32000, 50257, 128000, 151936, 256000):
        rows = chunk_rows(1024, 512, vocab)
        assert CHUNK_ARRAYS * 4 * vocab * rows <= 512 * 2**20 < CHUNK_ARRAYS * 4 * vocab * (rows + 1) or rows == 1024


def _batch(seed: int = 0, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, vocab, generator=g) * 3
    teacher = torch.randn(3, 7, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, 4:] = IGNORE_INDEX  # padding
    return logits, teacher, labels  # 14 target tokens


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= max(rtol * expected.abs().max().item(), 1e-9), (err, expected.abs().max().item())


@pytest.fixture
def chunk_sizes(monkeypatch) -> list[int]:
    """The rows per chunk the engine was asked for, call by call."""
    sizes: list[int] = []
    real = chunked._chunks

    def spy(rows: torch.Tensor, size: int):
        sizes.append(size)
        return real(rows, size)

    monkeypatch.setattr(chunked, "_chunks", spy)
    return sizes


@pytest.mark.parametrize("rows", [1, 3, 4, 14])  # 14 target tokens: 3 and 4 leave a shorter last chunk
@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_budget_sized_chunks_equal_the_reference(rows: int, loss: str, chunk_sizes: list[int]) -> None:
    logits, teacher, labels = _batch()
    kwargs = dict(loss=loss, temperature=2.0, alpha=0.4, num_items_in_batch=17)
    x = logits.clone().requires_grad_(True)
    ref = distillation_loss(x, teacher, labels, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref.loss, x)
    # loss_chunk_size alone would put all 14 targets in one chunk: the budget decides
    out = chunked_distillation_loss(x, teacher, labels, chunk_size=1024, chunk_mib=budget_for(rows), **kwargs)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert chunk_sizes == [rows]
    close(out.loss, ref.loss)
    close(out.kd_sum, ref.kd_sum)
    close(out.ce_sum, ref.ce_sum)
    close(grad, ref_grad)
    assert out.agreement.item() == ref.agreement.item()


@pytest.mark.parametrize("rows", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_budget_sized_fused_chunks_equal_the_reference(rows: int, dtype: torch.dtype, chunk_sizes: list[int]) -> None:
    """A 40-wide output layer with a bias, 37 vocabulary columns; the weight and bias gradients are accumulated in
    place (float32) or in a float32 sum cast at the end (bfloat16)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 16, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(40, 16, generator=g) * 0.5).to(dtype).requires_grad_(True)
    bias = torch.randn(1, 40, generator=g).to(dtype).requires_grad_(True)  # BART's final_logits_bias shape
    _, teacher, labels = _batch(seed=1)
    kwargs = dict(loss="forward_kl", alpha=0.5, num_items_in_batch=11)
    leaves = [t.detach().float().requires_grad_(True) for t in (hidden, weight, bias)]
    ref = distillation_loss((torch.nn.functional.linear(leaves[0], leaves[1]) + leaves[2])[..., :VOCAB], teacher,
                            labels, **kwargs)  # fmt: skip
    ref_grads = torch.autograd.grad(ref.loss, leaves)
    layer = OutputLayer(weight=weight, bias=bias)
    out = fused_distillation_loss(hidden, layer, teacher, labels, vocab_size=VOCAB, chunk_size=1024,
                                  chunk_mib=budget_for(rows), **kwargs)  # fmt: skip
    grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
    assert chunk_sizes == [rows]
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    close(out.loss, ref.loss, rtol)
    for grad, param, ref_grad in zip(grads, (hidden, weight, bias), ref_grads, strict=True):
        assert grad.dtype == dtype and grad.shape == param.shape
        close(grad.float(), ref_grad, rtol)
    assert torch.count_nonzero(grads[1][VOCAB:]) == 0 and torch.count_nonzero(grads[2][:, VOCAB:]) == 0


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("tail", ["bucket", "sampled"])
def test_budget_sized_chunks_of_cache_rows_equal_the_reference(rows: int, tail: str, chunk_sizes: list[int]) -> None:
    logits, teacher, labels = _batch(seed=2)
    cache = cache_rows(teacher[labels.ne(IGNORE_INDEX)], k=5, temperature=1.0, m=4 if tail == "sampled" else 0)
    x = logits.clone().requires_grad_(True)
    ref = sparse_distillation_loss(x, cache, labels, tail_treatment=tail, alpha=0.3)
    (ref_grad,) = torch.autograd.grad(ref.loss, x)
    cached = TopKRows.from_batch(cache, tail)
    out = chunked_distillation_loss(x, cached, labels, chunk_size=1024, chunk_mib=budget_for(rows), alpha=0.3)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert chunk_sizes == [rows]
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_config_budget_reaches_the_loss_settings(tmp_path) -> None:
    from helpers import config

    assert LossSettings.from_config(config(tmp_path)).chunk_mib == 512
    assert LossSettings.from_config(config(tmp_path, loss_chunk_mib=None)).chunk_mib is None
    assert LossSettings.from_config(config(tmp_path, loss_chunk_mib=0.5)).chunk_mib == 0.5
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="loss_chunk_mib"):
            config(tmp_path, loss_chunk_mib=bad)


# The working memory of the loss (peak resident set above its inputs, less the inputs' gradients) for each path and
# vocabulary, measured in one fresh process whose allocator returns freed tensors to the OS at once (as
# benchmarks/loss_scaling.py does), so that the resident set follows the live tensors.
_MEASURE = """
import json, sys, torch
from hf_kd.losses import OutputLayer, chunked_distillation_loss, fused_distillation_loss
n, h, mib = 512, 64, float(sys.argv[1])

def memory(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

def working(path, vocab):
    torch.manual_seed(0)
    teacher, labels = torch.randn(n, vocab), torch.randint(0, vocab, (n,))
    if path == "fused":
        params = [torch.randn(n, h).requires_grad_(True), (torch.randn(vocab, h) * h**-0.5).requires_grad_(True)]
        run = lambda: fused_distillation_loss(params[0], OutputLayer(params[1]), teacher, labels, chunk_mib=mib)
    else:
        params = [torch.randn(n, vocab).requires_grad_(True)]
        run = lambda: chunked_distillation_loss(params[0], teacher, labels, chunk_mib=mib)
    run().loss.backward()
    for p in params:
        p.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set (VmHWM) starts again from the current one
    base = memory("VmRSS:")
    run().loss.backward()
    return memory("VmHWM:") - base - sum(p.grad.numel() * 4 for p in params)

print(json.dumps({f"{path}/{vocab}": working(path, vocab) for path in ("chunked", "fused") for vocab in (4000, 32000)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_working_memory_is_flat_in_the_vocabulary() -> None:
    """512 tokens with a 31.25 MiB budget: 512 rows a chunk at V = 4,000, 64 at V = 32,000. Without the budget the
    chunk's float32 arrays grow 8-fold with the vocabulary; with it the working memory stays within 1.2x."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-c", _MEASURE, "31.25"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    working = json.loads(done.stdout.strip().splitlines()[-1])
    for path in ("chunked", "fused"):
        small, large = working[f"{path}/4000"], working[f"{path}/32000"]
        assert small > 10 * 2**20, (path, small)  # the chunk's arrays were measured at all (about 20-31 MiB)
        assert large <= 1.2 * small, (path, large / 2**20, small / 2**20)
