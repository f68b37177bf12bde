"""What several `hf-kd` commands share: the parser class, both option spellings, the one-line error runner, the
teacher runtime options, and loading a teacher, its tokenizer and a saved data set for a command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import torch
from datasets import Dataset
from safetensors import SafetensorError
from torch import nn

from hf_kd.errors import ConfigError, TokenizerMismatchError, check_model_folder, check_source_path, first_line
from hf_kd.teachers.loading import check_same_tokenizer, load_named_tokenizer, load_teacher
from hf_kd.teachers.placement import PRESETS, is_placed, is_quantized, placement_options

# Files that mean a folder holds a tokenizer: one that then cannot be loaded is an error, not "no tokenizer".
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors; the subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        # An abbreviation that matches one option under both its spellings is not ambiguous.
        return list({id(found[0]): found for found in super()._get_option_tuples(option_string)}.values())


def accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Let every long option (of ``parser`` and its subcommands) be given as --snake_case and as --kebab-case.

    The other spelling only parses: help lists each option once, as its module wrote it.
    """
    for action in parser._actions:
        for option in [o for o in action.option_strings if o.startswith("--")]:
            name = option[2:]
            for other in (f"--{name.replace('_', '-')}", f"--{name.replace('-', '_')}"):
                parser._option_string_actions.setdefault(other, action)
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                accept_both_spellings(subparser)


def run_command(
    prog: str,
    body: Callable[[Any], int],
    args: Any,
    errors: tuple[type[BaseException], ...] = (ConfigError,),
) -> int:
    """``body(args)``, with ``errors`` (bad input: arguments, data, models, an output folder) printed as one
    line, ``PROG: error: ...``, and exit status 2. ``prog`` is ``hf-kd COMMAND`` or a script's name."""
    try:
        return body(args)
    except errors as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def add_teacher_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --trust-remote-code and the placement options (:func:`add_placement_options`): how a
    command that runs the teacher loads it."""
    parser.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda when available).")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype the teacher runs in (default auto: as saved).",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="Run the repository's model code (only one you have read)."
    )
    add_placement_options(parser)


def add_placement_options(parser: Any, what: str = "the teacher") -> None:
    """--device-map, --max-memory, --offload-folder and --quantization: a model too big for one device, through
    Accelerate's big-model inference and Transformers' quantization configs (docs/big-teachers.md)."""
    parser.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help=f"Spread {what} over devices: auto (or balanced, sequential), one device (cpu, cuda:1), or JSON "
        "{module: device}. Replaces --device.",
    )
    parser.add_argument(
        "--max-memory",
        default=None,
        metavar="DEVICE=SIZE,...",
        help="The most each device holds with --device-map (implied: auto), e.g. 0=20GiB,cpu=60GiB, or JSON. What does "
        "not fit goes to disk only with --offload-folder.",
    )
    parser.add_argument(
        "--offload-folder", default=None, metavar="DIR", help="Allow modules that fit nowhere to be read from disk."
    )
    parser.add_argument(
        "--quantization",
        default=None,
        metavar="NAME|JSON",
        help=f"Quantize {what} while loading: {', '.join(PRESETS)} (torchao, bitsandbytes, quanto), or a "
        "Transformers quantization config as JSON text or a .json file.",
    )


def device_of(name: str | None) -> torch.device:
    """``--device`` as a torch device this machine has (default: cuda when available)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:1 ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU; use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use cuda:0 or --device cpu."
        )
    return device


def load_teacher_for_command(name: str, args: argparse.Namespace, option: str = "--teacher") -> tuple[nn.Module, Any]:
    """The teacher ``name`` (with ``--dtype``, ``--trust-remote-code``) and its own tokenizer or None; any
    failure is a ConfigError naming ``option``. Its tokenizer files must load unless ``--tokenizer`` replaces them."""
    check_source_path(option, name)
    check_model_folder(option, name, safetensors_only=True)  # load_teacher reads safetensors only
    kwargs = {} if args.dtype == "auto" else {"dtype": getattr(torch, args.dtype)}
    kwargs.update(placement_options(args, device_of(args.device)))
    options = SimpleNamespace(teacher_trust_remote_code=args.trust_remote_code, teacher_model_init_kwargs=kwargs)
    try:
        teacher, tokenizer = load_teacher(name, options)
    except ConfigError:
        raise
    except (OSError, ValueError, SafetensorError, ImportError) as err:  # ImportError: a quantization backend's
        raise ConfigError(
            f"{option}={name!r} cannot be loaded ({first_line(err)}); pass a folder written by save_pretrained "
            "(config.json and safetensors weights) or a Hub id."
        ) from None
    if tokenizer is None and not args.tokenizer and any((Path(name) / file).is_file() for file in TOKENIZER_FILES):
        # load_teacher takes an unreadable tokenizer for none; here it would silently use another vocabulary
        tokenizer = load_named_tokenizer(option, name, args.trust_remote_code)
    return teacher, tokenizer


def _check_one_tokenizer(loaded: list[tuple[str, nn.Module, Any]]) -> None:
    """Teachers mixed into one ensemble (token id by token id) must share their tokenizer; one without a tokenizer
    of its own is taken to share it."""
    own = [(name, tokenizer) for name, _, tokenizer in loaded if tokenizer is not None]
    for name, tokenizer in own[1:]:
        try:
            check_same_tokenizer(own[0][1], tokenizer)
        except TokenizerMismatchError:
            raise ConfigError(
                f"--teacher={name!r}: its tokenizer ({len(tokenizer)} tokens) maps tokens to other ids than the one "
                f"of --teacher={own[0][0]!r} ({len(own[0][1])} tokens), and an ensemble mixes its teachers' "
                "probabilities token id by token id; cache each teacher on its own, or choose teachers that share "
                "one tokenizer."
            ) from None


def load_teachers(args: argparse.Namespace, names: list[str]) -> tuple[list[nn.Module], Any]:
    """The teachers ``names`` on ``--device`` (or where ``--device-map`` placed them), and their one tokenizer:
    ``--tokenizer``, else the (first) teacher's own, else None. Any failure (their tokenizers differing too) is a
    ConfigError."""
    device = device_of(args.device)
    loaded = [(name, *load_teacher_for_command(name, args)) for name in names]
    _check_one_tokenizer(loaded)
    tokenizer = next((tokenizer for _, _, tokenizer in loaded if tokenizer is not None), None)
    if args.tokenizer:
        tokenizer = load_named_tokenizer("--tokenizer", args.tokenizer, args.trust_remote_code)
    models = [model if is_placed(model) or is_quantized(model) else model.to(device) for _, model, _ in loaded]
    return models, tokenizer


def _saved_empty(folder: Path) -> bool:
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def load_tokenised(path: str, split: str | None) -> Dataset:
    """The data set saved at ``path`` (the ``split`` of a DatasetDict); a ConfigError naming ``--dataset``."""
    from datasets import DatasetDict, load_from_disk

    if not Path(path).exists():
        raise ConfigError(f"--dataset {path} does not exist; pass a folder written by Dataset.save_to_disk.")
    try:
        data = load_from_disk(path)
    except (OSError, ValueError, KeyError, IndexError) as err:  # ValueError: damaged or non-UTF-8 json files
        if _saved_empty(Path(path)):  # `datasets` cannot load a data set saved without rows (IndexError)
            raise ConfigError(f"--dataset {path} has no rows; pass a data set with at least one example.") from None
        raise ConfigError(
            f"--dataset {path} cannot be read as a saved data set ({first_line(err)}); pass a folder written by "
            "Dataset.save_to_disk, or save it again."
        ) from None
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise ConfigError(f"--dataset {path} is a DatasetDict with splits {sorted(data)}; choose one with --split.")
        data = data[split]
    return data


def rebuild_reporter(output: str, rebuilt: list[int]) -> Callable[[int, str], None]:
    """An ``on_rebuild`` that says which shard is computed again, and why, and collects their indices."""

    def report(index: int, problem: str) -> None:
        rebuilt.append(index)
        print(f"{output}: shard {index} {problem}; computing it again.")

    return report


def rebuilt_note(rebuilt: list[int]) -> str:
    """The end of the command's last line: which shards this run had to compute again."""
    if not rebuilt:
        return ""
    return f" (rebuilt shard{'s' if len(rebuilt) > 1 else ''} {', '.join(map(str, rebuilt))})"
