"""Resumable, sharded writing of a data set computed row range by row range (teacher caches, pseudo-labels).

Layout of ``root``::

    manifest.json        fingerprint, row count, shard size, and one entry per finished shard
    shards/00000/        a ``Dataset.save_to_disk`` folder per shard of ``shard_size`` consecutive rows

A shard is written to ``shards/NNNNN.tmp`` and renamed once complete, and the manifest is rewritten through a
temporary file and ``os.replace``; so a run killed at any point leaves finished shards and at most one stray
temporary folder, and the next run with the same fingerprint computes only the shards the manifest lacks. Shard
boundaries depend only on ``shard_size``, so a resumed run writes the same rows, batched the same way, as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ShardError(ValueError):
    """A sharded output is incomplete, corrupt, or was made from other inputs."""


def _shard_dir(root: Path, index: int) -> Path:
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


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{root} holds no {MANIFEST}: it is not a finished or started hf-kd output folder.")
    return json.loads(path.read_text())


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    tmp = root / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


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
) -> dict[str, Any]:
    """Write rows ``[0, num_rows)`` in shards, resuming a run with the same ``fingerprint``; return the manifest.

    ``make_shard(start, end, progress)`` returns the data set of rows ``[start, end)`` and calls
    ``progress.update(n)`` as it goes. ``on_shard(index)`` runs after each shard is recorded (tests use it to
    simulate a kill). A folder holding another fingerprint is refused unless ``overwrite``. ``extra`` is stored
    in a new manifest but not compared on resume.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size={shard_size} must be positive.")
    root = Path(root)
    fingerprint = json.loads(json.dumps(fingerprint))  # what a reload compares against: JSON-normalised
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        changed = _differences(manifest.get("fingerprint", {}), fingerprint)
        if manifest.get("shard_size") != shard_size:
            changed.append("shard_size")
        if changed and not overwrite:
            raise ShardError(
                f"{root} already holds output made with other settings (they differ in: {', '.join(changed)}). "
                "Use another output folder, or pass overwrite to start over."
            )
        if changed:
            shutil.rmtree(root)
    if not (root / MANIFEST).is_file():
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
            tmp, final = _shard_dir(root, index).with_suffix(".tmp"), _shard_dir(root, index)
            shard.save_to_disk(str(tmp))
            if final.exists():  # renamed by a run killed before it could record the shard
                shutil.rmtree(final)
            os.rename(tmp, final)
            manifest["shards"][str(index)] = {"rows": end - start, "start": start, "sha256": checksum(final)}
            _write_manifest(root, manifest)
            if on_shard is not None:
                on_shard(index)
    manifest["complete"] = True
    _write_manifest(root, manifest)
    return manifest


def load_sharded(root: str | os.PathLike, verify: bool = True) -> tuple[Dataset, dict[str, Any]]:
    """The finished data set and its manifest; an unfinished, truncated or corrupt output raises ShardError.

    ``verify`` also recomputes every shard's checksum (reads every byte once).
    """
    root = Path(root)
    manifest = read_manifest(root)
    if not manifest.get("complete"):
        raise ShardError(
            f"{root} is unfinished ({len(manifest['shards'])} of {manifest['num_shards']} shards): run the same "
            "command again to complete it."
        )
    parts = []
    for index in range(manifest["num_shards"]):
        entry = manifest["shards"].get(str(index))
        folder = _shard_dir(root, index)
        if entry is None or not folder.is_dir():
            raise ShardError(f"{root}: shard {index} is missing ({folder}); the output is truncated.")
        shard = load_from_disk(str(folder))
        if len(shard) != entry["rows"]:
            raise ShardError(f"{root}: shard {index} has {len(shard)} rows but the manifest records {entry['rows']}.")
        if verify and checksum(folder) != entry["sha256"]:
            raise ShardError(f"{root}: shard {index} fails its checksum; the files are corrupt or were changed.")
        parts.append(shard)
    data = concatenate_datasets(parts) if parts else Dataset.from_dict({})
    if len(data) != manifest["num_rows"]:
        raise ShardError(f"{root} holds {len(data)} rows but the manifest records {manifest['num_rows']}.")
    return data, manifest
