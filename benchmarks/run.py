"""Cost of distillation with hf_kd: step time, peak memory and loss memory, against baselines.

Run from the repository root: ``python benchmarks/run.py`` (CPU, float32) or ``python benchmarks/run.py --device
cuda`` (bf16 on a CUDA device). Every measurement runs in a fresh subprocess so that one variant's allocations
cannot hide or inflate another's. Results go to ``benchmarks/results/<device>.json`` and ``<device>.md`` (``--name``
changes the stem). Sections: ``steps`` (a training step), ``loss`` (the loss alone, against TRL's GKD loss and
Liger-Kernel's fused linear JSD when they are installed) and ``cache`` (``hf-kd cache-teacher`` throughput); see
benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

# ---- the workload ----------------------------------------------------------------------------------------------

STEP_WORKLOAD = {
    "vocab": 50257,  # GPT-2's vocabulary
    "batch": 4,
    "seq": 128,
    "prompt": 16,  # the first tokens of every row are a prompt: not targets
    "student": {"n_layer": 2, "n_embd": 128, "n_head": 4},
    "teacher": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "chunk_size": 1024,
}
LOSS_WORKLOAD = {"vocabs": [32000, 50257], "batch": 8, "seq": 512, "hidden": 256, "chunk_size": 1024}
# hf-kd cache-teacher over random rows with a GPT-2-small-sized teacher (random weights: the speed is the same).
CACHE_WORKLOAD = {
    "vocab": 50257,
    "rows": 512,
    "seq": 512,
    "k": 64,
    "tail_samples": 64,
    "batch_size": 32,
    "teacher": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}
STEP_VARIANTS = [
    "ce_only",
    "teacher_forward",
    "hf_kd",
    "hf_kd_chunked",
    "hf_kd_fused",
    "hf_kd_kl_only",
    "hf_kd_kl_only_chunked",
    "hf_kd_kl_only_fused",
    "trl_gkd",
    "trl_gkd_default",
    "hand_written_kl",
]
LOSS_VARIANTS = [
    "naive",
    "hand_written_kl",
    "chunked",
    "naive_from_hidden",
    "chunked_from_hidden",
    "fused",
    "trl_gkd_loss",
    "liger_fused_jsd",
]
FROM_HIDDEN = ("naive_from_hidden", "chunked_from_hidden", "fused", "trl_gkd_loss", "liger_fused_jsd")


# ---- measuring ---------------------------------------------------------------------------------------------------


class Meter:
    """Peak memory of a region: CUDA allocator peak on GPU; on CPU the peak resident set (VmHWM), reset first.

    On CPU the subprocess runs with MALLOC_MMAP_THRESHOLD_ low, so glibc returns every freed tensor to the OS at
    once and the resident set follows the live tensors instead of the allocator's cache.
    """

    def __init__(self, device: str) -> None:
        self.device = device

    def _rss(self, field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def reset(self) -> int:
        """Start a region; returns the memory in use now (the region's baseline)."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return self._reset_cpu()

    def peak(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._peak_cpu()

    def _reset_cpu(self) -> int:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return self._rss("VmRSS:")

    def _peak_cpu(self) -> int:
        return self._rss("VmHWM:")

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


def _batch(w: dict[str, Any], device: str) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, w["vocab"], (w["batch"], w["seq"]), generator=g)
    labels = input_ids.clone()
    labels[:, : w["prompt"]] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def _time_steps(step, meter: Meter, warmup: int, steps: int) -> dict[str, Any]:
    for _ in range(warmup):
        step()
    meter.sync()
    base = meter.reset()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        meter.sync()
        times.append(time.perf_counter() - start)
    peak = meter.peak()
    return {
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "peak_bytes": peak,
        "peak_extra_bytes": peak - base,
    }


def _training_args(cls, device: str, **kwargs: Any):
    return cls(
        output_dir="/tmp/hf_kd_bench",
        report_to=[],
        per_device_train_batch_size=1,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        save_strategy="no",
        **kwargs,
    )


def _step_workload(device: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The step workload's student, teacher, tokenizer and batch (on ``device``)."""
    w = STEP_WORKLOAD
    student = common.tiny_gpt2(w["vocab"], w["seq"], seed=0, **w["student"])
    teacher = common.tiny_gpt2(w["vocab"], w["seq"], seed=1, **w["teacher"])
    return student, teacher, common.word_tokenizer(w["vocab"]), _batch(w, device)


def _teacher_forward(teacher: Any, batch: dict[str, Any], device: str) -> Callable[[], None]:
    """The teacher's forward pass on the batch, under ``inference_mode`` (bf16 on GPUs)."""
    import torch

    teacher.to(device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward() -> None:
        with torch.inference_mode():
            teacher(**inputs)

    return forward


def _training_step(trainer: Any, batch: dict[str, Any]) -> Callable[[], None]:
    """``Trainer.training_step`` on the batch (forward, loss, backward), then ``zero_grad``; no optimizer step."""
    model, num_items = trainer.model, batch["labels"][:, 1:].ne(-100).sum()

    def step() -> None:
        trainer.training_step(model, dict(batch), num_items)
        model.zero_grad(set_to_none=True)

    return step


def _step_worker(variant: str, device: str, warmup: int, steps: int) -> dict[str, Any]:
    student, teacher, tokenizer, batch = _step_workload(device)
    if variant == "teacher_forward":
        step = _teacher_forward(teacher, batch, device)
    else:
        step = _training_step(_make_trainer(variant, student, teacher, tokenizer, device), batch)
    return _time_steps(step, Meter(device), warmup, steps)


def _make_trainer(variant: str, student, teacher, tokenizer, device: str):
    import torch
    import torch.nn.functional as F
    from transformers import Trainer, TrainingArguments

    from hf_kd import DistillationConfig, DistillationTrainer

    chunk = STEP_WORKLOAD["chunk_size"]
    if variant == "ce_only":
        trainer = Trainer(model=student, args=_training_args(TrainingArguments, device), processing_class=tokenizer)
    elif variant.startswith("hf_kd"):
        fields = {"alpha": 0.0} if "kl_only" in variant else {}
        # Every path explicit: "hf_kd" is unchunked, "_chunked" never fused (the default, "auto", fuses where it can).
        fields["loss_chunk_size"] = chunk if "chunked" in variant or "fused" in variant else None
        if "fuse_output_layer" in DistillationConfig.__dataclass_fields__:
            fields["fuse_output_layer"] = "fused" in variant
        elif "fused" in variant:
            raise SkipVariant("this hf_kd has no fuse_output_layer option")
        args = _training_args(DistillationConfig, device, **fields)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    elif variant.startswith("trl_gkd"):
        try:
            from datasets import Dataset
            from trl.experimental.gkd import GKDConfig, GKDTrainer
        except ImportError as e:
            raise SkipVariant(f"TRL is not installed ({e}); pip install trl to compare") from e
        # TRL turns gradient checkpointing on by default; "trl_gkd" turns it off, as every other variant runs.
        checkpointing = variant == "trl_gkd_default"
        args = _training_args(
            GKDConfig,
            device,
            lmbda=0.0,
            beta=0.0,
            max_length=STEP_WORKLOAD["seq"],
            gradient_checkpointing=checkpointing,
        )
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            processing_class=tokenizer,
            data_collator=lambda rows: rows,
            train_dataset=Dataset.from_dict({"input_ids": [[3, 4]]}),  # required; batches are passed directly
        )
    elif variant == "hand_written_kl":

        class HandWrittenKD(Trainer):
            """The loss written by hand today: full logits, F.kl_div over the target positions."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
                labels = inputs.pop("labels")
                outputs = model(**inputs)
                with torch.no_grad():
                    teacher_logits = teacher(**inputs).logits
                mask = labels[:, 1:].ne(-100)
                s = F.log_softmax(outputs.logits[:, :-1][mask].float(), dim=-1)
                t = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
                loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
                return (loss, outputs) if return_outputs else loss

        teacher.to(device).eval().requires_grad_(False)
        if device == "cuda":
            teacher.to(torch.bfloat16)
        trainer = HandWrittenKD(
            model=student, args=_training_args(TrainingArguments, device), processing_class=tokenizer
        )
    else:
        raise ValueError(variant)
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer()
    return trainer


class SkipVariant(Exception):
    """A variant that cannot run here (a missing optional package or option)."""


def _loss_worker(variant: str, device: str, vocab: int, warmup: int, steps: int) -> dict[str, Any]:
    """Forward and backward of the loss alone over [batch * seq, vocab] logits (or hidden states)."""
    import torch
    import torch.nn.functional as F

    from hf_kd.losses import distillation_loss
    from hf_kd.losses.chunked import OutputLayer, chunked_distillation_loss, fused_distillation_loss

    w = LOSS_WORKLOAD
    meter = Meter(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    shape = (w["batch"], w["seq"])
    labels = torch.randint(0, vocab, shape, generator=g).to(device)
    from_hidden = variant in FROM_HIDDEN
    baseline = _baseline_loss(variant, w["chunk_size"], device)  # TRL's or Liger's, when installed
    if from_hidden:
        hidden = torch.randn(*shape, w["hidden"], generator=g).to(device, dtype).requires_grad_(True)
        weight = (torch.randn(vocab, w["hidden"], generator=g) * 0.05).to(device, dtype).requires_grad_(True)
    else:
        logits = torch.randn(*shape, vocab, generator=g).to(device, dtype).requires_grad_(True)
    if variant == "liger_fused_jsd":  # Liger takes the teacher's hidden states and output layer, not its logits
        teacher_hidden = torch.randn(*shape, w["hidden"], generator=g).to(device, dtype).flatten(0, 1)
        teacher_weight = (torch.randn(vocab, w["hidden"], generator=g) * 0.05).to(device, dtype)
    else:
        teacher = torch.randn(*shape, vocab, generator=g).to(device, dtype)

    def step() -> None:
        if variant == "liger_fused_jsd":
            baseline(hidden.flatten(0, 1), weight, teacher_hidden, teacher_weight, labels.flatten()).backward()
            return
        if variant == "fused":
            out = fused_distillation_loss(hidden, OutputLayer(weight), teacher, labels, chunk_size=w["chunk_size"])
            out.loss.backward()
            return
        student = F.linear(hidden, weight) if from_hidden else logits
        if variant.startswith("naive"):
            loss = distillation_loss(student, teacher, labels).loss
        elif variant.startswith("chunked"):
            loss = chunked_distillation_loss(student, teacher, labels, chunk_size=w["chunk_size"]).loss
        elif variant == "trl_gkd_loss":
            loss = baseline(student, teacher, labels, beta=0.0)  # GKDTrainer's loss; beta 0 is the forward KL
        else:  # hand_written_kl
            s = F.log_softmax(student.float(), dim=-1).flatten(0, 1)
            t = F.log_softmax(teacher.float(), dim=-1).flatten(0, 1)
            loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
        loss.backward()

    def run() -> None:
        step()
        for p in [hidden, weight] if from_hidden else [logits]:
            p.grad = None

    return _time_steps(run, meter, warmup, steps)


def _baseline_loss(variant: str, chunk_size: int, device: str):
    """TRL's GKD loss or Liger-Kernel's fused linear JSD for those variants (None for the others)."""
    if variant == "trl_gkd_loss":
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError as e:
            raise SkipVariant(f"TRL is not installed ({e}); pip install trl to compare") from e
        return GKDTrainer.generalized_jsd_loss
    if variant == "liger_fused_jsd":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError as e:
            raise SkipVariant(f"Liger-Kernel is not installed ({e}); pip install liger-kernel to compare") from e
        # hf_kd's default mix (CE and forward KL, half each); compiled with torch.compile as Liger's default,
        # on GPUs only (the CPU smoke run has no compiler to spare).
        return LigerFusedLinearJSDLoss(
            weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.0, chunk_size=chunk_size, compiled=device == "cuda"
        )
    return None


def _cache_worker(device: str) -> dict[str, Any]:
    """``hf-kd cache-teacher`` (in this process, after a warm-up run) over random rows: target tokens a second."""
    import tempfile

    import torch
    from datasets import Dataset

    from hf_kd.cli import main as hf_kd
    from hf_kd.teachers.cache_writer import cache_size

    w = CACHE_WORKLOAD
    meter = Meter(device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        common.tiny_gpt2(w["vocab"], w["seq"], seed=1, **w["teacher"]).save_pretrained(folder / "teacher")
        common.word_tokenizer(w["vocab"]).save_pretrained(folder / "teacher")
        g = torch.Generator().manual_seed(0)
        rows = torch.randint(3, w["vocab"], (w["rows"], w["seq"]), generator=g).tolist()
        Dataset.from_dict({"input_ids": rows}).save_to_disk(folder / "data")
        Dataset.from_dict({"input_ids": rows[: w["batch_size"]]}).save_to_disk(folder / "warmup")
        options = ["--teacher", str(folder / "teacher"), "--k", str(w["k"]), "--tail-samples", str(w["tail_samples"])]
        options += ["--batch-size", str(w["batch_size"]), "--shard-size", str(w["rows"]), "--device", device]
        options += ["--dtype", "bfloat16"] if device == "cuda" else []
        # The warm-up run pays for the CUDA context and the first kernels.
        if hf_kd(["cache-teacher", *options, "--dataset", str(folder / "warmup"), "--output", str(folder / "w")]):
            raise RuntimeError("hf-kd cache-teacher failed on the warm-up rows")
        base = meter.reset()
        start = time.perf_counter()
        if hf_kd(["cache-teacher", *options, "--dataset", str(folder / "data"), "--output", str(folder / "cache")]):
            raise RuntimeError("hf-kd cache-teacher failed")
        meter.sync()
        seconds = time.perf_counter() - start
        peak = meter.peak()
        size = cache_size(folder / "cache")
    return {
        "seconds": seconds,
        "target_tokens": size["target_tokens"],
        "tokens_per_s": size["target_tokens"] / seconds,
        "bytes_per_target_token": size["bytes_per_target_token"],
        "peak_extra_bytes": peak - base,
    }


# ---- orchestration -----------------------------------------------------------------------------------------------


def _spawn(args: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, __file__, *args, "--threads", str(threads)], capture_output=True, text=True, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT ") :])


def _environment(device: str, threads: int) -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "device": device,
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }
    with contextlib.suppress(ImportError):
        import trl

        env["trl"] = trl.__version__
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed, so runs compare)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss-steps", type=int, default=2, help="timed steps per loss-alone variant")
    parser.add_argument("--only", default="", help="comma-separated sections: steps,loss,cache (default steps,loss)")
    parser.add_argument("--variants", default="", help="comma-separated step and loss variants to run (default all)")
    parser.add_argument("--step-vocab", type=int, help="vocabulary of the training-step models (default 50257)")
    parser.add_argument("--vocabs", default="", help="comma-separated vocabularies of the loss section")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", help="stem of the result files (default: the device)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs (not results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.smoke:
        STEP_WORKLOAD.update(vocab=1000, batch=2, seq=32, prompt=4, chunk_size=16)
        LOSS_WORKLOAD.update(vocabs=[500], batch=2, seq=16, hidden=32, chunk_size=8)
        CACHE_WORKLOAD.update(vocab=500, rows=16, seq=32, k=8, tail_samples=8, batch_size=4)
        CACHE_WORKLOAD["teacher"] = {"n_layer": 2, "n_embd": 32, "n_head": 2}
    if args.step_vocab:
        STEP_WORKLOAD["vocab"] = args.step_vocab
    if args.vocabs:
        LOSS_WORKLOAD["vocabs"] = [int(v) for v in args.vocabs.split(",")]
    if args.worker:
        try:
            if args.worker == "step":
                result = _step_worker(args.variant, args.device, args.warmup, args.steps)
            elif args.worker == "cache":
                result = _cache_worker(args.device)
            else:
                result = _loss_worker(args.variant, args.device, args.vocab, args.warmup, args.steps)
        except SkipVariant as e:
            result = {"skipped": str(e)}
        print("RESULT " + json.dumps(result))
        return

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here.")
    sections = set(args.only.split(",")) if args.only else {"steps", "loss"}
    chosen = set(args.variants.split(",")) if args.variants else set(STEP_VARIANTS + LOSS_VARIANTS)
    worker_args = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    worker_args += ["--smoke"] if args.smoke else []
    worker_args += ["--step-vocab", str(args.step_vocab)] if args.step_vocab else []
    report: dict[str, Any] = {
        "command": common.command_line("run.py"),
        "environment": _environment(args.device, args.threads),
        "step_workload": STEP_WORKLOAD,
        "loss_workload": LOSS_WORKLOAD,
        "steps": {},
        "loss": {},
    }
    if "steps" in sections:
        for variant in [v for v in STEP_VARIANTS if v in chosen]:
            print(f"step: {variant} ...", flush=True)
            report["steps"][variant] = _spawn(["--worker", "step", "--variant", variant, *worker_args], args.threads)
    if "loss" in sections:
        for vocab in LOSS_WORKLOAD["vocabs"]:
            for variant in [v for v in LOSS_VARIANTS if v in chosen]:
                print(f"loss: vocab {vocab} {variant} ...", flush=True)
                loss_args = ["--device", args.device, "--steps", str(args.loss_steps), "--warmup", "1"]
                loss_args += ["--smoke"] if args.smoke else []
                result = _spawn(
                    ["--worker", "loss", "--variant", variant, "--vocab", str(vocab), *loss_args], args.threads
                )
                report["loss"][f"{vocab}/{variant}"] = result
    if "cache" in sections:
        print("cache: hf-kd cache-teacher ...", flush=True)
        report["cache_workload"] = CACHE_WORKLOAD
        report["cache"] = _spawn(["--worker", "cache", *worker_args], args.threads)
    report["environment"]["load_average_after"] = os.getloadavg()
    report["summary"] = summarize(report)

    common.write_results(Path(args.out), args.name or args.device, report, markdown(report))
    print(markdown(report))


def summarize(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ratios the targets are stated in: ``{name: {"value": ratio, "target": "<= x" or ""}}``."""
    s, summary = report["steps"], {}

    def t(name: str) -> float | None:
        return s.get(name, {}).get("step_s_median")

    def m(name: str) -> float | None:
        return s.get(name, {}).get("peak_extra_bytes")

    def add(name: str, num: float | None, den: float | None, target: str = "") -> None:
        if num is not None and den:
            summary[name] = {"value": num / den, "target": target}

    if t("ce_only") and t("teacher_forward"):
        for v in ("hf_kd", "hf_kd_chunked", "hf_kd_fused"):
            add(f"overhead: {v} / (ce_only + teacher_forward)", t(v), t("ce_only") + t("teacher_forward"), "<= 1.05")
    for baseline in ("trl_gkd", "trl_gkd_default", "hand_written_kl"):
        is_trl = baseline.startswith("trl")
        for v in ("hf_kd_kl_only", "hf_kd_kl_only_chunked", "hf_kd_kl_only_fused"):
            add(f"time: {v} / {baseline}", t(v), t(baseline), "<= 0.9" if is_trl else "")
            add(f"memory: {v} / {baseline}", m(v), m(baseline), "<= 1.0" if is_trl else "")
    loss = report["loss"]
    for key, result in loss.items():
        vocab, variant = key.split("/")
        naive = "naive_from_hidden" if variant in FROM_HIDDEN else "naive"
        if variant != naive:
            base = report["loss"].get(f"{vocab}/{naive}", {}).get("peak_extra_bytes")
            target = "<= 0.25" if variant in ("chunked", "chunked_from_hidden", "fused") else ""
            add(f"loss memory, vocab {vocab}: {variant} / {naive}", result.get("peak_extra_bytes"), base, target)
        if variant in ("trl_gkd_loss", "liger_fused_jsd"):  # hf_kd's default and fused paths against them
            for ours in ("chunked_from_hidden", "fused"):
                mine = loss.get(f"{vocab}/{ours}", {})
                for what, key in (("time", "step_s_median"), ("memory", "peak_extra_bytes")):
                    add(f"loss {what}, vocab {vocab}: {ours} / {variant}", mine.get(key), result.get(key))
    return summary


def _size(sizes: dict[str, int]) -> str:
    return f"{sizes['n_layer']} layers x {sizes['n_embd']}"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _timing_row(name: str, r: dict[str, Any]) -> str:
    """A table row: the median step time and peak memory, or why the variant did not run."""
    if "step_s_median" in r:
        return f"| {name} | {r['step_s_median']:.3f} | {_mib(r['peak_extra_bytes'])} |"
    return f"| {name} | {r.get('skipped') or r.get('error')} | |"


def markdown(report: dict[str, Any]) -> str:
    env, summary = report["environment"], report["summary"]
    w = report["step_workload"]
    lines = [
        f"# hf_kd benchmark: {env['device']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env.get('gpu', 'no GPU')}; {env['threads']} torch "
        f"thread(s); load average before/after: {env['load_average_before'][0]:.2f} / "
        f"{env['load_average_after'][0]:.2f}  ",
        f"Software: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}"
        + (f", TRL {env['trl']}" if "trl" in env else ""),
        "",
        f"## Training step (GPT-2 student {_size(w['student'])}, teacher {_size(w['teacher'])}, vocab {w['vocab']}, "
        f"batch {w['batch']} x {w['seq']} tokens, {w['prompt']} prompt tokens per row, chunk {w['chunk_size']})",
        "",
        "| variant | step time (median, s) | peak memory above step start (MiB) |",
        "|---|---:|---:|",
    ]
    lines += [_timing_row(name, r) for name, r in report["steps"].items()]
    lines += ["", "| ratio | value | target |", "|---|---:|---:|"]
    for key, entry in summary.items():
        lines.append(f"| {key} | {_num(entry['value'])} | {entry['target']} |")
    lw = report["loss_workload"]
    lines += [
        "",
        f"## Loss alone (batch {lw['batch']} x {lw['seq']} tokens, hidden {lw['hidden']}, chunk {lw['chunk_size']})",
        "",
        "| vocab / variant | forward+backward (median, s) | peak memory above inputs (MiB) |",
        "|---|---:|---:|",
    ]
    lines += [_timing_row(key, r) for key, r in report["loss"].items()]
    if "cache" in report:
        cw, r = report["cache_workload"], report["cache"]
        lines += [
            "",
            f"## hf-kd cache-teacher (teacher {_size(cw['teacher'])}, vocab {cw['vocab']}, {cw['rows']} rows x "
            f"{cw['seq']} tokens, k {cw['k']} + {cw['tail_samples']} tail samples, batch {cw['batch_size']})",
            "",
        ]
        if "tokens_per_s" in r:
            lines.append(
                f"{r['target_tokens']:,} target tokens in {r['seconds']:.2f} s: **{r['tokens_per_s']:,.0f} target "
                f"tokens/s**, {r['bytes_per_target_token']:.0f} bytes each, peak memory {_mib(r['peak_extra_bytes'])} "
                "MiB above the start"
            )
        else:
            lines.append(f"{r.get('skipped') or r.get('error')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
