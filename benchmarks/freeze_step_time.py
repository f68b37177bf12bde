"""KD step time of a DistilBART-style student with and without ``freeze_encoder``, on the quickstart's ``denoise``
task (CPU).

The student is ``make_student(teacher, decoder_layers=1)``: the teacher's encoder copied whole, one decoder layer.
With ``freeze_encoder`` its encoder gets no backward pass and no optimizer update, and, being a frozen copy of the
teacher's, the teacher reuses its outputs instead of running its own encoder (the trainer says so in the log, and
this script records it). Both arms start from the same student and train on the same batches, in the quickstart's
settings (batch size, float32, fused output layer "auto").

One KD step = the trainer's ``training_step`` (student forward, teacher forward, loss, backward) plus the optimizer
step and ``zero_grad``, timed with ``time.perf_counter``. The arms are interleaved (ABAB..., the order alternating
each round) so that drift in the machine's speed hits both; each round times ``--steps`` steps after one untimed
warm-up step per arm; the figure per arm is the median of all its timed steps, and the ratio is frozen / not frozen.

Run from the repository root, alone on the machine:
``nice python benchmarks/freeze_step_time.py`` (``--rounds 5 --steps 20`` by default). It loads the quickstart's
cached denoise teacher (trained there first when absent, which takes minutes). ``--smoke``: 1 round of 2 steps, to
check the script runs (its figures mean nothing). Results: benchmarks/results/freeze_step_time.json / .md
(``freeze_step_time_smoke.*`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hf_kd import DistillationTrainer, make_student  # noqa: E402
from hf_kd import quickstart as qs  # noqa: E402
from hf_kd.losses import IGNORE_INDEX  # noqa: E402

ARMS = {"not frozen": {}, "freeze_encoder": {"freeze_encoder": True}}


def build(arm: str, student: Any, teacher: Any, tokenizer: Any, train: Any, settings: Any, work: Path) -> Any:
    args = qs.training_args(
        work / arm.replace(" ", "_"), settings, steps=1000, lr=settings.student_lr, temperature=settings.temperature,
        alpha=settings.alpha, disable_tqdm=True, logging_steps=10**6, **ARMS[arm],
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=train,
        processing_class=tokenizer, data_collator=qs.collator(tokenizer),
    )  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    return trainer


def kd_step(trainer: Any, batch: dict[str, Any]) -> float:
    """Seconds of one training step on ``batch``: forward, backward, optimizer step."""
    inputs = trainer._prepare_inputs(batch)
    tokens = inputs["labels"].ne(IGNORE_INDEX).sum()
    start = time.perf_counter()
    trainer.training_step(trainer.model, inputs, tokens)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(trainers: dict[str, Any], batches: list[dict[str, Any]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {arm: [] for arm in trainers}
    for trainer in trainers.values():
        kd_step(trainer, batches[0])  # warm-up, untimed
    for r in range(rounds):
        order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
        for arm in order:
            times[arm] += [kd_step(trainers[arm], batch) for batch in batches]
    return times


def shape(model: Any) -> str:
    """``"BART 3+1 x 192"``: encoder + decoder layers, width."""
    c = model.config
    return f"{c.model_type.upper()} {c.encoder_layers}+{c.decoder_layers} x {c.d_model}"


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# KD step time with and without freeze_encoder",
        "",
        f"Quickstart denoise task, teacher {result['teacher']}, student {result['student']} "
        f"(`make_student(teacher, decoder_layers=1)`), batch {result['batch_size']}, "
        f"{result['rounds']} interleaved rounds x {result['steps']} steps per arm, {result['threads']} torch "
        f"thread(s), {result['machine']}. Command: `{result['command']}`.",
        "",
        "| arm | median step (s) | trainable parameters | teacher's encoder run |",
        "|---|---|---|---|",
    ]
    for arm, row in result["arms"].items():
        ran = "no (reuses the student's)" if row["teacher_reuses_student_encoder"] else "yes"
        lines.append(f"| {arm} | {row['median_s']:.4f} | {row['trainable_parameters']:,} | {ran} |")
    lines += ["", f"Ratio (freeze_encoder / not frozen): **{result['ratio']:.3f}**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="Data and quickstart-teacher cache (default: hf_kd's).")
    parser.add_argument("--work-dir", default="/tmp/hf_kd_freeze_step_time")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per arm and round.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the quickstart benchmarks use 1).")
    parser.add_argument("--smoke", action="store_true", help="1 round of 2 steps: checks the script, not the figures.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps = 1, 2
    from hf_kd.data import default_cache_dir

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("hf_kd.trainer").setLevel(logging.INFO)  # which way the teacher's encoder went, and why
    torch.set_num_threads(args.threads)
    settings = qs.Settings.for_task("denoise")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = qs.load_data(settings, cache_dir)
    tokenizer, teacher, _, _ = qs.train_teacher(settings, data, cache_dir)
    teacher.eval()
    train = qs.featurize("denoise", data["train"], tokenizer, settings)
    torch.manual_seed(settings.seed)
    student = make_student(teacher, decoder_layers=1)
    trainers = {arm: build(arm, student, teacher, tokenizer, train, settings, work) for arm in ARMS}
    loader = iter(trainers["not frozen"].get_train_dataloader())
    batches = [next(loader) for _ in range(args.steps)]
    times = measure(trainers, batches, args.rounds)

    arms = {
        arm: {
            "median_s": statistics.median(times[arm]),
            "step_times_s": [round(t, 6) for t in times[arm]],
            "trainable_parameters": trainable(trainer.model),
            "teacher_reuses_student_encoder": trainer.reuses_student_encoder,
        }
        for arm, trainer in trainers.items()
    }
    result = {
        "command": "python benchmarks/freeze_step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "teacher": shape(teacher),
        "student": shape(student),
        "batch_size": settings.batch_size,
        "rounds": args.rounds,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "arms": arms,
        "ratio": arms["freeze_encoder"]["median_s"] / arms["not frozen"]["median_s"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "freeze_step_time_smoke" if args.smoke else "freeze_step_time"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
