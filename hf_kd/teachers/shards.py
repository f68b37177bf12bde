"""Resumable, sharded writing of a data set computed row range by row range (teacher caches, pseudo-labels), by one
process or by many: processes of one ``torchrun`` / ``accelerate launch`` job, or independent jobs (a SLURM array,
machines sharing a filesystem) that never talk to each other.

Layout of ``root``::

    manifest.json        fingerprint, row count, shard size, and one entry per finished shard
    manifest.json.lock   while a process reads or changes the manifest (a claim file, see hf_kd.teachers.claims)
    shards/00000/        a ``Dataset.save_to_disk`` folder per shard of ``shard_size`` consecutive rows, holding
                         also ``hf_kd_shard.json``: its entry (rows, start, sha256), which marks the folder as ours
    shards/00000.claim   while a process writes shard 0

Shard boundaries depend only on ``shard_size`` and a shard's rows only on its row range, so whichever process
writes a shard writes the same bytes: the finished output of N workers is identical to a one-process run (same
shard checksums, same manifest). Worker ``i`` of ``n`` computes the shards ``s`` with ``s % n == i``; before writing
a shard a process claims it (an atomic claim file), so no shard is ever written by two processes at once, and a
claim whose holder died is taken over. A shard is written under a private temporary name and renamed once
complete; its manifest entry is added under the lock. Whoever sees every shard recorded verifies the ones it did
not write itself and marks the manifest complete; a process that must finish the job (one process, or rank 0 of a
launched job) waits for the others' shards.

A run on an existing output first verifies the shards of its own share and computes the missing or corrupt ones
again, so running the command again also repairs a damaged output. ``overwrite`` deletes only what the command
wrote (the manifest, the shard folders it lists or marked as ours, and the command's other outputs), never other
files in ``root``, and never anything behind a symbolic link. Every refusal is a one-line :class:`ShardError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from hf_kd.errors import ConfigError, first_line
from hf_kd.teachers.claims import STALE_AFTER, Claim

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = f"{MANIFEST}.lock"
RECORD = "hf_kd_shard.json"  # a finished shard's entry, inside its folder
FORMAT_VERSION = 1
SHARD_NAME = re.compile(r"\d{5}")
OURS = re.compile(r"\d{5}\.(tmp|claim)(\..*)?")  # temporary folders and claim files: only this command makes them
MANIFEST_KEYS = ("fingerprint", "num_rows", "shard_size", "num_shards", "shards")
SAVED_FILES = ("state.json", "dataset_info.json", RECORD)  # what save_to_disk (and we) put in a shard folder


class ShardError(ConfigError):
    """A sharded output is incomplete, corrupt, or was made from other inputs. Its message is one line naming the
    fix; as a :class:`~hf_kd.recipe.args.ConfigError`, ``hf-kd distill`` and the commands print it without a
    traceback."""


@dataclass(frozen=True)
class Workers:
    """This process's share of the shards: those ``s`` with ``s % count == index``.

    ``finish``: after its share, wait for the other processes' shards (taking over those whose holder died) and
    write the finished manifest; otherwise write it only if every shard is already there.
    ``steal``: while finishing, also compute shards nobody has claimed (a run that completes the job).
    ``completes``: may mark the output complete (not the ranks above 0 of a launch: rank 0 does, once).
    """

    count: int = 1
    index: int = 0
    finish: bool = True
    steal: bool = True
    completes: bool = True

    @property
    def name(self) -> str:
        return f"worker {self.index + 1}/{self.count}" if self.count > 1 else "one process"

    @classmethod
    def from_options(
        cls, num_workers: int = 1, worker_index: int | None = None, env: dict[str, str] | None = None
    ) -> Workers:
        """The share of ``--num-workers N --worker-index I`` (independent jobs) under a launcher's ``WORLD_SIZE``
        processes of ``RANK`` (``torchrun``, ``accelerate launch``; 1 and 0 without one): worker
        ``I * WORLD_SIZE + RANK`` of ``N * WORLD_SIZE``.

        Without ``--worker-index`` the run completes the job: one process computes every missing shard; under a
        launcher rank 0 waits for the other ranks and writes the manifest. With it, the worker computes its share and
        whoever finds every shard recorded writes the manifest."""
        env = os.environ if env is None else env
        if num_workers < 1:
            raise ConfigError(f"--num-workers {num_workers} must be 1 or more; pass e.g. --num-workers 4.")
        if worker_index is not None and not 0 <= worker_index < num_workers:
            raise ConfigError(
                f"--worker-index {worker_index} is out of range for --num-workers {num_workers}; pass an index from "
                f"0 to {num_workers - 1} (e.g. $SLURM_ARRAY_TASK_ID with --array=0-{num_workers - 1})."
            )
        try:
            world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
        except ValueError:
            raise ConfigError(
                f"WORLD_SIZE={env.get('WORLD_SIZE')!r} and RANK={env.get('RANK')!r} must be integers; "
                "launch with torchrun or accelerate launch, or unset them."
            ) from None
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is out of range for WORLD_SIZE={world}; launch with torchrun.")
        if worker_index is None:
            return cls(count=world, index=rank, finish=rank == 0, steal=world == 1, completes=rank == 0)
        return cls(count=num_workers * world, index=worker_index * world + rank, finish=False, steal=False)


def shard_dir(root: Path, index: int) -> Path:
    return root / "shards" / f"{index:05d}"


def data_files(folder: Path) -> list[Path]:
    """The Arrow files a ``save_to_disk`` folder consists of (not the ``cache-*.arrow`` files that later
    ``select``/``map`` calls on the loaded data set may add next to them)."""
    state = json.loads((folder / "state.json").read_text())
    return [folder / entry["filename"] for entry in state["_data_files"]]


def checksum(folder: Path) -> str:
    """sha256 of a saved data set's Arrow files (the json files carry run-specific fingerprints)."""
    digest = hashlib.sha256()
    for path in data_files(folder):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ---- reading and validating what we wrote ----------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_problem(entry: Any, index: int, num_rows: int, shard_size: int) -> str | None:
    """What is wrong with shard ``index``'s entry ``{rows, start, sha256}``, or None."""
    if not isinstance(entry, dict):
        return f"shard {index}'s entry is not an object"
    start, end = index * shard_size, min(num_rows, (index + 1) * shard_size)
    if entry.get("start") != start or not _is_int(entry.get("start")):
        return f"shard {index} records start {entry.get('start')!r}, not {start}"
    if entry.get("rows") != end - start or not _is_int(entry.get("rows")):
        return f"shard {index} records {entry.get('rows')!r} rows, not {end - start}"
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        return f"shard {index} records no valid sha256"
    return None


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """The first field of a manifest that is missing, of the wrong type, or inconsistent with the others."""
    version = manifest.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        return f"format_version {version!r} is not one this hf-kd reads (1 to {FORMAT_VERSION})"
    if not isinstance(manifest["fingerprint"], dict):
        return "fingerprint is not an object"
    num_rows, shard_size, num_shards = manifest["num_rows"], manifest["shard_size"], manifest["num_shards"]
    if not _is_int(num_rows) or num_rows < 0:
        return f"num_rows {num_rows!r} is not a row count"
    if not _is_int(shard_size) or shard_size < 1:
        return f"shard_size {shard_size!r} is not a positive integer"
    if num_shards != math.ceil(num_rows / shard_size) or not _is_int(num_shards):
        return f"num_shards {num_shards!r} does not match num_rows {num_rows} and shard_size {shard_size}"
    if not isinstance(manifest["shards"], dict):
        return "shards is not an object"
    for key, entry in manifest["shards"].items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < num_shards):
            return f"shard key {key!r} is not a shard index below {num_shards}"
        problem = _entry_problem(entry, int(key), num_rows, shard_size)
        if problem:
            return problem
    if not isinstance(manifest.get("complete", False), bool):
        return f"complete {manifest.get('complete')!r} is not true or false"
    if manifest.get("complete") and len(manifest["shards"]) != num_shards:
        return f"it is marked complete with {len(manifest['shards'])} of {num_shards} shards"
    return None


def read_manifest(root: str | os.PathLike, command: str = "the command that writes it") -> dict[str, Any]:
    """The manifest of ``root``, checked field by field; a folder without one, or with an unreadable or damaged
    one, raises :class:`ShardError` naming the file and whose fix names ``command``."""
    path = Path(root) / MANIFEST
    if not Path(root).exists():
        raise ShardError(f"{root} does not exist; build it first with {command}.")
    if not path.is_file():
        raise ShardError(f"{root} holds no {MANIFEST}, so it is not an hf-kd output folder; build it with {command}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise ShardError(
            f"{path} cannot be read ({first_line(err)}); rebuild the output with {command} and --overwrite."
        ) from None
    if not isinstance(manifest, dict) or any(key not in manifest for key in MANIFEST_KEYS):
        raise ShardError(f"{path} is not an hf-kd manifest; rebuild the output with {command} and --overwrite.")
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardError(f"{path} is damaged: {problem}; rebuild the output with {command} and --overwrite.")
    return manifest


def _read_record(folder: Path) -> Any:
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Atomically: a private temporary file, then os.replace (readers see the old or the new file, never half)."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _check_shard(
    root: Path, index: int, entry: dict[str, Any] | None, verify: bool = True
) -> tuple[Dataset | None, str | None]:
    """Finished shard ``index`` loaded, and what is wrong with it (missing, unreadable, wrong row count, failed
    checksum) or None."""
    folder = shard_dir(root, index)
    if entry is None or not folder.is_dir():
        return None, f"is missing ({folder})"
    try:
        shard = load_from_disk(str(folder))
        digest = checksum(folder) if verify else None
    except (OSError, ValueError, KeyError, TypeError) as err:  # a deleted or truncated .arrow, a damaged state.json
        return None, f"cannot be read ({first_line(err)})"
    if len(shard) != entry["rows"]:
        return shard, f"has {len(shard)} rows but the manifest records {entry['rows']}"
    if verify and digest != entry["sha256"]:
        return shard, "fails its checksum (its files are corrupt or were changed)"
    return shard, None


# ---- deleting only what we wrote ---------------------------------------------------------------------------------


def _refuse_links(root: Path, command: str) -> None:
    """Never write or delete through a symbolic link out of the output folder."""
    for path in (root / "shards", root / MANIFEST):
        if path.is_symlink():
            raise ShardError(
                f"{path} is a symbolic link (to {os.readlink(path)}); {command} writes and deletes only inside "
                f"--output and never follows a link out of it: put --output on the disk you want, or replace the "
                "link with a folder (nothing was changed)."
            )


def _is_ours(folder: Path, manifest: dict[str, Any] | None) -> bool:
    """A shard folder this command wrote: listed in the manifest, or marked by its record."""
    listed = manifest is not None and str(int(folder.name)) in manifest.get("shards", {})
    return listed or isinstance(_read_record(folder), dict)


def _remove_shard_folder(folder: Path) -> None:
    """Delete the files save_to_disk and we put in a shard folder, then the folder if nothing else is in it."""
    if folder.is_symlink():
        folder.unlink()
        return
    try:
        names = [path.name for path in data_files(folder)]
    except (OSError, ValueError, KeyError, TypeError):  # damaged: its Arrow files by save_to_disk's naming
        names = [path.name for path in folder.glob("data-*-of-*.arrow")]
    for name in (*names, *SAVED_FILES):
        (folder / name).unlink(missing_ok=True)
    for leftover in folder.glob("cache-*.arrow"):  # datasets' own caches of the loaded shard
        leftover.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def _remove_own_output(root: Path, owned: tuple[str, ...], manifest: dict[str, Any] | None) -> None:
    """Delete the manifest, our shards and ``owned`` (other outputs of the same command), and nothing else.

    The manifest goes last: a run killed half-way still has it, so the next run knows the folder is its own.
    """
    shards = root / "shards"
    if shards.is_dir() and not shards.is_symlink():
        for entry in shards.iterdir():
            if OURS.fullmatch(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            elif SHARD_NAME.fullmatch(entry.name) and entry.is_dir() and _is_ours(entry, manifest):
                _remove_shard_folder(entry)
        if not any(shards.iterdir()):
            shards.rmdir()
    for name in (*owned, MANIFEST):
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _refuse_collisions(root: Path, owned: tuple[str, ...], command: str) -> None:
    """A new output may go beside the user's files, but never into folders of the names it writes (and would
    later replace or delete): ``shards`` and ``owned``."""
    taken = [name for name in ("shards", *owned) if (root / name).exists() or (root / name).is_symlink()]
    if taken:
        raise ShardError(
            f"{root} already holds {', '.join(taken)}, which {command} did not write (there is no {MANIFEST}) and "
            "would replace; choose another output folder (nothing was changed there)."
        )


def check_inputs_outside(output: str | os.PathLike, inputs: dict[str, Any], written: tuple[str, ...]) -> None:
    """Refuse inputs (``{option: path}``) that lie in what the command writes or deletes under ``output``
    (``written``: names there), whatever links lead there: the command would destroy its own input."""
    out = Path(output).resolve()
    targets = [out / name for name in written]
    for option, path in inputs.items():
        if not path or not Path(path).exists():
            continue
        real = Path(path).resolve()
        hit = next((t for t in targets if real == t or t in real.parents), None)
        if hit is not None:
            raise ConfigError(
                f"{option} {path} lies in {hit}, which this command writes over in --output {output}; copy it out "
                "of there or choose another --output (nothing was changed)."
            )


# ---- the writer --------------------------------------------------------------------------------------------------


class _Progress:
    """tqdm for this worker's rows that also keeps its current claim fresh."""

    def __init__(self, bar: tqdm) -> None:
        self.bar, self.claim = bar, None

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        if self.claim is not None:
            self.claim.touch()

    def overall(self, done: int, total: int) -> None:
        """All workers' progress, beside this one's rows."""
        self.bar.set_postfix_str(f"{done}/{total} shards overall", refresh=True)


@dataclass
class _Writer:
    """One process's view of an output folder: what it computes, and which shards it already knows are sound."""

    root: Path
    num_rows: int
    shard_size: int
    make_shard: Callable[[int, int, Any], Dataset]
    on_shard: Callable[[int], None] | None
    on_rebuild: Callable[[int, str], None]
    command: str
    workers: Workers
    stale_after: float
    verified: set[int] = field(default_factory=set)  # shards this process wrote or checksummed
    forgotten: set[int] = field(default_factory=set)  # recorded shards this process found bad (ours to replace)
    written: list[int] = field(default_factory=list)

    def lock(self) -> Claim:
        return Claim(self.root / LOCK, self.workers.name, self.stale_after)

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.root, self.command)

    def _forget(self, index: int, problem: str) -> None:
        """A recorded shard is bad: drop its entry (the output is no longer complete) and say so."""
        self.forgotten.add(index)
        with self.lock():
            manifest = self.manifest()
            manifest["shards"].pop(str(index), None)
            manifest["complete"] = False
            _write_json(self.root / MANIFEST, manifest)
        self.on_rebuild(index, problem)

    def _recorded_ok(self, index: int, entry: dict[str, Any] | None) -> bool:
        """Shard ``index`` is recorded and (checksummed once per process) sound; a bad one is forgotten."""
        if entry is None:
            return False
        if index in self.verified:
            return True
        _, problem = _check_shard(self.root, index, entry)
        if problem is not None:
            self._forget(index, problem)
            return False
        self.verified.add(index)
        return True

    def ensure(self, index: int, progress: _Progress) -> bool:
        """Shard ``index`` recorded and sound, computing it if needed; False while another live process has it."""
        if self._recorded_ok(index, self.manifest()["shards"].get(str(index))):
            return True
        claim = Claim(self.root / "shards" / f"{index:05d}.claim", self.workers.name, self.stale_after)
        if not claim.acquire():
            return False
        try:
            # Recorded by another process between our look and the claim?
            if self._recorded_ok(index, self.manifest()["shards"].get(str(index))):
                return True
            progress.claim = claim
            self._write(index, progress)
        finally:
            progress.claim = None
            claim.release()
        self.written.append(index)
        if self.on_shard is not None:
            self.on_shard(index)
        return True

    def _write(self, index: int, progress: _Progress) -> None:
        final = shard_dir(self.root, index)
        for stray in final.parent.glob(f"{final.name}.tmp*"):  # left by a killed holder of this claim
            shutil.rmtree(stray)
        start, end = index * self.shard_size, min(self.num_rows, (index + 1) * self.shard_size)
        shard = self.make_shard(start, end, progress)
        if len(shard) != end - start:
            raise RuntimeError(f"Shard {index} has {len(shard)} rows, expected {end - start}.")
        tmp = final.with_name(f"{final.name}.tmp.{secrets.token_hex(8)}")
        shard.save_to_disk(str(tmp))
        entry = {"rows": end - start, "start": start, "sha256": checksum(tmp)}
        _write_json(tmp / RECORD, entry)
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            final.rmdir()  # an empty folder holds nothing of anyone's
        if final.is_symlink() or final.exists():
            ours = final.is_dir() and not final.is_symlink() and (_is_ours(final, None) or index in self.forgotten)
            if ours:  # renamed by a run killed before it could record the shard, or corrupt
                _remove_shard_folder(final)
            if final.is_symlink() or final.exists():  # not ours, or ours but holding someone's files too
                shutil.rmtree(tmp)
                raise ShardError(
                    f"{final} holds files {self.command} did not write (it has no valid {RECORD}, or other files "
                    "beside it) and is in the way; move it out of the output folder and run the command again."
                )
        os.rename(tmp, final)
        with self.lock():
            manifest = self.manifest()
            manifest["shards"][str(index)] = entry
            _write_json(self.root / MANIFEST, manifest)
        self.verified.add(index)
        progress.overall(len(manifest["shards"]), manifest["num_shards"])

    def finish_if_done(self) -> bool:
        """If every shard is recorded: verify the ones this process did not write or check (outside the lock: it
        reads every byte), then, under the lock, mark the manifest complete and return True."""
        manifest = self.manifest()
        if len(manifest["shards"]) < manifest["num_shards"] or manifest.get("complete"):
            return bool(manifest.get("complete"))
        bad = {}
        for key, entry in manifest["shards"].items():
            if int(key) not in self.verified:
                problem = _check_shard(self.root, int(key), entry)[1]
                if problem is None:
                    self.verified.add(int(key))
                else:
                    bad[key] = problem
        with self.lock():
            manifest = self.manifest()
            for key in bad:
                manifest["shards"].pop(key, None)
            manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
            _write_json(self.root / MANIFEST, manifest)
        for key in sorted(bad, key=int):
            self.on_rebuild(int(key), bad[key])
        return manifest["complete"]


def _open(root: Path, fingerprint: dict[str, Any], new: dict[str, Any], overwrite: bool, owned: tuple[str, ...],
          command: str) -> None:  # fmt: skip
    """Under the lock: leave a manifest with ``fingerprint`` in ``root`` (a new one, or the one to resume)."""
    if (root / MANIFEST).is_file():
        try:
            manifest = read_manifest(root, command)
        except ShardError:
            if not overwrite:
                raise
            manifest = None
        if manifest is not None:
            changed = _differences(manifest["fingerprint"], fingerprint)
            if manifest["shard_size"] != new["shard_size"]:
                changed.append("shard_size")
            if not changed:
                return
            if not overwrite:
                raise ShardError(
                    f"{root} already holds output made with other settings (they differ in: {', '.join(changed)}); "
                    "use another output folder, or pass --overwrite to replace it (only the files this command wrote "
                    "there are deleted)."
                )
        busy = [p.name for p in (root / "shards").glob("*.claim") if not Claim(p).is_stale()]
        if busy:
            raise ShardError(
                f"{root} is being written by other processes (claims {', '.join(sorted(busy))}); --overwrite would "
                "delete their work: wait for them or stop them, then run again."
            )
        _remove_own_output(root, owned, manifest)
    else:
        _refuse_collisions(root, owned, command)
    _write_json(root / MANIFEST, new)


def write_sharded(
    root: str | os.PathLike,
    fingerprint: dict[str, Any],
    num_rows: int,
    shard_size: int,
    make_shard: Callable[[int, int, Any], Dataset],
    *,
    desc: str = "Writing",
    overwrite: bool = False,
    on_shard: Callable[[int], None] | None = None,
    extra: dict[str, Any] | None = None,
    owned: tuple[str, ...] = (),
    on_rebuild: Callable[[int, str], None] | None = None,
    command: str = "the same command",
    workers: Workers | None = None,
    stale_after: float = STALE_AFTER,
    poll: float = 0.5,
) -> dict[str, Any]:
    """Write rows ``[0, num_rows)`` in shards, resuming a run with the same ``fingerprint``; return the manifest
    (``manifest["complete"]`` is False when this worker's share is done but others' are not yet).

    ``make_shard(start, end, progress)`` returns the data set of rows ``[start, end)`` and calls
    ``progress.update(n)`` as it goes. ``on_shard(index)`` runs after each shard this process records (tests use
    it to simulate a kill). ``extra`` is stored in a new manifest but not compared on resume. ``workers``: this
    process's share (default: :meth:`Workers.from_options` of the launcher's environment, no independent workers).

    A resumed (or finished) output is verified first: every shard of this worker's share that is missing, unreadable
    or fails its checksum is computed again, after ``on_rebuild(index, problem)`` (default: a logged warning); the
    process that completes the output verifies the other shards. A new output may go beside other files, but not
    into a folder already holding ``shards`` or a name in ``owned``. A folder holding another fingerprint is refused
    unless ``overwrite``, which deletes the manifest, our shards and ``owned``, never anything else there.
    """
    if shard_size <= 0:
        raise ConfigError(f"shard_size={shard_size} must be positive; pass 1 or more rows per shard.")
    root = Path(root)
    workers = workers or Workers.from_options()
    fingerprint = json.loads(json.dumps(fingerprint))  # what a reload compares against: JSON-normalised
    if root.exists() and not root.is_dir():
        raise ShardError(f"--output {root} is a file; choose a folder for {command}.")
    _refuse_links(root, command)
    new = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "num_rows": num_rows,
        "shard_size": shard_size,
        "num_shards": math.ceil(num_rows / shard_size),
        "shards": {},
        "complete": False,
        **(extra or {}),
    }
    made_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with Claim(root / LOCK, workers.name, stale_after):
            _open(root, fingerprint, new, overwrite, tuple(owned), command)
            (root / "shards").mkdir(exist_ok=True)
    except ShardError:
        if made_root and not any(root.iterdir()):
            root.rmdir()
        raise
    writer = _Writer(root, num_rows, shard_size, make_shard, on_shard, on_rebuild or _log_rebuild, command, workers,
                     stale_after)  # fmt: skip
    num_shards = new["num_shards"]
    mine = [i for i in range(num_shards) if i % workers.count == workers.index]
    rows = {i: min(num_rows, (i + 1) * shard_size) - i * shard_size for i in mine}
    recorded = writer.manifest()["shards"]
    label = f"{desc} ({workers.name})" if workers.count > 1 else desc
    done = sum(n for i, n in rows.items() if str(i) in recorded)
    with tqdm(total=sum(rows.values()), initial=done, desc=label, unit="row") as bar:
        progress = _Progress(bar)
        pending = [i for i in mine if not writer.ensure(i, progress)]
        if workers.finish:
            _finish(writer, progress, pending, num_shards, poll)
    if workers.completes and not writer.finish_if_done() and workers.finish:  # a shard failed its final check
        return write_sharded(root, fingerprint, num_rows, shard_size, make_shard, desc=desc, on_shard=on_shard,
                             extra=extra, owned=owned, on_rebuild=on_rebuild, command=command, workers=workers,
                             stale_after=stale_after, poll=poll)  # fmt: skip
    manifest = writer.manifest()
    logger.info(
        "%s: wrote shards %s; %d of %d shards of %s recorded.",
        workers.name, writer.written, len(manifest["shards"]), num_shards, root,
    )  # fmt: skip
    return manifest


def _finish(writer: _Writer, progress: _Progress, pending: list[int], num_shards: int, poll: float) -> None:
    """Wait until every shard is recorded; compute those whose holder died (and, when stealing, unclaimed ones)."""
    while True:
        recorded = writer.manifest()["shards"]
        progress.overall(len(recorded), num_shards)
        missing = [i for i in range(num_shards) if str(i) not in recorded]
        if not missing:
            return
        for index in missing:
            claim = Claim(writer.root / "shards" / f"{index:05d}.claim", stale_after=writer.stale_after)
            taken_by_someone = claim.holder()[1] is not None
            if (writer.workers.steal or index in pending or taken_by_someone) and claim.is_stale():
                writer.ensure(index, progress)
        time.sleep(poll)


def _log_rebuild(index: int, problem: str) -> None:
    logger.warning("Shard %d %s: computing it again.", index, problem)


def shard_progress(root: str | os.PathLike) -> tuple[int, int]:
    """(shards recorded, shards in all) of an output folder: the overall progress of its workers."""
    manifest = read_manifest(root)
    return len(manifest["shards"]), manifest["num_shards"]


def load_sharded(
    root: str | os.PathLike, verify: bool = True, command: str = "the command that wrote it"
) -> tuple[Dataset, dict[str, Any]]:
    """The finished data set and its manifest; an unfinished, truncated or corrupt output raises ShardError,
    whose fix is to run ``command`` again (it verifies the shards and rebuilds the bad ones).

    ``verify`` also recomputes every shard's checksum (reads every byte once).
    """
    root = Path(root)
    manifest = read_manifest(root, command)
    again = f"run {command} again with the same arguments"
    if not manifest.get("complete"):
        raise ShardError(
            f"{root} is unfinished ({len(manifest['shards'])} of {manifest['num_shards']} shards written); {again} "
            "to complete it (with several workers: the last one to finish completes it)."
        )
    parts = []
    for index in range(manifest["num_shards"]):
        shard, problem = _check_shard(root, index, manifest["shards"].get(str(index)), verify)
        if problem is not None:
            raise ShardError(f"{root}: shard {index} {problem}; {again} to rebuild it.")
        parts.append(shard)
    data = concatenate_datasets(parts) if parts else Dataset.from_dict({})
    if len(data) != manifest["num_rows"]:
        raise ShardError(f"{root} holds {len(data)} rows but its manifest records {manifest['num_rows']}; {again}.")
    return data, manifest
