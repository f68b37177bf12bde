"""`hf-kd distill` takes the example scripts' names, predicts on a test split, says what it does with each split,
prints once per launch, and loses nothing: overwrite deletes only what a run wrote, saving is atomic with a
fallback, bad paths are one line, and one run at a time writes into a folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_sentences
from recipe_helpers import run_distill, save_tiny_models, write_json_rows
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from hf_kd.errors import ConfigError
from hf_kd.locking import LOCK_FILE, folder_lock
from hf_kd.recipe.args import DataArguments, parse_recipe_config
from hf_kd.recipe.data import adopt_example_columns
from hf_kd.saving import save_atomically

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _rows(n: int, seed: int, source: str, target: str | None) -> list[dict[str, str]]:
    sources = random_sentences(n, seed=seed)
    targets = random_sentences(n, seed=seed + 1, min_len=2, max_len=6)
    return [{source: s, **({target: t} if target else {})} for s, t in zip(sources, targets, strict=True)]


def _data(root: Path, source: str, target: str | None, splits: dict[str, int]) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    return {
        split: write_json_rows(root / f"{split}.jsonl", _rows(n, 10 * i, source, target))
        for i, (split, n) in enumerate(splits.items())
    }


def _config(
    models, tmp_path: Path, family: str = "t5", splits: dict[str, int] | None = None, **changes
) -> tuple[str, Path]:
    """A recipe config on the tiny models: 2 CPU steps, no checkpoints, final evaluation without generation."""
    causal = family == "gpt2"
    splits = splits or {"train": 16, "validation": 4}
    source, target = ("text", None) if causal else ("document", "summary")
    out = tmp_path / "out"
    values = {
        "teacher_model_name_or_path": models[family]["teacher"],
        "student_model_name_or_path": models[family]["student"],
        "data_files": _data(tmp_path / "data", source, target, splits),
        "cache_dir": str(tmp_path / "cache"),
        **({"block_size": 8} if causal else {"source_column": source, "target_column": target}),
        "max_source_length": 16,
        "max_target_length": 8,
        "generation_max_length": 8,
        "generation_num_beams": 1,
        "output_dir": str(out),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 8,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "disable_tqdm": True,
    }
    values.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path), out


def _one_line_error(code: int, out: str, err: str, *words: str) -> str:
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("hf-kd distill: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- a. the example scripts' key names -----------------------------------------------------------------------


def test_summary_column_is_target_column_and_near_misses_name_the_right_key(tmp_path):
    _, data_args, _ = parse_recipe_config(None, ["--data_files", "x.jsonl", "--summary_column", "abstract"])
    assert data_args.target_column == "abstract"
    with pytest.raises(ConfigError, match="did you mean 'target_column'"):
        parse_recipe_config(None, ["--data_files", "x.jsonl", "--summary_colum", "abstract"])
    with pytest.raises(ConfigError, match="hf-kd's key is data_files"):
        parse_recipe_config(None, ["--train_file", "x.jsonl"])
    with pytest.raises(ConfigError, match="hf-kd's key is student_model_name_or_path"):
        parse_recipe_config(None, ["--data_files", "x.jsonl", "--model_name_or_path", "t5-small"])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_files": "x.jsonl", "summary_column": "a", "target_column": "b"}))
    with pytest.raises(ConfigError, match="summary_column='a' and target_column='b'.*keep one"):
        parse_recipe_config(config)


def test_text_column_is_the_source_of_an_encoder_decoder_model(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_files": "x.jsonl", "source_column": "document"}))
    _, data_args, _ = parse_recipe_config(config, ["--text_column", "body"])  # the command line wins
    adopt_example_columns(data_args, "seq2seq")
    assert data_args.source_column == "body"

    causal = DataArguments(data_files="x.jsonl", text_column="body")
    adopt_example_columns(causal, "causal")
    assert (causal.text_column, causal.source_column) == ("body", "article")
    both = DataArguments(data_files="x.jsonl", text_column="body", source_column="document")
    with pytest.raises(ConfigError, match="text_column='body' and source_column='document'.*keep one"):
        adopt_example_columns(both, "seq2seq")


def test_the_summarization_example_s_columns_train_and_every_split_is_accounted_for(models, tmp_path, capsys, caplog):
    config, out = _config(models, tmp_path, splits={"train": 16, "validation": 4, "test": 3, "extra": 2})
    data = yaml.safe_load(Path(config).read_text())["data_files"]
    renamed = {}
    for split, path in data.items():  # the columns of run_summarization.py's defaults-less data: body / abstract
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        renamed[split] = write_json_rows(Path(path), [{"body": r["document"], "abstract": r["summary"]} for r in rows])
    caplog.set_level(logging.INFO, logger="hf_kd")
    code, stdout, stderr = run_distill(capsys, config, "--text_column", "body", "--summary_column", "abstract")
    assert code == 0, stderr
    assert (out / "model.safetensors").is_file()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Data: split")]
    assert lines[0] == "Data: split 'train' (16 rows): trained on."
    assert lines[1] == "Data: split 'validation' (4 rows): evaluated on."
    assert lines[2].startswith("Data: split 'test' (3 rows): not used: do_predict is off")
    assert lines[3].startswith("Data: split 'extra' (2 rows): not used")
    assert len(lines) == 4


# ---- b. do_predict -------------------------------------------------------------------------------------------


def test_do_predict_predicts_on_the_test_split_as_run_summarization_does(models, tmp_path, capsys):
    config, out = _config(
        models, tmp_path, splits={"train": 16, "validation": 4, "test": 5}, predict_with_generate=True
    )
    code, _, stderr = run_distill(capsys, config, "--do_predict", "true", "--max_predict_samples", "3")
    assert code == 0, stderr

    predict = json.loads((out / "predict_results.json").read_text())
    assert predict["predict_samples"] == 3
    assert {"predict_loss", "predict_rouge1", "predict_rougeL"} <= set(predict)
    every = json.loads((out / "all_results.json").read_text())
    assert every["predict_rouge1"] == predict["predict_rouge1"] and "eval_loss" in every
    assert "predict_rouge1" in (out / "README.md").read_text()

    # The generations are the saved student's greedy outputs for the first 3 test rows, one a line.
    generated = (out / "generated_predictions.txt").read_text(encoding="utf-8").split("\n")
    student, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    test_rows = [json.loads(line) for line in Path(tmp_path / "data" / "test.jsonl").read_text().splitlines()][:3]
    expected = []
    for row in test_rows:
        inputs = tokenizer(row["document"], max_length=16, truncation=True, return_tensors="pt")
        with torch.no_grad():
            ids = student.generate(**inputs, max_length=8, num_beams=1, do_sample=False)
        expected.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
    assert generated == expected


def test_do_predict_without_a_test_split_is_refused_before_anything_runs(models, tmp_path, capsys):
    config, out = _config(models, tmp_path)
    code, stdout, stderr = run_distill(capsys, config, "--do_predict", "true")
    _one_line_error(code, stdout, stderr, "do_predict", "test_split='test'", "['train', 'validation']")
    assert not out.exists()


# ---- c. one message per launch -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_prints_the_result_once_and_the_lock_lets_the_other_rank_run(models, tmp_path):
    config, out = _config(models, tmp_path, family="gpt2", ddp_backend="gloo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    result = subprocess.run(
        [*launcher, "-m", "hf_kd.cli", "distill", "--config", config],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("Saved the student to") == 1, result.stdout
    assert result.stderr.count("Distillation finished") == 1
    assert result.stderr.count("Data: split 'train'") == 1
    assert json.loads((out / "train_results.json").read_text())["train_samples"] > 0
    assert not (out / LOCK_FILE).exists()


# ---- d. overwrite_output_dir deletes only what a run wrote ---------------------------------------------------


def test_overwrite_keeps_what_no_run_wrote_and_no_old_results(models, tmp_path, capsys):
    config, out = _config(
        models, tmp_path, splits={"train": 16, "validation": 4, "test": 2}, save_strategy="steps", save_steps=1
    )
    assert run_distill(capsys, config, "--do_predict", "true")[0] == 0
    assert {"predict_results.json", "eval_results.json", "checkpoint-2"} <= {p.name for p in out.iterdir()}
    # What the user put there: a copy of a checkpoint under another name, a notes file, a link to another disk.
    (out / "checkpoint-best").mkdir()
    for name in ("model.safetensors", "trainer_state.json", "config.json"):
        (out / "checkpoint-best" / name).write_bytes((out / "checkpoint-1" / name).read_bytes())
    (out / "checkpoint-notes.txt").write_text("lr 0.01 was better\n")
    elsewhere = tmp_path / "other-disk" / "checkpoint-3"
    elsewhere.mkdir(parents=True)
    (elsewhere / "trainer_state.json").write_text("{}")
    (out / "checkpoint-3").symlink_to(elsewhere)
    kept = {name: _digest(out / name) for name in ("checkpoint-best",)}

    # save_total_limit would let the Trainer delete checkpoint-best: refused, nothing touched.
    before = _digest(out)
    code, stdout, stderr = run_distill(capsys, config, "--overwrite_output_dir", "true", "--save_total_limit", "1")
    _one_line_error(code, stdout, stderr, "checkpoint-best", "save_total_limit=1")
    assert _digest(out) == before

    # A new run without evaluation or prediction: nothing of the replaced run's results is left to merge.
    code, _, stderr = run_distill(capsys, config, "--overwrite_output_dir", "true", "--max_steps", "1",
                               "--eval_split", "null")  # fmt: skip
    assert code == 0, stderr
    assert {name: _digest(out / name) for name in kept} == kept
    assert (out / "checkpoint-notes.txt").read_text() == "lr 0.01 was better\n"
    assert (out / "checkpoint-3").is_symlink() and (elsewhere / "trainer_state.json").read_text() == "{}"
    assert not (out / "checkpoint-2").exists()  # the replaced run's: no later resume continues it
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    for name in ("eval_results.json", "predict_results.json", "generated_predictions.txt"):
        assert not (out / name).exists(), name
    assert not any(k.startswith(("eval_", "predict_")) for k in json.loads((out / "all_results.json").read_text()))


def test_overwrite_never_deletes_the_checkpoint_the_run_starts_from(models, tmp_path, capsys):
    config, out = _config(models, tmp_path, save_strategy="steps", save_steps=1)
    assert run_distill(capsys, config)[0] == 0
    start = out / "checkpoint-2"
    before = _digest(start)
    restart = ["--student_model_name_or_path", str(start), "--overwrite_output_dir", "true"]

    # Saving checkpoints would write over it: refused.
    code, stdout, stderr = run_distill(capsys, config, *restart)
    _one_line_error(code, stdout, stderr, "student_model_name_or_path", "checkpoint-2", "copy it out")
    assert _digest(start) == before

    code, _, stderr = run_distill(capsys, config, *restart, "--save_strategy", "no")
    assert code == 0, stderr
    assert _digest(start) == before
    assert not (out / "checkpoint-1").exists()  # the replaced run's other checkpoint went


# ---- e. atomic save, and the trained weights kept when output_dir cannot take them ---------------------------


def test_a_failed_save_keeps_the_old_files_and_saves_the_student_elsewhere(models, tmp_path, capsys, monkeypatch):
    config, out = _config(models, tmp_path, save_strategy="steps", save_steps=2)
    assert run_distill(capsys, config)[0] == 0
    old = {name: _digest(out)[name] for name in ("model.safetensors", "config.json", "tokenizer.json")}
    fallback_root = tmp_path / "tmp"
    fallback_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(fallback_root))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again

    import transformers.modeling_utils as modeling_utils

    write = modeling_utils.safe_save_file

    def disk_full_in_output_dir(tensors, filename, *args, **kwargs):  # checkpoints still fit, the final save not
        path = Path(filename).resolve()
        if out.resolve() in path.parents and "checkpoint-" not in str(path):
            raise OSError(28, "No space left on device")
        return write(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full_in_output_dir)
    code, stdout, stderr = run_distill(capsys, config, "--overwrite_output_dir", "true", "--learning_rate", "0.05")
    line = _one_line_error(code, stdout, stderr, "cannot save the student", "No space left", "as before")
    assert {name: _digest(out)[name] for name in old} == old  # the previous student is intact
    assert not list(out.glob(".hf_kd_saving-*")) and not (out / LOCK_FILE).exists()
    (fallback,) = fallback_root.glob("hf_kd-student-*")
    assert str(fallback) in line
    # The copy is the trained student: the last checkpoint (step 2 = the end) holds the same weights.
    saved, last = load_file(fallback / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert saved.keys() == last.keys() and all(torch.equal(saved[k], last[k]) for k in saved)
    initial = load_file(Path(models["t5"]["student"]) / "model.safetensors")
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)
    AutoModelForSeq2SeqLM.from_pretrained(fallback)


def test_save_atomically_replaces_every_weight_file_or_none(tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    old = {"config.json": "old", "model-00001-of-00002.safetensors": "a", "model.safetensors.index.json": "{}"}
    for name, text in old.items():
        (out / name).write_text(text)
    (out / "notes.txt").write_text("mine")

    def broken(folder: str) -> None:
        Path(folder, "config.json").write_text("new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_atomically(broken, out)
    assert {p.name: p.read_text() for p in out.iterdir()} == {**old, "notes.txt": "mine"}

    def single_file(folder: str) -> None:
        Path(folder, "config.json").write_text("new")
        Path(folder, "model.safetensors").write_text("weights")

    save_atomically(single_file, out)  # the stale shards would be loaded before the new file: they go
    files = {p.name: p.read_text() for p in out.iterdir()}
    assert files == {"config.json": "new", "model.safetensors": "weights", "notes.txt": "mine"}


FSIZE_RUN = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.RLIM_INFINITY))  # config fits, the weights do not
from hf_kd.cli import main
sys.exit(main(["distill", "--config", sys.argv[1], "--overwrite_output_dir", "true"]))
"""


@pytest.mark.slow
def test_a_file_size_limit_while_saving_leaves_the_previous_student_intact(models, tmp_path, capsys):
    config, out = _config(models, tmp_path)
    assert run_distill(capsys, config)[0] == 0
    before = _digest(out)
    assert (out / "model.safetensors").stat().st_size > 60_000
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", FSIZE_RUN, config], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    _one_line_error(2, result.stdout, result.stderr, "cannot save the student", "File too large", "as before")
    after = _digest(out)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert after[name] == before[name], name
    assert not list(out.glob(".hf_kd_saving-*")) and not (out / LOCK_FILE).exists()


# ---- f. every path a user names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("config_missing", ["config file", "does not exist"]),
        ("config_is_a_folder", ["config file", "is a folder"]),
        ("config_under_a_file", ["config file", "which is a file"]),
        ("data_under_a_file", ["data_files", "which is a file"]),
        ("data_is_a_folder", ["data_files", "is a folder"]),
        ("student_is_a_file", ["student_model_name_or_path", "is a file"]),
        ("teacher_is_a_file", ["teacher_model_name_or_path", "is a file"]),
        ("teacher_dangling_link", ["teacher_model_name_or_path", "no such file or folder"]),
        ("tokenizer_is_a_file", ["tokenizer_name_or_path", "is a file"]),
        ("output_is_a_file", ["output_dir", "is a file"]),
        ("output_under_a_file", ["output_dir", "which is a file"]),
        ("output_dangling_link", ["output_dir", "symbolic link", "does not exist"]),
        ("cache_dir_is_a_file", ["cache_dir", "is a file"]),
        ("cache_dir_under_a_file", ["cache_dir", "which is a file"]),
        ("save_tokenized_train_under_a_file", ["save_tokenized_train", "which is a file"]),
        ("teacher_cache_is_a_file", ["teacher_cache", "is a file"]),
    ],
)
def test_a_bad_path_is_one_line(models, tmp_path, capsys, case, words):
    config, out = _config(models, tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    overrides = {
        "config_missing": {},
        "config_is_a_folder": {},
        "config_under_a_file": {},
        "data_under_a_file": {"--data_files": str(a_file / "train.jsonl")},
        "data_is_a_folder": {"--data_files": str(tmp_path)},
        "student_is_a_file": {"--student_model_name_or_path": str(a_file)},
        "teacher_is_a_file": {"--teacher_model_name_or_path": str(a_file)},
        "teacher_dangling_link": {"--teacher_model_name_or_path": str(tmp_path / "dangling")},
        "tokenizer_is_a_file": {"--tokenizer_name_or_path": str(a_file)},
        "output_is_a_file": {"--output_dir": str(a_file)},
        "output_under_a_file": {"--output_dir": str(a_file / "out")},
        "output_dangling_link": {"--output_dir": str(tmp_path / "dangling")},
        "cache_dir_is_a_file": {"--cache_dir": str(a_file)},
        "cache_dir_under_a_file": {"--cache_dir": str(a_file / "cache")},
        "save_tokenized_train_under_a_file": {"--save_tokenized_train": str(a_file / "tokenised")},
        "teacher_cache_is_a_file": {"--teacher_cache": str(a_file), "--teacher_model_name_or_path": "null"},
    }[case]
    config = {
        "config_missing": str(tmp_path / "nope.yaml"),
        "config_is_a_folder": str(tmp_path),
        "config_under_a_file": str(a_file / "recipe.yaml"),
    }.get(case, config)
    code, stdout, stderr = run_distill(capsys, config, *[t for kv in overrides.items() for t in kv])
    _one_line_error(code, stdout, stderr, *words)
    assert not out.exists() and a_file.read_text() == "x"


def test_symbolic_links_to_real_folders_work(models, tmp_path, capsys):
    config, _ = _config(models, tmp_path)
    (tmp_path / "student-link").symlink_to(models["t5"]["student"])
    (tmp_path / "real-out").mkdir()
    (tmp_path / "out-link").symlink_to(tmp_path / "real-out")
    code, _, stderr = run_distill(capsys, config, "--student_model_name_or_path", str(tmp_path / "student-link"),
                               "--output_dir", str(tmp_path / "out-link"))  # fmt: skip
    assert code == 0, stderr
    assert (tmp_path / "real-out" / "model.safetensors").is_file()
    assert (tmp_path / "out-link").is_symlink() and not (tmp_path / "real-out" / LOCK_FILE).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; tested as a path under a file instead")
def test_an_output_dir_that_cannot_be_written_is_one_line(models, tmp_path, capsys):
    config, _ = _config(models, tmp_path)
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, stdout, stderr = run_distill(capsys, config, "--output_dir", str(locked / "out"))
    finally:
        locked.chmod(0o700)
    _one_line_error(code, stdout, stderr, "output_dir", "cannot be created", "PermissionError")


# ---- f. one run per output_dir -------------------------------------------------------------------------------


def test_a_live_run_s_lock_refuses_a_second_run_and_a_dead_one_s_is_taken_over(models, tmp_path, capsys):
    config, out = _config(models, tmp_path)
    out.mkdir()
    lock = out / LOCK_FILE
    with folder_lock(out, "hf-kd distill"):  # held by a live process (this one, through another open file)
        code, stdout, stderr = run_distill(capsys, config)
        _one_line_error(code, stdout, stderr, "output_dir", "in use by hf-kd distill", f"pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written, the lock left to its owner

    # What a killed run leaves: its record in a lock file nobody holds (here naming this very process, as a reused
    # pid would: the unheld flock, not the pid, says the run has ended).
    ended = {"pid": os.getpid(), "host": socket.gethostname(), "command": "hf-kd distill", "started": "earlier"}
    lock.write_text(json.dumps(ended))
    code, _, stderr = run_distill(capsys, config)
    assert code == 0, stderr
    assert f"was left by hf-kd distill (pid {os.getpid()}" in stderr and "taking it over" in stderr
    assert (out / "model.safetensors").is_file() and not lock.exists()


@pytest.mark.slow
def test_two_runs_on_one_output_dir_at_once(models, tmp_path, capsys):
    """A real second run while the first one trains: one line, exit 2, the first run undisturbed."""
    config, out = _config(models, tmp_path, family="gpt2", max_steps=100000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "hf_kd.cli", "distill", "--config", config], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / LOCK_FILE).exists()
        code, stdout, stderr = run_distill(capsys, config, "--overwrite_output_dir", "true")
        _one_line_error(code, stdout, stderr, "output_dir", "in use by hf-kd distill", f"pid {first.pid}")
        assert first.poll() is None  # still training
    finally:
        first.kill()
        first.wait()
    # Killed: its lock is left behind, and the next run takes it over.
    assert (out / LOCK_FILE).exists()
    code, _, stderr = run_distill(capsys, config, "--overwrite_output_dir", "true", "--max_steps", "1")
    assert code == 0, stderr
    assert f"was left by hf-kd distill (pid {first.pid}" in stderr and "taking it over" in stderr
    assert not (out / LOCK_FILE).exists()
