"""``hf-kd make-student``: save a shallower (and, with width pruning, narrower) copy of a teacher, ready to
distill."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from hf_kd.cli.common import run_command
from hf_kd.errors import ConfigError, check_model_folder, check_source_path, check_writable_folder
from hf_kd.locking import sibling_lock
from hf_kd.recipe.args import holds_model
from hf_kd.student.calibration import read_calibration_file
from hf_kd.student.make import StudentSaveError, make_student
from hf_kd.student.prune import PRUNING_ATTRIBUTE, WIDTH_ARGUMENTS, target_sizes
from hf_kd.teachers.loading import load_named_tokenizer


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of layer indices, e.g. 0,6,11."
        ) from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``hf-kd make-student`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "make-student",
        help="Make a student by copying some of the teacher's layers (DistilBART style), optionally width-pruned.",
        description=(
            "Copy the teacher's embeddings, the chosen layers and every other weight into a model of the same "
            "architecture with fewer layers, and save it with the tokenizer and hf_kd_student.json (the layer "
            "map). Default layers: DistilBART's published maps for 6-, 12- and 16-layer teachers, else evenly "
            "spread keeping the first and the last. Width options then narrow the copy (Minitron width pruning: "
            "the channels, neurons and heads with the largest mean activations on --calibration-file stay). "
            "Supports BART, T5/mT5/Flan-T5, GPT-2, Llama, Mistral, Qwen2."
        ),
    )
    parser.add_argument("teacher", help="Local directory or Hub id of the teacher.")
    parser.add_argument("output_dir", help="Where to save the student.")
    parser.add_argument(
        "--encoder-layers", type=int, default=None, metavar="N", help="Encoder layers to keep (seq2seq only)."
    )
    parser.add_argument(
        "--decoder-layers",
        "--layers",
        type=int,
        default=None,
        metavar="N",
        help="Decoder layers to keep (all layers of a causal LM).",
    )
    parser.add_argument(
        "--encoder-map",
        type=_layer_list,
        default=None,
        metavar="LAYERS",
        help="Teacher encoder layers to copy, e.g. 0,6,11.",
    )
    parser.add_argument(
        "--decoder-map",
        "--layer-map",
        type=_layer_list,
        default=None,
        metavar="LAYERS",
        help="Teacher decoder layers to copy, e.g. 0,11.",
    )
    width = parser.add_argument_group(
        "width pruning (Minitron)",
        "Narrow the student: keep the hidden channels, MLP neurons and heads with the largest mean activations on "
        "the calibration data. Needs --calibration-file.",
    )
    for option, what in (
        ("--hidden-size", "Hidden (residual-stream) channels to keep."),
        ("--intermediate-size", "MLP neurons per layer to keep."),
        ("--num-attention-heads", "Query heads per attention module to keep."),
        ("--num-key-value-heads", "Key-value groups to keep (Llama, Mistral, Qwen2)."),
    ):
        width.add_argument(option, type=int, default=None, metavar="N", help=what)
    width.add_argument(
        "--calibration-file",
        default=None,
        metavar="F",
        help="Rows to rank by: .jsonl, .json, .csv, .txt (one text a line) or a save_to_disk folder; rows with "
        "input_ids are used as they are, else the text columns are tokenized.",
    )
    width.add_argument(
        "--calibration-rows", type=int, default=256, metavar="N", help="Use the first N rows (default 256)."
    )
    width.add_argument("--text-column", default="text", metavar="C", help="Text column (causal models; default text).")
    width.add_argument(
        "--source-column", default="article", metavar="C", help="Source column (encoder-decoder; default article)."
    )
    width.add_argument(
        "--target-column",
        default="highlights",
        metavar="C",
        help="Target column (encoder-decoder; default highlights).",
    )
    parser.add_argument(
        "--layer-selection",
        choices=["spread", "importance"],
        default="spread",
        help="With --encoder-layers/--decoder-layers: spread (DistilBART's maps, default) or importance (the "
        "most important blocks on --calibration-file).",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="Tokenizer to save with the student (default: the teacher's, if it has one).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the model output_dir already holds (never allowed for the teacher's or tokenizer's folder).",
    )
    parser.set_defaults(run=run)
    return parser


def check_paths(args: argparse.Namespace) -> None:
    """The teacher and tokenizer can be loaded, and output_dir can be written (a symlink: where it points), is not
    their folder, nor (unless --overwrite) a folder that already holds a model."""
    check_source_path("teacher", args.teacher)
    check_source_path("--tokenizer", args.tokenizer)
    for key, source in (("teacher", args.teacher), ("--tokenizer", args.tokenizer)):
        if source and Path(source).is_file():
            raise ConfigError(f"{key}={source!r} is a file; pass the folder the model was saved to (or a Hub id).")
    check_model_folder("teacher", args.teacher, safetensors_only=True)  # hf_kd.teachers.loading.load_teacher's rule
    out = check_writable_folder("output_dir", args.output_dir)
    for key, source in (("the teacher", args.teacher), ("--tokenizer", args.tokenizer)):
        if source and Path(source).is_dir() and Path(source).resolve() == out:
            raise ConfigError(f"output_dir {args.output_dir!r} is {key}'s folder; save the student elsewhere.")
    if out.is_dir() and holds_model(out) and not args.overwrite:
        raise ConfigError(
            f"output_dir {args.output_dir!r} already holds a model; pass --overwrite to replace it, or choose "
            "another output_dir."
        )


def check_width_options(args: argparse.Namespace) -> None:
    """Before any model is loaded: width pruning and importance-chosen layers need calibration rows, and sizes
    are positive."""
    needs = any(getattr(args, name) is not None for name in WIDTH_ARGUMENTS) or args.layer_selection == "importance"
    if needs and args.calibration_file is None:
        raise ConfigError(
            "width pruning and --layer-selection importance rank by activations on calibration data, and none was "
            "given; pass --calibration-file F (.jsonl, .json, .csv, .txt or a save_to_disk folder)."
        )
    if args.calibration_rows < 1:
        raise ConfigError(f"--calibration-rows {args.calibration_rows}: must be at least 1; pass e.g. 256.")
    if args.calibration_file is not None:
        if not Path(args.calibration_file).exists():
            raise ConfigError(f"--calibration-file {args.calibration_file!r}: no such file; give an existing path.")


def _calibration(args: argparse.Namespace) -> Any:
    """The calibration file's rows or texts, checked against the teacher's config first (cheap: no weights)."""
    if args.calibration_file is None:
        return None
    config = AutoConfig.from_pretrained(args.teacher)
    widths = {name: getattr(args, name) for name in WIDTH_ARGUMENTS}
    if any(v is not None for v in widths.values()):
        target_sizes(config, **widths)  # an impossible size is one line before the teacher is loaded
    rows = read_calibration_file(
        args.calibration_file,
        bool(getattr(config, "is_encoder_decoder", False)),
        text_column=args.text_column,
        source_column=args.source_column,
        target_column=args.target_column,
    )
    return rows[: args.calibration_rows]


def run(args: argparse.Namespace) -> int:
    """Make and save the student; print its layer map. Returns the exit status."""
    # OSError, ValueError: a bad map, an unsupported model, a teacher that cannot be loaded
    return run_command("hf-kd make-student", _locked, args, errors=(OSError, ValueError))


def _locked(args: argparse.Namespace) -> int:
    """One make-student at a time per output_dir: a lock file beside it (the save replaces it from a folder there)."""
    out = check_writable_folder("output_dir", args.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with sibling_lock(out, "hf-kd make-student"):
        return _make_student(args)


def _make_student(args: argparse.Namespace) -> int:
    layer_map = {}
    if args.encoder_map is not None:
        layer_map["encoder"] = args.encoder_map
    if args.decoder_map is not None:
        layer_map["decoder"] = args.decoder_map
    tokenizer = None
    check_paths(args)
    check_width_options(args)
    calibration = _calibration(args)
    if args.tokenizer is not None:
        tokenizer = load_named_tokenizer("--tokenizer", args.tokenizer)
    try:
        student = make_student(
            args.teacher,
            encoder_layers=args.encoder_layers,
            decoder_layers=args.decoder_layers,
            layer_map=layer_map or None,
            output_dir=args.output_dir,
            tokenizer=tokenizer,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads,
            calibration=calibration,
            layer_selection=args.layer_selection,
        )
    except StudentSaveError as err:  # a full disk or a file-size limit while saving: output_dir is as it was
        raise ConfigError(f"{err}; output_dir is left as it was: free space, or choose another output_dir.") from None
    layers = ", ".join(f"{name} {layers}" for name, layers in student.config.hf_kd_layer_map.items())
    pruning = getattr(student.config, PRUNING_ATTRIBUTE, None)
    if pruning is not None:
        before, after = pruning["teacher_sizes"], pruning["student_sizes"]
        grouped = before["num_key_value_heads"] != before["num_attention_heads"]  # else kv heads are the heads
        changed = [k for k in before if before[k] != after[k] and (grouped or k != "num_key_value_heads")]
        layers += "; widths: " + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in changed)
    print(f"Saved a {student.num_parameters():,}-parameter student to {args.output_dir} (teacher layers: {layers}).")
    return 0
