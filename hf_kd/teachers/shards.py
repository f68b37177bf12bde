"""Resumable, sharded writing of a data set computed row range by row range (teacher caches, pseudo-labels).

Layout of ``root``::

    manifest.json        fingerprint, row count, shard size, and one entry per finished shard
    shards/00000/        a ``Dataset.save_to_disk`` folder per shard of ``shard_size`` consecutive rows

A shard is written to ``shards/NNNNN.tmp`` and renamed once complete, and the manifest is rewritten through a
temporary file and ``os.replace``; so a run killed at any point leaves finished shards and at most one stray
temporary folder, and the next run with the same fingerprint computes only the shards the manifest lacks. Shard
boundaries depend only on ``shard_size``, so a resumed run writes the same rows, batched the same way, as an
uninterrupted one.

A run on an existing output first verifies the shards its manifest records and computes the missing or corrupt
ones again, so running the command again also repairs a damaged output. ``overwrite`` deletes only what the
command wrote (the manifest, ``shards/NNNNN`` and the command's other outputs), never other files in ``root``.
Every refusal is a one-line :class:`ShardError` that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from hf_kd.errors import ConfigError, first_line

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_NAME = re.compile(r"\d{5}(\.tmp)?")  # shards/00000, and shards/00000.tmp while it is written
MANIFEST_KEYS = ("fingerprint", "num_rows", "shard_size", "num_shards", "shards")


class ShardError(ConfigError):
    """A sharded output is incomplete, corrupt, or was made from other inputs. Its message is one line naming the
    fix; as a :class:`~hf_kd.recipe.args.ConfigError`, ``hf-kd distill`` and the commands print it without a
    traceback."""


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


def read_manifest(root: str | os.PathLike, command: str = "the command that writes it") -> dict[str, Any]:
    """The manifest of ``root``; a folder without one, or with an unreadable one, raises :class:`ShardError`
    whose fix names ``command``."""
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
    return manifest


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    tmp = root / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST)


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
    except (OSError, ValueError, KeyError) as err:  # a deleted or truncated .arrow file, a damaged state.json
        return None, f"cannot be read ({first_line(err)})"
    if len(shard) != entry["rows"]:
        return shard, f"has {len(shard)} rows but the manifest records {entry['rows']}"
    if verify and digest != entry["sha256"]:
        return shard, "fails its checksum (its files are corrupt or were changed)"
    return shard, None


def _remove_own_output(root: Path, owned: tuple[str, ...]) -> None:
    """Delete the manifest, the shards and ``owned`` (other outputs of the same command), and nothing else.

    The manifest goes last: a run killed half-way still has it, so the next run knows the folder is its own.
    """
    shards = root / "shards"
    if shards.is_dir():
        for entry in shards.iterdir():
            if SHARD_NAME.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
        if not any(shards.iterdir()):
            shards.rmdir()
    for name in (*owned, f"{MANIFEST}.tmp", MANIFEST):
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _refuse_collisions(root: Path, owned: tuple[str, ...], command: str) -> None:
    """A new output may go beside the user's files, but never into folders of the names it writes (and would
    later replace or delete): ``shards`` and ``owned``."""
    if root.exists() and not root.is_dir():
        raise ShardError(f"--output {root} is a file; choose a folder for {command}.")
    taken = [name for name in ("shards", *owned) if (root / name).exists() or (root / name).is_symlink()]
    if taken:
        raise ShardError(
            f"{root} already holds {', '.join(taken)}, which {command} did not write (there is no {MANIFEST}) and "
            "would replace; choose another output folder (nothing was changed there)."
        )


def _open_existing(
    root: Path, fingerprint: dict[str, Any], shard_size: int, overwrite: bool, owned: tuple[str, ...], command: str
) -> dict[str, Any] | None:
    """The manifest of a run to resume; None when there is none, or after ``overwrite`` removed another one."""
    if not (root / MANIFEST).is_file():
        _refuse_collisions(root, owned, command)
        return None
    try:
        manifest = read_manifest(root, command)
    except ShardError:
        if not overwrite:
            raise
        _remove_own_output(root, owned)
        return None
    changed = _differences(manifest.get("fingerprint", {}), fingerprint)
    if manifest.get("shard_size") != shard_size:
        changed.append("shard_size")
    if not changed:
        return manifest
    if not overwrite:
        raise ShardError(
            f"{root} already holds output made with other settings (they differ in: {', '.join(changed)}); use "
            "another output folder, or pass --overwrite to replace it (only the files this command wrote there are "
            "deleted)."
        )
    _remove_own_output(root, owned)
    return None


def _drop_bad_shards(root: Path, manifest: dict[str, Any], on_rebuild: Callable[[int, str], None]) -> None:
    """Forget the recorded shards that are missing or corrupt, so that the run computes them again."""
    bad = {}
    for key, entry in manifest["shards"].items():
        _, problem = _check_shard(root, int(key), entry)
        if problem is not None:
            bad[key] = problem
    for key in sorted(bad, key=int):
        del manifest["shards"][key]
        on_rebuild(int(key), bad[key])
    if bad:
        manifest["complete"] = False
        _write_manifest(root, manifest)


def _log_rebuild(index: int, problem: str) -> None:
    logger.warning("Shard %d %s: computing it again.", index, problem)


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
) -> dict[str, Any]:
    """Write rows ``[0, num_rows)`` in shards, resuming a run with the same ``fingerprint``; return the manifest.

    ``make_shard(start, end, progress)`` returns the data set of rows ``[start, end)`` and calls
    ``progress.update(n)`` as it goes. ``on_shard(index)`` runs after each shard is recorded (tests use it to
    simulate a kill). ``extra`` is stored in a new manifest but not compared on resume.

    A resumed (or finished) output is verified first: every recorded shard that is missing, unreadable or fails
    its checksum is computed again, after ``on_rebuild(index, problem)`` (default: a logged warning). A new output
    may go beside other files, but not into a folder already holding ``shards`` or a name in ``owned`` (the
    command's other outputs). A folder holding another fingerprint is refused unless ``overwrite``, which deletes
    the manifest, the shards and ``owned``, never anything else there. ``command`` names the command in errors.
    """
    if shard_size <= 0:
        raise ConfigError(f"shard_size={shard_size} must be positive; pass 1 or more rows per shard.")
    root = Path(root)
    fingerprint = json.loads(json.dumps(fingerprint))  # what a reload compares against: JSON-normalised
    manifest = _open_existing(root, fingerprint, shard_size, overwrite, tuple(owned), command)
    if manifest is not None:
        _drop_bad_shards(root, manifest, on_rebuild or _log_rebuild)
    else:
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "num_rows": num_rows,
            "shard_size": shard_size,
            "num_shards": math.ceil(num_rows / shard_size),
            "shards": {},
            "complete": False,
            **(extra or {}),
        }
        _write_manifest(root, manifest)
    (root / "shards").mkdir(exist_ok=True)
    for stray in (root / "shards").glob("*.tmp"):
        shutil.rmtree(stray)  # a shard a killed run was writing

    done = sum(entry["rows"] for entry in manifest["shards"].values())
    with tqdm(total=num_rows, initial=done, desc=desc, unit="row") as progress:
        for index in range(manifest["num_shards"]):
            if str(index) in manifest["shards"]:
                continue
            start, end = index * shard_size, min(num_rows, (index + 1) * shard_size)
            shard = make_shard(start, end, progress)
            if len(shard) != end - start:
                raise RuntimeError(f"Shard {index} has {len(shard)} rows, expected {end - start}.")
            tmp, final = shard_dir(root, index).with_suffix(".tmp"), shard_dir(root, index)
            shard.save_to_disk(str(tmp))
            if final.exists():  # renamed by a run killed before it could record the shard, or found corrupt
                shutil.rmtree(final)
            os.rename(tmp, final)
            manifest["shards"][str(index)] = {"rows": end - start, "start": start, "sha256": checksum(final)}
            _write_manifest(root, manifest)
            if on_shard is not None:
                on_shard(index)
    manifest["complete"] = True
    _write_manifest(root, manifest)
    return manifest


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
            "to complete it."
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
