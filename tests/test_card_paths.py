"""Model cards name models and data by Hub id or folder name, never by a local path, and carry the metrics."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import make_tokenizer, tiny_gpt2, tiny_t5
from helpers import config, lm_collator, lm_dataset
from recipe_helpers import write_data
from transformers import AutoModelForCausalLM

from hf_kd import DistillationTrainer
from hf_kd.card import distillation_section, hub_id, public_name
from hf_kd.recipe.args import parse_recipe_config
from hf_kd.recipe.run import run_recipe

HOME = os.path.expanduser("~")


def assert_no_local_path(card: str, *paths: Path | str) -> None:
    for path in (*paths, HOME, "/root", "/tmp", ".cache"):
        assert str(path) not in card, (path, card)


def row(key: str, value: float) -> str:
    return f"| {key} | {value:.4g} |"  # how the card's distillation section prints a measured float


@pytest.mark.parametrize(
    ("name", "shown", "repo"),
    [
        ("some-org/teacher-large", "some-org/teacher-large", "some-org/teacher-large"),
        ("gpt2", "gpt2", None),  # a legacy Hub id or a class name: left as it is, but no base_model
        ("/root/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/abc123", "openai-community/gpt2",
         "openai-community/gpt2"),
        ("/home/someone/.cache/hf_kd/quickstart/teacher", "teacher", None),
        ("~/models/teacher/", "teacher", None),
        ("./out/student", "student", None),
        ("runs/2024/teacher", "teacher", None),
    ],
)  # fmt: skip
def test_public_names(name, shown, repo):
    assert public_name(name) == shown
    assert hub_id(name) == repo


def test_a_relative_folder_on_disk_is_local(tmp_path, monkeypatch):
    (tmp_path / "org" / "teacher").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/teacher") is None and public_name("org/teacher") == "teacher"


def test_trainer_card_of_models_loaded_from_folders(tmp_path):
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    teacher_dir, student_dir, data_dir = tmp_path / "teacher", tmp_path / "student-init", tmp_path / "data"
    tiny_gpt2(vocab, seed=2).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    tiny_gpt2(vocab, seed=1).save_pretrained(student_dir)
    data_dir.mkdir()
    student = AutoModelForCausalLM.from_pretrained(str(student_dir))
    # Gone by the time the card is written (a temporary folder): the Trainer's own card would then name the
    # student by that path, as the model it was fine-tuned from.
    shutil.rmtree(student_dir)
    data = lm_dataset(tokenizer, n=8)
    trainer = DistillationTrainer(
        model=student, args=config(tmp_path, teacher_model_name_or_path=str(teacher_dir)), train_dataset=data,
        eval_dataset=data, processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    trainer.train()
    measured = trainer.evaluate()
    tested = trainer.evaluate(metric_key_prefix="test")
    trainer.create_model_card(dataset=str(data_dir), dataset_tags=str(data_dir), metrics={"test_perplexity": 123.456})
    card = (Path(trainer.args.output_dir) / "README.md").read_text()

    assert_no_local_path(card, tmp_path, teacher_dir, student_dir)
    assert "| teacher | `teacher` (a local folder) |" in card
    assert "| data set | `data` (a local folder) |" in card
    front = card.split("---")[1]
    assert "base_model" not in front and "datasets:" not in front  # nothing on the Hub to link
    assert "This model was initialised from `student-init` (a local folder) and trained on the data dataset." in card
    for key in ("eval_loss", "eval_kd_loss", "eval_ce_loss", "eval_teacher_agreement"):
        assert row(key, measured[key]) in card, key
    assert row("test_loss", tested["test_loss"]) in card and row("test_perplexity", 123.456) in card
    assert "runtime" not in card.split("## Distillation")[1].split("## ")[0]  # timings are not model metrics


def test_card_of_a_teacher_named_by_its_cache_path(tmp_path):
    """The quickstart names its teacher model object by the folder it saved it in (under ~/.cache)."""
    tokenizer = make_tokenizer()
    teacher = tiny_gpt2(len(tokenizer), seed=2)
    cached = os.path.join(HOME, ".cache", "hf_kd_quickstart", "lm", "teacher")
    teacher.name_or_path = teacher.config.name_or_path = cached
    student = tiny_gpt2(len(tokenizer), seed=1)
    student.config.name_or_path = "gpt2"  # a Hub id without an organisation: still the base model
    data = lm_dataset(tokenizer, n=4)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path), train_dataset=data,
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    trainer.create_model_card(dataset="stdlib docstrings")
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    assert_no_local_path(card, tmp_path, cached)
    assert "distilled from `teacher` (a local folder)" in card and "| data set | stdlib docstrings |" in card
    assert "base_model: gpt2" in card.split("---")[1] and "fine-tuned version of [gpt2]" in card


def test_distillation_section_names_a_hub_snapshot_by_its_repository():
    args = config(Path("unused"), loss="forward_kl")
    snapshot = f"{HOME}/.cache/huggingface/hub/models--google--flan-t5-large/snapshots/0123abcd"
    section = distillation_section(teacher=snapshot, args=args, dataset=f"{HOME}/data/xsum", metrics={"eval_x": 0.5})
    assert_no_local_path(section)
    assert "| teacher | `google/flan-t5-large` |" in section and "| data set | `xsum` (a local folder) |" in section


def test_recipe_card_has_no_local_paths_and_the_eval_metrics(tmp_path):
    tokenizer = make_tokenizer()
    dirs = {}
    for role, seed, d_model in (("teacher", 2, 48), ("student", 1, 32)):
        dirs[role] = tmp_path / f"t5-{role}"
        tiny_t5(len(tokenizer), seed=seed, d_model=d_model).save_pretrained(dirs[role])
        tokenizer.save_pretrained(dirs[role])
    (tmp_path / "data").mkdir()
    files = write_data(tmp_path / "data", {"source": "document", "target": "summary"}, n_train=8, n_eval=4)
    output_dir = tmp_path / "out"
    overrides = {
        "teacher_model_name_or_path": str(dirs["teacher"]), "student_model_name_or_path": str(dirs["student"]),
        "data_files": files, "source_column": "document", "target_column": "summary", "max_source_length": 16,
        "max_target_length": 8, "predict_with_generate": True, "generation_max_length": 8,
        "output_dir": str(output_dir), "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "use_cpu": True, "disable_tqdm": True,
    }  # fmt: skip
    metrics = run_recipe(*parse_recipe_config(None, overrides))
    card = (output_dir / "README.md").read_text()
    assert_no_local_path(card, tmp_path, *dirs.values())
    assert "| teacher | `t5-teacher` (a local folder) |" in card
    for key in ("eval_loss", "eval_kd_loss", "eval_rouge1", "eval_rougeL"):
        assert row(key, metrics[key]) in card, key
