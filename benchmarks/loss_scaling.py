"""How the distillation loss's peak memory and step time grow with the vocabulary and the number of target tokens.

Three loss paths of hf_kd, forward + backward of the loss alone (default settings: forward KL, alpha 0.5, T 1):

- ``reference``: ``distillation_loss`` on student logits ``[N, V]``, autograd over the whole float32 ``[N, V]``;
- ``chunked``: ``chunked_distillation_loss`` on the same logits, at most 1,024 target tokens a chunk and as many as
  fit its memory budget (``chunk_mib``, hf_kd's default 512 MiB), gradient formed in the forward pass;
- ``fused``: ``fused_distillation_loss`` on hidden states ``[N, H]`` and an output-layer weight ``[V, H]``
  (H = 256): the student's logits never exist beyond one chunk; chunks sized as for ``chunked``.

Besides the peak above the inputs, the tables give the loss's *working memory*: that peak less the gradients of
the inputs, which any loss must return (the ``[N, V]`` logits' on the chunked path, the hidden states' and the
output weight's on the fused path), and its ratio to the smallest vocabulary measured.

The teacher is an input of all three, as its target rows ``[N, V]``. Inputs are float32 on CPU and bfloat16 with
``--device cuda`` (the loss computes in float32 either way). Every (path, V, N) point runs in a fresh subprocess,
as ``run.py`` does; a point whose predicted peak (inputs + loss, see ``predict_bytes``) exceeds ``--max-gib`` is
not run and is recorded as skipped. Run from the repository root::

    python benchmarks/loss_scaling.py                 # CPU: benchmarks/results/loss_scaling_cpu.{json,md,png}
    python benchmarks/loss_scaling.py --device cuda   # bf16 inputs, CUDA allocator peak: loss_scaling_cuda.*
    python benchmarks/loss_scaling.py --smoke         # tiny sizes into a temporary folder (or --out), < 30 s
    python benchmarks/loss_scaling.py --chunk-mib 0   # no memory budget: 1,024-token chunks at every vocabulary

See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
from run import Meter as RunMeter  # noqa: E402  (the step benchmark's memory meter: VmHWM, or CUDA's peak)
from run import _environment as run_environment  # noqa: E402

PATHS = ("reference", "chunked", "fused")
WORKLOAD: dict[str, Any] = {
    "vocabs": [32000, 128000, 256000], "tokens": [4096, 16384], "hidden": 256, "chunk": 1024, "chunk_mib": 512.0,
}  # fmt: skip
# A budget small enough to shrink the smoke test's chunks too (16 rows at V 512, 8 at 2048).
SMOKE_WORKLOAD: dict[str, Any] = {
    "vocabs": [512, 2048], "tokens": [64, 256], "hidden": 32, "chunk": 16, "chunk_mib": 0.25,
}  # fmt: skip
# The correctness check before any timing: small, but several chunks and a vocabulary that is not a power of 2.
CHECK = {"vocab": 1000, "tokens": 300, "hidden": 64, "chunk": 128}
GIB = 2**30
VERIFY = "verify"  # the worker key of the check

# Peak memory above the inputs, in float32 arrays of V columns (measured on CPU at V = 32,000, N = 1,024 and 4,096):
# the reference holds 8 [N, V] arrays at its peak (copies of the target rows, two log-softmaxes, the clamp, exp(p),
# p - q, the gradient); chunked holds the [N, V] gradient buffer of its logits plus 2 [rows, V] arrays; fused
# holds 4 [rows, V] arrays (the chunk's logits are one) and its weight gradient, nothing of size N x V.
REFERENCE_ARRAYS = 8
CHUNKED_CHUNK_ARRAYS = 2
FUSED_CHUNK_ARRAYS = 4
BUDGET_ARRAYS = 4  # what hf_kd.losses.base.chunk_rows sizes a chunk by (its CHUNK_ARRAYS), for the predictions here
MARGIN = 1.15  # predictions are rounded up by this much, and a point must also fit in MemAvailable


def _loss_functions() -> tuple[Callable[..., Any], ...]:
    """hf_kd's three loss paths, imported in one line so that a package move changes one line here."""
    from hf_kd.losses import OutputLayer, chunked_distillation_loss, distillation_loss, fused_distillation_loss

    return distillation_loss, chunked_distillation_loss, fused_distillation_loss, OutputLayer


# ---- sizes -------------------------------------------------------------------------------------------------------


def input_bytes(path: str, vocab: int, tokens: int, hidden: int, itemsize: int) -> dict[str, int]:
    """Bytes of each input: the student's (logits, or hidden states + weight) and the teacher's target rows."""
    student = (tokens + vocab) * hidden * itemsize if path == "fused" else tokens * vocab * itemsize
    return {"student": student, "teacher": tokens * vocab * itemsize, "labels": tokens * 8}


def rows_per_chunk(chunk: int, chunk_mib: float | None, vocab: int) -> int:
    """Target tokens per chunk, as hf_kd.losses.base.chunk_rows chooses them (the worker records what hf_kd chose)."""
    if not chunk_mib:
        return chunk
    return max(1, min(chunk, int(chunk_mib * 2**20) // (BUDGET_ARRAYS * 4 * vocab)))


def predict_bytes(
    path: str, vocab: int, tokens: int, hidden: int, chunk: int, itemsize: int, chunk_mib: float | None = None
) -> int:
    """Predicted peak of a point: its inputs plus the loss's working memory (float32 arrays of V columns)."""
    chunk_array = min(rows_per_chunk(chunk, chunk_mib, vocab), tokens) * vocab * 4
    if path == "reference":
        loss = REFERENCE_ARRAYS * tokens * vocab * 4
    elif path == "chunked":
        loss = tokens * vocab * itemsize + CHUNKED_CHUNK_ARRAYS * chunk_array  # gradient buffer, one chunk
    else:  # one chunk; the weight's gradient (float32 sum, and its copy for bf16 weights); the hidden states' gradient
        loss = FUSED_CHUNK_ARRAYS * chunk_array + 2 * vocab * hidden * 4 + tokens * hidden * itemsize
    return int(MARGIN * (sum(input_bytes(path, vocab, tokens, hidden, itemsize).values()) + loss))


# ---- measuring (in the worker subprocess) ------------------------------------------------------------------------


class Meter(RunMeter):
    """Peak memory of a region: the CUDA allocator's peak, or on CPU the kernel's peak resident set (VmHWM).

    On CPU, writing 5 to /proc/self/clear_refs resets VmHWM to the current resident set; where that is not
    allowed the meter falls back to ``getrusage``'s ``ru_maxrss``, which cannot be reset, so its baseline is
    the one :meth:`mark_inputs` took before the warm-up step, right after the inputs were made.
    """

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.method = "cuda.max_memory_allocated" if device == "cuda" else "VmHWM after clear_refs"
        self.inputs_maxrss = 0

    def mark_inputs(self) -> None:
        """Call once the inputs exist: the baseline of the ``ru_maxrss`` fallback."""
        self.inputs_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _reset_cpu(self) -> int:
        if self.method.startswith("VmHWM"):
            try:
                return super()._reset_cpu()
            except OSError:
                self.method = "ru_maxrss growth"
        return self.inputs_maxrss

    def _peak_cpu(self) -> int:
        if self.method.startswith("VmHWM"):
            return super()._peak_cpu()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_inputs(path: str, vocab: int, tokens: int, hidden: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Random inputs of one point, made on ``device`` directly (no host copy of a device tensor)."""
    import torch

    torch.manual_seed(0)
    inputs: dict[str, Any] = {"labels": torch.randint(0, vocab, (tokens,), device=device)}  # every token a target
    if path == "fused":
        inputs["hidden"] = torch.randn(tokens, hidden, device=device, dtype=dtype).requires_grad_(True)
        weight = torch.randn(vocab, hidden, device=device, dtype=dtype)
        inputs["weight"] = weight.mul_(hidden**-0.5).requires_grad_(True)  # logits of about unit scale
    else:
        inputs["logits"] = torch.randn(tokens, vocab, device=device, dtype=dtype).requires_grad_(True)
    inputs["teacher"] = torch.randn(tokens, vocab, device=device, dtype=dtype)
    return inputs


def loss_step(
    path: str, inputs: dict[str, Any], vocab: int, chunk: int, chunk_mib: float | None
) -> Callable[[], float]:
    """A closure running forward + backward of ``path`` on ``inputs``, then dropping the gradients."""
    reference, chunked, fused, output_layer = _loss_functions()
    labels, teacher = inputs["labels"], inputs["teacher"]
    params = [inputs["hidden"], inputs["weight"]] if path == "fused" else [inputs["logits"]]

    def forward() -> Any:
        if path == "reference":
            return reference(inputs["logits"], teacher, labels)
        if path == "chunked":
            return chunked(inputs["logits"], teacher, labels, vocab_size=vocab, chunk_size=chunk, chunk_mib=chunk_mib)
        layer = output_layer(weight=inputs["weight"])
        return fused(inputs["hidden"], layer, teacher, labels, vocab_size=vocab, chunk_size=chunk, chunk_mib=chunk_mib)

    def step() -> float:
        loss = forward().loss
        loss.backward()
        for p in params:
            p.grad = None
        return loss.item()

    return step


def worker(
    path: str, device: str, vocab: int, tokens: int, hidden: int, chunk: int, chunk_mib: float | None, steps: int
) -> dict[str, Any]:
    """One point: inputs, a warm-up step, then ``steps`` timed steps; their median time and their peak memory."""
    import torch

    from hf_kd.losses.base import chunk_rows

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    meter = Meter(device)
    inputs = make_inputs(path, vocab, tokens, hidden, device, dtype)
    step = loss_step(path, inputs, vocab, chunk, chunk_mib)
    meter.sync()
    meter.mark_inputs()
    step()  # warm-up: first-call costs (allocations, kernel selection) stay out of the timings
    meter.sync()
    base = meter.reset()
    times, loss = [], None
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        meter.sync()
        times.append(time.perf_counter() - start)
    peak = meter.peak()
    rusage_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "loss_value": loss,
        "memory_method": meter.method,
        "baseline_bytes": base,
        "peak_bytes": peak,
        "loss_peak_bytes": peak - base,
        "chunk_rows": chunk_rows(chunk, chunk_mib, vocab) if path != "reference" else tokens,
        # A cross-check of VmHWM: the process's all-time peak RSS over its RSS once the inputs existed.
        "ru_maxrss_growth_bytes": rusage_after - meter.inputs_maxrss,
    }


# ---- correctness check (in a worker subprocess) ---------------------------------------------------------------------


def verify(device: str, tolerance: float = 1e-4) -> dict[str, Any]:
    """The three paths on one small float32 point: the same loss (to ``tolerance``) and the same gradients.

    The student's logits of ``reference`` and ``chunked`` are the fused path's ``hidden @ weight.T``, so all
    three compute the same function; gradients are compared through the projection.
    """
    import torch

    reference, chunked, fused, output_layer = _loss_functions()
    v, n, h, c = CHECK["vocab"], CHECK["tokens"], CHECK["hidden"], CHECK["chunk"]
    x = make_inputs("fused", v, n, h, device, torch.float32)
    hidden, weight, teacher, labels = x["hidden"], x["weight"], x["teacher"], x["labels"]
    results = {}
    for name in PATHS:
        if name == "fused":
            out = fused(hidden, output_layer(weight=weight), teacher, labels, vocab_size=v, chunk_size=c)
        else:
            logits = hidden @ weight.t()
            out = (
                reference(logits, teacher, labels)
                if name == "reference"
                else chunked(logits, teacher, labels, vocab_size=v, chunk_size=c)
            )
        (g_h, g_w) = torch.autograd.grad(out.loss, [hidden, weight])
        results[name] = (out.loss.item(), g_h, g_w)
    ref_loss, ref_gh, ref_gw = results["reference"]
    report: dict[str, Any] = {"point": CHECK, "tolerance": tolerance, "loss": {k: r[0] for k, r in results.items()}}
    for name in ("chunked", "fused"):
        loss, g_h, g_w = results[name]
        grad_err = max(
            float((g_h - ref_gh).abs().max() / ref_gh.abs().max()),
            float((g_w - ref_gw).abs().max() / ref_gw.abs().max()),
        )
        report[f"{name}_loss_diff"] = abs(loss - ref_loss)
        report[f"{name}_grad_rel_err"] = grad_err
        if abs(loss - ref_loss) > tolerance or grad_err > tolerance:
            raise RuntimeError(
                f"{name} disagrees with reference (loss {loss:.6f} vs {ref_loss:.6f}, gradient relative error "
                f"{grad_err:.2e}): not timing a wrong loss."
            )
    return report


# ---- orchestration -----------------------------------------------------------------------------------------------


def _available_bytes(device: str) -> int:
    """Memory free for a new point now: MemAvailable on CPU, the device's free memory on CUDA."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def point_key(vocab: int, tokens: int, path: str) -> str:
    return f"{vocab}/{tokens}/{path}"


def _spawn(points: list[str], args: argparse.Namespace, w: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Measure ``points`` (keys) one after another in one fresh subprocess; a result per key, or an error."""
    # A low mmap threshold makes glibc return every freed tensor to the OS, so RSS follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", ",".join(points), "--device", args.device, "--threads"]
    cmd += [str(args.threads), "--hidden", str(w["hidden"]), "--chunk", str(w["chunk"]), "--steps", str(args.steps)]
    cmd += ["--chunk-mib", str(w["chunk_mib"] or 0)]
    timeout = args.point_timeout * len(points)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        failure = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        stdout = proc.stdout
    except subprocess.TimeoutExpired as e:
        failure = [f"timed out after {timeout:.0f} s (--point-timeout)"]
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
    results = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            results[result.pop("key")] = result
    # A killed worker (out of memory: exit status -9) leaves its last points without a result.
    return {key: results.get(key, {"error": failure[0]}) for key in points}


def plan_point(path: str, vocab: int, tokens: int, args: argparse.Namespace, w: dict[str, Any]) -> dict[str, Any]:
    """A point's input sizes and predicted peak, and ``skipped`` when that exceeds ``--max-gib``."""
    itemsize = 2 if args.device == "cuda" else 4
    predicted = predict_bytes(path, vocab, tokens, w["hidden"], w["chunk"], itemsize, w["chunk_mib"])
    record: dict[str, Any] = {
        "input_bytes": input_bytes(path, vocab, tokens, w["hidden"], itemsize),
        "predicted_peak_bytes": predicted,
    }
    if predicted > args.max_gib * GIB:
        record["skipped"] = f"needs ~{predicted / GIB:.1f} GiB (> --max-gib {args.max_gib:g})"
    return record


def run_points(report: dict[str, Any], args: argparse.Namespace, w: dict[str, Any]) -> None:
    """The correctness check, then every planned point that was not skipped, each in a fresh subprocess.

    With ``--smoke`` the check and all points share one subprocess (its figures are not results). The main
    process never imports hf_kd: that import costs seconds, and memory, on every run.
    """
    records = report["points"]
    todo = [key for key, r in records.items() if "skipped" not in r]
    for group in [[VERIFY, *todo]] if args.smoke else [[VERIFY], *([key] for key in todo)]:
        available = _available_bytes(args.device)
        for key in [k for k in group if k != VERIFY]:
            needed = records[key]["predicted_peak_bytes"]
            if needed > available:  # other work on the machine holds memory now: never risk the OOM killer
                records[key]["skipped"] = f"needs ~{needed / GIB:.1f} GiB, only {available / GIB:.1f} GiB available"
                group.remove(key)
        print(f"{', '.join(group)} ...", end=" ", flush=True)
        load_before, start = os.getloadavg()[0], time.perf_counter()
        results = _spawn(group, args, w)
        extra = {"load_average_before": load_before, "load_average_after": os.getloadavg()[0]}
        extra["wall_s"] = time.perf_counter() - start
        if VERIFY in results:
            report["verification"] = check = results.pop(VERIFY)
            print(f"loss {check['loss']}" if "loss" in check else "", end=" ")
            if "error" in check:  # a wrong loss is not worth timing
                print(f"\nloss_scaling.py: check failed: {check['error']}", file=sys.stderr)
                sys.exit(1)
        for key, result in results.items():
            records[key].update(result, **extra)
        print(" ".join(_cell(r, "step_s_median") if "step_s_median" in r else r["error"] for r in results.values()))


def _environment(device: str, threads: int) -> dict[str, Any]:
    """run.py's machine description (without TRL and Transformers), plus the memory this sweep is sized by."""
    env = run_environment(device, threads)
    env.pop("trl", None)
    env.pop("transformers", None)
    env["memory_total_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return env


def _fail(message: str) -> None:
    sys.exit(common.fail("loss_scaling.py", message))


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of positive integers, e.g. 32000,128000"
        )
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.error = lambda message: _fail(f"{message} (see --help)")  # one line, exit 2
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, fixed so that runs compare")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point after one warm-up (median)")
    parser.add_argument("--max-gib", type=float, default=10.0, help="skip points predicted to need more memory")
    parser.add_argument(
        "--vocabs", type=_int_list, help="comma-separated vocabulary sizes (default 32000,128000,256000)"
    )
    parser.add_argument("--tokens", type=_int_list, help="comma-separated target-token counts (default 4096,16384)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument(
        "--chunk-mib", type=float, help="memory budget of a loss chunk in MiB (default hf_kd's 512; 0: no budget)"
    )
    parser.add_argument("--point-timeout", type=float, default=900.0, help="seconds before a point is given up")
    parser.add_argument("--out", help="output folder (default benchmarks/results; a temporary folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the script runs (not results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # points to measure here: V/N/path,...
    parser.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chunk_mib is not None and args.chunk_mib < 0:
        _fail("--chunk-mib must be 0 (no budget) or a positive number of MiB, e.g. --chunk-mib 512.")
    if args.threads < 1 or args.steps < 1:
        _fail("--threads and --steps must be at least 1.")
    if not args.max_gib > 0:
        _fail("--max-gib must be positive, e.g. --max-gib 10.")
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        _fail(f"--paths: unknown {sorted(unknown)}; choose from {','.join(PATHS)}.")
    return args


def run_worker(args: argparse.Namespace) -> None:
    """In the subprocess: the check and the points named by ``--worker``, a ``RESULT`` line each."""
    for key in args.worker.split(","):
        if key == VERIFY:
            try:
                result = verify(args.device)
            except RuntimeError as e:
                print("RESULT " + json.dumps({"key": key, "error": str(e)}), flush=True)
                sys.exit(1)  # and measure nothing after a failed check
        else:
            vocab, tokens, path = key.split("/")
            budget = args.chunk_mib or None
            result = worker(path, args.device, int(vocab), int(tokens), args.hidden, args.chunk, budget, args.steps)
        print("RESULT " + json.dumps({"key": key, **result}), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        run_worker(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA device here; run on a GPU machine or use --device cpu.")

    w = dict(SMOKE_WORKLOAD if args.smoke else WORKLOAD)
    w["vocabs"] = args.vocabs or w["vocabs"]
    w["tokens"] = args.tokens or w["tokens"]
    if args.chunk_mib is not None:
        w["chunk_mib"] = args.chunk_mib or None
    paths = [p for p in PATHS if p in args.paths.split(",")]
    out = common.results_folder(args.out, args.smoke, "loss_scaling_")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": common.command_line("loss_scaling.py"),
        "environment": _environment(args.device, args.threads),
        "workload": {
            **w,
            "paths": paths,
            "steps": args.steps,
            "max_gib": args.max_gib,
            "input_dtype": "bfloat16" if args.device == "cuda" else "float32",
        },
        "points": {},
    }
    for vocab in w["vocabs"]:
        for tokens in w["tokens"]:
            for path in paths:
                report["points"][point_key(vocab, tokens, path)] = plan_point(path, vocab, tokens, args, w)
    run_points(report, args, w)
    report["environment"]["load_average_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    write_outputs(report, out)


# ---- outputs -----------------------------------------------------------------------------------------------------


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """``loss_scaling_<device>.json``, ``.md`` and ``.png`` in ``out``."""
    text = markdown(report)
    path = common.write_results(out, f"loss_scaling_{report['environment']['device']}", report, text)
    plot(report, path.with_suffix(".png"))
    print(text)
    print(f"wrote {path}, .md, .png")


def _point(report: dict[str, Any], vocab: int, tokens: int, path: str) -> dict[str, Any]:
    return report["points"].get(point_key(vocab, tokens, path), {})


def _cell(r: dict[str, Any], key: str) -> str:
    if key in r:
        mib = r[key] / 2**20
        return f"{r[key]:.3g}" if key == "step_s_median" else f"{mib:,.0f}" if mib >= 10 else f"{mib:.1f}"
    if "skipped" in r:  # the time column says so, the memory column says what it would have needed
        return "skipped" if key == "step_s_median" else f"needs ~{r['predicted_peak_bytes'] / GIB:.0f} GiB"
    return "error" if "error" in r else "-"


def _mib(n: int) -> str:
    mib = n / 2**20
    return f"{mib:,.0f}" if abs(mib) >= 10 else f"{mib:.1f}"


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    return f"{a[key] / b[key]:.3f}" if key in a and b.get(key) else "-"


def markdown(report: dict[str, Any]) -> str:
    env, w, check = report["environment"], report["workload"], report["verification"]
    paths = w["paths"]
    lines = [
        f"# Loss scaling: {env['device']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores, {env['memory_total_gib']:.0f} GiB), "
        f"{env.get('gpu', 'no GPU')}; {env['threads']} torch thread(s); load average before/after: "
        f"{env['load_average_before'][0]:.2f} / {env['load_average_after'][0]:.2f}; wall time "
        f"{report['wall_s'] / 60:.1f} min  ",
        f"Software: Python {env['python']}, torch {env['torch']}  ",
        f"Workload: every token a target, hidden {w['hidden']}, chunk {w['chunk']} tokens at most, memory budget "
        f"{_budget(w)} per chunk, inputs {w['input_dtype']}, "
        f"forward KL with alpha 0.5; one warm-up step, median of {w['steps']} timed steps; points predicted to "
        f"need more than {w['max_gib']:g} GiB are skipped  ",
        f"Memory: {_methods(report)}, peak of the timed steps above the memory in use before them (inputs)  ",
        *_load_note(env),
        f"Check before timing (V {check['point']['vocab']}, N {check['point']['tokens']}): loss "
        + ", ".join(f"{k} {v:.6f}" for k, v in check["loss"].items())
        + f"; largest gradient error relative to reference {_grad_err(check):.1e}",
        "",
        "| V | N | "
        + " | ".join(f"{p} s | {p} MiB" for p in paths)
        + " | chunked/ref time | chunked/ref mem | fused/ref time | fused/ref mem |",
        "|---:|---:|" + "---:|---:|" * len(paths) + "---:|---:|---:|---:|",
    ]
    for vocab in w["vocabs"]:
        for tokens in w["tokens"]:
            r = {p: _point(report, vocab, tokens, p) for p in PATHS}
            cells = [c for p in paths for c in (_cell(r[p], "step_s_median"), _cell(r[p], "loss_peak_bytes"))]
            ratios = [
                _ratio(r[p], r["reference"], k)
                for p in ("chunked", "fused")
                for k in ("step_s_median", "loss_peak_bytes")
            ]
            lines.append(f"| {vocab:,} | {tokens:,} | " + " | ".join(cells + ratios) + " |")
    lines += working_memory_table(report)
    lines += [
        "",
        "Inputs (MiB): the student's (logits [N, V], or for fused hidden [N, H] + weight [V, H]) and the "
        "teacher's target rows [N, V].",
        "",
        "| V | N | logits | hidden + weight | teacher rows |",
        "|---:|---:|---:|---:|---:|",
    ]
    itemsize = 2 if env["device"] == "cuda" else 4
    for vocab in w["vocabs"]:
        for tokens in w["tokens"]:
            logits, fused = (input_bytes(p, vocab, tokens, w["hidden"], itemsize) for p in ("chunked", "fused"))
            lines.append(
                f"| {vocab:,} | {tokens:,} | {logits['student'] / 2**20:,.0f} | "
                f"{fused['student'] / 2**20:,.1f} | {logits['teacher'] / 2**20:,.0f} |"
            )
    errors = [f"- {k}: {r['error']}" for k, r in report["points"].items() if "error" in r]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def _budget(w: dict[str, Any]) -> str:
    return f"{w['chunk_mib']:g} MiB" if w.get("chunk_mib") else "none"


def _load_note(env: dict[str, Any]) -> list[str]:
    busy = max(env["load_average_before"][0], env["load_average_after"][0]) > 1.5 * env["threads"]
    note = "Times: rough, the machine was shared with other work (see the load average); memory is not  "
    return [note] if busy else []


def working_bytes(report: dict[str, Any], vocab: int, tokens: int, path: str) -> int | None:
    """A point's peak above its inputs less the gradients of the student's inputs (the same size as those inputs),
    which any loss returns: the loss's own working memory."""
    r = _point(report, vocab, tokens, path)
    if "loss_peak_bytes" not in r:
        return None
    itemsize = 2 if report["environment"]["device"] == "cuda" else 4
    return r["loss_peak_bytes"] - input_bytes(path, vocab, tokens, report["workload"]["hidden"], itemsize)["student"]


def working_memory_table(report: dict[str, Any]) -> list[str]:
    """Working memory (MiB) of the chunked and fused paths, rows per chunk, and the ratio to the smallest vocabulary."""
    w = report["workload"]
    paths = [p for p in ("chunked", "fused") if p in w["paths"]]
    if not paths:
        return []
    first = min(w["vocabs"])
    lines = [
        "",
        "Working memory (MiB): the peak above the inputs less the gradients of the student's inputs ([N, V] logits; "
        f"hidden states and output weight), which every loss returns; ratio to V = {first:,} at the same N.",
        "",
        "| V | N | " + " | ".join(f"{p} rows/chunk | {p} working MiB | {p} / V {first:,}" for p in paths) + " |",
        "|---:|---:|" + "---:|---:|---:|" * len(paths),
    ]
    for vocab in w["vocabs"]:
        for tokens in w["tokens"]:
            cells = []
            for path in paths:
                r, work, base = (
                    _point(report, vocab, tokens, path),
                    working_bytes(report, vocab, tokens, path),
                    working_bytes(report, first, tokens, path),
                )
                cells += [
                    f"{r['chunk_rows']:,}" if "chunk_rows" in r else "-",
                    _mib(work) if work is not None else _cell(r, "loss_peak_bytes"),
                    f"{work / base:.2f}" if work is not None and base else "-",
                ]
            lines.append(f"| {vocab:,} | {tokens:,} | " + " | ".join(cells) + " |")
    return lines


def _grad_err(check: dict[str, Any]) -> float:
    return max(check["chunked_grad_rel_err"], check["fused_grad_rel_err"])


def _methods(report: dict[str, Any]) -> str:
    methods = sorted({r["memory_method"] for r in report["points"].values() if "memory_method" in r})
    return " / ".join(methods) or "-"


def plot(report: dict[str, Any], path: Path) -> None:
    """Memory and time against V, one line per (loss path, N), log-scale y; skipped points are absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    w = report["workload"]
    colors = {"reference": "tab:red", "chunked": "tab:blue", "fused": "tab:green"}
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]  # per N: line style and marker
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = [
        ("loss_peak_bytes", 2**20, "peak loss memory above inputs (MiB)"),
        ("step_s_median", 1.0, "forward + backward time (s, median)"),
    ]
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        for path_name in w["paths"]:
            for i, tokens in enumerate(w["tokens"]):
                pts = [(v, _point(report, v, tokens, path_name).get(key)) for v in w["vocabs"]]
                pts = [(v, y / scale) for v, y in pts if y is not None and y > 0]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    line, marker = styles[i % len(styles)]
                    ax.plot(xs, ys, line, marker=marker, color=colors[path_name], label=f"{path_name}, N={tokens:,}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(w["vocabs"], [f"{v:,}" for v in w["vocabs"]])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}" if y >= 10 else f"{y:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(
        f"hf_kd loss scaling on {env['device']} ({env['threads']} thread(s), inputs "
        f"{w['input_dtype']}, chunk {w['chunk']}, budget {_budget(w)}, H {w['hidden']}); skipped points absent"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
