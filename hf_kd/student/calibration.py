"""Calibration batches: the few padded batches a teacher runs on to rank what pruning keeps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
        raise ValueError("Calibration texts need a tokenizer: pass tokenizer=... (the teacher's).")
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
            "A calibration batch has no input_ids tensor: give batches of tensors, rows with input_ids, or texts "
            "with a tokenizer."
        )
    if config.is_encoder_decoder and not any(k in batch for k in ("labels", "decoder_input_ids")):
        raise ValueError(
            "Calibration batches for an encoder-decoder model need labels (or decoder_input_ids) so that the "
            "decoder runs too: add the target token ids."
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
            f"calibration must be a list of batches, rows or texts (or a datasets.Dataset); got "
            f"{type(calibration).__name__}."
        )
    items = []
    for item in calibration:
        if max_rows is not None and len(items) >= max_rows:
            break
        items.append(item)
    if not items:
        raise ValueError("The calibration data is empty: give at least one batch, row or text.")
    first = items[0]
    if isinstance(first, Mapping) and any(isinstance(v, torch.Tensor) for v in first.values()):
        return [_check_batch(batch, config) for batch in items]
    if isinstance(first, (str, tuple)):
        items = _rows_from_texts(items, config, tokenizer)
    elif not isinstance(first, Mapping):
        raise ValueError(
            f"Calibration items must be batches, rows (dicts with input_ids) or texts; got {type(first).__name__}."
        )
    if any(row.get("input_ids") is None for row in items):
        raise ValueError("A calibration row has no input_ids: tokenize the data first, or give texts with a tokenizer.")
    if any(len(row["input_ids"]) == 0 for row in items):
        raise ValueError("A calibration row has no tokens (empty input_ids): drop empty rows.")
    if config.is_encoder_decoder and any(
        row.get("labels") is None and row.get("decoder_input_ids") is None for row in items
    ):
        raise ValueError(
            "Calibration rows for an encoder-decoder model need labels (or decoder_input_ids) so that the "
            "decoder runs too: add the target token ids."
        )
    return _batches_from_rows(items, config, _pad_id(config, tokenizer), batch_size)
