"""`hf-kd quickstart`: distillation end to end on a laptop CPU, offline, in a few minutes.

On the built-in standard-library docstring data (:mod:`hf_kd.data`) it trains a small teacher from scratch
(cached), then, with the same step budget, data order and initialisation, one student on the labels alone and
one by distillation from the teacher (:class:`hf_kd.DistillationTrainer`). It evaluates the three on the test
split and writes a DistilBART-style table (``report.md``, ``report.json``), a plot of the students' evaluation
loss, the distilled student with its model card, and the teacher (``teacher/``).

Tasks: ``denoise`` (the default) and ``summarize`` are encoder-decoder tasks, a BART teacher and T5-architecture
and BART students (``--student-archs t5,bart``) sharing one tokenizer; ``lm`` is language modelling with GPT-2
teacher and students (its teacher is the one ``recipes/configs/quickstart_lm.yaml`` distills from).

The command line (its options and the thread setting) is :mod:`hf_kd.cli.quickstart`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from hf_kd.errors import ConfigError, check_writable_folder, first_line, write_text_atomic
from hf_kd.locking import folder_lock
from hf_kd.quickstart_files import TEACHER_RECORD, check_teacher_record, claim_output_dir

# Nothing below reaches the Hub: data, tokenizer and models are all made locally. The tokenizer is used
# before and after the Trainer's dataloader forks; keep its thread pool quiet about it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Bump when anything that shapes the cached tokenizer/teacher changes.
TEACHER_CACHE_VERSION = 4

# The Settings fields that shape the tokenizer and teacher (the cache key; checked again in the cached record).
TEACHER_FIELDS = (
    "task seed vocab_size block_size source_length target_length mask_fraction max_words batch_size "
    "teacher_layers teacher_width teacher_steps teacher_lr max_train_docs group_by_length"
).split()

# Rows per shard of the teacher cache: the quickstart's training set (6,923 rows) fits one.
CACHE_SHARD_SIZE = 10_000

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
    group_by_length: bool = False  # batches of rows of similar length (less padding computed); lm blocks are equal
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
        # Random batches pad to 1.5x the tokens they hold (measured); grouped ones compute about 1.05x.
        "group_by_length": True,
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


_START = time.perf_counter()


def stage(message: str) -> None:
    """Print ``message`` with the wall time since the start and this process's CPU time (all threads)."""
    print(
        f"[hf-kd quickstart {time.perf_counter() - _START:5.0f}s, cpu {time.process_time():5.0f}s] {message}",
        flush=True,
    )


# ---- data and tokenizer ------------------------------------------------------------------------------


def _head(dataset: Any, n: int | None) -> Any:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def load_data(settings: Settings, cache_dir: Path) -> Any:
    """The task's splits, from the data cache under ``cache_dir`` (made on the first run); a damaged cache is a
    one-line ConfigError naming its folder."""
    from hf_kd.data import cache_path

    try:
        return _load_data(settings, cache_dir)
    except (OSError, ValueError, KeyError, IndexError) as err:  # what load_from_disk raises for a damaged folder
        folder = cache_path("summarize" if settings.task == "summarize" else "lm", cache_dir).parent
        raise ConfigError(
            f"the quickstart's data cache {folder} cannot be read ({first_line(err, 160)}); delete that folder (it "
            "is made again from the standard library), or pass another --cache-dir."
        ) from None


def _load_data(settings: Settings, cache_dir: Path) -> Any:
    from hf_kd.data import infilling_dataset, load_stdlib_docstrings

    if settings.task == "denoise":
        data = infilling_dataset(
            load_stdlib_docstrings("lm", cache_dir), settings.mask_fraction, max_words=settings.max_words
        )
    else:
        data = load_stdlib_docstrings(settings.task, cache_dir=cache_dir)
    data["train"] = _head(data["train"].shuffle(seed=settings.seed), settings.max_train_docs)
    data["test"] = _head(data["test"], settings.max_test_docs)
    return data


def train_tokenizer(texts: list[str], vocab_size: int, extra_special: tuple[str, ...] = ()) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``: <pad>=0, </s>=1 (end of sequence), <sep>=2, then
    ``extra_special`` (the denoise task's <mask>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<sep>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    special = {"mask_token": extra_special[0]} if extra_special else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="</s>", sep_token="<sep>", **special
    )


def tokenizer_texts(task: str, train: Any) -> list[str]:
    if task == "lm":
        return list(train["text"])
    source, target = COLUMNS[task]
    # denoise: the sources are the targets with words cut out, so the targets alone cover the text.
    columns = (target,) if task == "denoise" else (source, target)
    return [row[c] for row in train for c in columns]


def featurize(task: str, dataset: Any, tokenizer: Any, settings: Settings) -> Any:
    """Tokenised rows with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where not scored).

    lm: the docstrings, each ended by </s>, concatenated and cut into blocks of ``block_size`` tokens, all
    scored. Encoder-decoder tasks: ``input_ids`` = source </s>, ``labels`` = target </s>, both truncated.
    """
    eos = tokenizer.eos_token_id
    if task == "lm":

        def blocks(batch: dict[str, list]) -> dict[str, list]:
            ids = [i for text in batch["text"] for i in [*tokenizer(text)["input_ids"], eos]]
            size = settings.block_size
            chunks = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]
            return {"input_ids": chunks, "attention_mask": [[1] * size for _ in chunks], "labels": chunks}

        return dataset.map(blocks, batched=True, batch_size=1000, remove_columns=dataset.column_names)

    source_column, target_column = COLUMNS[task]

    def pairs(row: dict[str, str]) -> dict[str, list]:
        source = tokenizer(row[source_column])["input_ids"][: settings.source_length - 1] + [eos]
        target = tokenizer(row[target_column])["input_ids"][: settings.target_length - 1] + [eos]
        return {"input_ids": source, "attention_mask": [1] * len(source), "labels": target}

    return dataset.map(pairs, remove_columns=dataset.column_names)


def collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq

    # Pads input_ids with <pad> and labels with -100; lm blocks are already of equal length. No model is given,
    # so no decoder_input_ids are made here: each model shifts the labels itself, and in distillation the
    # student's are passed to the teacher (both start the decoder with <pad>, see build_seq2seq).
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


# ---- models and training -----------------------------------------------------------------------------


def build_model(tokenizer: Any, layers: int, width: int, settings: Settings, seed: int, arch: str = "") -> Any:
    """A randomly initialised model: GPT-2 for lm; for the encoder-decoder tasks ``arch`` ("bart", "t5")."""
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(seed)
    if settings.is_seq2seq:
        return build_seq2seq(arch or "bart", tokenizer, layers, width, settings)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.block_size,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Dropout only slows learning at these step counts: the training data are seen about twice.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def build_seq2seq(arch: str, tokenizer: Any, layers: int, width: int, settings: Settings) -> Any:
    """BART or T5 with ``layers`` encoder and ``layers`` decoder layers, heads of 64, feed-forward 4 x width.

    Both start the decoder with <pad> (T5's convention): the distillation trainer passes the student's decoder
    inputs to the teacher, so they must agree. No dropout, as for lm.
    """
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    heads = max(1, width // 64)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    if arch == "t5":
        config = T5Config(
            d_model=width,
            d_kv=width // heads,
            d_ff=4 * width,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=heads,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            **ids,
        )
        model = T5ForConditionalGeneration(config)
    elif arch == "bart":
        config = BartConfig(
            d_model=width,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=4 * width,
            decoder_ffn_dim=4 * width,
            max_position_embeddings=max(settings.source_length, settings.target_length),
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            # BART's default 0.02 lets Adam flatten this small post-LN encoder within ~25 steps: its output becomes
            # the same vector for every input and the decoder never reads the source (measured, docs/quickstart.md).
            init_std=0.05,
            forced_eos_token_id=None,
            **ids,
        )
        model = BartForConditionalGeneration(config)
    else:
        raise ValueError(f"arch={arch!r}: use 't5' or 'bart'.")
    generation = model.generation_config
    generation.decoder_start_token_id, generation.forced_bos_token_id = tokenizer.pad_token_id, None
    generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return model


def architecture(model: Any) -> str:
    """``"BART 3+3 x 192"``: family, encoder + decoder layers (or layers), width."""
    c = model.config
    if c.model_type == "gpt2":
        return f"GPT-2 {c.n_layer} x {c.n_embd}"
    if c.model_type == "t5":
        return f"T5 {c.num_layers}+{c.num_decoder_layers} x {c.d_model}"
    return f"BART {c.encoder_layers}+{c.decoder_layers} x {c.d_model}"


def training_args(output_dir: Path, settings: Settings, steps: int, lr: float, **extra: Any) -> Any:
    """The quickstart's schedule (cosine, 5% warm-up, no weight decay); ``extra`` adds fields or replaces these
    (the benchmarks log on their own cadence, without a progress bar)."""
    from hf_kd.config import DistillationConfig

    fields = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=32,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
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


def teacher_cache(settings: Settings, teacher: Any, tokenizer: Any, train: Any, cache_dir: Path) -> dict[str, Any]:
    """The teacher's top-``cache_k`` cache (with ``cache_tail_samples`` tail samples) over the featurised training
    set, computed once and kept beside the cached teacher; a later run verifies it and reads it again.

    The folder is named by the teacher's weights, so a teacher trained again never meets an older teacher's cache;
    one process writes it at a time. Returns its folder, size and the seconds this run spent on it.
    """
    from hf_kd.teachers.cache_writer import build_teacher_cache, cache_size, weights_hash

    name = f"topk-{settings.task}-{settings.teacher_key()}-{weights_hash(teacher)[:12]}"
    path = cache_dir / "quickstart" / f"{name}-k{settings.cache_k}-tail{settings.cache_tail_samples}"
    start = time.perf_counter()
    with folder_lock(path.parent, "hf-kd quickstart (caching the teacher)", wait=True):
        reused = path.exists()
        build_teacher_cache(
            teacher,
            train,
            path,
            tokenizer=tokenizer,
            k=settings.cache_k,
            tail_samples=settings.cache_tail_samples,
            seed=settings.seed,
            batch_size=32,
            shard_size=CACHE_SHARD_SIZE,
        )
    return {
        "path": str(path),
        "k": settings.cache_k,
        "tail_samples": settings.cache_tail_samples,
        "reused": reused,
        "seconds": time.perf_counter() - start,
        **cache_size(path),
    }


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


# ---- evaluation and report ---------------------------------------------------------------------------


@torch.no_grad()
def greedy_outputs(model: Any, tokenizer: Any, test: Any, settings: Settings) -> list[str]:
    """Greedy outputs for the first ``rouge_examples`` featurised test rows (encoder-decoder tasks)."""
    rows = _head(test, settings.rouge_examples)
    out = []
    for i in range(0, len(rows), 64):
        batch = tokenizer.pad({"input_ids": rows[i : i + 64]["input_ids"]}, return_tensors="pt")
        generated = model.generate(**batch, max_new_tokens=settings.target_length, do_sample=False, num_beams=1)
        out += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return out


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure, in percent."""
    from hf_kd.metrics import rouge

    return 100 * rouge(predictions, references, ["rougeL"])["rougeL"]


def constant_candidates(train_targets: list[str], outputs: list[list[str]], k: int = 20) -> list[str]:
    """Single outputs that a model ignoring its input might settle on, to find the best constant output.

    The ``k`` most frequent training targets, each model's most frequent output, and the most frequent training
    words in order of frequency, 1 to ``k`` of them ("the", "the of", ...: ROUGE-L rewards common words).
    """
    frequent = [text for text, _ in Counter(train_targets).most_common(k)]
    modes = [Counter(o).most_common(1)[0][0] for o in outputs if o]
    words = [w for w, _ in Counter(w for t in train_targets for w in t.lower().split()).most_common(k)]
    return list(dict.fromkeys([*frequent, *modes, *(" ".join(words[:n]) for n in range(1, len(words) + 1))]))


def conditioning(predictions: list[str], references: list[str], candidates: list[str]) -> dict[str, Any]:
    """Does a model condition on its input? Distinct greedy outputs, and ROUGE-L against the best constant output.

    Passes when at least half of the outputs are distinct and the ROUGE-L is at least 1.5 times that of the best
    single output among ``candidates`` repeated for every example.
    """
    scores = {c: rouge_l([c] * len(references), references) for c in candidates}
    best = max(scores, key=scores.get)
    score = rouge_l(predictions, references)
    distinct = len(set(predictions))
    ratio = score / scores[best] if scores[best] > 0 else float("inf")
    return {
        "distinct_outputs": distinct,
        "outputs": len(predictions),
        "rougeL": score,
        "best_constant": best,
        "best_constant_rougeL": scores[best],
        "ratio": ratio,
        "passes": 2 * distinct >= len(predictions) and ratio >= 1.5,
    }


def evaluate_model(
    model: Any, tokenizer: Any, test: Any, references: list[str], prompts: list[str], settings: Settings
) -> dict[str, Any]:
    """Parameters, test perplexity of the references, generation speed and (encoder-decoder) greedy outputs,
    their ROUGE-L and how many are distinct."""
    from hf_kd.metrics import count_parameters, generation_speed, perplexity

    result: dict[str, Any] = {
        "architecture": architecture(model),
        "params": count_parameters(model),
        "test_perplexity": perplexity(model, test, batch_size=32, data_collator=collator(tokenizer)),
    }
    if settings.is_seq2seq:
        predictions = greedy_outputs(model, tokenizer, test, settings)
        result["test_rougeL"] = rouge_l(predictions, references[: len(predictions)])
        result["distinct_outputs"] = len(set(predictions))
        result["predictions"] = predictions
    # Best of three timings: on a shared CPU the fastest run is the one least disturbed by other processes.
    speed = max(
        generation_speed(model, tokenizer, prompts, max_new_tokens=settings.speed_new_tokens, batch_size=len(prompts))[
            "tokens_per_second"
        ]
        for _ in range(3)
    )
    result["tokens_per_second"] = speed
    return result


MODEL_NAMES = {"teacher": "Teacher", "student_ce": "Student, CE only", "student_kd": "Student, distilled (KD)"}
ARCH_NAMES = {"t5": "T5", "bart": "BART", "gpt2": "GPT-2"}


def student_key(kind: str, arch: str, settings: Settings) -> str:
    """``student_ce``/``student_kd`` for the main (first) architecture, ``student_ce_bart`` ... for the others."""
    return f"student_{kind}" if arch == settings.archs[0] else f"student_{kind}_{arch}"


def model_name(key: str, settings: Settings) -> str:
    """The table's name for a result key: "Teacher", "Student, CE only", "Student (BART), distilled (KD)" ..."""
    if key == "teacher":
        return MODEL_NAMES[key]
    kind = key.split("_")[1]
    arch = key.split("_")[2] if key.count("_") == 2 else settings.archs[0]
    name = MODEL_NAMES[f"student_{kind}"]
    return name.replace("Student", f"Student ({ARCH_NAMES[arch]})") if settings.is_seq2seq else name


def markdown_table(models: dict[str, dict[str, Any]], settings: Settings) -> str:
    """A DistilBART-style table: size, speed-up over the teacher, test metrics."""
    seq2seq = settings.is_seq2seq
    header = ["Model", "Architecture", "Params", "Speed-up", "Tokens/s", "Test perplexity"]
    header += ["Test ROUGE-L", "Distinct outputs"] if seq2seq else []
    header += ["Train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    teacher_speed = models["teacher"]["tokens_per_second"]
    for key, m in models.items():
        cells = [
            model_name(key, settings),
            m["architecture"],
            f"{m['params'] / 1e6:.2f}M",
            f"{m['tokens_per_second'] / teacher_speed:.2f}x",
            f"{m['tokens_per_second']:.0f}",
            f"{m['test_perplexity']:.2f}",
        ]
        if seq2seq:
            cells += [f"{m['test_rougeL']:.2f}", f"{m['distinct_outputs']} / {len(m['predictions'])}"]
        cells += [f"{m['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    curves: dict[str, list[tuple[int, float]]], teacher_loss: float, path: Path, settings: Settings
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for key, points in curves.items():
        steps, losses = zip(*points, strict=True) if points else ((), ())
        style = ("o" if "_ce" in key else "s") + ("-" if key.count("_") == 1 else ":")
        ax.plot(steps, losses, style, label=model_name(key, settings), markersize=4)
    ax.axhline(teacher_loss, color="gray", linestyle="--", label="Teacher (final)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title(f"hf-kd quickstart ({settings.task}): same steps, data and init")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _settings_from_args(args: Any) -> Settings:
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


def run_quickstart(args: Any) -> int:
    """Run the whole quickstart as the options of `hf-kd quickstart` say (an ``argparse.Namespace`` or any
    object with those attributes: task, seed, smoke, output_dir, cache_dir, threads and the Settings fields,
    None for "the task's design"; ``overwrite``: replace the quickstart's entries in the output folder that it did
    not write with these settings, see :mod:`hf_kd.quickstart_files`); returns the exit status."""
    from hf_kd.data import default_cache_dir

    settings = _settings_from_args(args)
    check_settings(settings, getattr(args, "threads", None))
    output_dir = check_writable_folder("--output-dir", args.output_dir)
    cache_dir = check_writable_folder("--cache-dir", args.cache_dir or default_cache_dir())
    output_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(output_dir, "hf-kd quickstart"):  # a second run on this folder is refused, naming this one
        claim_output_dir(output_dir, settings, overwrite=bool(getattr(args, "overwrite", False)))
        return _run(args, settings, output_dir, cache_dir)


def _run(args: Any, settings: Settings, output_dir: Path, cache_dir: Path) -> int:
    from hf_kd.metrics import cross_entropy_sum

    global _START
    start = _START = time.perf_counter()

    stage(f"1/6 data: Python {sys.version.split()[0]} standard-library docstrings, task {settings.task!r}")
    data = load_data(settings, cache_dir)
    stage(f"    {len(data['train'])} train / {len(data['validation'])} validation / {len(data['test'])} test rows")

    layers = f"{settings.teacher_layers}+{settings.teacher_layers}" if settings.is_seq2seq else settings.teacher_layers
    stage(
        f"2/6 tokenizer + teacher ({'BART' if settings.is_seq2seq else 'GPT-2'} {layers} x {settings.teacher_width}, "
        f"{settings.teacher_steps} steps)"
    )
    tokenizer, teacher, teacher_seconds, cached = train_teacher(settings, data, cache_dir)
    if cached:
        stage(f"    loaded from the cache ({cache_dir / 'quickstart'}); trained in {teacher_seconds:.0f} s")
    train = featurize(settings.task, data["train"], tokenizer, settings)
    cache = None
    if settings.cache_k:
        stage(
            f"    teacher cache: top-{settings.cache_k} + {settings.cache_tail_samples} tail samples per target token"
        )
        cache = teacher_cache(settings, teacher, tokenizer, train, cache_dir)
        stage(
            f"    {'verified' if cache['reused'] else 'written'} in {cache['seconds']:.0f} s: "
            f"{cache['bytes'] / 1e6:.0f} MB, {cache['target_tokens']} target tokens ({cache['path']})"
        )
    # A copy beside the students (for lm, the teacher `hf-kd distill --config recipes/configs/quickstart_lm.yaml`
    # distills from).
    teacher.save_pretrained(output_dir / "teacher")
    tokenizer.save_pretrained(output_dir / "teacher")
    # The students' cards name the teacher published beside them, not the cache folder it was loaded from.
    teacher.name_or_path = teacher.config.name_or_path = str(output_dir / "teacher")
    valid = _head(featurize(settings.task, data["validation"], tokenizer, settings), settings.eval_blocks)
    test = featurize(settings.task, data["test"], tokenizer, settings)

    models, seconds, curves, card_writers = {"teacher": teacher}, {"teacher": teacher_seconds}, {}, {}
    for arch in settings.archs:
        for kind in ("ce", "kd"):
            key = student_key(kind, arch, settings)
            what = "on the labels (CE)" if kind == "ce" else f"by distillation (forward KL, T={settings.temperature}"
            what += "" if kind == "ce" else (", from the teacher cache)" if cache else ", live teacher)")
            layers = settings.student_layers
            stage(
                f"{3 if kind == 'ce' else 4}/6 {model_name(key, settings)}: {ARCH_NAMES[arch]} "
                f"{f'{layers}+{layers}' if settings.is_seq2seq else layers} x {settings.student_width}, "
                f"{settings.student_steps} steps, {what}"
            )
            models[key], trainer, seconds[key], curves[key] = train_student(
                settings, kind, teacher, tokenizer, train, valid, output_dir / key, arch, cache and Path(cache["path"])
            )
            trainer.save_model(str(output_dir / key))
            if kind == "kd":  # its card, with the test metrics, is written after the evaluation
                card_writers[key] = trainer

    stage("5/6 evaluation on the test split")
    references = (
        list(_head(data["test"], settings.rouge_examples)[COLUMNS[settings.task][1]]) if settings.is_seq2seq else []
    )
    prompts = [tokenizer.decode(ids[:16]) for ids in test[: settings.speed_prompts]["input_ids"]]
    results = {}
    for key, model in models.items():
        results[key] = evaluate_model(model, tokenizer, test, references, prompts, settings)
        results[key]["train_seconds"] = seconds[key]
    total, count = cross_entropy_sum(teacher, valid, batch_size=32, data_collator=collator(tokenizer))
    teacher_check = None
    if settings.is_seq2seq:
        train_targets = list(data["train"][COLUMNS[settings.task][1]])
        candidates = constant_candidates(train_targets, [m["predictions"] for m in results.values()])
        teacher_check = conditioning(results["teacher"]["predictions"], references, candidates)
    copy_baseline = None
    if settings.task == "denoise":
        from hf_kd.data import MASK_TOKEN

        # Not a constant: the input itself, masks dropped. ROUGE-L mostly measures copying on this task.
        sources = _head(data["test"], settings.rouge_examples)["source"]
        copy_baseline = rouge_l([" ".join(w for w in s.split() if w != MASK_TOKEN) for s in sources], references)

    stage("6/6 report")
    for key, trainer in card_writers.items():  # DistillationTrainer's card adds how the student was distilled
        trainer.create_model_card(
            dataset=f"Python {sys.version.split()[0]} stdlib docstrings ({settings.task})",
            tasks="text2text-generation" if settings.is_seq2seq else "text-generation",
            metrics={m: results[key][m] for m in ("test_rougeL", "test_perplexity") if m in results[key]},
        )
    metrics = ["test_rougeL", "test_perplexity"] if settings.is_seq2seq else ["test_perplexity"]
    wins = {}  # per architecture: does its KD student beat its CE student on each metric?
    for arch in settings.archs:
        kd, ce = results[student_key("kd", arch, settings)], results[student_key("ce", arch, settings)]
        wins[arch] = {m: kd[m] > ce[m] if m == "test_rougeL" else kd[m] < ce[m] for m in metrics}
    table = markdown_table(results, settings)
    plot_path = output_dir / "eval_loss.png"
    plot_curves(curves, total / count, plot_path, settings)
    wall = time.perf_counter() - start
    report = {
        "task": settings.task,
        "command": command_line(args),
        "settings": dataclasses.asdict(settings),
        "teacher_cached": cached,
        "teacher_cache": cache,  # None: the KD students ran the teacher at every step
        "models": results,
        "main_metric": metrics[0],
        "kd_beats_ce": all(wins[settings.archs[0]].values()),  # the main pair, on every metric
        "kd_beats_ce_on": wins,
        "teacher_conditioning": teacher_check,
        "copy_input_rougeL": copy_baseline,
        "eval_loss_curves": curves,
        "teacher_validation_loss": total / count,
        "wall_seconds": wall,
        "cpu_seconds": time.process_time(),  # this process, all threads, imports included
        "versions": _versions(),
    }
    write_text_atomic(output_dir / "report.json", json.dumps(report, indent=2))
    write_text_atomic(output_dir / "report.md", _markdown_report(report, table))
    print("\n" + table + "\n")
    if teacher_check is not None:
        stage(conditioning_sentence(teacher_check))
    for arch, arch_wins in wins.items():
        kd, ce = results[student_key("kd", arch, settings)], results[student_key("ce", arch, settings)]
        for metric, won in arch_wins.items():
            stage(
                f"the distilled {ARCH_NAMES[arch]} student {'beats' if won else 'does NOT beat'} the CE-only one on "
                f"{metric} ({kd[metric]:.2f} vs {ce[metric]:.2f})"
            )
    stage(f"done in {wall:.0f} s; wrote {output_dir}/report.md, report.json, {plot_path.name}, student_kd/, teacher/")
    return 0


def _versions() -> dict[str, str]:
    import transformers

    from hf_kd.version import __version__

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_kd": __version__,
    }


def conditioning_sentence(check: dict[str, Any]) -> str:
    verdict = "conditions" if check["passes"] else "does NOT condition"
    return (
        f"the teacher {verdict} on its input: {check['distinct_outputs']} of {check['outputs']} greedy outputs are "
        f"distinct (need half), ROUGE-L {check['rougeL']:.2f} vs {check['best_constant_rougeL']:.2f} for the best "
        f"constant output {check['best_constant']!r}: {check['ratio']:.2f}x (need 1.5x)"
    )


def _markdown_report(report: dict[str, Any], table: str) -> str:
    s = report["settings"]
    teacher_note = " (loaded from the cache)" if report["teacher_cached"] else ""
    # The recipe config reads the lm data; the other tasks' teachers are saved all the same.
    recipe = "; distill it again with `hf-kd distill --config recipes/configs/quickstart_lm.yaml`"
    recipe = recipe if report["task"] == "lm" else ""
    models = report["models"]
    teacher = models["teacher"]["architecture"]
    student = " and ".join(m["architecture"] for key, m in models.items() if key.startswith("student_kd"))
    check = report["teacher_conditioning"]
    seq2seq = f"\nROUGE-L: greedy outputs for the first {s['rouge_examples']} test examples.\n" if check else ""
    seq2seq += f"Conditioning check: {conditioning_sentence(check)}.\n" if check else ""
    if report["copy_input_rougeL"] is not None:
        seq2seq += (
            f"For scale: the input itself with its <mask> tokens dropped scores ROUGE-L "
            f"{report['copy_input_rougeL']:.2f} (most of each target is in its input).\n"
        )
    cache = report["teacher_cache"]
    source = "from the live teacher at every step"
    if cache:
        source = (
            f"from the teacher's top-{cache['k']} cache with {cache['tail_samples']} tail samples per target token, "
            f"computed once over the training set ({cache['bytes'] / 1e6:.0f} MB, `hf_kd.teachers.cache_writer`)"
        )
    wins = "; ".join(
        f"{ARCH_NAMES[arch]}: " + ", ".join(f"{m} {won}" for m, won in arch_wins.items())
        for arch, arch_wins in report["kd_beats_ce_on"].items()
    )
    return f"""# hf-kd quickstart report

Task: `{report["task"]}` on the Python {report["versions"]["python"]} standard-library docstrings.
Teacher: {teacher}, {s["teacher_steps"]} steps{teacher_note}.
Students: {student}, {s["student_steps"]} steps each; of each architecture one on the labels only and one by
distillation (forward KL, T = {s["temperature"]}, alpha = {s["alpha"]}; {source}), with the same initialisation
and data order. Batch {s["batch_size"]},
one byte-level BPE tokenizer of {s["vocab_size"]} tokens for all three.

{table}
{seq2seq}
Speed: greedy generation of {s["speed_new_tokens"]} new tokens for {s["speed_prompts"]} prompts, on this CPU.
Distilled student beats CE-only student ({wins}).
Saved here: `student_kd/` (with its model card), `student_ce/` and `teacher/` (model and tokenizer{recipe}).
Wall time: {report["wall_seconds"]:.0f} s; CPU time {report["cpu_seconds"]:.0f} s. Command: `{report["command"]}`

![evaluation loss](eval_loss.png)
"""
