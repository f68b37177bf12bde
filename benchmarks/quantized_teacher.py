"""A quantized teacher against the full one, on the quickstart's ``denoise`` task (CPU): how close its token
distributions are, what building a cache from it costs, and how a student trained from each cache scores.

Run from the repository root, alone on the machine for the times:
``nice python benchmarks/quantized_teacher.py [--cache-dir DIR]`` (the quickstart's data and BART 3+3 x 192
teacher, trained there first when absent, as benchmarks/seq2seq_quality.py does). ``--smoke``: tiny sizes, to
check the script runs (its figures mean nothing).

* fidelity, over every target token of the test split: forward KL(full || quantized) of the next-token
  distributions (nats per token), top-k overlap |top-k(full) & top-k(quantized)| / k for k = 1, 8, 64, and each
  teacher's own test perplexity and ROUGE-L;
* cost: building the k = 64 cache of the training split in this process (seconds, target tokens per second), and
  ``hf-kd cache-teacher`` doing the same in its own process (wall seconds with start-up and loading, and peak
  resident memory, the process's VmHWM), plus the teacher's weight bytes in memory (exact);
* students: the quickstart's T5 2+2 x 64 student from scratch, forward KL (alpha 0, T 1) from each cache, one seed,
  the same initialisation and data order: test ROUGE-L and perplexity.

Quantization: ``--quantization int8-weight-only`` (torchao's Int8WeightOnlyConfig through Transformers'
TorchAoConfig: every linear layer but the output layer). Results: benchmarks/results/quantized_teacher.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import torch  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402
from hf_kd import quickstart as qs  # noqa: E402
from hf_kd.losses import IGNORE_INDEX  # noqa: E402
from hf_kd.metrics import perplexity  # noqa: E402
from hf_kd.teachers.cache_writer import build_teacher_cache, cache_size  # noqa: E402
from hf_kd.teachers.loading import load_teacher  # noqa: E402
from hf_kd.teachers.placement import state_tensors  # noqa: E402

QUANTIZATION = "int8-weight-only"
TOP_K = (1, 8, 64)
CACHE_K = 64
STUDENT_STEPS, STUDENT_LR = 300, 3e-3  # benchmarks/seq2seq_quality.py's scratch rows


def load(teacher_dir: str, quantization: str | None) -> Any:
    kwargs = {"quantization_config": quantization} if quantization else {}
    return load_teacher(teacher_dir, SimpleNamespace(teacher_model_init_kwargs=kwargs))[0].eval()


def weight_bytes(model: Any) -> int:
    """Bytes of every weight and buffer as held in memory (a quantized tensor: its int8 data and scales)."""
    return sum(t.numel() * t.element_size() for _, t in state_tensors(model))


@torch.no_grad()
def fidelity(full: Any, quantized: Any, test: Any, tokenizer: Any, batch_size: int = 64) -> dict[str, float]:
    """Forward KL(full || quantized) and top-k overlaps, averaged over the target tokens of ``test``."""
    collate = qs.collator(tokenizer)
    kl, overlaps, tokens = 0.0, dict.fromkeys(TOP_K, 0.0), 0
    for start in range(0, len(test), batch_size):
        batch = collate([test[i] for i in range(start, min(start + batch_size, len(test)))])
        mask = batch["labels"].ne(IGNORE_INDEX)
        p = torch.log_softmax(full(**batch).logits[mask].double(), -1)
        q = torch.log_softmax(quantized(**batch).logits[mask].double(), -1)
        kl += float((p.exp() * (p - q)).sum())
        for k in TOP_K:
            a, b = p.topk(k, -1).indices, q.topk(k, -1).indices
            overlaps[k] += float((a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum()) / k
        tokens += int(mask.sum())
    return {
        "forward_kl_nats": kl / tokens,
        **{f"top{k}_overlap": v / tokens for k, v in overlaps.items()},
        "tokens": tokens,
    }


def teacher_scores(model: Any, tokenizer: Any, test: Any, references: list[str], settings: Any) -> dict[str, float]:
    predictions = qs.greedy_outputs(model, tokenizer, test, settings)
    return {
        "rougeL": qs.rouge_l(predictions, references[: len(predictions)]),
        "perplexity": perplexity(model, test, batch_size=32, data_collator=qs.collator(tokenizer)),
    }


def timed_cache(model: Any, train: Any, tokenizer: Any, work: Path) -> dict[str, float]:
    """Seconds and target tokens per second of building the cache in this process (no start-up or loading)."""
    folder = work / "timed_cache"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    build_teacher_cache(model, train, folder, tokenizer=tokenizer, k=CACHE_K, batch_size=64)
    seconds = time.perf_counter() - start
    tokens = cache_size(folder)["target_tokens"]
    shutil.rmtree(folder)
    return {"cache_seconds": seconds, "cache_target_tokens_per_second": tokens / seconds}


# Runs `hf-kd ARGS...` and then prints the process's peak RSS. Its own VmHWM, not wait4's ru_maxrss: Linux keeps
# ru_maxrss across execve, so a child forked from this (large) process would report this process's size.
CLI_WITH_PEAK = (
    "import sys\nfrom hf_kd.cli import main\ncode = main(sys.argv[1:])\n"
    "peak = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
    "print(f'VmHWM_KiB={peak}')\nsys.exit(code)"
)


def build_cache(teacher_dir: str, train_dir: Path, output: Path, quantization: str | None) -> dict[str, Any]:
    """``hf-kd cache-teacher`` in its own process: its wall seconds (start-up and loading included), peak RSS and
    the cache's size."""
    command = [sys.executable, "-c", CLI_WITH_PEAK, "cache-teacher", "--teacher", teacher_dir, "--dataset"]
    command += [str(train_dir), "--output", str(output), "--k", str(CACHE_K), "--batch-size", "64", "--device", "cpu"]
    command += ["--quantization", quantization] if quantization else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"hf-kd {' '.join(command[3:])} failed:\n{result.stderr[-3000:]}")
    peak = int(result.stdout.rsplit("VmHWM_KiB=", 1)[1].split()[0])
    return {
        "command": " ".join(["hf-kd", *command[3:]]),
        "seconds": seconds,
        "peak_rss_mib": peak / 1024,
        **cache_size(output),
    }


def train_student(cache: Path, train: Any, tokenizer: Any, settings: Any, work: Path, steps: int) -> Any:
    student = qs.build_model(tokenizer, settings.student_layers, settings.student_width, settings, settings.seed, "t5")
    kd = {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.0}
    args = common.training_args(work / f"student_{cache.name}", settings, steps, STUDENT_LR, logs=4, **kd)
    trainer = DistillationTrainer(
        model=student,
        teacher_cache=str(cache),
        args=args,
        train_dataset=train,
        data_collator=qs.collator(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    return student.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="Data and quickstart-teacher cache (default: hf_kd's).")
    parser.add_argument("--work-dir", default="/tmp/hf_kd_quantized_teacher")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes: checks the script, not the figures.")
    args = parser.parse_args(argv)
    from hf_kd.data import default_cache_dir

    torch.set_num_threads(1)
    settings = qs.Settings.for_task("denoise", **(qs.SMOKE if args.smoke else {}))
    steps = settings.student_steps if args.smoke else STUDENT_STEPS
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    work = Path(args.work_dir) / ("smoke" if args.smoke else "full")
    work.mkdir(parents=True, exist_ok=True)
    data = qs.load_data(settings, cache_dir)
    tokenizer, teacher, _, _ = qs.train_teacher(settings, data, cache_dir)
    teacher_dir = str(teacher.name_or_path)
    del teacher
    train = qs.featurize("denoise", data["train"], tokenizer, settings)
    test = qs.featurize("denoise", data["test"], tokenizer, settings)
    references = list(data["test"]["target"])
    train_dir = work / "train"
    if not train_dir.exists():
        train.save_to_disk(str(train_dir))

    report: dict[str, Any] = {
        "command": common.command_line("quantized_teacher.py", argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads 1",
        "quantization": QUANTIZATION,
        "teacher": teacher_dir,
        "train_rows": len(train),
        "test_rows": len(test),
        "student_steps": steps,
    }
    full, quantized = load(teacher_dir, None), load(teacher_dir, QUANTIZATION)
    config = full.config
    report["teacher_shape"] = f"BART {config.encoder_layers}+{config.decoder_layers} x {config.d_model}"
    report["fidelity"] = fidelity(full, quantized, test, tokenizer)
    report["teachers"] = {}
    for name, model in (("full", full), ("int8", quantized)):
        report["teachers"][name] = {"weight_bytes": weight_bytes(model), **timed_cache(model, train, tokenizer, work)}
        report["teachers"][name].update(teacher_scores(model, tokenizer, test, references, settings))
    del full, quantized
    print(json.dumps(report, indent=1), flush=True)

    report["caches"], report["students"] = {}, {}
    for name, quantization in (("full", None), ("int8", QUANTIZATION)):
        folder = work / f"cache_{name}"
        shutil.rmtree(folder, ignore_errors=True)  # this script's own folder: a resumed cache would time nothing
        report["caches"][name] = build_cache(teacher_dir, train_dir, folder, quantization)
        print(json.dumps({name: report["caches"][name]}), flush=True)
    for name in ("full", "int8"):
        start = time.perf_counter()
        student = train_student(work / f"cache_{name}", train, tokenizer, settings, work, steps)
        scores = teacher_scores(student, tokenizer, test, references, settings)
        report["students"][name] = {**scores, "seconds": time.perf_counter() - start}
        print(json.dumps({name: report["students"][name]}), flush=True)

    stem = "quantized_teacher_smoke" if args.smoke else "quantized_teacher"
    common.write_results(Path(args.out), stem, report, markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    fid, teachers, caches, students = (report[key] for key in ("fidelity", "teachers", "caches", "students"))
    lines = [
        f"# Quantized teacher ({report['quantization']}) against the full teacher",
        "",
        f"`{report['command']}` on {report['machine']}. Teacher: the quickstart's denoise {report['teacher_shape']} "
        f"({report['teacher']}); {report['train_rows']} training rows, {report['test_rows']} test rows.",
        "",
        f"## Fidelity ({fid['tokens']} test target tokens)",
        "",
        "| forward KL(full \\|\\| int8), nats/token | " + " | ".join(f"top-{k} overlap" for k in TOP_K) + " |",
        "|---:|" + "---:|" * len(TOP_K),
        f"| {fid['forward_kl_nats']:.2e} | " + " | ".join(f"{fid[f'top{k}_overlap']:.4f}" for k in TOP_K) + " |",
        "",
        "## Teachers and their caches (k = 64)",
        "",
        "Times are wall-clock seconds on this machine: compare the two arms within one run, alone on the machine.",
        "",
        "Cache seconds and target tokens/s: building the cache in one process, the teacher loaded. Command seconds "
        "and peak RSS: the whole `hf-kd cache-teacher` process (Python start-up, imports and loading included).",
        "",
        "| teacher | weight bytes | test ROUGE-L | test perplexity | cache seconds | target tokens/s | command seconds "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("full", "int8"):
        t, c = teachers[name], caches[name]
        lines.append(
            f"| {name} | {t['weight_bytes']:,} | {t['rougeL']:.2f} | {t['perplexity']:.3f} | {t['cache_seconds']:.1f} "
            f"| {t['cache_target_tokens_per_second']:.0f} | {c['seconds']:.1f} | {c['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        f"## Students from each cache (T5 2+2 x 64, forward KL, {report['student_steps']} steps, one seed)",
        "",
        "| cache | test ROUGE-L | test perplexity | seconds |",
        "|---|---:|---:|---:|",
    ]
    for name in ("full", "int8"):
        s = students[name]
        lines.append(f"| {name} | {s['rougeL']:.2f} | {s['perplexity']:.3f} | {s['seconds']:.0f} |")
    lines += ["", "Cache commands:", ""] + [f"- `{caches[name]['command']}`" for name in ("full", "int8")]
    if report.get("caches_note"):
        lines += ["", f"Note: {report['caches_note']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
