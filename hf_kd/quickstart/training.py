"""Training: the schedule, the teacher (trained once and cached) and the students, with their validation curves."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from hf_kd.errors import ConfigError, first_line
from hf_kd.locking import folder_lock
from hf_kd.quickstart.dataset import collator, featurize, tokenizer_texts, train_tokenizer
from hf_kd.quickstart.files import TEACHER_RECORD, check_teacher_record
from hf_kd.quickstart.models import build_model
from hf_kd.quickstart.settings import TEACHER_FIELDS, Settings


def training_args(output_dir: Path, settings: Settings, steps: int, lr: float, **extra: Any) -> Any:
    """The quickstart's schedule (cosine, 5% warm-up, no weight decay); ``extra`` adds fields or replaces these
    (the benchmarks log on their own cadence, without a progress bar)."""
    from hf_kd.config import DistillationConfig

    fields = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, steps // settings.num_evals),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    return DistillationConfig(**{**fields, **extra})


def train_teacher(settings: Settings, data: Any, cache_dir: Path) -> tuple[Any, Any, float, bool]:
    """The tokenizer and teacher, from the cache when an identical run already trained them.

    One process trains a given teacher at a time (the others wait, then load it); a cached teacher whose files
    are damaged is a one-line ConfigError naming them."""
    path = cache_dir / "quickstart" / f"teacher-{settings.task}-{settings.teacher_key()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent, "hf-kd quickstart (training a teacher)", wait=True):
        if path.exists():
            return (*_load_cached_teacher(settings, path), True)
        for stale in path.parent.glob(f"{path.name}.tmp*"):  # a killed run's half-trained copy (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        return _train_teacher(settings, data, path)


def _load_cached_teacher(settings: Settings, path: Path) -> tuple[Any, Any, float]:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    seconds = check_teacher_record(path, settings, TEACHER_FIELDS)
    auto = AutoModelForSeq2SeqLM if settings.is_seq2seq else AutoModelForCausalLM
    try:
        tokenizer, teacher = AutoTokenizer.from_pretrained(path), auto.from_pretrained(path).eval()
    except (OSError, ValueError, RuntimeError) as err:  # missing/truncated weights, a damaged config or tokenizer
        raise ConfigError(
            f"the cached teacher {path} cannot be loaded ({first_line(err, 160)}); delete that folder (hf-kd "
            "quickstart trains the teacher again), or pass another --cache-dir."
        ) from None
    return tokenizer, teacher, seconds


def _train_teacher(settings: Settings, data: Any, path: Path) -> tuple[Any, Any, float, bool]:
    from transformers import Trainer

    from hf_kd.data import MASK_TOKEN

    start = time.perf_counter()
    extra = (MASK_TOKEN,) if settings.task == "denoise" else ()
    tokenizer = train_tokenizer(tokenizer_texts(settings.task, data["train"]), settings.vocab_size, extra)
    train = featurize(settings.task, data["train"], tokenizer, settings)
    teacher = build_model(tokenizer, settings.teacher_layers, settings.teacher_width, settings, settings.seed + 1)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    args = training_args(tmp, settings, settings.teacher_steps, settings.teacher_lr)
    trainer = Trainer(model=teacher, args=args, train_dataset=train, data_collator=collator(tokenizer))
    trainer.train()
    seconds = time.perf_counter() - start
    teacher.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / TEACHER_RECORD).write_text(json.dumps({"train_seconds": seconds, **vars(settings)}))
    tmp.rename(path)  # complete or absent: an interrupted run never leaves a half-saved teacher
    teacher.name_or_path = teacher.config.name_or_path = str(path)  # named in the student's model card
    return tokenizer, teacher.eval(), seconds, False


class ValidationCurve(TrainerCallback):
    """Validation cross-entropy at step 0 and ``num_points`` evenly spaced steps, the same way for both students.

    (A plain Trainer's ``eval_loss`` would not do for the CE students: for causal LMs it divides by the unshifted
    label count. One callback measures every student the same way.)
    """

    def __init__(self, dataset: Any, data_collator: Any, steps: int, num_points: int) -> None:
        self.dataset, self.data_collator = dataset, data_collator
        self.at = {round(k * steps / num_points) for k in range(1, num_points + 1)}
        self.points: list[tuple[int, float]] = []

    def _measure(self, step: int, model: Any) -> None:
        from hf_kd.metrics import cross_entropy_sum

        total, count = cross_entropy_sum(model, self.dataset, batch_size=32, data_collator=self.data_collator)
        self.points.append((step, total / count))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._measure(0, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step in self.at:
            self._measure(state.global_step, model)


def train_student(
    settings: Settings,
    kind: str,
    teacher: Any,
    tokenizer: Any,
    train: Any,
    valid: Any,
    output_dir: Path,
    arch: str = "",
    cache: Path | None = None,
) -> tuple[Any, Any, float, list[tuple[int, float]]]:
    """A student trained on the labels (kind "ce") or distilled from the teacher (kind "kd"): from its top-k cache
    ``cache`` when given (the trainer needs no teacher then), else from the live ``teacher``."""
    from hf_kd.trainer import DistillationTrainer

    student = build_model(tokenizer, settings.student_layers, settings.student_width, settings, settings.seed, arch)
    curve = ValidationCurve(valid, collator(tokenizer), settings.student_steps, settings.num_evals)
    common = {
        "model": student,
        "train_dataset": train,
        "data_collator": collator(tokenizer),
        "processing_class": tokenizer,
        "callbacks": [curve],
    }
    start = time.perf_counter()
    if kind == "kd":
        args = training_args(
            output_dir,
            settings,
            settings.student_steps,
            settings.student_lr,
            loss="forward_kl",
            temperature=settings.temperature,
            alpha=settings.alpha,
        )
        if cache is None:
            trainer = DistillationTrainer(teacher_model=teacher, args=args, **common)
        else:
            trainer = DistillationTrainer(teacher_cache=str(cache), args=args, **common)
            trainer.teacher_name = teacher.name_or_path  # the model card names the teacher, not its cache folder
    else:
        from transformers import Trainer

        args = training_args(output_dir, settings, settings.student_steps, settings.student_lr)
        trainer = Trainer(args=args, **common)
    trainer.train()
    return student.eval(), trainer, time.perf_counter() - start, curve.points
