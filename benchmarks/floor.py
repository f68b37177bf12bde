"""Is a default distillation step at the floor? Step times of the loss paths against a CE step plus a teacher forward.

The floor is what any distillation step costs: the student's fine-tuning step (its own cross-entropy, forward and
backward) plus one teacher forward. The goal for hf_kd's default step is at most 1.05x the floor. Single runs
cannot tell 1.04x from 1.28x on a machine whose speed drifts, so the arms are interleaved: each arm lives in its
own process (models built and warmed up once), and every round runs each arm in turn, in an order that rotates
from round to round; ratios are taken within a round, then summarised over rounds (median, min..max).

Arms, on run.py's step workload (GPT-2 student 2 x 128 and teacher 4 x 256 built from configs, vocabulary 50,257,
batch 4 x 128 with 16 prompt tokens per row; ``Trainer.training_step``, the optimizer step left out):

- ``ce_only``: ``transformers.Trainer`` fine-tuning the student; ``teacher_forward``: the teacher's forward pass
  under ``inference_mode``. Their sum, within a round, is the floor.
- ``default``: ``DistillationTrainer`` with every loss setting at its default (alpha 0.5, forward KL, T 1).
- ``chunked``: the same with ``fuse_output_layer=False``; ``fused``: with ``fuse_output_layer=True``.
- ``trl_gkd``: TRL's ``GKDTrainer`` (``lmbda=0, beta=0``: forward KL, no CE term), when TRL is installed.

Run it alone on the machine (every other job slows the arms unevenly)::

    python benchmarks/floor.py                 # CPU, 1 thread: benchmarks/results/floor_cpu.{json,md}, ~4-6 min
    python benchmarks/floor.py --device cuda   # bf16 on a CUDA device: floor_cuda.*
    python benchmarks/floor.py --smoke         # tiny sizes, 2 rounds, into a temporary folder: checks it runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import run  # noqa: E402  (the step workload, its models, batch, trainers and memory meter)

ARMS = ("ce_only", "teacher_forward", "default", "chunked", "fused", "trl_gkd")
FLOOR = ("ce_only", "teacher_forward")
HF_KD_FIELDS: dict[str, dict[str, Any]] = {"default": {}, "chunked": {"fuse_output_layer": False},
                                           "fused": {"fuse_output_layer": True}}  # fmt: skip
GOAL = 1.05


# ---- the worker: one arm, built once, timed on request ---------------------------------------------------------


def build_step(arm: str, device: str) -> tuple[Any, dict[str, Any]]:
    """The step function of ``arm`` on run.py's workload, and what it resolved to (the path the default took)."""
    student, teacher, tokenizer, batch = run._step_workload(device)
    info: dict[str, Any] = {}
    if arm == "teacher_forward":
        return run._teacher_forward(teacher, batch, device), info
    if arm in HF_KD_FIELDS:
        from hf_kd import DistillationConfig, DistillationTrainer

        args = run._training_args(DistillationConfig, device, **HF_KD_FIELDS[arm])
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
        trainer.current_gradient_accumulation_steps = 1
        trainer.create_optimizer()
        s = trainer.loss_settings
        info = {"fused": s.fuse_output_layer, "loss_chunk_size": s.chunk_size, "loss_chunk_mib": s.chunk_mib}
    else:
        trainer = run._make_trainer(arm, student, teacher, tokenizer, device)  # ce_only, trl_gkd: run.py's variants
    return run._training_step(trainer, batch), info


def serve(arm: str, device: str, warmup: int) -> None:
    """Build ``arm``, warm it up, say READY; then time ``RUN n`` requests from stdin until ``QUIT``."""
    try:
        step, info = build_step(arm, device)
    except run.SkipVariant as e:
        print("READY " + json.dumps({"skipped": str(e)}), flush=True)
        return
    meter = run.Meter(device)
    for _ in range(warmup):
        step()
    meter.sync()
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if not line.startswith("RUN "):
            return
        base = meter.reset()
        times = []
        for _ in range(int(line.split()[1])):
            start = time.perf_counter()
            step()
            meter.sync()
            times.append(time.perf_counter() - start)
        peak = meter.peak()
        print("RESULT " + json.dumps({"times": times, "peak_extra_bytes": peak - base}), flush=True)


# ---- the orchestrator ------------------------------------------------------------------------------------------


class Arm:
    """A worker process holding one arm."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")  # the worker's stderr, shown if it fails
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, __file__, "--worker", name, "--device", args.device, "--threads", str(args.threads)]
        cmd += ["--warmup", str(args.warmup)] + (["--smoke"] if args.smoke else [])
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )

    def read(self, tag: str) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])
        self.log.seek(0)
        tail = self.log.read().strip().splitlines()[-1:] or [f"exit status {self.proc.wait()}"]
        return {"error": tail[0]}

    def run(self, steps: int) -> dict[str, Any]:
        try:
            self.proc.stdin.write(f"RUN {steps}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died: read() reports its last words
        return self.read("RESULT")

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()  # the worker's signal to end
        self.proc.wait(timeout=60)


def measure(args: argparse.Namespace, arms: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start every arm (set-up and warm-up side by side: nothing is timed yet), then run the rounds."""
    started = {name: Arm(name, args) for name in arms}
    workers, info = {}, {}
    for name, worker in started.items():
        info[name] = worker.read("READY")
        print(f"{name}: {info[name] or 'ready'}", flush=True)
        if "skipped" in info[name] or "error" in info[name]:
            worker.close()
        else:
            workers[name] = worker
    rounds = []
    try:
        for r in range(args.rounds):
            names = list(workers)
            order = names[r % len(names) :] + names[: r % len(names)]  # no arm always first or last
            results = {name: workers[name].run(args.steps) for name in order}
            for name in [n for n, res in results.items() if "error" in res]:
                workers.pop(name).close()  # its rounds so far stay; no ratio is made of an error
            rounds.append({"order": order, "arms": results})
            print(f"round {r + 1}: " + ", ".join(f"{n} {_median(res):.3f}s" for n, res in results.items()), flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    return info, rounds


def _median(result: dict[str, Any]) -> float:
    return statistics.median(result["times"]) if "times" in result else float("nan")


def summarize(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: its step time (median over rounds of each round's median) and its ratio to the same round's floor."""
    arms = {name for r in rounds for name in r["arms"]}
    summary = {}
    for name in sorted(arms, key=ARMS.index):
        times = [_median(r["arms"][name]) for r in rounds if "times" in r["arms"].get(name, {})]
        peaks = [r["arms"][name]["peak_extra_bytes"] for r in rounds if "times" in r["arms"].get(name, {})]
        entry: dict[str, Any] = {"step_s": _spread(times), "peak_extra_bytes": max(peaks) if peaks else None}
        ratios = [
            _median(r["arms"][name]) / sum(_median(r["arms"][f]) for f in FLOOR)
            for r in rounds
            if all("times" in r["arms"].get(a, {}) for a in (name, *FLOOR))
        ]
        if ratios:
            entry["ratio_to_floor"] = _spread(ratios)
        summary[name] = entry
    floors = [
        sum(_median(r["arms"][f]) for f in FLOOR) for r in rounds if all("times" in r["arms"].get(f, {}) for f in FLOOR)
    ]
    if floors:
        summary["floor"] = {"step_s": _spread(floors)}
    return summary


def _spread(values: list[float]) -> dict[str, Any]:
    return (
        {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values} if values else {}
    )


# ---- outputs ---------------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    env, w, summary, info = report["environment"], report["workload"], report["summary"], report["arms"]
    default = info.get("default", {})
    path = "fused" if default.get("fused") else "chunked" if default.get("fused") is False else "?"
    lines = [
        f"# Distillation step against the floor: {env['device']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env.get('gpu', 'no GPU')}; {env['threads']} torch "
        f"thread(s); load average before/after: {env['load_average_before'][0]:.2f} / "
        f"{env['load_average_after'][0]:.2f}; wall time {report['wall_s'] / 60:.1f} min  ",
        f"Software: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}"
        + (f", TRL {env['trl']}" if "trl" in env else ", TRL not installed")
        + "  ",
        f"Workload: GPT-2 student {run._size(w['student'])}, teacher {run._size(w['teacher'])}, vocabulary "
        f"{w['vocab']:,}, batch {w['batch']} x {w['seq']} tokens ({w['prompt']} prompt tokens per row); "
        f"{report['rounds']} rounds, each arm in turn (order rotating), {report['steps']} timed steps per arm per "
        f"round (their median), {report['warmup']} warm-up steps per arm  ",
        *(
            ["Times: the machine was not idle (load average above the thread count); not results  "]
            if max(env["load_average_before"][0], env["load_average_after"][0]) > 1.5 * env["threads"]
            else []
        ),
        f"The default resolved to the {path} path (loss_chunk_size {default.get('loss_chunk_size')}, "
        f"loss_chunk_mib {default.get('loss_chunk_mib')})",
        "",
        "| arm | step s, median | min..max | / floor, median | min..max | peak MiB above step start |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in (*ARMS, "floor"):
        if name not in summary:
            why = info.get(name, {}).get("skipped") or info.get(name, {}).get("error")
            if why:
                lines.append(f"| {name} | {why} | | | | |")
            continue
        e = summary[name]
        t, ratio, peak = e["step_s"], e.get("ratio_to_floor"), e.get("peak_extra_bytes")
        cells = [f"{t['median']:.3f}", f"{t['min']:.3f}..{t['max']:.3f}"]
        cells += [f"**{ratio['median']:.3f}**", f"{ratio['min']:.3f}..{ratio['max']:.3f}"] if ratio else ["", ""]
        cells.append(f"{peak / 2**20:,.0f}" if peak is not None else "")
        label = "floor (ce_only + teacher_forward, per round)" if name == "floor" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ratio = summary.get("default", {}).get("ratio_to_floor")
    if ratio:
        met = "met" if ratio["max"] <= GOAL else "met by the median" if ratio["median"] <= GOAL else "not met"
        lines += ["", f"Goal, default step <= {GOAL}x the floor: **{met}** (median {ratio['median']:.3f}, "
                  f"rounds {ratio['min']:.3f}..{ratio['max']:.3f})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed, so runs compare)")
    parser.add_argument("--rounds", type=int, help="rounds of every arm in turn (default 7; 2 with --smoke)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm per round (their median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm before the first round")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--out", help="output folder (default benchmarks/results; a temporary folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs (not results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    arms = [a for a in ARMS if a in args.arms.split(",")]
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown or args.threads < 1 or args.steps < 1 or (args.rounds is not None and args.rounds < 1):
        parser.error(f"--arms from {','.join(ARMS)} (unknown: {sorted(unknown)}); --threads, --steps, --rounds >= 1")
    if args.smoke:
        run.STEP_WORKLOAD.update(vocab=1000, batch=2, seq=32, prompt=4, chunk_size=16)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        serve(args.worker, args.device, args.warmup)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; run on a GPU machine or use --device cpu")
    args.rounds = args.rounds or (2 if args.smoke else 7)
    out = common.results_folder(args.out, args.smoke, "floor_")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": common.command_line("floor.py"),
        "environment": run._environment(args.device, args.threads),
        "workload": run.STEP_WORKLOAD,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    report["arms"], report["per_round"] = measure(args, arms)
    report["environment"]["load_average_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    report["summary"] = summarize(report["per_round"])
    path = common.write_results(out, f"floor_{args.device}", report, markdown(report))
    print(markdown(report))
    print(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
