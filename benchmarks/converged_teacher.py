"""Train the quickstart's denoise teacher (BART 3+3 x 192) until its validation ROUGE-L stops improving (CPU).

Run from the repository root: ``python benchmarks/converged_teacher.py --out DIR``. The tokenizer is the quickstart
teacher's (trained first when absent, in ``--cache-dir``), so students of ``seq2seq_quality.py --teacher-dir DIR``
share it. The model starts from the quickstart's initialisation (seed 1) and follows its schedule (cosine, 5%
warm-up) stretched over ``--max-steps``; every ``--eval-every`` steps it writes greedy outputs for the first
``--valid-rows`` rows of the *validation* split (the table scores the test split) and keeps the best weights; it stops
after ``--patience`` evaluations without a gain of at least ``--min-gain`` ROUGE-L points. DIR gets the best
weights, the tokenizer and ``converged_teacher.json`` (the curve, steps, wall and CPU seconds), written whole.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from hf_kd import quickstart as qs  # noqa: E402
from hf_kd.metrics import perplexity  # noqa: E402

TASK = "denoise"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StopWhenFlat(TrainerCallback):
    """Validation ROUGE-L every ``every`` steps; keeps the best weights; stops after ``patience`` flat evaluations."""

    def __init__(self, valid: Any, references: list[str], tokenizer: Any, settings: qs.Settings, every: int,
                 patience: int, min_gain: float, start: float) -> None:  # fmt: skip
        self.valid, self.references, self.tokenizer, self.settings = valid, references, tokenizer, settings
        self.every, self.patience, self.min_gain, self.start = every, patience, min_gain, start
        self.curve: list[dict[str, float]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.flat = 0

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every and state.global_step != args.max_steps:
            return
        model.eval()
        outputs = qs.greedy_outputs(model, self.tokenizer, self.valid, self.settings)
        score = qs.rouge_l(outputs, self.references[: len(outputs)])
        model.train()
        point = {
            "step": state.global_step,
            "rougeL": score,
            "wall": time.perf_counter() - self.start,
            "cpu": cpu_seconds(),
            "lr": state.log_history[-1].get("learning_rate", 0) if state.log_history else 0,
        }
        self.curve.append(point)
        print(json.dumps(point), flush=True)
        if self.best is None or score >= self.best[0] + self.min_gain:
            self.best, self.flat = (score, state.global_step, copy.deepcopy(model.state_dict())), 0
        else:
            self.flat += 1
            if self.flat >= self.patience:
                control.should_training_stop = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Folder for the best teacher (must not exist).")
    parser.add_argument("--cache-dir", default=None, help="Data and quickstart-teacher cache (default: hf_kd's).")
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--valid-rows", type=int, default=200)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--min-gain", type=float, default=0.2, help="ROUGE-L points an evaluation must gain.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cooldown-from",
        default=None,
        help="Start from this folder's teacher (an earlier --out) and decay --lr linearly to 0 over --max-steps, "
        "without warm-up: the annealing an early-stopped checkpoint of a long cosine schedule did not get.",
    )
    parser.add_argument("--smoke", action="store_true", help="Tiny data and model (seconds).")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"converged_teacher.py: {out} exists; pass another --out (nothing there is touched)", file=sys.stderr)
        return 2
    from hf_kd.data import default_cache_dir

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    settings = qs.Settings.for_task(TASK)
    if args.smoke:
        settings = dataclasses.replace(settings, **qs.SMOKE)
    settings = dataclasses.replace(settings, rouge_examples=args.valid_rows)
    data = qs.load_data(settings, Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    tokenizer, quickstart_teacher, _, _ = qs.train_teacher(
        settings, data, Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    )
    train = qs.featurize(TASK, data["train"], tokenizer, settings)
    valid = qs.featurize(TASK, data["validation"], tokenizer, settings)
    references = list(data["validation"]["target"][: args.valid_rows])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    schedule: dict[str, Any] = {"logging_steps": 100, "disable_tqdm": True}
    if args.cooldown_from:
        from transformers import AutoModelForSeq2SeqLM

        teacher = AutoModelForSeq2SeqLM.from_pretrained(args.cooldown_from)
        schedule |= {"lr_scheduler_type": "linear", "warmup_steps": 0}
    else:
        width, layers = settings.teacher_width, settings.teacher_layers
        teacher = qs.build_model(tokenizer, layers, width, settings, settings.seed + 1)
    targs = qs.training_args(tmp, settings, args.max_steps, args.lr, **schedule)
    stop = StopWhenFlat(valid, references, tokenizer, settings, args.eval_every, args.patience, args.min_gain, start)
    Trainer(model=teacher, args=targs, train_dataset=train, data_collator=qs.collator(tokenizer),
            callbacks=[stop]).train()  # fmt: skip
    best_rouge, best_step, state = stop.best
    teacher.load_state_dict(state)
    teacher.eval()
    record = {
        "command": " ".join(["python", "benchmarks/converged_teacher.py", *(argv or sys.argv[1:])]),
        "best_step": best_step,
        "best_valid_rougeL": best_rouge,
        "steps_run": stop.curve[-1]["step"],
        "valid_rows": args.valid_rows,
        "curve": stop.curve,
        "valid_perplexity": perplexity(teacher, valid, batch_size=32, data_collator=qs.collator(tokenizer)),
        "quickstart_teacher_valid_rougeL": qs.rouge_l(
            qs.greedy_outputs(quickstart_teacher, tokenizer, valid, settings), references
        ),
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": cpu_seconds(),
        "threads": args.threads,
        "settings": dataclasses.asdict(settings),
        "max_steps": args.max_steps,
        "lr": args.lr,
        "cooldown_from": args.cooldown_from,
    }
    teacher.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "converged_teacher.json").write_text(json.dumps(record, indent=1))
    tmp.rename(out)
    print(json.dumps({k: v for k, v in record.items() if k not in ("curve", "settings")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
