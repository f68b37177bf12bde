"""The folder a recipe writes: one run at a time in it, and what ``overwrite_output_dir`` may delete there.

A run holds its folder's lock (:mod:`hf_kd.locking`, as make-student and quickstart do) from the first check to the
end, so a second run on the same folder stops with one line instead of mixing its files with the first one's; a lock
left by a process that no longer runs is taken over. ``overwrite_output_dir`` deletes only what a Trainer run wrote
there: its ``checkpoint-<step>`` folders (each holds a ``trainer_state.json``) and its results files, never a folder
the user made, a symbolic link, or anything this run reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_kd.errors import ConfigError, first_line
from hf_kd.locking import LOCK_FILE, path_lock
from hf_kd.saving import TEMP_PREFIX

logger = logging.getLogger(__name__)

# What a run's save_metrics and prediction write; after overwrite_output_dir none of the replaced run's may be left
# for the new run's all_results.json to merge with.
RESULTS_FILES = (
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "predict_results.json",
    "test_results.json",
    "generated_predictions.txt",
)
_STEP_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-\d+$")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _holds_input(path: Path, inputs: list[Path]) -> bool:
    resolved = path.resolve()
    return any(_inside(source, resolved) for source in inputs)


def written_checkpoint(path: Path) -> bool:
    """A ``checkpoint-<step>`` folder (not a link) that a Trainer wrote: it holds ``trainer_state.json``."""
    return (
        bool(_STEP_CHECKPOINT.match(path.name))
        and path.is_dir()
        and not path.is_symlink()
        and (path / "trainer_state.json").is_file()
    )


def check_checkpoint_folders(
    output_dir: str, inputs: dict[str, Path], saves: bool, save_total_limit: int | None, resume: bool
) -> None:
    """Refuse a run whose own checkpoints would replace or delete something it reads or the user made.

    ``inputs`` maps a config key to the (resolved) path it names. The Trainer writes ``checkpoint-<step>`` folders
    into ``output_dir`` (so an input inside one would be written over), and with ``save_total_limit`` deletes the
    oldest ``checkpoint-*`` folders there, whoever made them.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return
    entries = sorted(p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    if saves and not resume:
        for key, source in inputs.items():
            for entry in entries:
                if _STEP_CHECKPOINT.match(entry.name) and _inside(source, entry.resolve()):
                    raise ConfigError(
                        f"{key}={str(source)!r} is in output_dir's {entry.name}, and this run saves its own "
                        f"checkpoint-<step> folders there: copy it out of output_dir and name the copy, or choose "
                        "another output_dir (or save_strategy: no)."
                    )
    if saves and save_total_limit and save_total_limit > 0:
        held = list(inputs.values())
        foreign = [
            e.name for e in entries if not e.is_symlink() and (not written_checkpoint(e) or _holds_input(e, held))
        ]
        if foreign:
            raise ConfigError(
                f"output_dir={output_dir!r} holds {', '.join(foreign)}, which no earlier run wrote there, and "
                f"save_total_limit={save_total_limit} makes the Trainer delete the oldest checkpoint-* folders: "
                "move them out of output_dir, or set save_total_limit: null."
            )


def clear_replaced_run(output_dir: str, inputs: list[Path]) -> None:
    """overwrite_output_dir: delete the replaced run's checkpoints (so that no later resume continues it) and its
    results files (so that the new run's all_results.json holds only its own metrics); keep everything else."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    doomed, kept = [], []
    for entry in sorted(out.iterdir()):
        if entry.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"):
            (doomed if written_checkpoint(entry) and not _holds_input(entry, inputs) else kept).append(entry)
        elif entry.is_symlink() or _holds_input(entry, inputs):
            continue
        elif entry.name in RESULTS_FILES and entry.is_file():
            doomed.append(entry)
        elif entry.name.startswith(TEMP_PREFIX) and entry.is_dir():  # a save that was killed half-way
            doomed.append(entry)
    if doomed:
        logger.warning("overwrite_output_dir: deleting the replaced run's %s.", ", ".join(p.name for p in doomed))
    if kept:
        logger.warning(
            "overwrite_output_dir: keeping %s (not a checkpoint an earlier run wrote there, or read by this run).",
            ", ".join(p.name for p in kept),
        )
    for path in doomed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---- one run per folder --------------------------------------------------------------------------------------


def _make_folder(folder: Path, key: str) -> list[Path]:
    """Create ``folder`` (and missing parents); the folders created, or a ConfigError saying why it cannot be."""
    if folder.is_symlink() and not folder.exists():
        raise ConfigError(
            f"{key}={str(folder)!r} is a symbolic link to {os.readlink(folder)!r}, which does not exist; create that "
            f"folder or choose another {key}."
        )
    missing, existing = [], folder
    while not existing.exists() and not existing.is_symlink():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is under {str(existing)!r}, which is a file"
        raise ConfigError(f"{key}={str(folder)!r} {where}, not a folder; choose a folder (it is created when missing).")
    try:
        for path in reversed(missing):
            path.mkdir()
    except OSError as err:
        raise ConfigError(
            f"{key}={str(folder)!r} cannot be created ({type(err).__name__}: {first_line(err)}); choose a folder "
            "you can write to."
        ) from None
    return missing


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, key: str, active: bool = True) -> Iterator[None]:
    """Create ``folder`` and hold its lock (:func:`hf_kd.locking.path_lock`, command ``hf-kd distill``) for the
    body; at the end the lock goes, and the folders created here too when the run left them empty.

    ``active=False`` (the other processes of a multi-process run: the main one holds the lock for them) does
    nothing. Another live run's lock is one line naming it (``key`` and the holder); a dead one's is taken over.
    """
    if not active:
        yield
        return
    folder = Path(folder)
    created = _make_folder(folder, key)
    try:
        with path_lock(folder / LOCK_FILE, "hf-kd distill", folder=f"{key}={str(folder)!r}"):
            yield
    finally:
        for path in created:
            try:
                path.rmdir()  # only when empty: the run wrote nothing there
            except OSError:
                break
