"""Scaling of `hf-kd cache-teacher` and `hf-kd pseudo-label` with processes: target tokens per second of one process
against two (independent `--num-workers 2` jobs, and `torchrun --nproc_per_node 2`), one thread each.

Run alone on the machine, from the repository root::

    python benchmarks/cache_scaling.py                 # ~5.5 minutes on 2+ idle cores; writes benchmarks/results/
    python benchmarks/cache_scaling.py --scale 0.05 --rounds 1 --out /tmp/scaling   # a smoke test

Every arm is the command line a user runs, timed from launch to exit (Python start-up and model loading
included), on a fresh output folder, then run once more on its finished output (start-up, loading and verifying
alone: subtracted for the "net" figures); the arms are interleaved (1 process, 2 workers[, torchrun 2], 1 process,
...) over ``--rounds`` rounds, and the tables give the median and the spread (min .. max). Every multi-process
output is checked byte-for-byte against the one-process output of the same round (the manifest, which holds every
shard's sha256).
Target tokens: the cache's target positions; for pseudo-labels, the generated tokens (teacher outputs re-tokenised).
The goal (issue 18): two processes at least 1.8x one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORKLOAD = {
    "vocab": 32000,
    "teacher": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "cache": {"rows": 224, "tokens": 128, "k": 64, "tail_samples": 64, "batch": 8, "shards": 16},
    "labels": {"rows": 224, "source_tokens": 32, "new_tokens": 32, "batch": 8, "shards": 16},
}
ARMS = ("1 process", "2 workers", "torchrun 2")
DEFAULT_ARMS = ("1 process", "2 workers")


def _inputs(folder: Path, scale: float) -> dict[str, Any]:
    """A random-weight GPT-2 teacher with a word-level tokenizer, a tokenised and a text data set."""
    import torch
    from common import tiny_gpt2, word_tokenizer
    from datasets import Dataset

    w = WORKLOAD
    tok = word_tokenizer(w["vocab"])
    seq = max(w["cache"]["tokens"], w["labels"]["source_tokens"] + w["labels"]["new_tokens"])
    tiny_gpt2(w["vocab"], seq, seed=0, **w["teacher"]).save_pretrained(folder / "teacher")
    tok.save_pretrained(folder / "teacher")
    g = torch.Generator().manual_seed(0)
    rows = max(2, int(w["cache"]["rows"] * scale))
    ids = torch.randint(3, w["vocab"], (rows, w["cache"]["tokens"]), generator=g).tolist()
    Dataset.from_dict({"input_ids": ids}).save_to_disk(str(folder / "tokenised"))
    rows_l = max(2, int(w["labels"]["rows"] * scale))
    words = torch.randint(3, w["vocab"], (rows_l, w["labels"]["source_tokens"]), generator=g).tolist()
    Dataset.from_dict({"source": [" ".join(f"w{i}" for i in r) for r in words]}).save_to_disk(str(folder / "text"))
    return {
        "cache": {"rows": rows, "shard_size": max(1, rows // w["cache"]["shards"])},
        "labels": {"rows": rows_l, "shard_size": max(1, rows_l // w["labels"]["shards"])},
    }


def _argv(command: str, folder: Path, out: Path, sizes: dict[str, Any]) -> list[str]:
    common = ["--teacher", str(folder / "teacher"), "--output", str(out), "--device", "cpu"]
    if command == "cache":
        c = WORKLOAD["cache"]
        return ["cache-teacher", *common, "--dataset", str(folder / "tokenised"), "--k", str(c["k"]),
                "--tail-samples", str(c["tail_samples"]), "--batch-size", str(c["batch"]),
                "--shard-size", str(sizes["cache"]["shard_size"])]  # fmt: skip
    c = WORKLOAD["labels"]
    return ["pseudo-label", *common, "--dataset", str(folder / "text"), "--source-column", "source",
            "--max-new-tokens", str(c["new_tokens"]), "--batch-size", str(c["batch"]),
            "--shard-size", str(sizes["labels"]["shard_size"])]  # fmt: skip


def _run_arm(arm: str, argv: list[str]) -> float:
    """Wall seconds of one arm, launch to exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}  # fmt: skip
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    cli = [sys.executable, "-m", "hf_kd.cli"]
    if arm == "1 process":
        commands = [[*cli, *argv]]
    elif arm == "2 workers":
        commands = [[*cli, *argv, "--num-workers", "2", "--worker-index", str(i)] for i in range(2)]
    else:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "hf_kd.cli",
        ]
        commands = [[*launch, *argv]]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [p.communicate() for p in procs]
    seconds = time.perf_counter() - start
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"{arm} failed: {(stderr or stdout).strip().splitlines()[-1:]}")
    return seconds


def _target_tokens(command: str, out: Path, folder: Path) -> int:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    if command == "cache":
        from hf_kd.teachers.cache_writer import cache_size

        return int(cache_size(out)["target_tokens"])
    tok = AutoTokenizer.from_pretrained(folder / "teacher")
    texts = list(load_from_disk(str(out / "dataset"))["teacher_output"])
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (default 3).")
    parser.add_argument("--scale", type=float, default=1.0, help="Rows as a fraction of the workload (smoke tests).")
    parser.add_argument("--commands", nargs="+", default=["cache", "labels"], choices=["cache", "labels"])
    parser.add_argument(
        "--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS, help="Default: 1 process, 2 workers."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="Results folder.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cache-scaling-"))
    try:
        sizes = _inputs(work / "inputs", args.scale)
        times: dict[str, dict[str, list[float]]] = {c: {a: [] for a in args.arms} for c in args.commands}
        startup: dict[str, dict[str, list[float]]] = {c: {a: [] for a in args.arms} for c in args.commands}
        tokens: dict[str, int] = {}
        for r in range(args.rounds):
            for command in args.commands:
                manifests = {}
                for arm in args.arms:
                    out = work / f"{command}-{arm.replace(' ', '-')}-{r}"
                    seconds = _run_arm(arm, _argv(command, work / "inputs", out, sizes))
                    times[command][arm].append(seconds)
                    # The same command on the finished output: start-up, loading and verifying, no computing.
                    startup[command][arm].append(_run_arm(arm, _argv(command, work / "inputs", out, sizes)))
                    manifests[arm] = (out / "manifest.json").read_bytes()
                    tokens.setdefault(command, _target_tokens(command, out, work / "inputs"))
                    shutil.rmtree(out)
                    rest = f"{seconds:.1f} s (start-up {startup[command][arm][-1]:.1f} s)"
                    print(f"round {r + 1}/{args.rounds} {command} {arm}: {rest}", flush=True)
                if len(set(manifests.values())) != 1:
                    raise SystemExit(f"{command}: the outputs of {list(manifests)} differ; they must be identical.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"workload": WORKLOAD, "scale": args.scale, "rounds": args.rounds, "sizes": sizes, "tokens": tokens,
              "seconds": times, "startup_seconds": startup, "environment": _environment()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache_scaling.json").write_text(json.dumps(report, indent=1))
    (args.out / "cache_scaling.md").write_text(markdown(report))
    print(markdown(report))


def _environment() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# cache-teacher / pseudo-label scaling: 1 process vs 2 (one thread each)",
        "",
        f"Command: `python benchmarks/cache_scaling.py --rounds {report['rounds']} --scale {report['scale']}`; "
        f"{report['rounds']} interleaved rounds; load average before: {report['environment']['load_average_before']}."
        " End to end: launch to exit. Net: minus the same arm's run on the finished output (start-up, loading, "
        "verifying), i.e. the computing alone.",
        "",
        "| command | arm | target tokens | median s (end to end) | tokens/s end to end: median (min .. max) "
        "| speed-up | tokens/s net: median (min .. max) | speed-up net |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for command, arms in report["seconds"].items():
        n = report["tokens"][command]
        net = {
            arm: [t - s for t, s in zip(seconds, report["startup_seconds"][command][arm], strict=True)]
            for arm, seconds in arms.items()
        }
        base = statistics.median(arms["1 process"]) if "1 process" in arms else None
        base_net = statistics.median(net["1 process"]) if "1 process" in arms else None
        for arm, seconds in arms.items():
            med, med_net = statistics.median(seconds), statistics.median(net[arm])
            lines.append(
                f"| {command} | {arm} | {n} | {med:.1f} | {_rate(n, seconds)} | {_ratio(base, med)} "
                f"| {_rate(n, net[arm])} | {_ratio(base_net, med_net)} |"
            )
    return "\n".join(lines) + "\n"


def _rate(tokens: int, seconds: list[float]) -> str:
    if min(seconds) <= 0:
        return "-"
    return f"{tokens / statistics.median(seconds):.0f} ({tokens / max(seconds):.0f} .. {tokens / min(seconds):.0f})"


def _ratio(base: float | None, value: float) -> str:
    return f"{base / value:.2f}x" if base and base > 0 and value > 0 else "-"


if __name__ == "__main__":
    main()
