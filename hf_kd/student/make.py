"""make_student: a shallower copy of the teacher, DistilBART style (keep some layers, copy every other weight),
optionally narrowed by width pruning (:mod:`hf_kd.student.prune`)."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_kd.student.calibration import calibration_batches
from hf_kd.student.prune import PRUNING_ATTRIBUTE, prune_width, spec_of, target_sizes

# What a student made here records in its config, and the file saved beside it.
CONFIG_ATTRIBUTE = "hf_kd_layer_map"
RECORD_FILE = "hf_kd_student.json"

# DistilBART's published choices (transformers' seq2seq-distillation example, LAYERS_TO_COPY):
# teacher layers -> student layers -> which teacher layers to copy. Other sizes are spread evenly.
PUBLISHED_MAPS: dict[int, dict[int, list[int]]] = {
    12: {
        1: [0],
        2: [0, 6],
        3: [0, 6, 11],
        4: [0, 4, 8, 11],
        6: [0, 2, 4, 7, 9, 11],
        9: [0, 1, 2, 4, 5, 7, 9, 10, 11],
    },
    16: {
        1: [0],
        2: [0, 15],
        3: [0, 8, 15],
        4: [0, 5, 10, 15],
        6: [0, 3, 6, 9, 12, 15],
        8: [0, 2, 4, 6, 8, 10, 12, 15],
        9: [0, 1, 3, 5, 7, 9, 11, 13, 15],
        12: [0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15],
    },
    6: {1: [0], 2: [0, 5], 3: [0, 2, 5], 4: [0, 1, 3, 5]},
}


@dataclass(frozen=True)
class Stack:
    """One stack of layers: where its ModuleList lives in the state dict and which config field counts it."""

    prefix: str
    count_attribute: str


_SEQ2SEQ_BART = {
    "encoder": Stack("model.encoder.layers", "encoder_layers"),
    "decoder": Stack("model.decoder.layers", "decoder_layers"),
}
_SEQ2SEQ_T5 = {"encoder": Stack("encoder.block", "num_layers"), "decoder": Stack("decoder.block", "num_decoder_layers")}
_LLAMA_LIKE = {"decoder": Stack("model.layers", "num_hidden_layers")}

# model_type -> its stacks. Causal models have a single stack, called "decoder".
FAMILIES: dict[str, dict[str, Stack]] = {
    "bart": _SEQ2SEQ_BART,
    "t5": _SEQ2SEQ_T5,
    "mt5": _SEQ2SEQ_T5,
    "gpt2": {"decoder": Stack("transformer.h", "n_layer")},
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def stacks_of(config: Any) -> dict[str, Stack]:
    """The layer stacks of a supported architecture; a ValueError naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"make_student does not support model_type={model_type!r}. Supported: {sorted(FAMILIES)}. For another "
            "architecture build the student yourself (e.g. AutoModel.from_config with fewer layers) and copy the "
            "weights you want."
        )
    return FAMILIES[model_type]


def default_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Which teacher layers a student of ``student_layers`` copies by default.

    DistilBART's published map when there is one (12, 16 or 6 teacher layers); otherwise evenly spread, always
    keeping the first and the last layer (``round_half_up(i * (n - 1) / (k - 1))``, which gives the published
    12 -> 6 and 12 -> 3 maps too).
    """
    _check_count(student_layers, teacher_layers, "student layers")
    if student_layers == teacher_layers:
        return list(range(teacher_layers))
    published = PUBLISHED_MAPS.get(teacher_layers, {}).get(student_layers)
    if published is not None:
        return list(published)
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [int(i * step + 0.5) for i in range(student_layers)]


def _check_count(count: Any, teacher_layers: int, what: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= teacher_layers:
        raise ValueError(
            f"{what}={count!r}: a student needs between 1 and {teacher_layers} layers here (the teacher's count); "
            "copying cannot make a deeper model. Pass a smaller number."
        )


def check_layer_map(layers: Any, teacher_layers: int, stack: str) -> list[int]:
    """A validated list of teacher layer indices: ints in range, increasing, not more than the teacher has."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(
            f"The {stack} layer map must be a list of teacher layer indices, e.g. [0, 6, 11]; got {layers!r}."
        )
    layers = list(layers)
    if not layers:
        raise ValueError(f"The {stack} layer map is empty: a student needs at least one layer, e.g. [0].")
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < teacher_layers:
            raise ValueError(
                f"The {stack} layer map {layers} names layer {index!r}, but the teacher's {stack} has layers "
                f"0..{teacher_layers - 1}. Use indices in that range."
            )
    if len(layers) > teacher_layers:
        raise ValueError(
            f"The {stack} layer map {layers} has {len(layers)} layers, more than the teacher's {teacher_layers}. "
            "A student copies each teacher layer at most once."
        )
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(
            f"The {stack} layer map {layers} repeats a layer or is out of order: list distinct teacher layers in "
            f"increasing order, e.g. {sorted(set(layers))}."
        )
    return layers


def maps_per_stack(layer_map: Mapping[str, Any] | Sequence[Any], stacks: Collection[str], what: str) -> dict[str, Any]:
    """``layer_map`` as ``{stack: map}``: a plain list is a causal model's decoder map; a stack the model lacks is
    refused (``what`` names the map in the messages)."""
    if not isinstance(layer_map, Mapping):
        if "encoder" in stacks:
            raise ValueError(
                f'An encoder-decoder model needs a {what} per stack: {{"encoder": [...], "decoder": [...]}}.'
            )
        layer_map = {"decoder": list(layer_map)}
    unknown = set(layer_map) - set(stacks)
    if unknown:
        raise ValueError(f"Unknown stack(s) {sorted(unknown)} in the {what}: the model has {sorted(stacks)}.")
    return dict(layer_map)


def resolve_layer_map(
    config: Any,
    encoder_layers: int | None = None,
    decoder_layers: int | None = None,
    layer_map: dict[str, list[int]] | list[int] | None = None,
) -> dict[str, list[int]]:
    """The teacher layers each stack of the student copies, from counts or an explicit map (validated).

    ``layer_map`` is ``{"encoder": [...], "decoder": [...]}`` (a causal model has only ``"decoder"``; a plain list
    is taken as its decoder map). A stack neither counted nor mapped keeps all its layers.
    """
    stacks = stacks_of(config)
    counts = {"encoder": encoder_layers, "decoder": decoder_layers}
    if "encoder" not in stacks and encoder_layers is not None:
        raise ValueError(
            f"encoder_layers={encoder_layers} but a {config.model_type} model has no encoder: use decoder_layers "
            "for the number of layers of a causal model."
        )
    layer_map = maps_per_stack(layer_map or {}, stacks, "layer map")
    resolved = {}
    for name, stack in stacks.items():
        teacher_count = int(getattr(config, stack.count_attribute))
        if name in layer_map:
            resolved[name] = check_layer_map(layer_map[name], teacher_count, name)
            if counts[name] is not None and counts[name] != len(resolved[name]):
                raise ValueError(
                    f"{name}_layers={counts[name]} disagrees with the {name} layer map {resolved[name]} "
                    f"({len(resolved[name])} layers): give one or the other."
                )
        elif counts[name] is not None:
            resolved[name] = default_layers(teacher_count, counts[name])
        else:
            resolved[name] = list(range(teacher_count))
    return resolved


def student_config(teacher_config: Any, layer_map: dict[str, list[int]]) -> Any:
    """The teacher's config with the student's layer counts, per-layer lists and the map recorded."""
    config = copy.deepcopy(teacher_config)
    stacks = stacks_of(config)
    for name, layers in layer_map.items():
        setattr(config, stacks[name].count_attribute, len(layers))
    # Per-layer settings (e.g. Qwen2's sliding vs full attention) follow the layer they were copied from.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and "encoder" not in stacks:
        config.layer_types = [layer_types[i] for i in layer_map["decoder"]]
    setattr(config, CONFIG_ATTRIBUTE, {name: list(layers) for name, layers in layer_map.items()})
    return config


def map_state_dict(
    teacher_state: dict[str, torch.Tensor],
    student_keys: list[str],
    stacks: dict[str, Stack],
    layer_map: dict[str, list[int]],
) -> dict[str, torch.Tensor]:
    """The student's state dict taken from the teacher's: layer ``i`` of a stack from teacher layer ``map[i]``.

    A parameter the copied teacher layer lacks but teacher layer 0 has (T5's relative attention bias, which lives
    in the first block of each stack) comes from layer 0, so the student's first block always has it.
    """
    patterns = [
        (re.compile(rf"^{re.escape(s.prefix)}\.(\d+)\.(.+)$"), s.prefix, layer_map[n]) for n, s in stacks.items()
    ]
    mapped = {}
    for key in student_keys:
        source = key
        for pattern, prefix, layers in patterns:
            match = pattern.match(key)
            if match:
                index, rest = int(match.group(1)), match.group(2)
                source = f"{prefix}.{layers[index]}.{rest}"
                if source not in teacher_state and f"{prefix}.0.{rest}" in teacher_state:
                    source = f"{prefix}.0.{rest}"
                break
        if source not in teacher_state:
            raise KeyError(f"The student's weight {key!r} has no counterpart {source!r} in the teacher.")
        mapped[key] = teacher_state[source]
    return mapped


def make_student(
    teacher: PreTrainedModel | str,
    encoder_layers: int | None = None,
    decoder_layers: int | None = None,
    layer_map: dict[str, list[int]] | list[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    calibration: Any = None,
    layer_selection: str = "spread",
    calibration_batch_size: int = 8,
    calibration_rows: int | None = None,
) -> PreTrainedModel:
    """A smaller student of the teacher's architecture, initialised from the teacher's weights.

    The student has the teacher's config with fewer layers; it gets the teacher's embeddings, the chosen layers
    (default: :func:`default_layers`) and every other weight (final layer norms, an untied ``lm_head``, BART's
    ``final_logits_bias``, T5's relative attention bias). The map is recorded in ``config.hf_kd_layer_map``.

    Width pruning (Minitron): given ``hidden_size``, ``intermediate_size``, ``num_attention_heads`` or
    ``num_key_value_heads``, the layer-pruned student is then narrowed to those widths, keeping the channels,
    neurons and heads with the largest mean activations on ``calibration`` (see :mod:`hf_kd.student.prune`); the
    kept indices are recorded in ``config.hf_kd_pruning``.

    Args:
        teacher: a model, or a local path / Hub id loaded with the Auto class that fits its config.
        encoder_layers: how many encoder layers the student keeps (encoder-decoder models only).
        decoder_layers: how many decoder layers the student keeps (the layer count of a causal model).
        layer_map: explicit teacher layer indices per stack, ``{"encoder": [0, 6, 11], "decoder": [0, 11]}``, or
            a list for a causal model; overrides the default spread.
        output_dir: when given, the student is saved there (see :func:`save_student`).
        tokenizer: saved with the student (and tokenizes calibration texts); when ``teacher`` is a path with a
            tokenizer, that one is used.
        hidden_size: residual-stream channels the student keeps (GPT-2, BART: must be
            ``num_attention_heads x`` the teacher's head size).
        intermediate_size: MLP neurons per layer the student keeps.
        num_attention_heads: query heads per attention module the student keeps.
        num_key_value_heads: key-value groups kept (Llama, Mistral, Qwen2), each with its query heads.
        calibration: what the importance is measured on: batches of tensors, rows with ``input_ids`` (a
            ``datasets.Dataset`` too) or texts; see :func:`hf_kd.student.calibration.calibration_batches`.
            Needed when a width shrinks or ``layer_selection="importance"``.
        layer_selection: ``"spread"`` (DistilBART's maps, else evenly spread) or ``"importance"`` (the
            ``encoder_layers`` / ``decoder_layers`` most important blocks, :mod:`hf_kd.student.depth`).
        calibration_batch_size: rows per calibration batch (rows and texts only).
        calibration_rows: use at most this many rows (or batches) of ``calibration``.

    Returns:
        The student, in eval mode as ``from_pretrained`` would give it.

    Example:
        >>> student = make_student("facebook/bart-large-cnn", encoder_layers=12, decoder_layers=6)  # doctest: +SKIP
    """
    if isinstance(teacher, (str, os.PathLike)):
        teacher_name = str(teacher)
        from hf_kd.teachers.loading import load_teacher

        teacher, loaded_tokenizer = load_teacher(str(teacher), None)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    else:
        teacher_name = getattr(teacher.config, "_name_or_path", "") or ""
    stacks = stacks_of(teacher.config)
    widths = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads)  # fmt: skip
    target = target_sizes(teacher.config, **widths) if any(v is not None for v in widths.values()) else None
    if layer_selection not in ("spread", "importance"):
        raise ValueError(f"layer_selection={layer_selection!r} is not a choice; use 'spread' or 'importance'.")
    shrinks = target is not None and target != spec_of(teacher.config).sizes(teacher.config, None)
    batches = None
    if shrinks or layer_selection == "importance" or (target is not None and calibration is not None):
        if calibration is None:
            why = "a width smaller than the teacher's" if shrinks else "layer_selection='importance'"
            raise ValueError(
                f"{why} is chosen by importance on calibration data, and none was given; pass calibration=[...] "
                "(batches, rows with input_ids, or texts with a tokenizer), or --calibration-file on the CLI."
            )
        batches = calibration_batches(
            calibration, teacher, tokenizer, batch_size=calibration_batch_size, max_rows=calibration_rows
        )
    if layer_selection == "importance":
        layer_map = _layers_by_importance(teacher, batches, encoder_layers, decoder_layers, layer_map)
        encoder_layers = decoder_layers = None
    resolved = resolve_layer_map(teacher.config, encoder_layers, decoder_layers, layer_map)
    student = _copy_layers(teacher, stacks, resolved)
    if target is not None and batches is not None:
        student = prune_width(student, batches, target)
    student.hf_kd_teacher_name = teacher_name
    student.hf_kd_layer_selection = layer_selection if layer_map is None or layer_selection == "importance" else "map"
    if output_dir is not None:
        save_student(student, output_dir, tokenizer=tokenizer, teacher_name=teacher_name, teacher_config=teacher.config)
    return student


def _copy_layers(teacher: PreTrainedModel, stacks: dict[str, Stack], resolved: dict[str, list[int]]) -> PreTrainedModel:
    """The teacher with only the mapped layers of each stack (weights copied, not shared)."""
    config = student_config(teacher.config, resolved)
    student = type(teacher)._from_config(config, dtype=teacher.dtype)
    state = map_state_dict(teacher.state_dict(), list(student.state_dict()), stacks, resolved)
    student.load_state_dict(state, strict=True)
    student.tie_weights()
    if getattr(teacher, "generation_config", None) is not None:
        # Beam size, length penalty, forced tokens...: the teacher's way of generating suits its copy too.
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def _layers_by_importance(
    teacher: PreTrainedModel,
    batches: list[dict[str, torch.Tensor]],
    encoder_layers: int | None,
    decoder_layers: int | None,
    layer_map: Any,
) -> dict[str, list[int]]:
    """The layers :func:`hf_kd.student.depth.layers_by_importance` keeps for the counts given, validated."""
    if layer_map is not None:
        raise ValueError(
            "layer_selection='importance' chooses the layers itself; pass encoder_layers / decoder_layers, or drop "
            "it to copy the layer_map given."
        )
    resolve_layer_map(teacher.config, encoder_layers, decoder_layers)  # the counts' own errors first
    counts = {name: n for name, n in (("encoder", encoder_layers), ("decoder", decoder_layers)) if n is not None}
    if not counts:
        raise ValueError(
            "layer_selection='importance' needs to know how many layers to keep; pass encoder_layers and/or "
            "decoder_layers."
        )
    from hf_kd.student.depth import layers_by_importance  # written beside this module; loaded only when asked

    return {
        name: sorted(int(i) for i in layers) for name, layers in layers_by_importance(teacher, batches, counts).items()
    }


class StudentSaveError(OSError):
    """Saving a student failed (a full disk, a file-size limit); the output folder was left as it was."""


def save_student(
    student: PreTrainedModel,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    teacher_name: str | None = None,
    teacher_config: Any = None,
) -> None:
    """Save a student from :func:`make_student` with its tokenizer and ``hf_kd_student.json`` (the layer map).

    Whole or not at all: everything is written to a temporary folder beside ``output_dir`` first, then a new
    ``output_dir`` is that folder renamed, and an existing one gets the files moved in (the weight files of a model
    it held before and the new one lacks removed: stale shards would be loaded with the new ones). A save that
    fails (a full disk) leaves ``output_dir`` as it was and removes the temporary folder.
    """
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would become the student folder's
    try:
        try:
            _save_into(tmp, student, tokenizer, teacher_name, teacher_config)
        except OSError as err:
            raise StudentSaveError(f"the student could not be saved to {target} ({err.strerror or err})") from err
        if not target.exists():
            tmp.rename(target)
            return
        new = {p.name for p in tmp.iterdir()}
        for old in target.iterdir():
            if old.name not in new and old.is_file() and _WEIGHT_FILE.match(old.name):
                old.unlink()
        for entry in tmp.iterdir():
            os.replace(entry, target / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The files a model's weights live in (safetensors or pickle, single or sharded, and their indices).
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def _save_into(folder: Path, student: PreTrainedModel, tokenizer: Any, teacher_name: str | None,
               teacher_config: Any) -> None:  # fmt: skip
    student.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    layer_map = getattr(student.config, CONFIG_ATTRIBUTE, None)
    stacks = stacks_of(student.config)
    record = {
        "teacher": teacher_name if teacher_name is not None else getattr(student, "hf_kd_teacher_name", None),
        "model_type": student.config.model_type,
        "layer_map": layer_map,
        "student_layers": {n: int(getattr(student.config, s.count_attribute)) for n, s in stacks.items()},
    }
    if getattr(student, "hf_kd_layer_selection", None) is not None:
        record["layer_selection"] = student.hf_kd_layer_selection
    if getattr(student.config, PRUNING_ATTRIBUTE, None) is not None:
        record["pruning"] = getattr(student.config, PRUNING_ATTRIBUTE)
    if teacher_config is not None:
        record["teacher_layers"] = {n: int(getattr(teacher_config, s.count_attribute)) for n, s in stacks.items()}
    with open(folder / RECORD_FILE, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
