"""`hf-kd evaluate` and `hf-kd make-student`: the same blocks for both models, lengths checked before anything
runs, every output path a user can name (a folder, a file, under a file, a symlink, a file the command did not
write) one line and exit 2 or a documented result, and two commands on one folder never a traceback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, random_sentences, tiny_gpt2
from helpers import one_line_error
from recipe_helpers import write_json_rows
from transformers import LlamaConfig, LlamaForCausalLM

from hf_kd.cli import main
from hf_kd.locking import LOCK_FILE, FolderInUseError, folder_lock, sibling_lock


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    tok = make_tokenizer()
    # One set of weights under two configs that differ only in max_position_embeddings (rotary: no position
    # weights), and a GPT-2 of 64 learned positions.
    torch.manual_seed(0)
    base = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": 3}  # fmt: skip
    llama = LlamaForCausalLM(LlamaConfig(max_position_embeddings=64, **base))
    llama.save_pretrained(root / "llama-64")
    llama.config.max_position_embeddings = 128
    llama.save_pretrained(root / "llama-128")
    tiny_gpt2(len(tok), seed=1).save_pretrained(root / "gpt2")
    for name in ("llama-64", "llama-128", "gpt2"):
        tok.save_pretrained(root / name)
    long_texts = [" ".join(random_sentences(12, seed=s)) for s in range(4)]  # ~90 tokens each
    write_json_rows(root / "long.jsonl", [{"text": t} for t in long_texts])
    return {p.name: p for p in root.iterdir()}


def evaluate_argv(files, student: str, *extra: str) -> list[str]:
    return ["evaluate", "--student", str(files[student]), "--data_files", str(files["long.jsonl"]),
            "--batch_size", "2", "--device", "cpu", *extra]  # fmt: skip


# ---- e: the same blocks for both models ---------------------------------------------------------------------------


def test_evaluate_scores_both_models_on_the_same_blocks(capsys, tmp_path, files) -> None:
    out = tmp_path / "r.json"
    argv = evaluate_argv(files, "llama-64", "--teacher", str(files["llama-128"]), "--block_size", "128")
    assert main([*argv, "--no_speed", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    # Identical weights on identical blocks (cut to the smaller limit, 64): identical perplexity, ratio exactly 1.
    assert results["student"]["perplexity"] == results["teacher"]["perplexity"]
    ratio = [line for line in capsys.readouterr().out.splitlines() if line.startswith("perplexity")][0].split()[-1]
    assert ratio == "1"
    alone = tmp_path / "alone.json"  # the 64-position model alone gives the same number: 64-token blocks
    assert main([*evaluate_argv(files, "llama-64", "--block_size", "128"), "--no_speed", "--output", str(alone)]) == 0
    assert json.loads(alone.read_text())["student"]["perplexity"] == results["teacher"]["perplexity"]
    assert math.isfinite(results["student"]["perplexity"])


# ---- c: the speed measurement's lengths ---------------------------------------------------------------------------


def test_evaluate_speed_prompts_past_the_positions_are_one_line(capsys, tmp_path, files) -> None:
    # 64 positions; prompts cut to 128 tokens (~90 here) + 64 new tokens: an IndexError in generate before.
    one_line_error(capsys, evaluate_argv(files, "gpt2"), "64 positions", "--speed_input_length", "--no_speed")
    out = tmp_path / "r.json"  # the fix the message names works
    argv = evaluate_argv(files, "gpt2", "--speed_input_length", "32", "--max_new_tokens", "8", "--speed_samples", "2")
    assert main([*argv, "--output", str(out)]) == 0
    assert json.loads(out.read_text())["student"]["generation_tokens_per_second"] > 0


# ---- f: --output ----------------------------------------------------------------------------------------------------


def test_evaluate_output_paths(capsys, tmp_path, files) -> None:
    argv = [*evaluate_argv(files, "gpt2"), "--no_speed", "--output"]
    (tmp_path / "folder").mkdir()
    one_line_error(capsys, [*argv, str(tmp_path / "folder")], "is a folder")
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, [*argv, str(tmp_path / "file" / "r.json")], "which is a file")
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    one_line_error(capsys, [*argv, str(notes)], "is not an hf-kd evaluate result")
    assert notes.read_text() == '{"my": "notes"}'  # left as it was
    # A symlink: the file it points to is written, the link stays.
    target = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert main([*argv, str(link)]) == 0
    assert link.is_symlink() and set(json.loads(target.read_text())) == {"student"}
    # An earlier result is replaced, and a new folder is made.
    assert main([*argv, str(link)]) == 0
    assert main([*argv, str(tmp_path / "new" / "r.json")]) == 0
    assert json.loads((tmp_path / "new" / "r.json").read_text()) == json.loads(target.read_text())
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


# ---- make-student ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher") / "gpt2"
    tiny_gpt2(len(make_tokenizer()), seed=1, n_layer=4).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def student_argv(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["make-student", str(teacher), str(out), "--layers", "2", *extra]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_make_student_paths(capsys, tmp_path, teacher) -> None:
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, student_argv(teacher, tmp_path / "file"), "is a file, not a folder")
    one_line_error(capsys, student_argv(teacher, tmp_path / "file" / "out"), "which is a file")
    one_line_error(capsys, student_argv(teacher / "config.json", tmp_path / "out"), "is a file; pass the folder")
    one_line_error(capsys, [*student_argv(teacher, tmp_path / "out"), "--tokenizer", str(tmp_path / "file")], "file")
    # A symlink to a folder: the student is saved where it points, the link stays.
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert main(student_argv(teacher, tmp_path / "link")) == 0
    assert (tmp_path / "link").is_symlink() and (real / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*"))  # no temporary folder or lock file left


def test_make_student_save_is_whole_or_nothing(capsys, tmp_path, teacher, monkeypatch) -> None:
    out = tmp_path / "out"
    assert main(student_argv(teacher, out)) == 0
    (out / "notes.txt").write_text("mine")
    before = tree(out)

    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{}")  # part of the files, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full_disk)
    one_line_error(capsys, [*student_argv(teacher, out), "--overwrite"], "No space left", "left as it was")
    assert tree(out) == before and not list(tmp_path.glob(".*"))


def test_make_student_overwrite_removes_the_old_weights_only(capsys, tmp_path, teacher) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json"):  # fmt: skip
        (out / stale).write_text("an older, sharded model")
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    assert main([*student_argv(teacher, out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert (out / "notes.txt").read_text() == "mine"
    record = json.loads((out / "hf_kd_student.json").read_text())
    assert record["layer_map"] == {"decoder": [0, 3]} and record["teacher_layers"] == {"decoder": 4}


def test_make_student_on_an_output_in_use_is_one_line(capsys, tmp_path, teacher) -> None:
    out = tmp_path / "out"
    with sibling_lock(out, "hf-kd make-student"):
        one_line_error(capsys, student_argv(teacher, out), "in use by hf-kd make-student", f"pid {os.getpid()}")
    assert not out.exists()


def test_lock_waits_for_its_holder_in_another_process(tmp_path) -> None:
    """wait=True blocks while another process holds the lock and goes on when it is released."""
    code = textwrap.dedent(f"""
        import time
        from hf_kd.locking import folder_lock
        with folder_lock({str(tmp_path)!r}, "holder"):
            print("held", flush=True)
            time.sleep(1.5)
            open({str(tmp_path / "done")!r}, "w").close()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=f"in use by holder \\(pid {holder.pid}"):
            with folder_lock(tmp_path, "second"):
                pass
        with folder_lock(tmp_path, "third", wait=True):
            assert (tmp_path / "done").exists()  # taken only after the holder's body ended
    finally:
        holder.wait(timeout=30)
    assert not (tmp_path / LOCK_FILE).exists()


def test_an_atomic_write_that_fails_leaves_the_previous_file(tmp_path, monkeypatch) -> None:
    from hf_kd import errors

    path = tmp_path / "r.json"
    errors.write_text_atomic(path, "first")
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, *args, **kwargs):
            self.file = real_fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[:2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(errors.os, "fdopen", FullDisk)
    with pytest.raises(OSError, match="No space"):
        errors.write_text_atomic(path, "second, longer")
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
