"""Tiny saved models and local data files standing in for the Hub in recipe and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_tokenizer, random_sentences, tiny_bart, tiny_gpt2, tiny_t5

from hf_kd.cli import main

FAMILIES = ("bart", "t5", "gpt2")


def save_tiny_models(root: Path) -> dict[str, dict[str, str]]:
    """``{family: {"teacher": dir, "student": dir}}``: each dir holds a tiny model and the shared tokenizer.

    Teachers are wider and (for T5) deeper than students, so a student built from a teacher's config with
    overrides is told apart from both.
    """
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    builders = {
        "bart": (lambda: tiny_bart(vocab, seed=1, d_model=48), lambda: tiny_bart(vocab, seed=2)),
        "t5": (lambda: tiny_t5(vocab, seed=1, d_model=48, num_layers=3), lambda: tiny_t5(vocab, seed=2)),
        "gpt2": (lambda: tiny_gpt2(vocab, seed=1, n_embd=48, n_layer=3), lambda: tiny_gpt2(vocab, seed=2)),
    }
    paths: dict[str, dict[str, str]] = {}
    for family, (make_teacher, make_student) in builders.items():
        paths[family] = {}
        for role, make in (("teacher", make_teacher), ("student", make_student)):
            directory = root / f"{family}-{role}"
            make().save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            paths[family][role] = str(directory)
    return paths


def write_json_rows(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def write_data(root: Path, columns: dict[str, str], n_train: int = 16, n_eval: int = 4) -> dict[str, str]:
    """JSON-lines train/validation files; ``columns`` maps a role ("source", "target", "text") to its name."""
    files = {}
    for split, n, seed in (("train", n_train, 0), ("validation", n_eval, 100)):
        sources = random_sentences(n, seed=seed)
        targets = random_sentences(n, seed=seed + 1, min_len=2, max_len=6)
        rows = []
        for source, target in zip(sources, targets, strict=True):
            row = {}
            if "source" in columns:
                row[columns["source"]] = source
                row[columns["target"]] = target
            if "text" in columns:
                row[columns["text"]] = source
            rows.append(row)
        files[split] = write_json_rows(root / f"{split}.jsonl", rows)
    return files


def family_of(teacher_name: str) -> str:
    """Which tiny family stands in for a config's teacher (by its Hub name, or the quickstart's local GPT-2)."""
    name = teacher_name.lower()
    if "quickstart" in name:  # hf_kd_quickstart/teacher, saved by `hf-kd quickstart`
        return "gpt2"
    for family in ("bart", "gpt2", "t5"):
        if family in name:
            return family
    raise ValueError(f"no tiny stand-in for teacher {teacher_name!r}")


def tiny_overrides(config: dict, models: dict[str, dict[str, str]], data_dir: Path, output_dir: Path) -> dict:
    """Overrides that run ``config`` on the tiny models and local data for 2 CPU steps, all else unchanged."""
    family = family_of(config["teacher_model_name_or_path"])
    causal = family == "gpt2"
    columns = (
        {"text": config.get("text_column", "text")}
        if causal
        else {"source": config.get("source_column", "article"), "target": config.get("target_column", "highlights")}
    )
    overrides = {
        "teacher_model_name_or_path": models[family]["teacher"],
        "teacher_model_init_kwargs": None,
        "dataset_name": None,
        "dataset_config_name": None,
        "data_files": write_data(data_dir, columns),
        "preprocessing_num_workers": None,
        "cache_dir": str(data_dir / "cache"),
        "max_source_length": 16,
        "max_target_length": 8,
        "block_size": 16,
        "generation_max_length": 8,
        "generation_num_beams": 1,
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 0,
        "logging_steps": 1,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "disable_tqdm": True,
        "push_to_hub": False,
    }
    if config.get("student_model_name_or_path"):
        overrides["student_model_name_or_path"] = models[family]["student"]
    elif config.get("student_config"):
        overrides["student_config"] = models[family]["student"]
    return overrides


def run_distill(capsys, config: str, *overrides: str) -> tuple[int, str, str]:
    """`hf-kd distill --config CONFIG OVERRIDES` in this process: its exit status, stdout and stderr."""
    code = main(["distill", "--config", config, *overrides])
    out, err = capsys.readouterr()
    return code, out, err
