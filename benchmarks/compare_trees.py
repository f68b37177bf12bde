"""Step time and memory of two checkouts of hf_kd, interleaved: did a change make training slower?

Run from the repository root: ``python benchmarks/compare_trees.py BEFORE_DIR AFTER_DIR`` (e.g. ``git worktree add
../before <rev>`` first). Each round runs every variant of ``benchmarks/run.py``'s training step once per tree, each
in a fresh process (``run.py --worker step``), alternating which tree goes first, so that a shared machine's load
drifts over both alike; medians over the rounds are compared. Results: ``benchmarks/results/compare_trees.json`` and
``.md`` (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["ce_only", "teacher_forward", "hf_kd", "hf_kd_chunked", "hf_kd_fused", "hand_written_kl"]


def worker(tree: Path, variant: str, steps: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, str(tree / "benchmarks" / "run.py"), "--worker", "step", "--variant", variant,
               "--device", "cpu", "--steps", str(steps), "--warmup", "2", "--threads", "1"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{tree} {variant} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per worker (median taken)")
    parser.add_argument("--name", default="compare_trees")
    args = parser.parse_args()
    for tree in (args.before, args.after):
        if not (tree / "benchmarks" / "run.py").is_file():
            print(f"compare_trees.py: {tree} holds no benchmarks/run.py; give two hf_kd checkouts", file=sys.stderr)
            return 2
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    load_before = os.getloadavg()[0]
    runs: dict[str, dict[str, list[dict]]] = {t: {v: [] for v in VARIANTS} for t in trees}
    for r in range(args.rounds):
        for variant in VARIANTS:
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                runs[name][variant].append(worker(trees[name], variant, args.steps))
                print(f"round {r + 1} {name} {variant}: {runs[name][variant][-1]['step_s_median']:.3f} s", flush=True)
    median = {t: {v: statistics.median(x["step_s_median"] for x in runs[t][v]) for v in VARIANTS} for t in trees}
    memory = {t: {v: statistics.median(x["peak_extra_bytes"] for x in runs[t][v]) / 2**20 for v in VARIANTS}
              for t in trees}  # fmt: skip
    before, after = median["before"], median["after"]
    rows = [f"| {v} | {before[v]:.3f} | {after[v]:.3f} | {after[v] / before[v]:.3f}"
            f" | {memory['before'][v]:.0f} | {memory['after'][v]:.0f} |" for v in VARIANTS]  # fmt: skip

    def overhead(t: str, v: str) -> float:
        return median[t][v] / (median[t]["ce_only"] + median[t]["teacher_forward"])

    ratios = [f"| {v} / (ce_only + teacher_forward) | {overhead('before', v):.3f} | {overhead('after', v):.3f} |"
              for v in ("hf_kd", "hf_kd_chunked", "hf_kd_fused")]  # fmt: skip
    text = "\n".join([
        f"# Step time before and after: {trees['before']} vs {trees['after']}", "",
        f"Command: `python benchmarks/compare_trees.py {args.before} {args.after} --rounds {args.rounds}`; the "
        f"workload of `benchmarks/run.py` (CPU, 1 thread); medians over {args.rounds} interleaved rounds of the "
        f"per-worker medians of {args.steps} steps; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after.", "",
        "| variant | before s | after s | after / before | before MiB | after MiB |", "|---|---:|---:|---:|---:|---:|",
        *rows, "", "| ratio | before | after |", "|---|---:|---:|", *ratios, "",
    ])  # fmt: skip
    out = ROOT / "benchmarks" / "results"
    (out / f"{args.name}.json").write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "runs": runs},
                                                      indent=1))  # fmt: skip
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
