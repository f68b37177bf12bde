"""One command at a time per output folder: a lock file that names its holder.

The lock is an advisory ``flock`` on ``<folder>/.hf_kd.lock``, whose text says which process holds it
(:func:`holder_record`: ``{"pid", "host", "command", "started", "start"}``). ``make-student``, ``quickstart`` and
``distill`` take it (``distill`` in its main process only, for all the ranks of a torchrun; ``cache-teacher`` and
``pseudo-label`` use claim files instead, :mod:`hf_kd.teachers.claims`). The kernel drops the ``flock`` when its
process ends, however it ends, so a lock file left by a killed run is stale by construction: the next command takes
it over (and says so) instead of asking anyone to delete it. A second command on a held folder stops with one line
naming the holder, or waits for it (``wait=True``: for caches that the first command fills and the second then
reuses).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hf_kd.errors import ConfigError

LOCK_FILE = ".hf_kd.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; commands run unlocked there
    fcntl = None


class FolderInUseError(ConfigError):
    """Another live process holds the lock of a folder this command would write."""


def process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) where /proc has it: a reused pid has another one."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_record(command: str) -> dict[str, Any]:
    """What a lock or claim file says of this process: pid, host, ``command``, when (for people) and ``start``
    (for :func:`runs_here`)."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "start": process_start(pid)}  # fmt: skip


def runs_here(record: dict[str, Any]) -> bool | None:
    """Whether the process a :func:`holder_record` names still runs; None when it ran on another host (or the
    record names no pid), which this host cannot see."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    start = record.get("start")
    return start is None or process_start(pid) in (None, start)


def describe(text: str | None, unknown: str = "another process") -> str:
    """Who a lock file's ``text`` names, in words; ``unknown`` when it is empty or junk (a holder between
    open() and write())."""
    try:
        info = json.loads(text or "")
        where = f" on {info['host']}" if info.get("host") else ""
        since = f", since {info['started']}" if info.get("started") else ""
        return f"{info['command']} (pid {int(info['pid'])}{where}{since})"
    except (ValueError, KeyError, TypeError, AttributeError):
        return unknown


def _holder(lock: Path) -> str:
    try:
        return describe(lock.read_text(encoding="utf-8"))
    except OSError:
        return "another process"


def _acquire(lock: Path, wait: bool) -> tuple[int, str | None]:
    """An fd holding the flock on ``lock`` (the file at that path now, not an unlinked one), and the text a
    previous holder left in it when it did not remove it (a killed run), else None."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:  # the previous holder removed it between our open() and flock()
            same = False
        if same:
            left = os.read(fd, 4096).decode("utf-8", "replace").strip() or None
            return fd, left
        os.close(fd)


def folder_lock(folder: str | os.PathLike, command: str, wait: bool = False) -> contextlib.AbstractContextManager:
    """Hold ``<folder>/.hf_kd.lock`` for the body (see :func:`path_lock`); ``folder`` must exist."""
    return path_lock(Path(folder) / LOCK_FILE, command, wait, folder)


def sibling_lock(path: str | os.PathLike, command: str, wait: bool = False) -> contextlib.AbstractContextManager:
    """Hold ``.<name>.hf_kd.lock`` beside ``path`` (for an output that is replaced whole, or not there yet); the
    folder ``path`` is in must exist."""
    path = Path(path)
    return path_lock(path.parent / f".{path.name}{LOCK_FILE}", command, wait, path)


@contextlib.contextmanager
def path_lock(lock: Path, command: str, wait: bool = False, folder: str | os.PathLike | None = None) -> Iterator[Path]:
    """Hold the lock file ``lock`` for the body; ``folder`` is what the messages call the locked output.

    ``command`` (e.g. ``"hf-kd quickstart"``) is written into the lock and named to anyone refused. Without
    ``wait`` a held lock raises :class:`FolderInUseError` (one line: the holder and the fix); with ``wait``
    it blocks until the holder is done (printing who it waits for). Yields the lock file's path.
    """
    folder = lock.parent if folder is None else folder
    if fcntl is None:
        yield lock
        return
    try:
        fd, left = _acquire(lock, wait=False)
    except BlockingIOError:
        if not wait:
            raise FolderInUseError(
                f"{folder} is in use by {_holder(lock)}; wait for it to finish, or choose another folder."
            ) from None
        print(f"{folder}: waiting for {_holder(lock)} to finish ...", file=sys.stderr, flush=True)
        fd, left = _acquire(lock, wait=True)
    except OSError as err:
        raise ConfigError(
            f"{folder}: cannot create its lock file {LOCK_FILE} ({err.strerror}); choose a writable folder."
        ) from None
    if left:
        print(f"{folder}: {lock.name} was left by {describe(left, 'an earlier run')}, which no longer runs; "
              "taking it over.", file=sys.stderr)  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_record(command)).encode(), 0)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # before unlocking: a waiter then sees the file is gone and opens a fresh one
        os.close(fd)
