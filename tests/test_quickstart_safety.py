"""`hf-kd quickstart` never writes over what it did not write with the same settings, reads its own files back
field by field, and refuses a second run on a folder in use: one line, exit 2, before any training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_tokenizer, tiny_gpt2
from helpers import one_line_error

from hf_kd import quickstart
from hf_kd.cli import build_parser
from hf_kd.data import cache_path
from hf_kd.errors import ConfigError
from hf_kd.locking import LOCK_FILE, folder_lock
from hf_kd.quickstart.files import MARKER, claim_output_dir, planned_outputs


def argv(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["quickstart", "--smoke", "--task", "lm", "--threads", "1", "--output-dir", str(out),
            "--cache-dir", str(cache), *extra]  # fmt: skip


def settings_of(out: Path, cache: Path, *extra: str) -> quickstart.Settings:
    return quickstart.settings_from_args(build_parser().parse_args(argv(out, cache, *extra)))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_model(tmp_path) -> Path:
    """A model of the user's in DIR/teacher, beside notes of theirs."""
    out = tmp_path / "out"
    tiny_gpt2(len(make_tokenizer())).save_pretrained(out / "teacher")
    (out / "notes.txt").write_text("mine")
    return out


def test_a_model_already_in_output_teacher_is_never_written_over(capsys, tmp_path, user_model) -> None:
    before = tree(user_model)
    one_line_error(capsys, argv(user_model, tmp_path / "cache"), "teacher already exists", "--overwrite")
    assert tree(user_model) == before and not (tmp_path / "cache").exists()  # refused before anything ran


@pytest.mark.parametrize("entry", ["student_kd", "report.json"])
def test_a_symlink_or_file_under_the_quickstart_names_is_refused(capsys, tmp_path, entry) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (out / entry).symlink_to(elsewhere)
    one_line_error(capsys, argv(out, tmp_path / "cache"), "symlink")
    assert (out / entry).is_symlink() and (elsewhere / "keep.txt").read_text() == "keep"


def test_overwrite_replaces_exactly_the_quickstart_entries(tmp_path, user_model) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (user_model / "student_kd").symlink_to(elsewhere)
    settings = settings_of(user_model, tmp_path / "cache")
    claim_output_dir(user_model, settings, overwrite=True)
    assert not (user_model / "teacher").exists() and not (user_model / "student_kd").exists()
    assert (user_model / "notes.txt").read_text() == "mine"  # not a quickstart entry: kept
    assert (elsewhere / "keep.txt").read_text() == "keep"  # the link was removed, not followed
    marker = json.loads((user_model / MARKER).read_text())
    assert marker["outputs"] == sorted(planned_outputs(settings))
    # Claimed with these settings: the same settings may write there again, other settings may not.
    (user_model / "teacher").mkdir()
    claim_output_dir(user_model, settings, overwrite=False)
    other = settings_of(user_model, tmp_path / "cache", "--student-steps", "2")
    with pytest.raises(ConfigError, match="other settings"):
        claim_output_dir(user_model, other, overwrite=False)


@pytest.mark.parametrize(
    "text, words",
    [("{not json", "cannot be read as JSON"), ('{"kind": "other"}', "kind is not"),
     ('{"kind": "hf-kd-quickstart", "settings": {}, "outputs": ["../x"]}', "outputs is not")],
)  # fmt: skip
def test_a_damaged_marker_is_one_line_naming_it(capsys, tmp_path, text, words) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(text)
    one_line_error(capsys, argv(out, tmp_path / "cache"), MARKER, words)


def test_output_and_cache_paths(capsys, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, argv(tmp_path / "file", tmp_path / "cache"), "is a file, not a folder")
    one_line_error(capsys, argv(tmp_path / "file" / "out", tmp_path / "cache"), "which is a file")
    one_line_error(capsys, argv(tmp_path / "out", tmp_path / "file"), "--cache-dir", "is a file")


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(capsys, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "hf-kd quickstart"):
        one_line_error(capsys, argv(out, tmp_path / "cache"), "in use by hf-kd quickstart", f"pid {os.getpid()}")
    assert not (out / LOCK_FILE).exists()  # released


def test_a_stale_lock_is_taken_over(capsys, tmp_path) -> None:
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 7, "host": "h", "command": "hf-kd x", "started": ""}))
    with folder_lock(tmp_path, "hf-kd y") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "left by hf-kd x (pid 4194311 on h), which no longer runs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    quickstart.load_data(settings_of(cache / "out", cache), cache)  # extracts the standard-library data once
    return cache


def _teacher_folder(cache: Path, settings: quickstart.Settings) -> Path:
    return cache / "quickstart" / f"teacher-{settings.task}-{settings.teacher_key()}"


@pytest.mark.parametrize(
    "record, words",
    [(None, "cannot be read"), ('{"train_seconds": "soon"}', "train_seconds='soon'"),
     ('{"train_seconds": 3, "seed": 5}', "describes another teacher")],
)  # fmt: skip
def test_a_damaged_cached_teacher_is_one_line_naming_it(capsys, tmp_path, data_cache, record, words) -> None:
    out = tmp_path / "out"
    settings = settings_of(out, data_cache)
    folder = _teacher_folder(data_cache, settings)
    folder.mkdir(parents=True)
    try:
        tiny_gpt2(len(make_tokenizer())).save_pretrained(folder)
        if record is not None:
            fields = {f: getattr(settings, f) for f in quickstart.TEACHER_FIELDS}
            (folder / "quickstart_teacher.json").write_text(json.dumps({**fields, **json.loads(record)}))
        one_line_error(capsys, argv(out, data_cache), "quickstart_teacher.json", words, "delete the folder")
    finally:
        import shutil

        shutil.rmtree(folder)


def test_a_damaged_data_cache_is_one_line_naming_it(capsys, tmp_path, data_cache) -> None:
    cache = tmp_path / "cache"
    folder = cache_path("lm", cache)
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text("{broken")
    one_line_error(capsys, argv(tmp_path / "out", cache), "data cache", "delete that folder")


@pytest.mark.parametrize(
    "extra, words",
    [(("--student-steps", "0"), "--student-steps 0 must be 1 or more"), (("--threads", "0"), "--threads 0"),
     (("--teacher-lr", "-1"), "positive number"), (("--mask-fraction", "1.5"), "between 0 and 1"),
     (("--alpha", "2"), "between 0 and 1"), (("--teacher-width", "129"), "heads")],
)  # fmt: skip
def test_sizes_and_rates_that_cannot_make_a_run(capsys, tmp_path, extra, words) -> None:
    one_line_error(capsys, argv(tmp_path / "out", tmp_path / "cache", *extra), words)
    assert not (tmp_path / "out").exists()
