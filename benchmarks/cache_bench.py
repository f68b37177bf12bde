"""Cost of the offline teacher cache: bytes per target token, and training-step time from the cache.

Run from the repository root: ``python benchmarks/cache_bench.py`` (CPU). It builds a top-k cache of a tiny GPT-2
teacher over random token rows (the workload of benchmarks/run.py: GPT-2's 50257-token vocabulary, rows of 128
tokens whose first 16 are an unscored prompt), then times one optimizer step of the student three ways:

* ``ce_only``: fetch rows, collate, student forward, cross-entropy, backward, AdamW step;
* ``online_kd``: the same plus the teacher's forward and the dense forward KL of hf_kd.losses;
* ``cache_kd``: the same as ce_only but the rows carry cache columns and the loss is the k + 1 bucket forward KL
  of hf_kd.losses.topk (no teacher in memory), through the trainer's default path (hf_kd.losses.chunked with
  :class:`~hf_kd.losses.topk.TopKRows`: closed-form gradient, no slice of the logits);
  ``cache_kd_uniform`` / ``cache_kd_sampled``: the same with the uniform tail / the sampled tail (a cache with
  64 tail samples per target); ``cache_kd_reference``: the unchunked autograd reference
  (``sparse_distillation_loss`` on sliced logits), what the trainer did before.

The three variants are interleaved step by step (the CPU is shared, so load drifts) and the median is reported.
Results go to ``benchmarks/results/cache_cpu.json`` and ``cache_cpu.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import DataCollatorForSeq2Seq, GPT2LMHeadModel  # noqa: E402

from hf_kd.losses import distillation_loss  # noqa: E402
from hf_kd.losses.chunked import chunked_distillation_loss  # noqa: E402
from hf_kd.losses.topk import TopKRows  # noqa: E402
from hf_kd.teachers.cache import BATCH_KEY, CachedTeacher  # noqa: E402
from hf_kd.teachers.cache_writer import build_teacher_cache, cache_size  # noqa: E402

WORKLOAD = {
    "vocab": 50257,
    "batch": 4,
    "seq": 128,
    "prompt": 16,
    "rows": 64,
    "student": {"n_layer": 2, "n_embd": 128, "n_head": 4},
    "teacher": {"n_layer": 4, "n_embd": 256, "n_head": 4},
}


def rows(w: dict[str, Any]) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, w["vocab"], (w["rows"], w["seq"]), generator=g)
    labels = ids.clone()
    labels[:, : w["prompt"]] = -100
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def measure_size(
    teacher: GPT2LMHeadModel, tok: Any, data: Dataset, k: int, folder: Path, tail_samples: int = 0
) -> dict[str, float]:
    start = time.perf_counter()
    build_teacher_cache(
        teacher, data, folder, tokenizer=tok, k=k, batch_size=8, shard_size=32, tail_samples=tail_samples
    )
    seconds = time.perf_counter() - start
    return {**cache_size(folder), "build_s": seconds, "build_rows_per_s": len(data) / seconds}


def step_functions(
    w: dict[str, Any], data: Dataset, cache: CachedTeacher, sampled_cache: CachedTeacher, tok: Any
) -> dict[str, Any]:
    student = common.tiny_gpt2(w["vocab"], w["seq"], seed=0, **w["student"])
    teacher = common.tiny_gpt2(w["vocab"], w["seq"], seed=1, **w["teacher"]).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    cached_rows = cache.attach(data, tokenizer=tok)
    cache_collate = cache.collator(collate)
    sampled_rows = sampled_cache.attach(data, tokenizer=tok)
    sampled_collate = sampled_cache.collator(collate)
    state = {"i": 0}

    def indices() -> list[int]:
        start = state["i"] % (len(data) // w["batch"]) * w["batch"]
        state["i"] += 1
        return list(range(start, start + w["batch"]))

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def ce_only() -> None:
        batch = collate([data[i] for i in indices()])
        finish(student(**batch).loss)

    def online_kd() -> None:
        batch = collate([data[i] for i in indices()])
        labels = batch.pop("labels")[:, 1:]
        logits = student(**batch).logits[:, :-1]
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits[:, :-1]
        finish(distillation_loss(logits, teacher_logits, labels, alpha=0.5).loss)

    def from_cache(rows: Dataset, collator: Any, tail: str) -> None:
        # As DistillationTrainer does: the full logits, labels padded to their length (no slice, no copy).
        batch = collator([rows[i] for i in indices()])
        topk = TopKRows.from_batch(batch.pop(BATCH_KEY), tail)
        labels = torch.nn.functional.pad(batch.pop("labels")[:, 1:], (0, 1), value=-100)
        logits = student(**batch).logits
        finish(chunked_distillation_loss(logits, topk, labels, alpha=0.5).loss)

    def cache_kd_reference() -> None:
        batch = cache_collate([cached_rows[i] for i in indices()])
        rows_ = batch.pop(BATCH_KEY)
        labels = batch.pop("labels")[:, 1:]
        logits = student(**batch).logits[:, :-1]
        finish(cache.loss(logits, rows_, labels, alpha=0.5, temperature=1.0).loss)

    return {
        "ce_only": ce_only,
        "online_kd": online_kd,
        "cache_kd": lambda: from_cache(cached_rows, cache_collate, "bucket"),
        "cache_kd_uniform": lambda: from_cache(cached_rows, cache_collate, "uniform"),
        "cache_kd_sampled": lambda: from_cache(sampled_rows, sampled_collate, "sampled"),
        "cache_kd_reference": cache_kd_reference,
    }


def time_steps(steps: dict[str, Any], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: {"step_s_median": statistics.median(t), "step_s_all": t} for name, t in times.items()}


def markdown(result: dict[str, Any]) -> str:
    size = result["cache"]
    steps = result["steps"]
    ce = steps["ce_only"]["step_s_median"]
    lines = [
        "# Teacher cache: size and step time (CPU)",
        "",
        f"Command: `{result['command']}`. Torch {result['torch']}, {result['threads']} threads, {result['platform']}.",
        "Workload: GPT-2 vocabulary (50257, ids stored as uint16), rows of 128 tokens, 112 scored; student "
        "2x128, teacher 4x256, batch 4. Target: <= 400 bytes per target token at k = 64; a cache step <= 1.10x "
        "a CE-only step.",
        "",
        "| k (+ tail samples) | bytes / target token | cache build (rows/s) |",
        "|---|---|---|",
    ]
    for k, entry in sorted(size.items(), key=lambda item: int(item[0].split("+")[0]) + len(item[0]) / 100):
        lines.append(f"| {k} | {entry['bytes_per_target_token']:.1f} | {entry['build_rows_per_s']:.1f} |")
    lines += ["", "| variant | median step (ms) | vs CE-only |", "|---|---|---|"]
    for name, entry in steps.items():
        lines.append(f"| {name} | {entry['step_s_median'] * 1000:.1f} | {entry['step_s_median'] / ce:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 128], help="k values to measure sizes at.")
    parser.add_argument("--size-rows", type=int, default=16, help="Rows cached for the sizes at k != 64.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    w = WORKLOAD
    tok = common.word_tokenizer(w["vocab"])
    data = rows(w)
    teacher = common.tiny_gpt2(w["vocab"], w["seq"], seed=1, **w["teacher"])
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The training cache (k = 64, every row), then the other k on a few rows: bytes per token barely
        # depend on the row count (only the per-row list offsets do).
        sizes["64"] = measure_size(teacher, tok, data, 64, Path(tmp) / "train")
        sizes["64+64"] = measure_size(teacher, tok, data, 64, Path(tmp) / "sampled", tail_samples=64)
        for k in [k for k in args.ks if k != 64]:
            sizes[str(k)] = measure_size(teacher, tok, data.select(range(args.size_rows)), k, Path(tmp) / f"k{k}")
        for k, entry in sizes.items():
            print(f"k={k}: {entry['bytes_per_target_token']:.1f} bytes per target token", flush=True)
        cache, sampled = CachedTeacher(Path(tmp) / "train"), CachedTeacher(Path(tmp) / "sampled")
        steps = time_steps(step_functions(w, data, cache, sampled, tok), args.warmup, args.repeats)
    result = {
        "command": common.command_line("cache_bench.py", argv),
        "workload": w,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cache": sizes,
        "steps": steps,
        "ratios_vs_ce_only": {
            name: entry["step_s_median"] / steps["ce_only"]["step_s_median"] for name, entry in steps.items()
        },
    }
    common.write_results(Path(args.out), "cache_cpu", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
