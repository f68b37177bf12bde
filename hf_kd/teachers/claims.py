"""Claim files: which process is writing a shard (or holds an output folder's lock), safe on a shared filesystem.

A claim is a small JSON file (:func:`hf_kd.locking.holder_record`, the worker as its command, and a random token)
made atomically: written under a private name, then hard-linked to the claim's name, which fails when the name exists
(``link`` is atomic on local filesystems and on NFS, unlike ``O_EXCL`` on old NFS clients). Whoever made the link
holds the claim until it unlinks it.

A holder that died leaves its claim behind. A claim is *stale*, and may be taken over, when its holder ran on this
host and its pid is gone or now another process's (:func:`hf_kd.locking.runs_here`), or, for another host, when the
file was not touched for ``stale_after`` seconds (a holder touches its claims as it makes progress:
:meth:`Claim.touch`). Taking over renames the stale file to a private name first, so that of two processes that both
found it stale only one succeeds.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from hf_kd.locking import holder_record, runs_here

STALE_AFTER = 600.0  # seconds without a touch after which another host's claim counts as abandoned
TOUCH_EVERY = 30.0


class Claim:
    """A claim file at ``path``; ``worker`` is written into it for people reading a stuck folder."""

    def __init__(self, path: Path, worker: str = "", stale_after: float = STALE_AFTER) -> None:
        self.path = Path(path)
        self.stale_after = stale_after
        self.info = {**holder_record(worker), "token": secrets.token_hex(8)}
        self.text = json.dumps(self.info)
        self.held = False
        self._touched = 0.0

    def _link(self) -> bool:
        private = self.path.with_name(f"{self.path.name}.{self.info['token']}")
        private.write_text(self.text)
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            private.unlink()

    def holder(self) -> tuple[dict[str, Any] | None, str | None]:
        """The current holder's info (None if the claim is free or unreadable) and the file's text."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            info = json.loads(text)
            return (info if isinstance(info, dict) else None), text
        except ValueError:
            return None, text

    def is_stale(self) -> bool:
        """True when the claim is free, or its holder is known dead (see the module docstring)."""
        info, text = self.holder()
        if text is None:
            return True
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        here = runs_here(info) if info is not None else None
        return age > self.stale_after if here is None else not here

    def acquire(self) -> bool:
        """Take the claim if it is free or stale; False when a live holder has it."""
        if self._link():
            self.held = True
            return True
        if not self.is_stale():
            return False
        _, seen = self.holder()
        moved = self.path.with_name(f"{self.path.name}.stale.{self.info['token']}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            pass  # released meanwhile, or another process took it over first
        else:
            if moved.read_text() != seen:  # someone took it over between our look and the rename: give it back
                try:
                    os.link(moved, self.path)
                except FileExistsError:
                    pass
                moved.unlink()
                return False
            moved.unlink()
        self.held = self._link()
        return self.held

    def wait(self, poll: float = 0.2) -> None:
        """Block until the claim is ours (an output folder's short-lived lock)."""
        while not self.acquire():
            time.sleep(poll)

    def touch(self) -> None:
        """Tell other hosts the holder is alive (at most every TOUCH_EVERY seconds)."""
        now = time.time()
        if self.held and now - self._touched > TOUCH_EVERY:
            self._touched = now
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        """Remove the claim if it is still ours (a holder declared dead may have lost it)."""
        if self.held and self.holder()[1] == self.text:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> Claim:
        self.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
