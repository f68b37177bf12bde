"""Calibration batches: the few padded batches a teacher runs on to rank what pruning keeps."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

# Batch keys the models' forward takes; anything else in a row (text columns, ids) is left out.
MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels")


def _config(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def _max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _pad_id(config: Any, tokenizer: Any) -> int:
    for source in (tokenizer, config):
        value = getattr(source, "pad_token_id", None)
        if isinstance(value, int):
            return value
    return 0


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _rows_from_texts(texts: list[Any], config: Any, tokenizer: Any) -> list[dict[str, list[int]]]:
    """Strings (a causal text, or an encoder-decoder source that its decoder reads too) or (source, target)
    pairs, tokenized and cut to the model's position limit."""
    if tokenizer is None:
        raise ValueError(
            "Calibration texts need a tokenizer to become token ids; pass tokenizer=... (--tokenizer on the CLI)."
        )
    limit = _max_positions(config)
    rows = []
    for text in texts:
        source, target = (text, text) if isinstance(text, str) else text
        row = {"input_ids": tokenizer(source, truncation=limit is not None, max_length=limit)["input_ids"]}
        if config.is_encoder_decoder:
            row["labels"] = tokenizer(target, truncation=limit is not None, max_length=limit)["input_ids"]
        rows.append(row)
    return rows


def _batches_from_rows(rows: list[Mapping[str, Any]], config: Any, pad_id: int, batch_size: int) -> list[dict]:
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {"input_ids": _pad([r["input_ids"] for r in chunk], pad_id)}
        if all(r.get("attention_mask") is not None for r in chunk):
            batch["attention_mask"] = _pad([r["attention_mask"] for r in chunk], 0)
        else:
            batch["attention_mask"] = _pad([[1] * len(r["input_ids"]) for r in chunk], 0)
        if config.is_encoder_decoder:
            if all(r.get("labels") is not None for r in chunk):
                batch["labels"] = _pad([r["labels"] for r in chunk], -100)
            else:
                batch["decoder_input_ids"] = _pad([r["decoder_input_ids"] for r in chunk], pad_id)
                batch["decoder_attention_mask"] = _pad([[1] * len(r["decoder_input_ids"]) for r in chunk], 0)
        batches.append(batch)
    return batches


def _check_batch(batch: Mapping[str, Any], config: Any) -> dict[str, torch.Tensor]:
    if not isinstance(batch.get("input_ids"), torch.Tensor):
        raise ValueError(
            "A calibration batch has no input_ids tensor; give batches of tensors, rows with input_ids, or texts "
            "with a tokenizer."
        )
    if config.is_encoder_decoder and not any(k in batch for k in ("labels", "decoder_input_ids")):
        raise ValueError(
            "Calibration batches for an encoder-decoder model need labels (or decoder_input_ids) so that the "
            "decoder runs too; add the target token ids."
        )
    return {k: v for k, v in batch.items() if k in MODEL_KEYS and isinstance(v, torch.Tensor)}


def calibration_batches(
    calibration: Any,
    model_or_config: Any,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_rows: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of tensors for the model to run on, from whatever calibration data was given.

    ``calibration`` may be batches already (mappings of tensors: used as they are, ``max_rows`` counts batches
    then), a ``datasets.Dataset`` or list of rows with ``input_ids`` (and ``attention_mask``; an encoder-decoder
    needs ``labels`` or ``decoder_input_ids``), or texts with a ``tokenizer``: strings (an encoder-decoder's decoder
    reads the source too) or ``(source, target)`` pairs. Rows are padded with the pad id, labels with -100.
    Anything unusable is one ValueError naming what to give instead.
    """
    config = _config(model_or_config)
    if isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise ValueError(
            f"calibration must be a list of batches, rows or texts (or a datasets.Dataset), not "
            f"{type(calibration).__name__}; pass e.g. a list of texts."
        )
    items = []
    for item in calibration:
        if max_rows is not None and len(items) >= max_rows:
            break
        items.append(item)
    if not items:
        raise ValueError("The calibration data is empty; give at least one batch, row or text.")
    first = items[0]
    if isinstance(first, Mapping) and any(isinstance(v, torch.Tensor) for v in first.values()):
        return [_check_batch(batch, config) for batch in items]
    if isinstance(first, (str, tuple)):
        items = _rows_from_texts(items, config, tokenizer)
    elif not isinstance(first, Mapping):
        raise ValueError(
            f"Calibration items must be batches, rows (dicts with input_ids) or texts, not {type(first).__name__}; "
            "convert them to one of those."
        )
    if any(row.get("input_ids") is None for row in items):
        raise ValueError("A calibration row has no input_ids; tokenize the data first, or give texts with a tokenizer.")
    if any(len(row["input_ids"]) == 0 for row in items):
        raise ValueError("A calibration row has no tokens (empty input_ids); drop empty rows.")
    if config.is_encoder_decoder and any(
        row.get("labels") is None and row.get("decoder_input_ids") is None for row in items
    ):
        raise ValueError(
            "Calibration rows for an encoder-decoder model need labels (or decoder_input_ids) so that the "
            "decoder runs too; add the target token ids."
        )
    limit = _max_positions(config)
    if limit is not None:  # a row past the model's positions would fail inside the forward
        items = [{k: (v[:limit] if k in MODEL_KEYS and v is not None else v) for k, v in row.items()} for row in items]
    return _batches_from_rows(items, config, _pad_id(config, tokenizer), batch_size)


def read_calibration_file(
    path: str | os.PathLike,
    is_encoder_decoder: bool,
    text_column: str = "text",
    source_column: str = "article",
    target_column: str = "highlights",
) -> list[Any]:
    """Calibration rows or texts from a file: a ``save_to_disk`` folder, ``.jsonl``, ``.json`` (a list of
    objects), ``.csv`` or ``.txt`` (one text per line). Rows holding ``input_ids`` are used as they are; otherwise
    the text column (causal models) or the source and target columns (encoder-decoder) give texts to tokenize."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"calibration file {str(path)!r}: no such file or folder; give an existing path.")
    suffix = path.suffix.lower()
    if path.is_dir():
        from datasets import Dataset, load_from_disk

        from hf_kd.data import is_saved_dataset

        if not is_saved_dataset(str(path)):
            raise ValueError(
                f"calibration folder {str(path)!r} was not written by save_to_disk; give such a folder, or a .jsonl, "
                ".json, .csv or .txt file."
            )
        data = load_from_disk(str(path))
        if not isinstance(data, Dataset):
            if "train" not in data:
                raise ValueError(
                    f"calibration folder {str(path)!r} holds splits {sorted(data)} and no 'train'; save one split "
                    "with save_to_disk and pass its folder."
                )
            data = data["train"]
        rows: list[Any] = list(data)
    elif suffix in (".txt", ".jsonl", ".json", ".csv"):
        try:
            rows = _read_rows(path, suffix)
        except (ValueError, csv.Error) as err:  # not JSON, not UTF-8, a broken CSV
            raise ValueError(
                f"calibration file {str(path)!r} cannot be read as {suffix} ({' '.join(str(err).split())[:200]}); "
                "fix the file or give another."
            ) from None
        if suffix == ".txt":
            return rows
    else:
        raise ValueError(
            f"calibration file {str(path)!r}: unknown format {suffix or '(no suffix)'}; use .jsonl, .json, .csv, "
            ".txt or a save_to_disk folder."
        )
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError(
            f"calibration file {str(path)!r} is not a list of rows; give a list of JSON objects, one per row."
        )
    if not rows or "input_ids" in rows[0]:
        return rows
    columns = [source_column, target_column] if is_encoder_decoder else [text_column]
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        options = "--source-column/--target-column" if is_encoder_decoder else "--text-column"
        raise ValueError(
            f"calibration file {str(path)!r} has no column {missing[0]!r} (it has {sorted(rows[0])}); name the "
            f"columns with {options}."
        )
    if is_encoder_decoder:
        return [(str(r[source_column]), str(r[target_column])) for r in rows]
    return [str(r[text_column]) for r in rows]


def _read_rows(path: Path, suffix: str) -> Any:
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".json":
        return json.loads(text)
    return list(csv.DictReader(text.splitlines()))
