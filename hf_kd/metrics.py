"""Offline evaluation metrics: ROUGE, perplexity, parameter counts and generation speed.

Nothing here reaches the Hub: ROUGE is hf_kd's local `evaluate` metric (:data:`ROUGE_PATH`, a copy of the Hub's
``rouge`` on the same ``rouge_score`` package) and the rest is plain torch.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hf_kd.losses.base import IGNORE_INDEX
from hf_kd.teachers.placement import input_device

if TYPE_CHECKING:
    from evaluate import EvaluationModule

DEFAULT_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_PATH = str(Path(__file__).resolve().parent / "evaluate_metrics" / "rouge")
"""The folder of hf_kd's ROUGE `evaluate` module: ``evaluate.load(ROUGE_PATH)`` works offline."""


# ---- ROUGE -----------------------------------------------------------------------------------------------


def load_metric(name_or_path: str = "rouge", **load_kwargs: Any) -> EvaluationModule:
    """``evaluate.load`` with ``"rouge"`` meaning hf_kd's local ROUGE; any other name or path goes to evaluate.

    A Hub metric name loads offline only when it is already in evaluate's cache. ``keep_in_memory`` defaults to
    True: the predictions are held in memory rather than in cache files that concurrent processes would share.
    """
    import evaluate  # imported on use: it is slow to import and most of hf_kd does not need it

    load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(ROUGE_PATH if name_or_path == "rouge" else name_or_path, **load_kwargs)


def load_rouge(**load_kwargs: Any) -> EvaluationModule:
    """hf_kd's ROUGE `evaluate` metric: ``load_rouge().compute(predictions=..., references=...)``.

    Arguments, defaults and result keys are those of ``evaluate.load("rouge")`` (see :data:`ROUGE_PATH`).
    """
    return load_metric("rouge", **load_kwargs)


@functools.lru_cache(maxsize=1)
def _shared_rouge() -> EvaluationModule:
    return load_rouge()  # loaded once per process: `rouge` is called once per evaluation or batch


def rouge(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    rouge_types: Sequence[str] | None = None,
    use_aggregator: bool = True,
    use_stemmer: bool = False,
    tokenizer: Callable[[str], list[str]] | None = None,
) -> dict[str, Any]:
    """ROUGE F-measures in [0, 1] from hf_kd's local `evaluate` metric (:func:`load_rouge`).

    ``references`` holds one string per prediction, or a list of strings (the best-matching one counts).
    With ``use_aggregator`` each key maps to the mean F-measure over the examples; without it, to the list of
    per-example F-measures. Unlike the Hub's ``rouge``, the mean is exact rather than the median of bootstrap
    resamples (which approximates it), so the result is deterministic.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    rouge_types = list(rouge_types or DEFAULT_ROUGE_TYPES)
    if not predictions:  # evaluate refuses an empty batch
        return {key: [] if not use_aggregator else 0.0 for key in rouge_types}
    if not all(isinstance(r, str) for r in references):  # evaluate wants one reference format for the batch
        references = [[r] if isinstance(r, str) else list(r) for r in references]
    return _shared_rouge().compute(
        predictions=list(predictions),
        references=list(references),
        rouge_types=rouge_types,
        use_aggregator=use_aggregator,
        use_stemmer=use_stemmer,
        tokenizer=tokenizer,
    )


class Rouge:
    """A drop-in for ``evaluate.load("rouge")`` in ``compute_metrics`` code: ``Rouge().compute(...)``."""

    def compute(self, *, predictions: Sequence[str], references: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
        return rouge(predictions, references, **kwargs)


# ---- perplexity ------------------------------------------------------------------------------------------


def _pad_collate(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every sequence column to the longest row: labels with -100, masks with 0, ids with the pad."""
    batch = {}
    for key in features[0]:
        rows = [torch.as_tensor(f[key]) for f in features]
        if rows[0].dim() == 0:
            batch[key] = torch.stack(rows)
            continue
        fill = IGNORE_INDEX if key == "labels" else 0 if "attention_mask" in key else pad_token_id
        batch[key] = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)
    return batch


@torch.no_grad()
def cross_entropy_sum(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    batch_size: int = 8,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
) -> tuple[float, int]:
    """Summed cross-entropy (nats) over the target tokens of ``dataset``, and the number of those tokens.

    Targets are ``labels`` != -100 (shifted by one for causal models); a causal row without labels is scored
    on its attention-masked ``input_ids``. ``data_collator`` defaults to right padding with the model's
    ``pad_token_id`` (0 when it has none).
    """
    config = getattr(model, "config", None)
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if data_collator is None:
        pad = getattr(config, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)

        def data_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return _pad_collate(features, pad)

    device = input_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows: list[dict[str, Any]] = []
    try:
        for row in [*dataset, None]:
            if row is not None:
                rows.append(row)
                if len(rows) < batch_size:
                    continue
            if not rows:
                break
            batch = {k: v.to(device) for k, v in data_collator(rows).items() if isinstance(v, torch.Tensor)}
            rows = []
            labels = batch.pop("labels", None)
            if labels is None:
                if is_encoder_decoder:
                    raise ValueError("An encoder-decoder model needs `labels` (the decoder targets) to be scored.")
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
                labels = batch["input_ids"].masked_fill(mask.eq(0), IGNORE_INDEX)
            if is_encoder_decoder and "decoder_input_ids" not in batch:
                batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = model(**batch, use_cache=False).logits.float()
            if not is_encoder_decoder:
                logits, labels = logits[:, :-1], labels[:, 1:]
            total += nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int(labels.ne(IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total, count


def perplexity(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    batch_size: int = 8,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
) -> float:
    """Token-weighted perplexity: ``exp(sum of CE / number of target tokens)`` over the whole dataset.

    Works for causal and encoder-decoder models; see :func:`cross_entropy_sum` for what is counted.
    """
    total, count = cross_entropy_sum(model, dataset, batch_size=batch_size, data_collator=data_collator)
    if count == 0:
        raise ValueError("The dataset has no target tokens (all labels are -100).")
    return math.exp(total / count)


# ---- size and speed --------------------------------------------------------------------------------------


def count_parameters(model: nn.Module, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
    """Number of parameters, tied weights counted once (``PreTrainedModel.num_parameters`` when available)."""
    if hasattr(model, "num_parameters"):
        return int(model.num_parameters(only_trainable=trainable_only, exclude_embeddings=exclude_embeddings))
    if exclude_embeddings:
        raise ValueError("exclude_embeddings needs a transformers PreTrainedModel.")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _new_token_counts(new_tokens: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """Tokens generated per row, up to and including the first end-of-sequence token (the rest is padding)."""
    if eos_token_id is None:
        return torch.full((new_tokens.size(0),), new_tokens.size(1))
    eos = torch.isin(new_tokens, torch.as_tensor(eos_token_id, device=new_tokens.device).reshape(-1))
    after_eos = (eos.int().cumsum(dim=1) - eos.int()) > 0
    return (~after_eos).sum(dim=1).cpu()


@torch.no_grad()
def generation_speed(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    fixed_length: bool = True,
    warmup: bool = True,
    max_input_length: int | None = None,
    **generate_kwargs: Any,
) -> dict[str, float]:
    """Greedy generation throughput over ``texts``: ``{"tokens_per_second", "new_tokens", "seconds"}``.

    With ``fixed_length`` every row generates exactly ``max_new_tokens`` tokens (``min_new_tokens`` is set),
    so models are timed on the same amount of work whatever they predict. Rows are left-padded for causal
    models. ``warmup`` first runs one untimed batch.
    """
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1, **generate_kwargs}
    if fixed_length:
        kwargs["min_new_tokens"] = max_new_tokens
    if getattr(model.generation_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    device = input_device(model)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if is_encoder_decoder else "left"
    was_training = model.training
    model.eval()
    batches = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    try:
        encoded = [
            tokenizer(
                b,
                return_tensors="pt",
                padding=True,
                truncation=max_input_length is not None,
                max_length=max_input_length,
            ).to(device)
            for b in batches
        ]
        if warmup and encoded:
            model.generate(**encoded[0], **kwargs)
        new_tokens, seconds = 0, 0.0
        for inputs in encoded:
            start = time.perf_counter()
            output = model.generate(**inputs, **kwargs)
            seconds += time.perf_counter() - start
            generated = output[:, 1:] if is_encoder_decoder else output[:, inputs["input_ids"].size(1) :]
            new_tokens += int(_new_token_counts(generated, eos).sum())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return {
        "tokens_per_second": new_tokens / seconds if seconds > 0 else float("nan"),
        "new_tokens": new_tokens,
        "seconds": seconds,
    }
