"""`hf-kd distill` and `hf-kd make-student` lose nothing the user made and turn bad input into one-line errors."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from recipe_helpers import run_distill, save_tiny_models, tiny_overrides, write_data, write_json_rows
from safetensors.torch import load_file

from hf_kd.cli import main
from hf_kd.trainer import DistillationTrainer

ROOT = Path(__file__).resolve().parents[1]
T5_CONFIG = ROOT / "recipes" / "configs" / "t5_large_to_t5_small_xsum.yaml"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _tokens(overrides: dict) -> list[str]:
    """``{key: value}`` as ``--key value`` tokens, each value written as the YAML the command line reads."""
    tokens = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        tokens += [f"--{key}", text]
    return tokens


def _t5_config(models, tmp_path: Path, **changes) -> tuple[str, Path]:
    """A T5 recipe config on the tiny models and local data: 2 steps, a checkpoint every step, evaluation (without
    generation) at the end only."""
    config = yaml.safe_load(T5_CONFIG.read_text())
    output_dir = tmp_path / "out"
    fast = {"save_steps": 1, "eval_strategy": "no", "predict_with_generate": False}
    values = {**config, **tiny_overrides(config, models, tmp_path, output_dir), **fast}
    for key, value in changes.items():  # None: the key is left out
        values[key] = value
        if value is None:
            del values[key]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path), output_dir


def _assert_one_line_error(code: int, out: str, err: str, command: str, *words: str) -> None:
    assert code == 2
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith(f"hf-kd {command}: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- item 1: a finished run, the teacher's folder --------------------------------------------------------------


def test_distill_refuses_a_finished_run_unless_asked_to_resume_or_overwrite(models, tmp_path, capsys):
    config, out = _t5_config(models, tmp_path)
    assert run_distill(capsys, config)[0] == 0
    before = _digest(out)

    code, stdout, stderr = run_distill(capsys, config, "--learning_rate", "0.5")
    _assert_one_line_error(code, stdout, stderr, "distill", "output_dir", "not empty", "--overwrite_output_dir true",
                           "--resume_from_checkpoint true")  # fmt: skip
    assert _digest(out) == before  # model, results, card and checkpoints untouched

    assert run_distill(capsys, config, "--resume_from_checkpoint", "true", "--max_steps", "3")[0] == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] >= 3  # continued, not restarted

    (out / "checkpoint-9").mkdir()  # a checkpoint of the run being replaced (the Trainer's: with its state)
    shutil.copy(out / "trainer_state.json", out / "checkpoint-9" / "trainer_state.json")
    assert run_distill(capsys, config, "--overwrite_output_dir", "true", "--max_steps", "1")[0] == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # no resume into the old run


def test_distill_never_writes_into_the_teacher_or_student_folder(models, tmp_path, capsys):
    config, _ = _t5_config(models, tmp_path)
    for role, key in (("teacher", "teacher_model_name_or_path"), ("student", "student_model_name_or_path")):
        folder = Path(models["t5"][role])
        before = _digest(folder)
        code, out, err = run_distill(capsys, config, "--output_dir", str(folder), "--overwrite_output_dir", "true")
        _assert_one_line_error(code, out, err, "distill", "output_dir", key, "another folder")
        assert _digest(folder) == before


def test_resume_without_a_checkpoint_is_a_one_line_error(models, tmp_path, capsys):
    config, out = _t5_config(models, tmp_path)
    code, stdout, stderr = run_distill(capsys, config, "--resume_from_checkpoint", "true")
    _assert_one_line_error(code, stdout, stderr, "distill", "resume_from_checkpoint", "no checkpoint")


def test_make_student_refuses_a_saved_model_and_the_teacher_folder(models, tmp_path, capsys):
    teacher = models["t5"]["teacher"]
    out = tmp_path / "student"
    assert main(["make-student", teacher, str(out), "--decoder-layers", "1"]) == 0
    capsys.readouterr()
    before = _digest(out)
    code = main(["make-student", teacher, str(out), "--decoder-layers", "2"])
    _assert_one_line_error(code, *capsys.readouterr(), "make-student", "already holds a model", "--overwrite")
    assert _digest(out) == before

    teacher_before = _digest(Path(teacher))
    code = main(["make-student", teacher, teacher, "--decoder-layers", "1", "--overwrite"])
    _assert_one_line_error(code, *capsys.readouterr(), "make-student", "teacher's folder")
    assert _digest(Path(teacher)) == teacher_before

    assert main(["make-student", teacher, str(out), "--decoder-layers", "2", "--overwrite"]) == 0
    assert json.loads((out / "hf_kd_student.json").read_text())["layer_map"]["decoder"] == [0, 2]


# ---- item 5: generation settings, the final evaluation ---------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("generation_max_length", "0"), ("generation_num_beams", "0")])
def test_bad_generation_settings_are_refused_before_training(models, tmp_path, capsys, key, value):
    config, out = _t5_config(models, tmp_path)
    code, stdout, stderr = run_distill(capsys, config, f"--{key}", value)
    _assert_one_line_error(code, stdout, stderr, "distill", f"{key}={value}")
    assert not out.exists()  # nothing trained, nothing to lose


def test_a_failing_final_evaluation_keeps_the_trained_student(models, tmp_path, capsys, monkeypatch):
    config, out = _t5_config(models, tmp_path, save_strategy="no")

    def broken(self, *args, **kwargs):
        raise RuntimeError("out of memory in generate")

    monkeypatch.setattr(DistillationTrainer, "evaluate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_distill(capsys, config)
    initial = load_file(Path(models["t5"]["student"]) / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert any(not torch.equal(initial[name], trained[name]) for name in initial)


# ---- item 7: --save_tokenized_train says what it did -----------------------------------------------------------


def test_save_tokenized_train_names_the_split_folder_and_the_next_command(models, tmp_path, capsys):
    config, out = _t5_config(models, tmp_path)
    folder = tmp_path / "train_tok"
    code, stdout, _ = run_distill(capsys, config, "--save_tokenized_train", str(folder))
    assert code == 0
    assert "Saved the student" not in stdout
    assert f"to {folder}" in stdout and "hf-kd cache-teacher" in stdout and f"--dataset {folder}" in stdout
    assert len(Dataset.load_from_disk(str(folder))) == 16 and not out.exists()

    code, stdout, stderr = run_distill(capsys, config, "--save_tokenized_train", str(folder))  # a second time
    _assert_one_line_error(code, stdout, stderr, "distill", "save_tokenized_train", "not empty")


# ---- bad input: one line, exit 2 -------------------------------------------------------------------------------


def _damaged_copy(source: str, folder: Path, how: str) -> str:
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:  # only pickled weights
        torch.save(load_file(weights), folder / "pytorch_model.bin")
        weights.unlink()
    return str(folder)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("latin1_jsonl", ["train.jsonl", "not UTF-8", "line 5", "iconv"]),
        ("latin1_csv", ["train.csv", "not UTF-8", "line 2", "iconv"]),
        ("latin1_yaml", ["recipe.yaml", "not UTF-8", "iconv"]),
        ("truncated_student", ["student_model_name_or_path", "model.safetensors", "truncated"]),
        ("truncated_teacher", ["teacher_model_name_or_path", "model.safetensors", "truncated"]),
        ("bin_only_teacher", ["teacher_model_name_or_path", "pytorch_model.bin", "safetensors", "save_pretrained"]),
        ("missing_tokenizer", ["tokenizer_name_or_path", "no such file or folder"]),
        ("empty_targets", ["target_column='summary'", "every text", "empty"]),
    ],
)
def test_bad_input_is_a_one_line_error(models, tmp_path, capsys, case, words):
    config, out = _t5_config(models, tmp_path)
    overrides: list[str] = []
    rows = [{"document": "one two three", "summary": "four five"}] * 4
    if case == "latin1_jsonl":
        path = tmp_path / "train.jsonl"
        write_json_rows(path, rows)
        path.write_bytes(path.read_bytes() + b'{"document": "caf\xe9", "summary": "x"}\n')
        overrides = ["--data_files", json.dumps({"train": str(path), "validation": str(path)})]
    elif case == "latin1_csv":
        path = tmp_path / "train.csv"
        path.write_bytes(b"document,summary\ncaf\xe9 au lait,good\n")
        overrides = ["--data_files", str(path)]
    elif case == "latin1_yaml":
        Path(config).write_bytes(Path(config).read_bytes() + b"# caf\xe9\n")
    elif case == "truncated_student":
        student = _damaged_copy(models["t5"]["student"], tmp_path / "student", "truncated")
        overrides = ["--student_model_name_or_path", student]
    elif case in ("truncated_teacher", "bin_only_teacher"):
        how = "truncated" if case == "truncated_teacher" else "pickled"
        overrides = ["--teacher_model_name_or_path", _damaged_copy(models["t5"]["teacher"], tmp_path / "t", how)]
    elif case == "missing_tokenizer":
        overrides = ["--tokenizer_name_or_path", str(tmp_path / "no" / "tokenizer")]
    elif case == "empty_targets":
        path = write_json_rows(tmp_path / "empty.jsonl", [{"document": "one two", "summary": " "}] * 8)
        overrides = ["--data_files", json.dumps({"train": path, "validation": path})]
    code, stdout, stderr = run_distill(capsys, config, *overrides)
    _assert_one_line_error(code, stdout, stderr, "distill", *words)
    assert not out.exists()


@pytest.mark.parametrize("case", ["truncated", "pickled", "missing_tokenizer"])
def test_make_student_bad_input_is_a_one_line_error(models, tmp_path, capsys, case):
    teacher = models["t5"]["teacher"]
    argv = [teacher, str(tmp_path / "student"), "--decoder-layers", "1"]
    if case == "missing_tokenizer":
        argv += ["--tokenizer", str(tmp_path / "nowhere")]
        words = ["--tokenizer", "no such file or folder"]
    else:
        argv[0] = _damaged_copy(teacher, tmp_path / "teacher", case)
        words = ["teacher", "truncated" if case == "truncated" else "pytorch_model.bin"]
    _assert_one_line_error(main(["make-student", *argv]), *capsys.readouterr(), "make-student", *words)
    assert not (tmp_path / "student").exists()


def test_rows_with_an_empty_target_are_left_out(tmp_path):
    """A batch of only such rows would have no label position (the collator fails on it)."""
    from conftest import make_tokenizer

    from hf_kd.recipe.args import DataArguments
    from hf_kd.recipe.data import tokenize_seq2seq

    rows = [{"source": "one two", "target": t} for t in ("three", "", "four five", " ")]
    data_args = DataArguments(data_files="unused.jsonl", source_column="source", target_column="target")
    tokenised = tokenize_seq2seq(Dataset.from_list(rows), make_tokenizer(), data_args)
    assert len(tokenised) == 2 and all(len(labels) > 0 for labels in tokenised["labels"])


@pytest.mark.parametrize("switch", [["--validation_split_percentage", "0"], ["--eval_split", "null"]])
def test_evaluation_can_be_turned_off_with_train_only_data(models, tmp_path, capsys, switch):
    config, out = _t5_config(models, tmp_path)
    train = yaml.safe_load(Path(config).read_text())["data_files"]["train"]
    code, _, stderr = run_distill(capsys, config, "--data_files", train, "--eval_strategy", "steps", *switch)
    assert code == 0, stderr
    assert json.loads((out / "all_results.json").read_text())["train_samples"] == 16
    assert not (out / "eval_results.json").exists()


# ---- the documented flows run as written -----------------------------------------------------------------------


def _documented_command(page: str, section: str) -> list[str]:
    """The `hf-kd distill ...` command a docs section gives inline, as argv (without `hf-kd`)."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"`(hf-kd distill [^`]+)`", body)
    return shlex.split(command)[1:]


def test_using_your_own_data_runs_as_documented(models, tmp_path, capsys, monkeypatch):
    """docs/recipes.md's train-only command, on a config that evaluates every N steps: a validation split is
    held out of the train rows."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    write_data(tmp_path / "tmp", {"source": "question", "target": "answer"}, n_train=40)
    (tmp_path / "data").mkdir()
    shutil.move(tmp_path / "tmp" / "train.jsonl", tmp_path / "data" / "train.jsonl")
    argv = _documented_command("recipes.md", "Using your own data")
    argv = [str(ROOT / a) if a.startswith("recipes/") else a for a in argv]  # the config, from the repository
    config = yaml.safe_load(T5_CONFIG.read_text())
    tiny = tiny_overrides(config, models, tmp_path / "tmp", tmp_path / "out")
    for key in ("dataset_name", "dataset_config_name", "data_files"):
        tiny.pop(key)
    assert main([*argv, *_tokens(tiny)]) == 0
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["eval_samples"] == 2  # 5 % of 40 rows
    assert results["train_samples"] == 38


def test_a_pseudo_labelled_data_set_trains_as_documented(models, tmp_path, capsys, monkeypatch):
    """docs/cache.md: `hf-kd pseudo-label` writes <output>/dataset, and its distill commands train on that folder
    (alone: 5 % held out; with a validation folder: evaluated on it)."""
    monkeypatch.chdir(tmp_path)
    rows = [{"article": " ".join(["one", "two", "three"][: 1 + i % 3]), "highlights": "four five"} for i in range(40)]
    Dataset.from_list(rows).save_to_disk("data/train_text")
    Dataset.from_list(rows[:3]).save_to_disk("data/val_text")
    argv = ["pseudo-label", "--teacher", models["t5"]["teacher"], "--dataset", "data/train_text", "--output",
            "pseudo/train", "--source-column", "article", "--target-column", "highlights", "--max-new-tokens", "4",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    (tmp_path / "tiny").mkdir()
    config = yaml.safe_load(T5_CONFIG.read_text())
    tiny = tiny_overrides(config, models, tmp_path / "tiny", tmp_path / "out")
    for key in ("dataset_name", "dataset_config_name", "data_files"):
        tiny.pop(key)
    text = (ROOT / "docs" / "cache.md").read_text(encoding="utf-8")
    body = text.split("## Sequence-level KD: pseudo-labels\n", 1)[1].split("\n## ", 1)[0]
    alone, with_validation = re.findall(r"`(hf-kd distill [^`]+)`|`(--dataset_name null --data_files [^`]+)`", body)
    alone_argv = [str(ROOT / a) if a.startswith("recipes/") else a for a in shlex.split(alone[0])[1:]]

    assert main([*alone_argv, *_tokens(tiny)]) == 0
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["eval_samples"] == 2  # 5 % held out

    again = [*alone_argv, *shlex.split(with_validation[1]), *_tokens(tiny), "--overwrite_output_dir", "true"]
    assert main(again) == 0
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["eval_samples"] == 3


# ---- refusals made by DistillationTrainer itself --------------------------------------------------------------


def test_a_setting_the_trainer_refuses_is_a_one_line_error(models, tmp_path, capsys):
    """The trainer's own refusals (here: a teacher and a teacher cache at once) reach the user as one line too."""
    config, output_dir = _t5_config(models, tmp_path, teacher_cache=str(tmp_path / "some-cache"))
    (tmp_path / "some-cache").mkdir()
    code, out, err = run_distill(capsys, config)
    _assert_one_line_error(code, out, err, "distill", "teacher", "teacher_cache", "not both")
    assert not (output_dir / "model.safetensors").exists()
