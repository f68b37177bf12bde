"""Errors whose one-line message names the fix: the command line prints them without a traceback.

Also the checks of the paths a user names, made before anything is loaded, that raise them: a missing path that
cannot be a Hub id, a local model folder whose weights cannot be loaded, and an output folder or file that cannot
be written (or holds what the command did not write); and the atomic write of a small output file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open


class ConfigError(ValueError):
    """A recipe config (or the command line) names something that does not exist or has the wrong type."""


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers map tokens to different ids, so their distributions cannot be compared."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``err``'s message (at most ``limit`` characters), or its class name.

    Library errors (transformers, safetensors, datasets) run over many lines; a one-line message quotes this.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(err).__name__


def check_source_path(key: str, name: str | None) -> None:
    """A value that can only be a local path (not a Hub id) must exist, before the Hub is asked about it.

    ``key`` is how the user named it: a config key or a command-line option.
    """
    if not name or Path(name).exists():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{key}={name!r}: no such file or folder; give an existing path or a Hub id.") from None


def check_model_folder(key: str, path: str | None, safetensors_only: bool = False) -> None:
    """A local model folder whose weights cannot be loaded is refused with the fix (Hub ids are left to the Hub).

    Every ``*.safetensors`` file must open (a truncated or damaged one does not). ``safetensors_only``: the
    folder is loaded with ``use_safetensors=True`` (teachers, ``hf-kd evaluate``), so pickled
    ``pytorch_model.bin`` weights alone are refused.
    """
    folder = Path(path) if path else None
    if folder is None or not folder.is_dir():
        return
    shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - SafetensorError (truncated, corrupt) or OSError
            raise ConfigError(
                f"{key}={path!r}: its safetensors weights cannot be read ({shard.name}: {first_line(err, 200)}); "
                "the file is truncated or corrupt: copy, download or save the model again."
            ) from None
    pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (folder / n).is_file()]
    if safetensors_only and pickled and not shards:
        try:
            is_encoder_decoder = json.loads((folder / "config.json").read_text()).get("is_encoder_decoder")
        except (OSError, ValueError, AttributeError):  # no config.json, or not one: the causal class, as a guess
            is_encoder_decoder = False
        auto = "AutoModelForSeq2SeqLM" if is_encoder_decoder else "AutoModelForCausalLM"
        raise ConfigError(
            f"{key}={path!r} holds only {pickled[0]} (pickle), and hf-kd loads this model from safetensors only, as "
            f"a pickle can run code when loaded; if you trust the file, convert it once with "
            f"transformers.{auto}.from_pretrained(DIR).save_pretrained(DIR)."
        )


def check_writable_folder(key: str, path: str | os.PathLike) -> Path:
    """A folder a command will create or write into: not a file, not under a file, and writable (its nearest
    existing ancestor, when it does not exist yet). Returns it resolved: a symlink to a folder is written through
    (the files go where it points; the link stays)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is a file, not a folder; name a folder (new or existing).")
    if folder.is_symlink() and not folder.exists():
        raise ConfigError(f"{key}={str(path)!r} is a symlink to nothing; point it at a folder, or name another one.")
    _check_ancestor(key, path, folder.absolute())
    return folder.resolve()


def _check_ancestor(key: str, path: str | os.PathLike, start: Path) -> None:
    """The nearest existing folder of ``start`` (itself or an ancestor) is a writable folder, not a file."""
    existing = start
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is under {str(existing)!r}, which is a file; name a path outside it.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(path)!r}: {str(existing)!r} is not writable by you; choose another place.")


def check_output_file(key: str, path: str | os.PathLike, is_ours: Callable[[Any], bool], what: str) -> Path:
    """A file a command will write: its folder as :func:`check_writable_folder` checks it, not a folder itself,
    and, when it exists, a file the command wrote before (``is_ours`` of its parsed JSON), never another one.
    Returns it resolved: through a symlink, the file it points to is replaced (the link stays)."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is a folder; name a file, e.g. {str(file / 'results.json')!r}.")
    file = file.resolve()  # a symlink: the file it points to (made when missing, as a shell's `>` does)
    _check_ancestor(key, path, file.parent)
    if file.exists():
        try:
            ours = is_ours(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise ConfigError(
                f"{key}={str(path)!r} exists and is not {what}; it is left as it is: name another file, or move it "
                "away first."
            )
    return file


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then one rename (two writers: the last
    complete file wins; a full disk leaves the previous file intact)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
