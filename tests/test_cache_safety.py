"""`hf-kd cache-teacher` / `hf-kd pseudo-label` and the cache they write: nothing of the user's deleted, a re-run
repairs a damaged output, and every bad input (arguments, data, models, output folders) is one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import random_sentences, tiny_gpt2
from datasets import Dataset, DatasetDict
from helpers import one_line_error, run_cli
from recipe_helpers import write_data

from hf_kd.cli import main
from hf_kd.recipe.args import ConfigError
from hf_kd.teachers.cache import CachedTeacher
from hf_kd.teachers.cache_writer import build_teacher_cache

SHARD_SIZE = "3"  # 7 rows: shards 0, 1, 2


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok) -> dict[str, Path]:
    """A saved teacher (with its tokenizer), a tokenised data set and a text data set."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_gpt2(len(tok), seed=7).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    rows = []
    for text in random_sentences(7, seed=3, min_len=4, max_len=10):
        ids = tok(text)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    Dataset.from_list(rows).save_to_disk(str(root / "tokenised"))
    text = {"source": random_sentences(7, seed=11), "target": random_sentences(7, seed=12, max_len=6)}
    Dataset.from_dict(text).save_to_disk(str(root / "text"))
    return {"root": root, "teacher": root / "teacher", "tokenised": root / "tokenised", "text": root / "text"}


def cache_argv(files: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [
        "cache-teacher", "--teacher", str(files["teacher"]), "--dataset", str(files["tokenised"]),
        "--output", str(output), "--k", "4", "--shard-size", SHARD_SIZE, "--device", "cpu", *extra,
    ]  # fmt: skip


def label_argv(files: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [
        "pseudo-label", "--teacher", str(files["teacher"]), "--dataset", str(files["text"]), "--output", str(output),
        "--source-column", "source", "--max-new-tokens", "3", "--shard-size", SHARD_SIZE, "--device", "cpu", *extra,
    ]  # fmt: skip


ARGV = {"cache-teacher": cache_argv, "pseudo-label": label_argv}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- item 2: --overwrite deletes only what the command wrote ----------------------------------------------------


@pytest.mark.parametrize("command", ["cache-teacher", "pseudo-label"])
def test_overwrite_keeps_files_the_command_did_not_write(capsys, tmp_path, files, command) -> None:
    out = tmp_path / "out"
    assert run_cli(capsys, ARGV[command](files, out))[0] == 0
    (out / "model").mkdir()
    (out / "model" / "model.safetensors").write_bytes(b"a trained model")
    (out / "notes.txt").write_text("mine")
    other = ["--k", "5"] if command == "cache-teacher" else ["--max-new-tokens", "4"]
    one_line_error(capsys, ARGV[command](files, out, *other), "other settings", "--overwrite")
    code, _, err = run_cli(capsys, ARGV[command](files, out, *other, "--overwrite"))
    assert code == 0, err
    assert (out / "model" / "model.safetensors").read_bytes() == b"a trained model"
    assert (out / "notes.txt").read_text() == "mine"
    fingerprint = json.loads((out / "manifest.json").read_text())["fingerprint"]
    assert fingerprint["k" if command == "cache-teacher" else "max_new_tokens"] == int(other[1])


@pytest.mark.parametrize("command", ["cache-teacher", "pseudo-label"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_new_output_refuses_a_folder_holding_names_it_would_replace(capsys, tmp_path, files, command, overwrite):
    out = tmp_path / "model-dir"
    (out / "shards" / "00000").mkdir(parents=True)  # another tool's shards: main replaced 00000 with the cache's
    (out / "shards" / "00000" / "weights.bin").write_bytes(b"not ours")
    (out / "model.safetensors").write_bytes(b"a trained model")
    before = tree(out)
    one_line_error(capsys, ARGV[command](files, out, *overwrite), "already holds shards", "another output folder")
    assert tree(out) == before


def test_pseudo_label_refuses_a_dataset_folder_it_did_not_write(capsys, tmp_path, files) -> None:
    out = tmp_path / "out"
    (out / "dataset").mkdir(parents=True)  # main saved the assembled data set over it
    (out / "dataset" / "mine.txt").write_text("mine")
    one_line_error(capsys, label_argv(files, out), "already holds dataset")
    assert tree(out) == {"dataset/mine.txt": b"mine"}


def test_new_output_beside_other_files_keeps_them(capsys, tmp_path, files) -> None:
    out = tmp_path / "model-dir"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"a trained model")
    assert run_cli(capsys, cache_argv(files, out))[0] == 0
    assert run_cli(capsys, cache_argv(files, out, "--k", "5", "--overwrite"))[0] == 0
    assert (out / "model.safetensors").read_bytes() == b"a trained model"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors", "shards"]


# ---- item 3: a re-run verifies the shards and rebuilds the bad ones ---------------------------------------------


def damage(out: Path) -> None:
    """Shard 0: its .arrow file deleted; shard 1: bytes changed (same size); shard 2: the folder deleted."""
    next((out / "shards" / "00000").glob("*.arrow")).unlink()
    arrow = next((out / "shards" / "00001").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-40:-20] = bytes(20)
    arrow.write_bytes(bytes(data))
    shutil.rmtree(out / "shards" / "00002")


def test_cache_rerun_rebuilds_corrupt_and_missing_shards(capsys, tmp_path, files) -> None:
    out = tmp_path / "cache"
    assert run_cli(capsys, cache_argv(files, out))[0] == 0
    clean = CachedTeacher(out).data.to_dict()
    manifest = json.loads((out / "manifest.json").read_text())
    damage(out)
    code, stdout, err = run_cli(capsys, cache_argv(files, out))
    assert code == 0, err
    assert "rebuilt shards 0, 1, 2" in stdout, stdout
    assert "shard 0 cannot be read" in stdout and "shard 2 is missing" in stdout, stdout
    assert CachedTeacher(out).data.to_dict() == clean  # verified (checksums) and equal to the first build
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]
    code, stdout, _ = run_cli(capsys, cache_argv(files, out))  # nothing left to repair
    assert code == 0 and "rebuilt" not in stdout


def test_pseudo_label_rerun_rebuilds_a_corrupt_shard(capsys, tmp_path, files) -> None:
    out = tmp_path / "labels"
    assert run_cli(capsys, label_argv(files, out))[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    arrow = next((out / "shards" / "00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-30] + bytes(30))
    code, stdout, err = run_cli(capsys, label_argv(files, out))
    assert code == 0, err
    assert "shard 1 fails its checksum" in stdout and "rebuilt shard 1)" in stdout, stdout
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


# ---- a bad cache opened for training: one line, naming the fix ------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, files, tok) -> Path:
    out = tmp_path_factory.mktemp("c") / "cache"
    assert main(cache_argv(files, out)) == 0
    return out


def _bad_cache(kind: str, cache_dir: Path, tmp_path: Path) -> Path:
    bad = tmp_path / kind
    if kind != "missing":
        shutil.copytree(cache_dir, bad)
    if kind == "corrupt":
        arrow = next((bad / "shards" / "00001").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[:-30] + bytes(30))
    elif kind == "arrow-deleted":
        next((bad / "shards" / "00002").glob("*.arrow")).unlink()
    elif kind == "unfinished":
        manifest = json.loads((bad / "manifest.json").read_text())
        del manifest["shards"]["2"]
        (bad / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    elif kind == "manifest-not-utf8":
        (bad / "manifest.json").write_bytes(b'{"num_rows": "\xff\xfe"}')
    return bad


BAD_CACHES = {
    "missing": ["does not exist", "hf-kd cache-teacher"],
    "corrupt": ["shard 1 fails its checksum", "run `hf-kd cache-teacher` again"],
    "arrow-deleted": ["shard 2 cannot be read", "run `hf-kd cache-teacher` again"],
    "unfinished": ["unfinished (2 of 3 shards", "run `hf-kd cache-teacher` again"],
    "manifest-not-utf8": ["manifest.json cannot be read", "--overwrite"],
}


@pytest.mark.parametrize("kind", list(BAD_CACHES))
def test_training_on_a_bad_cache_raises_a_one_line_config_error(tmp_path, cache_dir, kind) -> None:
    with pytest.raises(ConfigError) as info:
        CachedTeacher(_bad_cache(kind, cache_dir, tmp_path))
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in BAD_CACHES[kind]), message


def test_cache_for_other_rows_is_a_config_error(cache_dir, files, tok) -> None:
    rows = Dataset.load_from_disk(str(files["tokenised"])).select(range(5))
    with pytest.raises(ConfigError, match="another data set: 7 rows, this one has 5; .*hf-kd cache-teacher"):
        CachedTeacher(cache_dir).attach(rows, tokenizer=tok)


@pytest.mark.parametrize("kind", ["corrupt", "missing"])
def test_distill_on_a_bad_cache_is_one_line(capsys, tmp_path, files, cache_dir, kind) -> None:
    data = write_data(tmp_path, {"text": "text"}, n_train=7, n_eval=2)
    config = {
        "teacher_cache": str(_bad_cache(kind, cache_dir, tmp_path)),
        "student_config": str(files["teacher"]),
        "tokenizer_name_or_path": str(files["teacher"]),
        "data_files": data,
        "block_size": 16,
        "group_texts": False,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    one_line_error(capsys, ["distill", "--config", str(tmp_path / "c.yaml")], *BAD_CACHES[kind])


# ---- one-line errors of the two commands ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--k", "0"], ["--k 0", "1 or more"]),
        (["--k", "999"], ["k=999", "vocabulary size 54"]),
        (["--temperature", "0"], ["--temperature 0.0", "positive"]),
        (["--temperature", "-1"], ["--temperature -1.0", "positive"]),
        (["--temperature", "nan"], ["--temperature nan", "positive"]),
        (["--temperature", "inf"], ["--temperature inf", "positive"]),
        (["--tail-samples", "-1"], ["--tail-samples -1", "0 or more"]),
        (["--batch-size", "0"], ["--batch-size 0", "1 or more"]),
        (["--shard-size", "0"], ["--shard-size 0", "1 or more"]),
        (["--tokenizer", "/no/such/tokenizer"], ["--tokenizer='/no/such/tokenizer'", "no such file or folder"]),
        (["--device", "cuda:99"], ["--device", "cpu"]),
    ],
)
def test_cache_teacher_bad_settings(capsys, tmp_path, files, extra, words) -> None:
    one_line_error(capsys, cache_argv(files, tmp_path / "out", *extra), *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--batch-size", "0"], ["--batch-size 0", "1 or more"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens 0", "1 or more"]),
        (["--num-beams", "0"], ["--num-beams 0", "1 or more"]),
        (["--shard-size", "0"], ["--shard-size 0", "1 or more"]),
        (["--max-wer", "nan"], ["--max-wer nan", "finite"]),
        (["--tokenizer", "/no/such/tokenizer"], ["--tokenizer='/no/such/tokenizer'", "no such file or folder"]),
        (["--source-column", "article"], ["no column 'article'", "--source-column"]),
        (["--target-column", "summary", "--target-source", "both"], ["'summary'", "--target-column"]),
    ],
)
def test_pseudo_label_bad_settings(capsys, tmp_path, files, extra, words) -> None:
    one_line_error(capsys, label_argv(files, tmp_path / "out", *extra), *words)
    assert not (tmp_path / "out").exists()


def _bad_dataset(kind: str, files: Path, tmp_path: Path, command: str) -> Path:
    """A broken ``--dataset`` for ``command``, as a saved data set folder (or a path that is not there)."""
    source = files["tokenised" if command == "cache-teacher" else "text"]
    path = tmp_path / kind
    if kind == "empty":
        Dataset.load_from_disk(str(source)).select([]).save_to_disk(str(path))
    elif kind == "wrong-kind":  # cache-teacher given text, pseudo-label given token ids
        other = files["text" if command == "cache-teacher" else "tokenised"]
        shutil.copytree(other, path)
    elif kind == "dataset-dict":
        DatasetDict({"train": Dataset.load_from_disk(str(source))}).save_to_disk(str(path))
    elif kind == "arrow-deleted":
        shutil.copytree(source, path)
        next(path.glob("*.arrow")).unlink()
    elif kind == "state-not-utf8":
        shutil.copytree(source, path)
        (path / "state.json").write_bytes(b'{"_data_files": "\xff\xfe"}')
    return path


BAD_DATASETS = {
    "missing": ["does not exist", "save_to_disk"],
    "empty": ["has no rows", "at least one example"],
    "dataset-dict": ["DatasetDict", "['train']", "--split"],
    "arrow-deleted": ["cannot be read", "No such file"],
    "state-not-utf8": ["cannot be read", "utf-8"],
}


@pytest.mark.parametrize("command", ["cache-teacher", "pseudo-label"])
@pytest.mark.parametrize("kind", [*BAD_DATASETS, "wrong-kind"])
def test_bad_dataset(capsys, tmp_path, files, command, kind) -> None:
    path = _bad_dataset(kind, files, tmp_path, command)
    argv = ARGV[command](files, tmp_path / "out")
    argv[argv.index("--dataset") + 1] = str(path)
    if command == "pseudo-label" and kind == "wrong-kind":
        argv[argv.index("--source-column") + 1] = "input_ids"
    wrong_kind = ["no input_ids column", "tokenise"] if command == "cache-teacher" else ["not text", "raw text"]
    one_line_error(capsys, argv, f"--dataset {path}", *BAD_DATASETS.get(kind, wrong_kind))
    assert not (tmp_path / "out").exists()


def _bad_teacher(kind: str, files: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / kind
    shutil.copytree(files["teacher"], folder)
    weights = folder / "model.safetensors"
    if kind == "truncated-header":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "truncated-tensors":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "pickle-only":
        weights.rename(folder / "pytorch_model.bin")
    elif kind == "tokenizer-not-utf8":
        (folder / "tokenizer_config.json").write_bytes(b'{"model_max_length": "\xff\xfe"}')
    return folder


BAD_TEACHERS = {
    "truncated-header": ["safetensors weights cannot be read", "truncated or corrupt"],
    "truncated-tensors": ["safetensors weights cannot be read", "truncated or corrupt"],
    "pickle-only": ["pytorch_model.bin", "safetensors only", "save_pretrained"],
    "tokenizer-not-utf8": ["its tokenizer cannot be loaded", "utf-8", "--tokenizer"],
}


@pytest.mark.parametrize("command", ["cache-teacher", "pseudo-label"])
@pytest.mark.parametrize("kind", list(BAD_TEACHERS))
def test_bad_teacher_folder(capsys, tmp_path, files, command, kind) -> None:
    folder = _bad_teacher(kind, files, tmp_path)
    argv = ARGV[command](files, tmp_path / "out")
    argv[argv.index("--teacher") + 1] = str(folder)
    one_line_error(capsys, argv, f"--teacher={str(folder)!r}", *BAD_TEACHERS[kind])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["cache-teacher", "pseudo-label"])
def test_unreadable_manifest_is_one_line_and_overwrite_replaces_it(capsys, tmp_path, files, command) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(b"\xff\xfe not json")
    one_line_error(capsys, ARGV[command](files, out), "manifest.json cannot be read", "--overwrite")
    code, _, err = run_cli(capsys, ARGV[command](files, out, "--overwrite"))
    assert code == 0, err


def test_library_rebuild_is_reported_and_checked_arguments_are_config_errors(tmp_path, files, tok) -> None:
    """The Python API: bad settings are ConfigErrors (still ValueErrors), a repair is reported to on_rebuild."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(files["teacher"])
    rows = Dataset.load_from_disk(str(files["tokenised"]))
    for bad in ({"k": 0}, {"temperature": float("nan")}, {"tail_samples": -1}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            build_teacher_cache(teacher, rows, tmp_path / "never", tokenizer=tok, **{"k": 4, **bad})
    assert not (tmp_path / "never").exists()
    build_teacher_cache(teacher, rows, tmp_path / "c", tokenizer=tok, k=4, shard_size=3)
    shutil.rmtree(tmp_path / "c" / "shards" / "00001")
    told = []
    build_teacher_cache(
        teacher, rows, tmp_path / "c", tokenizer=tok, k=4, shard_size=3, on_rebuild=lambda *shard: told.append(shard)
    )
    assert told == [(1, f"is missing ({tmp_path / 'c' / 'shards' / '00001'})")]
    CachedTeacher(tmp_path / "c")
