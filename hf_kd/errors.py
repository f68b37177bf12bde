"""Errors whose one-line message names the fix: the command line prints them without a traceback.

Also the checks of the paths a user names, made before anything is loaded, that raise them: a missing path that
cannot be a Hub id, and a local model folder whose weights cannot be loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

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
