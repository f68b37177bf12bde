"""The whole run, stage by stage: data, tokenizer and teacher, the teacher cache, the students, evaluation, report."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from hf_kd.errors import check_writable_folder, write_text_atomic
from hf_kd.locking import folder_lock
from hf_kd.quickstart.cache import teacher_cache
from hf_kd.quickstart.dataset import collator, featurize, head, load_data
from hf_kd.quickstart.files import claim_output_dir
from hf_kd.quickstart.report import (
    ARCH_NAMES,
    conditioning_sentence,
    markdown_report,
    markdown_table,
    model_name,
    plot_curves,
    student_key,
    versions,
)
from hf_kd.quickstart.scoring import conditioning, constant_candidates, evaluate_model, rouge_l
from hf_kd.quickstart.settings import COLUMNS, Settings, check_settings, command_line, settings_from_args
from hf_kd.quickstart.training import train_student, train_teacher

_START = time.perf_counter()


def stage(message: str) -> None:
    """Print ``message`` with the wall time since the start and this process's CPU time (all threads)."""
    print(
        f"[hf-kd quickstart {time.perf_counter() - _START:5.0f}s, cpu {time.process_time():5.0f}s] {message}",
        flush=True,
    )


def run_quickstart(args: Any) -> int:
    """Run the whole quickstart as the options of `hf-kd quickstart` say (an ``argparse.Namespace`` or any
    object with those attributes: task, seed, smoke, output_dir, cache_dir, threads and the Settings fields,
    None for "the task's design"; ``overwrite``: replace the quickstart's entries in the output folder that it did
    not write with these settings, see :mod:`hf_kd.quickstart_files`); returns the exit status."""
    from hf_kd.data import default_cache_dir

    settings = settings_from_args(args)
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
    valid = head(featurize(settings.task, data["validation"], tokenizer, settings), settings.eval_blocks)
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
        list(head(data["test"], settings.rouge_examples)[COLUMNS[settings.task][1]]) if settings.is_seq2seq else []
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
        sources = head(data["test"], settings.rouge_examples)["source"]
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
        "versions": versions(),
    }
    write_text_atomic(output_dir / "report.json", json.dumps(report, indent=2))
    write_text_atomic(output_dir / "report.md", markdown_report(report, table))
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
