"""The arguments of a distillation recipe and how a YAML config (plus `--key value` overrides) becomes them.

A recipe config is one flat YAML mapping whose keys are the fields of :class:`ModelArguments`,
:class:`DataArguments` and :class:`hf_kd.DistillationConfig` (every ``Seq2SeqTrainingArguments`` field).
:func:`parse_recipe_config` checks every key and every value's type before anything is built, so a typo
or a wrong type is a one-line :class:`ConfigError` naming it, not a traceback an hour into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from hf_kd.config import DistillationConfig
from hf_kd.errors import ConfigError
from hf_kd.locking import LOCK_FILE

STDLIB_DOCSTRINGS = "hf_kd/stdlib_docstrings"


@dataclass
class ModelArguments:
    """Which student to distill, how to load it, and whether a finished run in ``output_dir`` may be replaced.

    The teacher is ``teacher_model_name_or_path``.
    """

    student_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory of a pretrained student (e.g. a distilbart checkpoint)."},
    )
    student_config: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local directory or config.json of a config to build a randomly initialised student "
            "from (used when student_model_name_or_path is not set). Without it, the teacher's config is used."
        },
    )
    student_config_overrides: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'Fields changed on the from-scratch student\'s config, e.g. {"num_layers": 2} (a dict or a '
            "JSON string)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to use; by default the student's, or the teacher's when the student has none."},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype the student's weights are loaded in: float32 (default; keep it for mixed-precision "
            "training with bf16/fp16), bfloat16, float16 or auto."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the code of the student's (and the tokenizer's) repository, as the Transformers examples' "
            "option of this name does; only for repositories you have read. The teacher's is "
            "teacher_trust_remote_code."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace what a non-empty output_dir (or save_tokenized_train folder) holds. Without it (or "
            "resume_from_checkpoint) the recipe refuses such a folder. Never allowed for the teacher's, the "
            "student's, the tokenizer's or the data's own folder."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.student_config_overrides, str):
            self.student_config_overrides = _json_field("student_config_overrides", self.student_config_overrides)
        if self.dtype not in (None, "auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}: use one of auto, float32, bfloat16, float16.")
        if self.student_model_name_or_path and self.student_config:
            raise ConfigError(
                "Both student_model_name_or_path and student_config are set: give a pretrained student or a "
                "config to build one from scratch, not both."
            )


@dataclass
class DataArguments:
    """Where the text comes from and how it becomes model inputs."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"Hub data set id (e.g. abisee/cnn_dailymail), or {STDLIB_DOCSTRINGS!r} for the offline "
            "Python-standard-library docstring data set built by hf_kd.data."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    data_files: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Local json/jsonl/csv/parquet/txt files instead of dataset_name: one path (used as the train "
            'split) or a mapping split -> path, e.g. {"train": "train.json", "validation": "val.json"}.'
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default="validation",
        metadata={
            "help": "Split to evaluate on. When the data has no such split, validation_split_percentage of the "
            "train split is held out instead. null: no evaluation."
        },
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "When the data has no eval_split: the percentage of the train split (its first rows, as in "
            "transformers' run_clm.py) held out to evaluate on. 0: no evaluation."
        },
    )
    source_column: str = field(default="article", metadata={"help": "Input text column (encoder-decoder)."})
    target_column: str = field(default="highlights", metadata={"help": "Target text column (encoder-decoder)."})
    text_column: str = field(default="text", metadata={"help": "Text column (causal language models)."})
    source_prefix: str = field(
        default="", metadata={"help": 'Prepended to every source text, e.g. "summarize: " for T5.'}
    )
    max_source_length: int = field(default=1024, metadata={"help": "Source tokens kept (encoder-decoder)."})
    max_target_length: int = field(default=128, metadata={"help": "Target tokens kept (encoder-decoder)."})
    block_size: int = field(
        default=1024,
        metadata={
            "help": "Causal LMs: length of the training sequences. With group_texts the tokenised corpus is "
            "concatenated and cut into blocks of this size; otherwise each text is truncated to it."
        },
    )
    group_texts: bool = field(
        default=True, metadata={"help": "Causal LMs: concatenate texts and cut them into block_size blocks."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation rows."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where data sets and models are cached."})
    test_split: str | None = field(
        default="test",
        metadata={
            "help": "Split predicted on when do_predict is true (run_summarization.py's test_file): its predict_* "
            "metrics go to predict_results.json and, with predict_with_generate, its generations to "
            "generated_predictions.txt."
        },
    )
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only the first N test rows."})
    save_tokenized_train: str | None = field(
        default=None,
        metadata={
            "help": "Save the tokenised training split to this folder (Dataset.save_to_disk) and stop without "
            "training: the input of `hf-kd cache-teacher --dataset`. Then train with `teacher_cache:` set to the "
            "cache (and no teacher_model_name_or_path); the same config tokenises the same rows."
        },
    )

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.data_files is None:
            raise ConfigError("No data: set dataset_name (a Hub id or hf_kd/stdlib_docstrings) or data_files.")
        if self.dataset_name is not None and self.data_files is not None:
            raise ConfigError("Both dataset_name and data_files are set: use one source of data.")
        for name in ("max_source_length", "max_target_length", "block_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive number of tokens.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ConfigError(
                f"validation_split_percentage={self.validation_split_percentage} must be between 0 (no evaluation) "
                "and 99."
            )
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive number of rows or null.")


RECIPE_DATACLASSES = (ModelArguments, DataArguments, DistillationConfig)
TRUST_REMOTE_CODE_SPLIT = (
    "trust_remote_code now covers the student and its tokenizer only, as in the Transformers examples; the teacher "
    "has teacher_trust_remote_code. It is still applied to the teacher too, for now: set teacher_trust_remote_code "
    "(true or false) to say what you mean and silence this warning."
)

# Keys of transformers' example scripts (run_summarization.py, run_clm.py) taken as hf-kd's key of the same meaning.
# Their text_column is hf-kd's text_column for causal models and its source_column for encoder-decoder ones
# (hf_kd.recipe.data.adopt_example_columns).
KEY_ALIASES = {"summary_column": "target_column"}
# Keys of those scripts that hf-kd names or does otherwise: what to use instead.
EXAMPLE_KEYS = {
    "model_name_or_path": "student_model_name_or_path",
    "config_name": "student_config",
    "tokenizer_name": "tokenizer_name_or_path",
    "torch_dtype": "dtype",
    "train_file": 'data_files (e.g. {"train": FILE, "validation": FILE, "test": FILE})',
    "validation_file": 'data_files (e.g. {"train": FILE, "validation": FILE})',
    "test_file": 'data_files (e.g. {"train": FILE, "test": FILE}) with do_predict',
    "val_max_target_length": "generation_max_length",
    "num_beams": "generation_num_beams",
}


def _json_field(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name}: {text!r} is not valid JSON ({err.msg}).") from None


# ---- reading and checking ----------------------------------------------------------------------------------


def field_types() -> dict[str, Any]:
    """Every recipe key and its type annotation, resolved."""
    types_: dict[str, Any] = {}
    for cls in RECIPE_DATACLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                types_[f.name] = hints[f.name]
    return types_


def field_choices() -> dict[str, list[Any]]:
    """The keys whose field metadata lists the values allowed (``loss``, ``train_sampling_strategy`` ...)."""
    return {
        f.name: list(f.metadata["choices"])
        for cls in RECIPE_DATACLASSES
        for f in dataclasses.fields(cls)
        if f.init and f.metadata.get("choices")
    }


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if any(isinstance(m, type) and issubclass(m, enum.Enum) for m in members):
            members = tuple(m for m in members if m is not str)  # `Enum | str` only takes the enum's values
        return " or ".join(_type_name(a) for a in members)
    if origin is not None:
        return {list: "a list", dict: "a mapping"}.get(origin, str(tp))
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits ``tp``, the value converted where YAML leaves it as a string, e.g. '5e-5')."""
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
        if enums and isinstance(value, str):  # `Enum | str` fields: the str is for typing, not free text
            return any(value in {m.value for m in e} for e in enums), value
        for member in members:
            ok, converted = _coerce(value, member)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and inner in (str, Any):  # `--report_to none` style single value
            return True, value
        if not isinstance(value, list):
            return False, value
        checked = [_coerce(v, inner) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, int | float) and not isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {m.value for m in tp}, value
    return True, value  # a type the YAML cannot express (GenerationConfig, ParallelismConfig ...): left to it


def check_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check every key exists and every value has its field's type; returns the values, converted."""
    known, choices = field_types(), field_choices()
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in KEY_ALIASES:
            alias, key = key, KEY_ALIASES[key]
            if key in values and values[key] != value:
                raise ConfigError(
                    f"{source}: {alias}={value!r} and {key}={values[key]!r} name the same setting ({alias} is "
                    f"the example scripts' name for {key}); keep one."
                )
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}{_unknown_key_hint(key, known)}.")
        ok, converted = _coerce(value, known[key])
        if not ok:
            raise ConfigError(
                f"{source}: {key!r} must be {_type_name(known[key])}, got {value!r} ({type(value).__name__})."
            )
        if key in choices and converted is not None and converted not in choices[key]:
            raise ConfigError(f"{source}: {key!r} must be one of {choices[key]}, got {value!r}.")
        checked[key] = converted
    return checked


def _unknown_key_hint(key: str, known: dict[str, Any]) -> str:
    """What to write instead: hf-kd's name for an example script's key, else the closest key (aliases included)."""
    if key in EXAMPLE_KEYS:
        return f" (transformers' example scripts name it so; hf-kd's key is {EXAMPLE_KEYS[key]})"
    close = difflib.get_close_matches(key, [*known, *KEY_ALIASES, *EXAMPLE_KEYS], n=1)
    if not close:
        return ""
    name = KEY_ALIASES.get(close[0], close[0])
    return f" (did you mean {name!r}?)" if name in known else f" (did you mean {EXAMPLE_KEYS[name]}?)"


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """``["--key", "value", "--flag", "--k=v"]`` -> ``{"key": "value", "flag": "true", "k": "v"}`` (still text)."""
    texts: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"override {token!r}: expected --key value (or --key=value).")
        key, eq, text = token[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                text = tokens[i + 1]
                i += 1
            else:
                text = "true"  # a bare --flag
        texts[key.replace("-", "_")] = text
        i += 1
    return texts


def check_overrides(texts: dict[str, str]) -> dict[str, Any]:
    """Command-line values read as YAML (``5e-5``, ``true``, ``null``, ``{a: 1}``), checked like a config's.

    A text whose YAML reading does not fit its key is taken as the plain string when the key takes strings:
    ``--source_prefix "summarize: "`` is a prefix, not a mapping.
    """
    values = {}
    for key, text in texts.items():
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        try:
            values.update(check_values({key: value}, "command line"))
        except ConfigError:
            name = KEY_ALIASES.get(key, key)
            if value == text or name not in field_types():
                raise
            try:
                values.update(check_values({key: text}, "command line"))
            except ConfigError:
                raise ConfigError(
                    f"command line: {key!r} must be {_type_name(field_types()[name])}, got {text!r}."
                ) from None
    return values


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, or a :class:`ConfigError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give the recipe's YAML file.")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} {missing_reason(path)}.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: {not_utf8(path.read_bytes(), err)}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe config is a mapping of key: value, got a {type(data).__name__}.")
    return data


def missing_reason(path: str | os.PathLike) -> str:
    """Why a path that should exist does not: "does not exist", or what stands in its way."""
    path = Path(path)
    if path.is_symlink():
        return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
    for parent in path.parents:
        if parent.is_dir():
            return "does not exist"
        if parent.exists() or parent.is_symlink():
            return f"is under {str(parent)!r}, which is a file, not a folder"
    return "does not exist"


def not_utf8(data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> str:
    """The message for text that is not UTF-8: where the first bad byte is, and how to convert the file.

    ``data`` starts at line ``first_line`` of the file.
    """
    line = data[: err.start].count(b"\n") + first_line
    return (
        f"not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); re-save it as UTF-8, e.g. "
        "iconv -f latin1 -t utf-8 FILE > FILE.utf8"
    )


def build_recipe_args(values: dict[str, Any]) -> tuple[ModelArguments, DataArguments, DistillationConfig]:
    """The three argument objects from checked values; their own validation errors become ConfigErrors."""
    try:
        built = recipe_parser().parse_dict(values)
    except ConfigError:
        raise
    except (ValueError, TypeError, ImportError) as err:  # a dataclass's own __post_init__ check
        raise ConfigError(" ".join(str(err).split())) from None
    check_generation(built[2])
    if values.get("trust_remote_code") and "teacher_trust_remote_code" not in values:
        # Before the split, trust_remote_code also covered the teacher: old recipes keep working, with a warning.
        warnings.warn(TRUST_REMOTE_CODE_SPLIT, FutureWarning, stacklevel=2)
        built[2].teacher_trust_remote_code = True
    return built  # type: ignore[return-value]


def check_generation(args: DistillationConfig) -> None:
    """Generation settings that would only fail at the first evaluation, after training, are refused now."""
    if args.generation_max_length is not None and args.generation_max_length < 2:
        raise ConfigError(
            f"generation_max_length={args.generation_max_length}: generation needs at least 2 tokens (the "
            "decoder's start token counts); set it to the target length, e.g. max_target_length, or null."
        )
    if args.generation_num_beams is not None and args.generation_num_beams < 1:
        raise ConfigError(
            f"generation_num_beams={args.generation_num_beams}: use 1 (greedy) or more (beam search), or null."
        )


# ---- the folders a recipe reads and writes ----------------------------------------------------------------


def holds_model(folder: Path) -> bool:
    """Whether ``folder`` holds a saved model (its config or weights)."""
    names = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return any((folder / name).is_file() for name in names)


def check_output_folder(
    key: str, output: str | os.PathLike, sources: dict[str, str | None], overwrite: bool, resume: bool = False
) -> None:
    """Refuse to write into a source folder (always) or over what a non-empty folder holds (unless asked).

    ``sources`` maps a config key to the path it names; a file (``student_config: dir/config.json``) counts as
    its folder.
    """
    out = Path(output).resolve()
    for source_key, source in sources.items():
        if not source or not Path(source).exists():
            continue
        folder = Path(source).resolve()
        folder = folder if folder.is_dir() else folder.parent
        if out == folder:
            raise ConfigError(
                f"{key}={str(output)!r} is the folder of {source_key}: the run would overwrite it; choose "
                "another folder."
            )
    if overwrite or resume or not out.is_dir():
        return
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)  # the lock: this run's own
    if not held:
        return
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    resume_hint = "--resume_from_checkpoint true to continue its run, " if key == "output_dir" else ""
    raise ConfigError(
        f"{key}={str(output)!r} is not empty ({shown}); pass {resume_hint}--overwrite_output_dir true to replace "
        f"what it holds, or choose another {key}."
    )


def recipe_parser() -> HfArgumentParser:
    """An HfArgumentParser over the three recipe dataclasses (its --help lists every key)."""
    return HfArgumentParser(RECIPE_DATACLASSES)


def parse_recipe_config(
    path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None
) -> tuple[ModelArguments, DataArguments, DistillationConfig]:
    """Read a recipe config, apply overrides (``--key value`` tokens or a dict) and build its arguments."""
    values = check_values(load_yaml_config(path), str(path)) if path is not None else {}
    if isinstance(overrides, dict):
        given = check_values(overrides, "command line")
    else:
        given = check_overrides(parse_overrides(list(overrides))) if overrides else {}
    if "text_column" in given and "source_column" not in given:
        # run_summarization.py's --text_column names the source: it overrides the config's source_column too
        values.pop("source_column", None)
    values.update(given)
    return build_recipe_args(values)
