"""`hf-kd pseudo-label`: sequence-level KD data, the teacher's own outputs as training targets (Kim & Rush 2016).

The teacher generates (greedy or beam search, batched) a target for every source text of a data set; the
outputs are written in resumable shards (:mod:`hf_kd.teachers.shards`) with their agreement with the reference target
(ROUGE-L F1 and word error rate), and then assembled into a data set the recipes train on, whose
``target_column`` holds:

* ``target_source="teacher"``: the teacher's output (the reference is kept in ``reference_<target_column>``);
* ``"reference"``: the original target (a baseline with the same filtering and columns);
* ``"both"``: every example twice, once with each target.

A ``target_source`` column says which each row holds. A filter (``min_rouge_l`` or ``max_wer``, like
distil-whisper's WER filter) drops teacher outputs too far from the reference: in ``"teacher"`` mode the
example is dropped, in ``"both"`` mode only its teacher row. The filter and the mix are applied at assembly, so
they can be changed without generating again. The command line is :mod:`hf_kd.cli.pseudo_label`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Features, Value, concatenate_datasets
from torch import nn

from hf_kd.errors import ConfigError
from hf_kd.metrics import rouge
from hf_kd.teachers.cache_writer import config_hash, dataset_hash, tokenizer_hash, weights_hash
from hf_kd.teachers.loading import encoder_ids
from hf_kd.teachers.placement import input_device
from hf_kd.teachers.shards import ShardError, Workers, load_sharded, write_sharded

PSEUDO_KIND = "hf-kd-pseudo-labels"
COMMAND = "`hf-kd pseudo-label`"
ASSEMBLED = "dataset"  # <output>/dataset: the assembled training set the command writes beside its shards
TARGET_SOURCES = ("teacher", "reference", "both")


def word_error_rate(prediction: str, reference: str) -> float:
    """Word-level edit distance divided by the reference's word count (1.0 for an empty reference unless equal)."""
    hyp, ref = prediction.split(), reference.split()
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1] / len(ref)


def generate_batch(teacher: nn.Module, tokenizer: Any, sources: list[str], settings: dict[str, Any]) -> list[str]:
    """The teacher's decoded outputs for ``sources``; causal teachers continue the left-padded prompt."""
    is_ed = bool(getattr(teacher.config, "is_encoder_decoder", False))
    tokenizer.padding_side = "right" if is_ed else "left"  # decoder-only generation continues the last token
    enc = tokenizer(sources, max_length=settings["max_source_length"], truncation=True)
    enc.pop("token_type_ids", None)
    if is_ed:
        enc["input_ids"] = [
            encoder_ids(ids, tokenizer.eos_token_id, settings["max_source_length"]) for ids in enc["input_ids"]
        ]
        enc["attention_mask"] = [[1] * len(ids) for ids in enc["input_ids"]]
    enc = tokenizer.pad(enc, return_tensors="pt").to(input_device(teacher))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = teacher.generate(
            **enc,
            max_new_tokens=settings["max_new_tokens"],
            num_beams=settings["num_beams"],
            do_sample=False,
            pad_token_id=pad,
            **settings["generation_kwargs"],
        )
    if not is_ed:
        out = out[:, enc["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def _shard_maker(teacher: nn.Module, tokenizer: Any, dataset: Dataset, settings: dict[str, Any]):  # noqa: ANN202
    def make_shard(start: int, end: int, progress: Any) -> Dataset:
        rows = dataset.select(range(start, end))
        sources = [settings["source_prefix"] + (s or "") for s in rows[settings["source_column"]]]
        outputs: list[str] = []
        for b in range(0, len(sources), settings["batch_size"]):
            outputs += generate_batch(teacher, tokenizer, sources[b : b + settings["batch_size"]], settings)
            progress.update(len(sources[b : b + settings["batch_size"]]))
        columns: dict[str, list] = {"teacher_output": outputs}
        target = settings["target_column"]
        if target is not None and target in rows.column_names:
            references = [r or "" for r in rows[target]]
            scores = rouge(outputs, references, rouge_types=["rougeL"], use_aggregator=False)["rougeL"]
            columns["teacher_rouge_l"] = scores
            columns["teacher_wer"] = [word_error_rate(o, r) for o, r in zip(outputs, references, strict=True)]
        # Explicit types: a shard whose scores happen to be all 0 would otherwise be typed int64.
        features = Features({name: Value("string" if name == "teacher_output" else "float64") for name in columns})
        return Dataset.from_dict(columns, features=features)

    return make_shard


def generate_pseudo_labels(
    teacher: nn.Module,
    tokenizer: Any,
    dataset: Dataset,
    output_dir: str | os.PathLike,
    *,
    source_column: str,
    target_column: str | None = None,
    source_prefix: str = "",
    max_source_length: int = 512,
    max_new_tokens: int = 128,
    num_beams: int = 1,
    batch_size: int = 8,
    shard_size: int = 1000,
    generation_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    on_shard: Any = None,
    on_rebuild: Callable[[int, str], None] | None = None,
    workers: Workers | None = None,
) -> Path:
    """Generate the teacher's output for every row of ``dataset`` into resumable shards under ``output_dir``.

    Deterministic decoding only (greedy, or beam search with ``num_beams > 1``), so that a resumed run
    equals an uninterrupted one. Read the result with :func:`assemble`. A run on an existing output first
    verifies its shards and generates the missing or corrupt ones again (``on_rebuild(index, problem)``);
    ``overwrite`` replaces an output made with other settings (its manifest, shards and ``dataset``, nothing
    else). Bad arguments or data raise :class:`~hf_kd.recipe.args.ConfigError`. ``workers``: this process's share
    of the shards, as for :func:`hf_kd.teachers.cache_writer.build_teacher_cache`.
    """
    check_text_dataset(dataset, "the data set", source_column, target_column)
    for name, value in (("max_source_length", max_source_length), ("max_new_tokens", max_new_tokens),
                        ("num_beams", num_beams), ("batch_size", batch_size)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{name}={value} must be 1 or more; pass a positive count.")
    settings = {
        "source_column": source_column,
        "target_column": target_column,
        "source_prefix": source_prefix,
        "max_source_length": max_source_length,
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "batch_size": batch_size,
        "generation_kwargs": dict(generation_kwargs or {}),
    }
    hashed = [c for c in (source_column, target_column) if c is not None and c in dataset.column_names]
    fingerprint = {
        "kind": PSEUDO_KIND,
        "teacher_config_sha256": config_hash(teacher),
        "teacher_weights_sha256": weights_hash(teacher),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "dataset_sha256": dataset_hash(dataset, tuple(hashed)),
        "dataset_rows": len(dataset),
        **{k: v for k, v in settings.items() if k != "batch_size"},
    }
    was_training, padding_side, pad_token = teacher.training, tokenizer.padding_side, tokenizer.pad_token
    if pad_token is None:  # GPT-2-style tokenizers: batching needs a pad token; its id never reaches the output
        tokenizer.pad_token = tokenizer.eos_token
    teacher.eval()
    try:
        write_sharded(
            output_dir,
            fingerprint,
            len(dataset),
            shard_size,
            _shard_maker(teacher, tokenizer, dataset, settings),
            desc="Pseudo-labelling",
            overwrite=overwrite,
            on_shard=on_shard,
            owned=(ASSEMBLED,),
            on_rebuild=on_rebuild,
            command=COMMAND,
            workers=workers,
        )
    finally:
        teacher.train(was_training)
        tokenizer.padding_side = padding_side
        tokenizer.pad_token = pad_token
    return Path(output_dir)


def assemble(
    dataset: Dataset,
    labels_dir: str | os.PathLike,
    *,
    target_column: str = "target",
    target_source: str = "teacher",
    min_rouge_l: float | None = None,
    max_wer: float | None = None,
) -> Dataset:
    """The training data set: ``dataset``'s rows with ``target_column`` taken from the teacher, the reference or
    both (see the module docstring), teacher outputs outside the filter thresholds left out."""
    if target_source not in TARGET_SOURCES:
        raise ConfigError(f"target_source={target_source!r}; choose one of {TARGET_SOURCES}.")
    labels, manifest = load_sharded(labels_dir, command=COMMAND)
    fp = manifest["fingerprint"]
    if fp.get("kind") != PSEUDO_KIND:
        raise ShardError(f"{labels_dir} holds no pseudo-labels (kind {fp.get('kind')!r}); make them with {COMMAND}.")
    if len(dataset) != fp["dataset_rows"] or dataset_hash(dataset, _hashed(fp, dataset)) != fp["dataset_sha256"]:
        raise ShardError(
            f"The pseudo-labels in {labels_dir} were generated for another data set; assemble them with the data "
            f"set they were made from, or run {COMMAND} on this one."
        )
    has_reference = target_column in dataset.column_names
    check_reference(dataset, target_column, target_source, min_rouge_l, max_wer)
    keep = [True] * len(labels)
    if min_rouge_l is not None:
        keep = [k and s >= min_rouge_l for k, s in zip(keep, labels["teacher_rouge_l"], strict=True)]
    if max_wer is not None:
        keep = [k and s <= max_wer for k, s in zip(keep, labels["teacher_wer"], strict=True)]
    joined = concatenate_datasets([dataset, labels], axis=1)
    if has_reference:
        joined = joined.add_column(f"reference_{target_column}", joined[target_column])
    parts = []
    if target_source in ("reference", "both"):
        parts.append(joined.add_column("target_source", ["reference"] * len(joined)))
    if target_source in ("teacher", "both"):
        rows = joined.select([i for i, k in enumerate(keep) if k])
        rows = rows.remove_columns([target_column]) if has_reference else rows
        rows = rows.add_column(target_column, rows["teacher_output"])
        rows = rows.add_column("target_source", ["teacher"] * len(rows))
        parts.append(rows.select_columns(parts[0].column_names) if parts else rows)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def check_reference(
    dataset: Dataset, target_column: str, target_source: str, min_rouge_l: float | None, max_wer: float | None
) -> None:
    """References are needed for ``target_source`` other than "teacher" and for the filters."""
    if target_column in dataset.column_names:
        return
    if target_source != "teacher" or min_rouge_l is not None or max_wer is not None:
        raise ConfigError(
            f"target_source={target_source!r} and the filters need the reference column {target_column!r}, "
            f"which the data set lacks (its columns: {', '.join(dataset.column_names)}); name it with "
            "--target-column, or use --target-source teacher without filters."
        )


def check_text_dataset(dataset: Dataset, name: str, source_column: str, target_column: str | None) -> None:
    """Refuse a data set without rows, or whose source (and reference, when present) are not text."""
    if len(dataset) == 0:
        raise ConfigError(f"{name} has no rows; pass a data set with at least one example.")
    columns = ", ".join(dataset.column_names)
    if source_column not in dataset.column_names:
        raise ConfigError(
            f"{name} has no column {source_column!r} (its columns: {columns}); name the source text with "
            "--source-column."
        )
    for column in (source_column, target_column):
        feature = dataset.features.get(column) if column is not None else None
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ConfigError(
                f"{name}: column {column!r} holds {feature}, not text; pseudo-label reads raw text (a data set "
                "before tokenisation)."
            )


def _hashed(fingerprint: dict[str, Any], dataset: Dataset) -> tuple[str, ...]:
    names = (fingerprint["source_column"], fingerprint["target_column"])
    return tuple(c for c in names if c is not None and c in dataset.column_names)
