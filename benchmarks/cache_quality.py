"""Quality of training from a top-k teacher cache, and of sequence-level KD, on the quickstart's lm task (CPU).

Run from the repository root: ``python benchmarks/cache_quality.py --cache-dir DIR`` (the quickstart's data and
teacher cache; the teacher is trained there first when absent). Four students with the same initialisation, data
order and steps are trained on the same training blocks and scored by test perplexity:

* ``ce``: cross-entropy on the data;
* ``kd_online``: DistillationTrainer, forward KL (alpha 0, T 1) against the live teacher;
* ``kd_cache_k<K>[_s<M>][_uniform]``: the same loss from a top-K cache (hf_kd.teachers.cache_writer) through
  ``DistillationTrainer(teacher_cache=...)``: the k + 1 bucket forward KL; with ``_s<M>`` the cache also holds M
  tail samples per target and the loss uses the unbiased sampled tail; with ``_uniform`` the uniform tail;
* ``seqkd``: cross-entropy on the teacher's greedy continuations of each block's first 16 tokens
  (hf_kd.teachers.pseudo_label), the block's text after them replaced.

Results: benchmarks/results/cache_quality.json / .md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import numpy as np  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Trainer  # noqa: E402

from hf_kd import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_kd import quickstart as qs  # noqa: E402
from hf_kd.metrics import perplexity  # noqa: E402
from hf_kd.teachers.cache import CachedTeacher  # noqa: E402
from hf_kd.teachers.cache_writer import build_teacher_cache, cache_size  # noqa: E402
from hf_kd.teachers.pseudo_label import assemble, generate_pseudo_labels  # noqa: E402


def training_args(output_dir: Path, settings: Any, seed: int, **extra: Any) -> DistillationConfig:
    """The quickstart's student schedule, without evaluation during training (the test set scores at the end)."""
    return common.training_args(output_dir, settings, settings.student_steps, settings.student_lr, seed=seed, **extra)


def seqkd_rows(teacher: Any, tokenizer: Any, train: Dataset, settings: Any, folder: Path, prompt: int) -> Dataset:
    """Training blocks whose tokens after the first ``prompt`` are the teacher's greedy continuation."""
    prompts = Dataset.from_dict({"prompt": [tokenizer.decode(ids[:prompt]) for ids in train["input_ids"]]})
    generate_pseudo_labels(
        teacher,
        tokenizer,
        prompts,
        folder,
        source_column="prompt",
        max_source_length=prompt,  # decoding and re-encoding may change the count: keep prompt + new <= block
        max_new_tokens=settings.block_size - prompt,
        batch_size=240,  # generation here is per-step overhead bound: fewer, larger batches
        shard_size=480,
    )
    labelled = assemble(prompts, folder, target_column="continuation")

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        ids = tokenizer(row["prompt"] + " " + row["continuation"])["input_ids"][: settings.block_size]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}

    return labelled.map(encode, remove_columns=labelled.column_names)


def top_k_mass(cache: CachedTeacher, rows: int = 300) -> float:
    """Mean probability the teacher puts on its top-k tokens (1 - tail mass), over the first ``rows`` rows."""
    tails = cache.data.select(range(min(rows, len(cache.data)))).with_format("numpy")["tail_logmass"]
    return float(1.0 - np.exp(np.concatenate(list(tails))).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="Quickstart data/teacher cache folder (required unless --report-only).")
    parser.add_argument("--work-dir", default="/tmp/hf_kd_cache_quality")
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--variants", nargs="+", default=["ce", "kd_online", "kd_cache_k64", "seqkd"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--teacher-dir", help="Load the teacher and tokenizer from here instead of the quickstart.")
    parser.add_argument("--merge", action="store_true", help="Add to the results already in --out.")
    parser.add_argument(
        "--student-seeds",
        type=int,
        nargs="+",
        default=[None],
        help="Student initialisation and data-order seeds; results of seed S are named <variant>@S (the default, "
        "the quickstart's seed, keeps the plain name). Data, teacher and caches do not depend on it.",
    )
    parser.add_argument("--report-only", action="store_true", help="Rewrite the .md from the .json in --out.")
    args = parser.parse_args(argv)
    if args.report_only:
        common.rewrite_markdown(Path(args.out) / "cache_quality.json", markdown)
        return 0
    if args.cache_dir is None:
        parser.error("--cache-dir is required")
    # --teacher-dir: a teacher the quickstart trained earlier (its cache key may have changed since)
    settings, _, tokenizer, teacher, train, test = common.lm_task(
        Path(args.cache_dir), args.student_steps, args.teacher_dir
    )
    work = Path(args.work_dir)
    collate = qs.collator(tokenizer)
    out = Path(args.out)
    previous = json.loads((out / "cache_quality.json").read_text()) if args.merge else {}
    results: dict[str, Any] = previous.get("results", {})
    results["teacher"] = {"test_perplexity": perplexity(teacher, test, 32, collate)}
    runs = [(variant, seed) for seed in args.student_seeds for variant in args.variants]
    for variant, student_seed in runs:
        start = time.perf_counter()
        name = variant if student_seed is None else f"{variant}@{student_seed}"
        seed = settings.seed if student_seed is None else student_seed
        student = qs.build_model(tokenizer, settings.student_layers, settings.student_width, settings, seed)
        parts = {"model": student, "data_collator": collate, "processing_class": tokenizer}
        kd = {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.0}
        extra: dict[str, Any] = {}
        if variant == "ce":
            targs = training_args(work / variant, settings, seed)
            trainer = Trainer(args=targs, train_dataset=train, **parts)
        elif variant == "kd_online":
            targs = training_args(work / variant, settings, seed, **kd)
            trainer = DistillationTrainer(teacher_model=teacher, args=targs, train_dataset=train, **parts)
        elif match := re.fullmatch(r"kd_cache_k(\d+)(?:_s(\d+))?(_uniform)?", variant):
            k, samples = int(match[1]), int(match[2] or 0)
            tail = "uniform" if match[3] else ("sampled" if samples else "bucket")
            folder = work / f"cache_k{k}" if not samples else work / f"cache_k{k}_s{samples}"
            t0 = time.perf_counter()
            build_teacher_cache(teacher, train, folder, tokenizer=tokenizer, k=k, batch_size=64, tail_samples=samples)
            extra["cache_build_s"] = time.perf_counter() - t0
            cache = CachedTeacher(folder)
            extra["teacher_top_k_mass"] = top_k_mass(cache)
            extra["bytes_per_target_token"] = cache_size(folder)["bytes_per_target_token"]
            targs = training_args(work / variant, settings, seed, teacher_cache_tail=tail, **kd)
            trainer = DistillationTrainer(teacher_cache=cache, args=targs, train_dataset=train, **parts)
        elif variant == "seqkd":
            t0 = time.perf_counter()
            rows = seqkd_rows(teacher, tokenizer, train, settings, work / "pseudo", prompt=16)
            extra["pseudo_label_s"] = time.perf_counter() - t0
            targs = training_args(work / variant, settings, seed)
            trainer = Trainer(args=targs, train_dataset=rows, **parts)
        else:
            raise ValueError(variant)
        trainer.train()
        ppl = perplexity(student.eval(), test, 32, collate)
        results[name] = {"test_perplexity": ppl, "seconds": time.perf_counter() - start, **extra}
        print(json.dumps({name: results[name]}), flush=True)
    report = {
        "commands": [
            *previous.get("commands", []),
            common.command_line("cache_quality.py", argv),
        ],
        "settings": vars(settings),
        "train_rows": len(train),
        "test_rows": len(test),
        "results": results,
    }
    common.write_results(out, "cache_quality", report, markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    """The results table; cached students also get their gap to the online-teacher student."""
    s, results = report["settings"], report["results"]
    lines = [
        "# Training from a top-k cache and SeqKD: quickstart lm task (CPU)",
        "",
        common.lm_intro(report) + f"; teacher {s['teacher_layers']}x{s['teacher_width']}, students "
        f"{s['student_layers']}x{s['student_width']}, same seed and data order; alpha 0, T 1 for the KD students; "
        f"{report['test_rows']} test blocks. `name@S`: the student seed S (initialisation and data order; the plain "
        "names use the quickstart's seed 0); *vs online KD* compares with the online-KD student of the same seed. "
        "Seconds are wall time on a shared 2-core machine (other jobs ran at the same time).",
        "",
        "| model | test perplexity | vs online KD | teacher mass in top-k | bytes / target token | seconds |",
        "|---|---|---|---|---|---|",
    ]
    gaps: dict[str, list[float]] = {}
    for name, entry in results.items():
        ppl = entry["test_perplexity"]
        variant, _, seed = name.partition("@")
        online = results.get("kd_online" + (f"@{seed}" if seed else ""), {}).get("test_perplexity")
        gap = f"{common.percent_change(ppl, online):+.1f}%" if online and name.startswith("kd_cache") else ""
        if gap:
            gaps.setdefault(variant, []).append(common.percent_change(ppl, online))
        mass = f"{entry['teacher_top_k_mass']:.3f}" if "teacher_top_k_mass" in entry else ""
        seconds = f"{entry['seconds']:.0f}" if "seconds" in entry else ""
        size = f"{entry['bytes_per_target_token']:.0f}" if "bytes_per_target_token" in entry else ""
        lines.append(f"| {name} | {ppl:.2f} | {gap} | {mass} | {size} | {seconds} |")
    several = {variant: values for variant, values in gaps.items() if len(values) > 1}
    if several:
        lines += ["", "Over student seeds (paired with the online-KD student of the same seed):", ""]
        lines += ["| variant | seeds | mean gap to online KD | median | min | max |", "|---|---|---|---|---|---|"]
        for variant, values in several.items():
            figures = [statistics.mean(values), statistics.median(values), min(values), max(values)]
            lines.append(f"| {variant} | {len(values)} | " + " | ".join(f"{x:+.1f}%" for x in figures) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
