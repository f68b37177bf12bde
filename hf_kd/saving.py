"""Saving a model so that a failed save loses nothing.

:func:`save_atomically` writes into a temporary folder beside the files it replaces and then renames them into
place: a full disk or a file-size limit in the middle of a save leaves the previous files as they were, never a
``config.json`` without weights. :func:`save_elsewhere` is the second try when the folder cannot take the save at
all: the trained weights go to the system's temporary folder (``$TMPDIR``) before the process exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from hf_kd.errors import first_line

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".hf_kd_saving-"
FALLBACK_PREFIX = "hf_kd-student-"
# What a failed write raises: OSError from Python, SafetensorError from the safetensors writer (ENOSPC, EFBIG).
SAVE_ERRORS = (OSError, SafetensorError)
# Weight files a save may leave behind from the previous one (a sharded save after a single-file one, or the
# reverse); from_pretrained would load the stale ones first, so they go once the new files are in place.
WEIGHT_FILES = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
)


class SaveError(Exception):
    """A model could not be saved where asked; the message says where its weights can still be found."""


def save_atomically(save: Callable[[str], None], output_dir: str | os.PathLike, enabled: bool = True) -> None:
    """``save(folder)`` into a temporary folder inside ``output_dir``, then each file renamed into ``output_dir``.

    A failure raises with ``output_dir`` untouched (the temporary folder is removed). Renames within one folder
    need no space, so once ``save`` has succeeded the move cannot run out of it. ``enabled=False`` saves in place
    (processes that write nothing and only join the collectives of a save).
    """
    if not enabled:
        save(str(output_dir))
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out))
    try:
        save(str(temp))
        written = sorted(temp.iterdir())
        names = {path.name for path in written}
        stale = [p for pattern in WEIGHT_FILES for p in out.glob(pattern) if p.name not in names and p.is_file()]
        for path in written:
            target = out / path.name
            if path.is_dir() and target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(path, target)
        for path in stale:
            path.unlink()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def save_elsewhere(save: Callable[[str], None]) -> tuple[str | None, str | None]:
    """Second try after a failed save: ``save`` into a new folder of the system's temporary folder.

    Returns (the folder, None), or (None, why this failed too).
    """
    try:
        folder = tempfile.mkdtemp(prefix=FALLBACK_PREFIX)
    except OSError as err:
        return None, _why(err)
    try:
        save(folder)
    except SAVE_ERRORS as err:
        shutil.rmtree(folder, ignore_errors=True)
        return None, _why(err)
    return folder, None


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err, 200)}"
