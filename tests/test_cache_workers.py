"""`hf-kd cache-teacher` / `hf-kd pseudo-label` written by many processes: torchrun ranks and independent workers
(--num-workers N --worker-index I, one after the other or at once) give an output byte-identical to one process; a
killed worker's shards are redone and nothing else; a shard someone holds is never written twice; bad worker
settings are one line. Also the outputs' data-loss cases (issue 17): inputs inside the output, symlinked shards,
damaged manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tokenizer, random_sentences, tiny_gpt2
from datasets import Dataset
from helpers import run_cli

from hf_kd.cli import main
from hf_kd.errors import ConfigError
from hf_kd.teachers.cache import CachedTeacher
from hf_kd.teachers.claims import Claim
from hf_kd.teachers.shards import ShardError, data_files

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("WORLD_SIZE", None), ENV.pop("RANK", None)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A saved teacher with its tokenizer, a tokenised data set (9 rows) and a text data set (9 rows)."""
    tok = make_tokenizer()
    root = tmp_path_factory.mktemp("inputs")
    tiny_gpt2(len(tok), seed=7).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    ids = [tok(text)["input_ids"] for text in random_sentences(9, seed=3, min_len=4, max_len=10)]
    Dataset.from_dict({"input_ids": ids, "labels": ids}).save_to_disk(str(root / "tokenised"))
    text = {"source": random_sentences(9, seed=11), "target": random_sentences(9, seed=12, max_len=6)}
    Dataset.from_dict(text).save_to_disk(str(root / "text"))
    return {"teacher": root / "teacher", "tokenised": root / "tokenised", "text": root / "text"}


def argv(command: str, files: dict[str, Path], output: Path, *extra: str) -> list[str]:
    if command == "cache-teacher":
        return ["cache-teacher", "--teacher", str(files["teacher"]), "--dataset", str(files["tokenised"]),
                "--output", str(output), "--k", "4", "--tail-samples", "3", "--shard-size", "2", "--device", "cpu",
                *extra]  # fmt: skip
    return ["pseudo-label", "--teacher", str(files["teacher"]), "--dataset", str(files["text"]), "--output",
            str(output), "--source-column", "source", "--max-new-tokens", "3", "--shard-size", "2", "--device", "cpu",
            *extra]  # fmt: skip


def one_line_error(capsys, args: list[str], *words: str) -> str:
    code, out, err = run_cli(capsys, args)
    assert code == 2, (code, out, err)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and "; " in errors[0], err
    assert all(word in errors[0] for word in words), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, files) -> dict[str, Path]:
    """Each command's output from one process."""
    root = tmp_path_factory.mktemp("reference")
    for command in ("cache-teacher", "pseudo-label"):
        assert main(argv(command, files, root / command)) == 0
    return {command: root / command for command in ("cache-teacher", "pseudo-label")}


def arrow_bytes(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in data_files(folder)]


def assert_identical(output: Path, reference: Path) -> None:
    """Same manifest bytes (so the same shard checksums), same Arrow bytes in every shard and in the assembled data
    set, and nothing left behind (claims, locks, temporary folders)."""
    assert (output / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == manifest["num_shards"] > 2
    names = sorted(p.name for p in (output / "shards").iterdir())
    assert names == sorted(p.name for p in (reference / "shards").iterdir()) == [f"{i:05d}" for i in range(len(names))]
    for name in names:
        assert arrow_bytes(output / "shards" / name) == arrow_bytes(reference / "shards" / name), name
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in reference.iterdir())
    if (reference / "dataset").exists():
        assert arrow_bytes(output / "dataset") == arrow_bytes(reference / "dataset")


def wrote(stdout: str) -> list[int]:
    """The shards a worker's last line says it wrote."""
    found = re.findall(r"wrote shards ([\d, ]+);", stdout)
    return [int(i) for i in found[-1].split(", ")] if found else []


COMMANDS = ["cache-teacher", "pseudo-label"]


# ---- independent workers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_workers_one_after_another_equal_one_process(capsys, tmp_path, files, reference, command) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, argv(command, files, out, "--num-workers", "2", "--worker-index", "1"))
    assert code == 0, err
    assert wrote(stdout) == [1, 3] and "worker 2/2" in stdout and "2 of 5 shards are recorded" in stdout, stdout
    if command == "cache-teacher":
        with pytest.raises(ShardError, match="unfinished"):
            CachedTeacher(out)
    assert not (out / "dataset").exists()
    code, stdout, err = run_cli(capsys, argv(command, files, out, "--num-workers", "2", "--worker-index", "0"))
    assert code == 0, err
    assert "Cache written" in stdout or "rows (teacher targets) written" in stdout, stdout
    assert_identical(out, reference[command])


def run_at_once(commands: list[list[str]]) -> list[str]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hf_kd.cli", *c], env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )  # fmt: skip
        for c in commands
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stdout + stderr[-3000:]
    return [stdout for stdout, _ in outputs]


@pytest.mark.slow
def test_workers_at_once_equal_one_process(tmp_path, files, reference) -> None:
    """Worker 0 twice and worker 1, all at once on one folder: every shard written exactly once (the claims), the
    result identical to one process."""
    out = tmp_path / "out"
    workers = [["--num-workers", "2", "--worker-index", i] for i in ("0", "1", "0")]
    stdouts = run_at_once([argv("cache-teacher", files, out, *w) for w in workers])
    written = [wrote(s) for s in stdouts]
    assert sorted(i for w in written for i in w) == [0, 1, 2, 3, 4], written  # every shard written exactly once
    assert all(i % 2 == 0 for i in written[0] + written[2]) and written[1] == [1, 3], written
    assert sum("Cache written" in s for s in stdouts) >= 1, stdouts
    assert_identical(out, reference["cache-teacher"])


@pytest.mark.slow
def test_pseudo_label_workers_at_once_equal_one_process(tmp_path, files, reference) -> None:
    out = tmp_path / "out"
    stdouts = run_at_once([argv("pseudo-label", files, out, "--num-workers", "2", "--worker-index", i) for i in "01"])
    assert sorted(wrote(stdouts[0]) + wrote(stdouts[1])) == [0, 1, 2, 3, 4]
    assert_identical(out, reference["pseudo-label"])


# ---- torchrun -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_torchrun_two_processes_equal_one_process(tmp_path, files, reference, command) -> None:
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hf_kd.cli"]
    result = subprocess.run([*launch, *argv(command, files, out)], env=ENV, text=True, capture_output=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "worker 2/2 wrote shards 1, 3" in result.stdout, result.stdout
    assert_identical(out, reference[command])


# ---- a killed worker, a live claim, other settings, bad indices ---------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_killed_worker_redoes_only_its_missing_shards(capsys, tmp_path, files, reference) -> None:
    out = tmp_path / "out"
    worker0 = argv("cache-teacher", files, out, "--num-workers", "2", "--worker-index", "0")
    assert run_cli(capsys, worker0)[0] == 0
    # What SIGKILL while writing shard 2 leaves: no manifest entry, a half-written folder, the dead holder's claim.
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"]["2"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "shards" / "00002")
    (out / "shards" / "00002.tmp.deadbeef").mkdir()
    (out / "shards" / "00002.claim").write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    before = {i: (out / "shards" / f"{i:05d}" / "hf_kd_shard.json").stat().st_mtime_ns for i in (0, 4)}
    code, stdout, err = run_cli(capsys, worker0)
    assert code == 0, err
    assert wrote(stdout) == [2], stdout  # only the killed shard
    assert {i: (out / "shards" / f"{i:05d}" / "hf_kd_shard.json").stat().st_mtime_ns for i in (0, 4)} == before
    assert run_cli(capsys, argv("cache-teacher", files, out, "--num-workers", "2", "--worker-index", "1"))[0] == 0
    assert_identical(out, reference["cache-teacher"])


def test_a_shard_held_by_a_live_process_is_not_written_twice(capsys, tmp_path, files, reference) -> None:
    out = tmp_path / "out"
    worker0 = argv("cache-teacher", files, out, "--num-workers", "2", "--worker-index", "0")
    assert run_cli(capsys, argv("cache-teacher", files, out, "--num-workers", "2", "--worker-index", "1"))[0] == 0
    held = Claim(out / "shards" / "00002.claim", "another run of worker 0")
    assert held.acquire()  # this (live) process holds shard 2
    code, stdout, err = run_cli(capsys, worker0)
    assert code == 0 and wrote(stdout) == [0, 4] and "4 of 5 shards are recorded" in stdout, stdout + err
    held.release()
    code, stdout, err = run_cli(capsys, worker0)
    assert code == 0 and wrote(stdout) == [2] and "Cache written" in stdout, stdout + err
    assert_identical(out, reference["cache-teacher"])


@pytest.mark.parametrize("command", COMMANDS)
def test_worker_with_other_settings_is_refused(capsys, tmp_path, files, command) -> None:
    out = tmp_path / "out"
    assert run_cli(capsys, argv(command, files, out, "--num-workers", "2", "--worker-index", "0"))[0] == 0
    before = (out / "manifest.json").read_bytes()
    other = ["--k", "5"] if command == "cache-teacher" else ["--max-new-tokens", "4"]
    one_line_error(
        capsys, argv(command, files, out, "--num-workers", "2", "--worker-index", "1", *other), "other settings"
    )
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000", "00002", "00004"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("workers", "words"),
    [
        (["--num-workers", "2", "--worker-index", "2"], ["--worker-index 2 is out of range", "0 to 1"]),
        (["--num-workers", "3", "--worker-index", "-1"], ["--worker-index -1 is out of range", "0 to 2"]),
        (["--worker-index", "1"], ["--worker-index 1 is out of range for --num-workers 1"]),
        (["--num-workers", "0"], ["--num-workers 0 must be 1 or more"]),
    ],
)
def test_bad_worker_options_are_one_line(capsys, tmp_path, files, command, workers, words) -> None:
    one_line_error(capsys, argv(command, files, tmp_path / "out", *workers), *words)
    assert not (tmp_path / "out").exists()


def test_launcher_rank_out_of_range_is_a_config_error() -> None:
    from hf_kd.teachers.shards import Workers

    assert Workers.from_options(2, 1, env={"WORLD_SIZE": "2", "RANK": "1"}) == Workers(4, 3, False, False, True)
    assert Workers.from_options(1, None, env={"WORLD_SIZE": "2", "RANK": "1"}) == Workers(2, 1, False, False, False)
    assert Workers.from_options(1, None, env={"WORLD_SIZE": "2", "RANK": "0"}) == Workers(2, 0, True, False, True)
    assert Workers.from_options(3, None, env={}) == Workers(1, 0, True, True, True)  # no index: finish the job
    with pytest.raises(ConfigError, match="RANK=2 is out of range"):
        Workers.from_options(1, None, env={"WORLD_SIZE": "2", "RANK": "2"})


# ---- issue 17: never destroy the run's inputs, never follow a link out, damaged manifests ------------------------


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_pseudo_label_never_deletes_its_own_dataset(capsys, tmp_path, files, overwrite) -> None:
    """main: --overwrite deleted <output>/dataset, this run's --dataset, then failed: input gone, no output."""
    out = tmp_path / "out"
    assert run_cli(capsys, argv("pseudo-label", files, out))[0] == 0
    before = tree(out)
    again = argv("pseudo-label", files, out, "--max-new-tokens", "4", *overwrite)
    again[again.index("--dataset") + 1] = str(out / "dataset")
    one_line_error(capsys, again, f"--dataset {out / 'dataset'} lies in", "choose another --output")
    assert tree(out) == before


def test_cache_teacher_refuses_a_dataset_inside_its_shards(capsys, tmp_path, files) -> None:
    out = tmp_path / "out"
    assert run_cli(capsys, argv("cache-teacher", files, out))[0] == 0
    before = tree(out)
    again = argv("cache-teacher", files, out, "--k", "5", "--overwrite")
    again[again.index("--dataset") + 1] = str(out / "shards" / "00000")
    one_line_error(capsys, again, "lies in", "shards")
    assert tree(out) == before


def test_symlinked_shards_are_never_followed(capsys, tmp_path, files) -> None:
    """main: --overwrite followed the link, deleted every 5-digit folder on the other disk, then failed on every
    retry."""
    out, disk = tmp_path / "out", tmp_path / "other-disk"
    assert run_cli(capsys, argv("cache-teacher", files, out))[0] == 0
    shutil.move(out / "shards", disk)  # the user moved the shards to another disk and linked them back
    (out / "shards").symlink_to(disk)
    (disk / "00042").mkdir()
    (disk / "00042" / "theirs.bin").write_bytes(b"not written by hf-kd")
    before = tree(disk)
    assert CachedTeacher(out).data.num_rows == 9  # reading through the link is fine
    for extra in (["--k", "5", "--overwrite"], []):
        one_line_error(capsys, argv("cache-teacher", files, out, *extra), "is a symbolic link", "never follows")
        assert tree(disk) == before and (out / "manifest.json").is_file()
    (out / "shards").unlink()  # the fix the message names: the retry then works
    code, _, err = run_cli(capsys, argv("cache-teacher", files, out, "--k", "5", "--overwrite"))
    assert code == 0, err
    assert tree(disk) == before and CachedTeacher(out).k == 5


def test_overwrite_deletes_only_files_it_wrote(capsys, tmp_path, files) -> None:
    out = tmp_path / "out"
    assert run_cli(capsys, argv("cache-teacher", files, out))[0] == 0
    (out / "shards" / "00042").mkdir()
    (out / "shards" / "00042" / "theirs.bin").write_bytes(b"mine")
    (out / "shards" / "00001" / "notes.txt").write_text("mine too")
    overwrite = argv("cache-teacher", files, out, "--k", "5", "--overwrite")
    one_line_error(capsys, overwrite, "shards/00001 holds files", "move it out")  # it holds notes.txt
    assert (out / "shards" / "00042" / "theirs.bin").read_bytes() == b"mine"
    assert [p.name for p in (out / "shards" / "00001").iterdir()] == ["notes.txt"]
    (out / "shards" / "00001" / "notes.txt").rename(tmp_path / "notes.txt")
    code, _, err = run_cli(capsys, argv("cache-teacher", files, out, "--k", "5"))
    assert code == 0, err
    assert (out / "shards" / "00042" / "theirs.bin").read_bytes() == b"mine" and CachedTeacher(out).k == 5


MANIFEST_DAMAGE = {
    "num_rows": ("num_rows", "9"),
    "shard_size": ("shard_size", 0),
    "num_shards": ("num_shards", 4),
    "shards": ("shards", []),
    "complete": ("complete", "yes"),
    "format_version": ("format_version", 99),
    "fingerprint": ("fingerprint", "abc"),
}


@pytest.mark.parametrize("kind", [*MANIFEST_DAMAGE, "entry-rows", "entry-sha", "entry-key", "entry-start"])
def test_damaged_manifest_is_one_line_naming_the_file_and_field(capsys, tmp_path, files, kind) -> None:
    out = tmp_path / "out"
    assert run_cli(capsys, argv("cache-teacher", files, out))[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    if kind in MANIFEST_DAMAGE:
        key, value = MANIFEST_DAMAGE[kind]
        manifest[key], field = value, key
    elif kind == "entry-rows":
        manifest["shards"]["1"]["rows"], field = 3, "shard 1 records 3 rows, not 2"
    elif kind == "entry-sha":
        manifest["shards"]["0"]["sha256"], field = "abc", "shard 0 records no valid sha256"
    elif kind == "entry-key":
        manifest["shards"]["x"], field = manifest["shards"]["0"], "shard key 'x'"
    else:
        manifest["shards"]["2"]["start"], field = 5, "shard 2 records start 5, not 4"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as info:
        CachedTeacher(out)
    assert "manifest.json is damaged" in str(info.value) and field in str(info.value), info.value
    one_line_error(capsys, argv("cache-teacher", files, out), "manifest.json is damaged", field, "--overwrite")
    assert run_cli(capsys, argv("cache-teacher", files, out, "--overwrite"))[0] == 0
    CachedTeacher(out)


def test_claims_live_dead_and_other_hosts(tmp_path) -> None:
    path = tmp_path / "00000.claim"
    first, second = Claim(path, "a"), Claim(path, "b")
    assert first.acquire() and not second.acquire()  # held by a live process (this one)
    first.release()
    assert not path.exists() and second.acquire()
    second.release()
    path.write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    assert Claim(path).is_stale()  # this host, pid gone
    reused = {**json.loads(Claim(path).text), "start": "1"}  # this process's pid, another process's start time
    path.write_text(json.dumps(reused))
    assert Claim(path).is_stale()  # the pid was reused: the holder has ended
    path.write_text(json.dumps({**reused, "start": Claim(path).info["start"]}))
    assert not Claim(path).is_stale()  # this very process
    path.write_text(json.dumps({"pid": 1, "host": "another-host"}))
    assert not Claim(path, stale_after=60).is_stale()  # another host, touched just now: alive
    os.utime(path, (0, 1_000))
    taker = Claim(path, stale_after=60)
    assert taker.is_stale() and taker.acquire()  # another host, not touched for ages: taken over
    assert json.loads(path.read_text())["token"] == taker.info["token"]
    taker.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cache_made_before_shard_records_is_repaired(capsys, tmp_path, files, reference) -> None:
    """Caches written before hf_kd_shard.json existed: their manifest marks their shards as ours."""
    out = tmp_path / "out"
    shutil.copytree(reference["cache-teacher"], out)
    for record in out.glob("shards/*/hf_kd_shard.json"):
        record.unlink()
    arrow = next((out / "shards" / "00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-30] + bytes(30))
    code, stdout, err = run_cli(capsys, argv("cache-teacher", files, out))
    assert code == 0 and "shard 1 fails its checksum" in stdout, stdout + err
    assert (out / "manifest.json").read_bytes() == (reference["cache-teacher"] / "manifest.json").read_bytes()
    assert arrow_bytes(out / "shards" / "00001") == arrow_bytes(reference["cache-teacher"] / "shards" / "00001")


def test_overwrite_is_refused_while_others_hold_claims(capsys, tmp_path, files) -> None:
    out = tmp_path / "out"
    assert run_cli(capsys, argv("cache-teacher", files, out, "--num-workers", "2", "--worker-index", "0"))[0] == 0
    held = Claim(out / "shards" / "00001.claim", "worker 2/2")
    assert held.acquire()
    before = tree(out)
    one_line_error(capsys, argv("cache-teacher", files, out, "--k", "5", "--overwrite"), "being written by other")
    assert tree(out) == before
    held.release()
