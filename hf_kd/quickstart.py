"""`hf-kd quickstart`: distillation end to end on a laptop CPU, offline, in a few minutes.

On the built-in standard-library docstring data (:mod:`hf_kd.data`) it trains a small GPT-2 teacher from
scratch (cached), then, with the same step budget, data order and initialisation, one student on the labels
alone and one by distillation from the teacher (:class:`hf_kd.DistillationTrainer`). It evaluates the three
on the test split and writes a DistilBART-style table (``report.md``, ``report.json``), a plot of the
students' evaluation loss, the distilled student with its model card, and the teacher (``teacher/``, the
teacher of ``recipes/configs/quickstart_lm.yaml``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

# Nothing below reaches the Hub: data, tokenizer and models are all made locally. The tokenizer is used
# before and after the Trainer's dataloader forks; keep its thread pool quiet about it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Bump when anything that shapes the cached tokenizer/teacher changes.
TEACHER_CACHE_VERSION = 1


@dataclass
class Settings:
    """Everything that shapes a quickstart run. The defaults are the measured full-size design."""

    task: str = "lm"
    seed: int = 0
    vocab_size: int = 2048
    block_size: int = 128  # lm: tokens per training block
    source_length: int = 96  # summarize: code tokens kept before the separator
    summary_length: int = 32  # summarize: summary tokens kept (incl. end of sequence)
    batch_size: int = 16
    teacher_layers: int = 3
    teacher_width: int = 192
    teacher_steps: int = 500
    teacher_lr: float = 2e-3
    student_layers: int = 2
    student_width: int = 64
    student_steps: int = 500
    student_lr: float = 3e-3
    temperature: float = 1.0
    alpha: float = 0.0
    eval_blocks: int = 64  # validation rows scored at each evaluation during training
    num_evals: int = 8
    max_train_docs: int | None = None  # subsample the training split (smoke mode)
    max_test_docs: int | None = None
    rouge_examples: int = 200  # summarize: test examples generated for ROUGE-L
    speed_prompts: int = 16
    speed_new_tokens: int = 32

    def teacher_key(self) -> str:
        """A hash of what determines the tokenizer and teacher, naming their cache folder."""
        fields = (
            "task seed vocab_size block_size source_length summary_length batch_size teacher_layers "
            "teacher_width teacher_steps teacher_lr max_train_docs"
        ).split()
        from hf_kd.data import EXTRACTION_VERSION

        # The data come from the running Python's standard library: another version, another teacher.
        versions = {"v": TEACHER_CACHE_VERSION, "data": EXTRACTION_VERSION, "python": sys.version.split()[0]}
        payload = json.dumps({f: getattr(self, f) for f in fields} | versions, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


SMOKE = {
    "vocab_size": 300,
    "block_size": 32,
    "source_length": 24,
    "summary_length": 12,
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
    print(f"[hf-kd quickstart {time.perf_counter() - _START:5.0f}s] {message}", flush=True)


# ---- data and tokenizer ------------------------------------------------------------------------------


def _head(dataset: Any, n: int | None) -> Any:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def load_data(settings: Settings, cache_dir: Path) -> Any:
    from hf_kd.data import load_stdlib_docstrings

    data = load_stdlib_docstrings(settings.task, cache_dir=cache_dir)
    data["train"] = _head(data["train"].shuffle(seed=settings.seed), settings.max_train_docs)
    data["test"] = _head(data["test"], settings.max_test_docs)
    return data


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``: <pad>=0, </s>=1 (end of sequence), <sep>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<sep>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="</s>", sep_token="<sep>"
    )


def tokenizer_texts(task: str, train: Any) -> list[str]:
    return list(train["text"]) if task == "lm" else [t for row in train for t in (row["code"], row["summary"])]


def featurize(task: str, dataset: Any, tokenizer: Any, settings: Settings) -> Any:
    """Tokenised rows with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where not scored).

    lm: the docstrings, each ended by </s>, concatenated and cut into blocks of ``block_size`` tokens, all
    scored. summarize: ``code <sep> summary </s>``, only the summary and </s> scored.
    """
    eos, sep = tokenizer.eos_token_id, tokenizer.sep_token_id
    if task == "lm":

        def blocks(batch: dict[str, list]) -> dict[str, list]:
            ids = [i for text in batch["text"] for i in [*tokenizer(text)["input_ids"], eos]]
            size = settings.block_size
            chunks = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]
            return {"input_ids": chunks, "attention_mask": [[1] * size for _ in chunks], "labels": chunks}

        return dataset.map(blocks, batched=True, batch_size=1000, remove_columns=dataset.column_names)

    def pairs(row: dict[str, str]) -> dict[str, list]:
        source = tokenizer(row["code"])["input_ids"][: settings.source_length] + [sep]
        target = tokenizer(" " + row["summary"])["input_ids"][: settings.summary_length - 1] + [eos]
        return {
            "input_ids": source + target,
            "attention_mask": [1] * (len(source) + len(target)),
            "labels": [-100] * len(source) + target,
        }

    return dataset.map(pairs, remove_columns=dataset.column_names)


def collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq

    # Pads input_ids with <pad> and labels with -100; lm blocks are already of equal length.
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


# ---- models and training -----------------------------------------------------------------------------


def build_model(tokenizer: Any, layers: int, width: int, settings: Settings, seed: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(seed)
    positions = settings.block_size if settings.task == "lm" else settings.source_length + 1 + settings.summary_length
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
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


def training_args(output_dir: Path, settings: Settings, steps: int, lr: float, **extra: Any) -> Any:
    from hf_kd import DistillationConfig

    return DistillationConfig(
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
        **extra,
    )


def train_teacher(settings: Settings, data: Any, cache_dir: Path) -> tuple[Any, Any, float, bool]:
    """The tokenizer and teacher, from the cache when an identical run already trained them."""
    from transformers import AutoTokenizer, GPT2LMHeadModel, Trainer

    path = cache_dir / "quickstart" / f"teacher-{settings.task}-{settings.teacher_key()}"
    if (path / "config.json").exists():
        info = json.loads((path / "quickstart_teacher.json").read_text())
        return AutoTokenizer.from_pretrained(path), GPT2LMHeadModel.from_pretrained(path), info["train_seconds"], True
    start = time.perf_counter()
    tokenizer = train_tokenizer(tokenizer_texts(settings.task, data["train"]), settings.vocab_size)
    train = featurize(settings.task, data["train"], tokenizer, settings)
    teacher = build_model(tokenizer, settings.teacher_layers, settings.teacher_width, settings, settings.seed + 1)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    args = training_args(tmp, settings, settings.teacher_steps, settings.teacher_lr)
    trainer = Trainer(model=teacher, args=args, train_dataset=train, data_collator=collator(tokenizer))
    trainer.train()
    seconds = time.perf_counter() - start
    teacher.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "quickstart_teacher.json").write_text(json.dumps({"train_seconds": seconds, **vars(settings)}))
    tmp.rename(path)  # complete or absent: an interrupted run never leaves a half-saved teacher
    teacher.name_or_path = teacher.config.name_or_path = str(path)  # named in the student's model card
    return tokenizer, teacher.eval(), seconds, False


class ValidationCurve(TrainerCallback):
    """Validation cross-entropy at step 0 and ``num_points`` evenly spaced steps, the same way for both students.

    (The Trainer's own ``eval_loss`` would not do: for causal LMs it divides by the unshifted label count, and
    the distillation trainer's is the distillation loss.)
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
    settings: Settings, kind: str, teacher: Any, tokenizer: Any, train: Any, valid: Any, output_dir: Path
) -> tuple[Any, Any, float, list[tuple[int, float]]]:
    """A student trained on the labels (kind "ce") or distilled from the teacher (kind "kd")."""
    from hf_kd import DistillationTrainer

    student = build_model(tokenizer, settings.student_layers, settings.student_width, settings, settings.seed)
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
        trainer = DistillationTrainer(teacher_model=teacher, args=args, **common)
    else:
        from transformers import Trainer

        args = training_args(output_dir, settings, settings.student_steps, settings.student_lr)
        trainer = Trainer(args=args, **common)
    trainer.train()
    return student.eval(), trainer, time.perf_counter() - start, curve.points


# ---- evaluation and report ---------------------------------------------------------------------------


@torch.no_grad()
def summaries(model: Any, tokenizer: Any, test: Any, settings: Settings) -> list[str]:
    """Greedy summaries of the first ``rouge_examples`` featurised test rows (prompt: code <sep>)."""
    rows = _head(test, settings.rouge_examples)
    out = []
    for i in range(0, len(rows), 32):
        batch = rows[i : i + 32]
        sources = [ids[: labels.count(-100)] for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)]
        width = max(map(len, sources))
        # Left padding, so that every row's continuation starts at the same position.
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in sources])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sources])
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=settings.summary_length,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += [t.strip() for t in tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)]
    return out


def evaluate_model(
    model: Any, tokenizer: Any, test: Any, references: list[str], prompts: list[str], settings: Settings
) -> dict[str, Any]:
    """Parameters, test perplexity, generation speed and (summarize) ROUGE-L of greedy summaries."""
    from hf_kd.metrics import count_parameters, generation_speed, perplexity, rouge

    result: dict[str, Any] = {
        "params": count_parameters(model),
        "test_perplexity": perplexity(model, test, batch_size=32, data_collator=collator(tokenizer)),
    }
    if settings.task == "summarize":
        predictions = summaries(model, tokenizer, test, settings)
        result["test_rougeL"] = 100 * rouge(predictions, references[: len(predictions)], ["rougeL"])["rougeL"]
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


def markdown_table(models: dict[str, dict[str, Any]], task: str) -> str:
    """A DistilBART-style table: size, speed-up over the teacher, test metrics."""
    header = ["Model", "Params", "Speed-up", "Tokens/s", "Test perplexity"]
    header += ["Test ROUGE-L"] if task == "summarize" else []
    header += ["Train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    teacher_speed = models["teacher"]["tokens_per_second"]
    for key, m in models.items():
        cells = [
            MODEL_NAMES[key],
            f"{m['params'] / 1e6:.2f}M",
            f"{m['tokens_per_second'] / teacher_speed:.2f}x",
            f"{m['tokens_per_second']:.0f}",
            f"{m['test_perplexity']:.2f}",
        ]
        cells += [f"{m['test_rougeL']:.2f}"] if task == "summarize" else []
        cells += [f"{m['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[tuple[int, float]]], teacher_loss: float, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for key, style in (("student_ce", "o-"), ("student_kd", "s-")):
        steps, losses = zip(*curves[key], strict=True) if curves[key] else ((), ())
        ax.plot(steps, losses, style, label=MODEL_NAMES[key], markersize=4)
    ax.axhline(teacher_loss, color="gray", linestyle="--", label="Teacher (final)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title(f"hf-kd quickstart ({task}): same steps, data and init")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _settings_from_args(args: argparse.Namespace) -> Settings:
    settings = Settings(task=args.task, seed=args.seed)
    if args.smoke:
        settings = dataclasses.replace(settings, **SMOKE)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if f.name not in ("task", "seed") and getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(settings, **overrides)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (options left at their default omitted)."""
    words = ["hf-kd", "quickstart", "--task", args.task, "--output-dir", str(args.output_dir)]
    words += ["--smoke"] if args.smoke else []
    for name in ("cache_dir", "seed", "threads", *(f.name for f in dataclasses.fields(Settings))):
        value = getattr(args, name, None)
        if name not in ("task",) and value is not None and not (name == "seed" and value == 0):
            words += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(words)


def run(args: argparse.Namespace) -> int:
    """Run the quickstart; returns the exit status."""
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _pipeline(args)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep their setting


def _pipeline(args: argparse.Namespace) -> int:
    from hf_kd.data import default_cache_dir
    from hf_kd.metrics import cross_entropy_sum

    global _START
    start = _START = time.perf_counter()
    settings = _settings_from_args(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()

    stage(f"1/6 data: Python {sys.version.split()[0]} standard-library docstrings, task {settings.task!r}")
    data = load_data(settings, cache_dir)
    stage(f"    {len(data['train'])} train / {len(data['validation'])} validation / {len(data['test'])} test rows")

    stage(
        f"2/6 tokenizer + teacher ({settings.teacher_layers} layers x {settings.teacher_width}, "
        f"{settings.teacher_steps} steps)"
    )
    tokenizer, teacher, teacher_seconds, cached = train_teacher(settings, data, cache_dir)
    if cached:
        stage(f"    loaded from the cache ({cache_dir / 'quickstart'}); trained in {teacher_seconds:.0f} s")
    # A copy beside the students, so that `hf-kd distill --config recipes/configs/quickstart_lm.yaml` finds it.
    teacher.save_pretrained(output_dir / "teacher")
    tokenizer.save_pretrained(output_dir / "teacher")
    train = featurize(settings.task, data["train"], tokenizer, settings)
    valid = _head(featurize(settings.task, data["validation"], tokenizer, settings), settings.eval_blocks)
    test = featurize(settings.task, data["test"], tokenizer, settings)

    students, seconds, curves = {}, {}, {}
    for number, kind in ((3, "ce"), (4, "kd")):
        what = "on the labels (CE)" if kind == "ce" else f"by distillation (forward KL, T={settings.temperature})"
        stage(
            f"{number}/6 student {kind} ({settings.student_layers} layers x {settings.student_width}, "
            f"{settings.student_steps} steps) {what}"
        )
        model, trainer, secs, curves[f"student_{kind}"] = train_student(
            settings, kind, teacher, tokenizer, train, valid, output_dir / f"student_{kind}"
        )
        students[kind], seconds[kind] = model, secs
        trainer.save_model(str(output_dir / f"student_{kind}"))
        if kind == "kd":  # DistillationTrainer's card adds how the student was distilled
            trainer.create_model_card(
                dataset=f"Python {sys.version.split()[0]} stdlib docstrings ({settings.task})",
                tasks="text-generation",
            )

    stage("5/6 evaluation on the test split")
    references = list(_head(data["test"], settings.rouge_examples)["summary"]) if settings.task == "summarize" else []
    prompts = [tokenizer.decode(ids[:16]) for ids in test[: settings.speed_prompts]["input_ids"]]
    models = {"teacher": teacher, "student_ce": students["ce"], "student_kd": students["kd"]}
    results = {}
    for key, model in models.items():
        results[key] = evaluate_model(model, tokenizer, test, references, prompts, settings)
    results["teacher"]["train_seconds"] = teacher_seconds
    results["student_ce"]["train_seconds"] = seconds["ce"]
    results["student_kd"]["train_seconds"] = seconds["kd"]
    total, count = cross_entropy_sum(teacher, valid, batch_size=32, data_collator=collator(tokenizer))

    stage("6/6 report")
    metric = "test_rougeL" if settings.task == "summarize" else "test_perplexity"
    sign = 1 if metric == "test_rougeL" else -1
    kd_wins = sign * results["student_kd"][metric] > sign * results["student_ce"][metric]
    table = markdown_table(results, settings.task)
    plot_path = output_dir / "eval_loss.png"
    plot_curves(curves, total / count, plot_path, settings.task)
    wall = time.perf_counter() - start
    report = {
        "task": settings.task,
        "command": command_line(args),
        "settings": dataclasses.asdict(settings),
        "teacher_cached": cached,
        "models": results,
        "main_metric": metric,
        "kd_beats_ce": kd_wins,
        "eval_loss_curves": curves,
        "teacher_validation_loss": total / count,
        "wall_seconds": wall,
        "cpu_seconds": time.process_time(),  # this process, all threads, imports included
        "versions": _versions(),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    (output_dir / "report.md").write_text(_markdown_report(report, table))
    print("\n" + table + "\n")
    verdict = "beats" if kd_wins else "does NOT beat"
    stage(
        f"the distilled student {verdict} the CE-only student on {metric} "
        f"({results['student_kd'][metric]:.2f} vs {results['student_ce'][metric]:.2f})"
    )
    stage(f"done in {wall:.0f} s; wrote {output_dir}/report.md, report.json, {plot_path.name}, student_kd/, teacher/")
    return 0


def _versions() -> dict[str, str]:
    import transformers

    from hf_kd import __version__

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_kd": __version__,
    }


def _markdown_report(report: dict[str, Any], table: str) -> str:
    s = report["settings"]
    teacher_note = " (loaded from the cache)" if report["teacher_cached"] else ""
    # The recipe config reads the lm data; a summarize teacher is saved all the same.
    recipe = "; distill it again with `hf-kd distill --config recipes/configs/quickstart_lm.yaml`"
    recipe = recipe if report["task"] == "lm" else ""
    return f"""# hf-kd quickstart report

Task: `{report["task"]}` on the Python {report["versions"]["python"]} standard-library docstrings.
Teacher: GPT-2, {s["teacher_layers"]} layers x {s["teacher_width"]}, {s["teacher_steps"]} steps{teacher_note}.
Students: GPT-2, {s["student_layers"]} layers x {s["student_width"]}, {s["student_steps"]} steps each, same
initialisation and data order; one on the labels only, one by distillation (forward KL, T = {s["temperature"]},
alpha = {s["alpha"]}). Batch {s["batch_size"]}, byte-level BPE of {s["vocab_size"]} tokens.

{table}

Speed: greedy generation of {s["speed_new_tokens"]} new tokens for {s["speed_prompts"]} prompts, on this CPU.
Distilled student beats CE-only student on {report["main_metric"]}: {report["kd_beats_ce"]}.
Saved here: `student_kd/` (with its model card), `student_ce/` and `teacher/` (model and tokenizer{recipe}).
Wall time: {report["wall_seconds"]:.0f} s. Command: `{report["command"]}`

![evaluation loss](eval_loss.png)
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``hf-kd quickstart`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "quickstart",
        help="Distill a small model end to end on built-in data, offline, in a few CPU minutes.",
        description=(
            "Train a small GPT-2 teacher from scratch on the docstrings of the Python standard library (cached "
            "for later runs), then two students with the same step budget, data and initialisation: one on the "
            "labels alone, one by distillation from the teacher. Evaluate the three on the test split and write "
            "report.md, report.json, eval_loss.png, the distilled student (with its model card) and the teacher "
            "to --output-dir. Needs no network; about 600 CPU-seconds (see docs/quickstart.md)."
        ),
    )
    parser.add_argument(
        "--task",
        choices=["lm", "summarize"],
        default="lm",
        help="lm: language modelling of docstrings (perplexity); summarize: function source -> "
        "first docstring sentence (perplexity and ROUGE-L). Default: lm.",
    )
    parser.add_argument(
        "--output-dir", default="hf_kd_quickstart", help="Where reports and students go (default: ./hf_kd_quickstart)."
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="Cache for the data set, tokenizer and teacher (default: $HF_KD_CACHE or ~/.cache/hf_kd).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seeds the teacher, the students and the data order.")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="Tiny models, data and step counts: checks the whole pipeline in well under a minute.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    sizes = parser.add_argument_group("sizes and budget (defaults: the measured design, see docs/quickstart.md)")
    for name, kind in (
        ("teacher_steps", int),
        ("student_steps", int),
        ("batch_size", int),
        ("teacher_layers", int),
        ("teacher_width", int),
        ("student_layers", int),
        ("student_width", int),
        ("vocab_size", int),
        ("block_size", int),
        ("teacher_lr", float),
        ("student_lr", float),
        ("temperature", float),
        ("max_train_docs", int),
    ):
        default = getattr(Settings, name)
        help_text = f"default: {default if default is not None else 'all'}"
        sizes.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=help_text)
    sizes.add_argument("--alpha", type=float, default=None, help="weight of CE in the KD student's loss (default 0)")
    parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_kd.quickstart``: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog="hf-kd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "quickstart":
        argv = ["quickstart", *argv]
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
