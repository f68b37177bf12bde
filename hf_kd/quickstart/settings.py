"""What shapes a quickstart run: the tasks, :class:`Settings`, each task's measured design, the smoke sizes, and
the checks and the command line made from the options."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from hf_kd.errors import ConfigError

# Bump when anything that shapes the cached tokenizer/teacher changes.
TEACHER_CACHE_VERSION = 3


# The Settings fields that shape the tokenizer and teacher (the cache key; checked again in the cached record).
TEACHER_FIELDS = (
    "task seed vocab_size block_size source_length target_length mask_fraction max_words batch_size "
    "teacher_layers teacher_width teacher_steps teacher_lr max_train_docs"
).split()


SEQ2SEQ_TASKS = ("denoise", "summarize")


TASKS = ("denoise", "summarize", "lm")


DEFAULT_TASK = "denoise"


# (source column, target column) of the encoder-decoder tasks' rows in hf_kd.data.
COLUMNS = {"denoise": ("source", "target"), "summarize": ("code", "summary")}


@dataclass
class Settings:
    """Everything that shapes a quickstart run.

    The field defaults are the ``lm`` design; :meth:`for_task` applies a task's measured design
    (:data:`TASK_DESIGNS`), which is what the command line starts from.
    """

    task: str = "lm"
    seed: int = 0
    vocab_size: int = 2048
    block_size: int = 128  # lm: tokens per training block
    source_length: int = 96  # encoder-decoder tasks: source tokens kept, </s> included
    target_length: int = 32  # encoder-decoder tasks: target tokens kept, </s> included
    mask_fraction: float = 0.3  # denoise: share of each docstring's words masked
    max_words: int = 48  # denoise: words of each docstring kept
    batch_size: int = 16
    teacher_layers: int = 3  # encoder-decoder: layers of the encoder and of the decoder, each
    teacher_width: int = 192
    teacher_steps: int = 500
    teacher_lr: float = 2e-3
    student_archs: str = "t5"  # encoder-decoder tasks: comma-separated "t5", "bart" (the teacher is BART)
    student_layers: int = 2
    student_width: int = 64
    student_steps: int = 500
    student_lr: float = 3e-3
    temperature: float = 1.0
    alpha: float = 0.0
    cache_k: int = 0  # the KD students learn from the teacher's top-k cache (0: from the live teacher)
    cache_tail_samples: int = 0  # tokens drawn per target from the teacher's distribution outside the top-k
    eval_blocks: int = 64  # validation rows scored at each evaluation during training
    num_evals: int = 8
    max_train_docs: int | None = None  # subsample the training split (smoke mode)
    max_test_docs: int | None = None
    rouge_examples: int = 300  # encoder-decoder tasks: test examples generated for ROUGE-L
    speed_prompts: int = 16
    speed_new_tokens: int = 32

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> Settings:
        """The measured design of ``task`` (docs/quickstart.md says why), then ``overrides``."""
        return cls(**{"task": task, **TASK_DESIGNS[task], **overrides})

    @property
    def is_seq2seq(self) -> bool:
        return self.task in SEQ2SEQ_TASKS

    @property
    def archs(self) -> list[str]:
        """The students' architectures: a CE and a KD student of each; the first pair is the main one."""
        return [a.strip() for a in self.student_archs.split(",")] if self.is_seq2seq else ["gpt2"]

    def teacher_key(self) -> str:
        """A hash of what determines the tokenizer and teacher, naming their cache folder."""
        fields = TEACHER_FIELDS
        from hf_kd.data import EXTRACTION_VERSION

        # The data come from the running Python's standard library: another version, another teacher.
        versions = {"v": TEACHER_CACHE_VERSION, "data": EXTRACTION_VERSION, "python": sys.version.split()[0]}
        payload = json.dumps({f: getattr(self, f) for f in fields} | versions, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


# Each task's measured design: what differs from the Settings defaults (the lm design).
TASK_DESIGNS: dict[str, dict[str, Any]] = {
    "lm": {},
    "denoise": {
        "vocab_size": 512,
        "source_length": 64,
        "target_length": 64,
        "max_words": 32,
        "batch_size": 32,
        "teacher_layers": 3,
        "teacher_width": 192,
        "teacher_steps": 600,
        "teacher_lr": 2e-3,
        "student_archs": "t5,bart",
        "student_layers": 2,
        "student_width": 64,
        "student_steps": 600,
        "student_lr": 3e-3,
        # The teacher runs once over the training set, not at every KD step of both KD students (docs/quickstart.md).
        "cache_k": 64,
        "cache_tail_samples": 64,
    },
    "summarize": {
        "vocab_size": 1024,
        "source_length": 96,
        "target_length": 32,
        "batch_size": 32,
        "teacher_layers": 3,
        "teacher_width": 192,
        "teacher_steps": 600,
        "teacher_lr": 2e-3,
        "student_archs": "t5,bart",
        "student_layers": 1,
        "student_width": 64,
        "student_steps": 600,
        "student_lr": 3e-3,
    },
}


SMOKE = {
    "vocab_size": 300,
    "block_size": 32,
    "source_length": 24,
    "target_length": 12,
    "max_words": 12,
    "batch_size": 8,
    "teacher_layers": 1,
    "teacher_width": 32,
    "teacher_steps": 12,
    "student_layers": 1,
    "student_width": 16,
    "student_steps": 8,
    "eval_blocks": 8,
    "num_evals": 2,
    "max_train_docs": 300,
    "max_test_docs": 40,
    "rouge_examples": 8,
    "speed_prompts": 4,
    "speed_new_tokens": 4,
}


def settings_from_args(args: Any) -> Settings:
    settings = Settings.for_task(args.task, seed=args.seed)
    if args.smoke:
        settings = dataclasses.replace(settings, **SMOKE)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if f.name not in ("task", "seed") and getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(settings, **overrides)


_POSITIVE = ("vocab_size block_size source_length target_length max_words batch_size teacher_layers teacher_width "
             "teacher_steps student_layers student_width student_steps max_train_docs").split()  # fmt: skip


def check_settings(settings: Settings, threads: int | None) -> None:
    """Sizes, steps and rates that cannot make a run: one-line ConfigErrors naming the option, before any work."""
    design = Settings.for_task(settings.task)

    def refuse(name: str, value: Any, rule: str) -> None:
        option = f"--{name.replace('_', '-')}"
        example = getattr(design, name, None) or 1
        raise ConfigError(f"{option} {value} {rule}; pass e.g. {option} {example}.")

    if threads is not None and threads < 1:
        refuse("threads", threads, "must be 1 or more")
    for name in _POSITIVE:
        value = getattr(settings, name)
        if value is not None and value < 1:
            refuse(name, value, "must be 1 or more")
    for name in ("teacher_lr", "student_lr", "temperature"):
        value = getattr(settings, name)
        if not math.isfinite(value) or value <= 0:
            refuse(name, value, "must be a positive number")
    if not 0 < settings.mask_fraction < 1:
        refuse("mask_fraction", settings.mask_fraction, "must be between 0 and 1")
    if not 0 <= settings.alpha <= 1:
        refuse("alpha", settings.alpha, "must be between 0 and 1 (the weight of CE in the KD student's loss)")
    for name in ("teacher_width", "student_width"):  # heads of 64: a width of 128 or more splits into whole heads
        width = getattr(settings, name)
        if width % max(1, width // 64):
            refuse(name, width, "does not split into heads of about 64 (use a width below 128 or a multiple of 64)")


def command_line(args: Any) -> str:
    """The command that reproduces this run (options left at their default omitted)."""
    words = ["hf-kd", "quickstart", "--task", args.task, "--output-dir", str(args.output_dir)]
    words += ["--smoke"] if args.smoke else []
    for name in ("cache_dir", "seed", "threads", *(f.name for f in dataclasses.fields(Settings))):
        value = getattr(args, name, None)
        if name not in ("task",) and value is not None and not (name == "seed" and value == 0):
            words += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(words)
