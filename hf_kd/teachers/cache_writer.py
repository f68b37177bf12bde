"""`hf-kd cache-teacher`: run the teacher once over a tokenised data set and keep its top-k log-probabilities.

For every target token (``labels != -100``; for causal models the shifted positions, as the trainer scores
them) the cache row of an example holds, flattened in target order:

* ``target_ids``: the target token ids (the labels), to check at training time that the rows line up;
* ``topk_ids``: the teacher's ``k`` most likely token ids, most likely first (uint16 when the vocabulary fits);
* ``topk_logprobs``: their log-probabilities at the cache's temperature (float16);
* ``tail_logmass``: ``log(1 - sum of the top-k probabilities)``, the teacher's mass on all other tokens
  (float32; computed as a log-sum-exp over the other tokens, so it is exact even when the tail is tiny);
* with ``tail_samples = m > 0`` also ``tail_ids``: ``m`` tokens drawn from the teacher's tail (its distribution
  outside the top-k, renormalised; systematic sampling, seeded, so a resumed run draws the same), and
  ``tail_plogp``: the tail's ``sum p log p`` (float32). They make the unbiased ``"sampled"`` tail treatment of
  :mod:`hf_kd.losses.topk` possible, for 2 bytes per sample.

The cache is a sharded, resumable :mod:`hf_kd.teachers.shards` folder; its fingerprint names the teacher (config and
weights hashes; every member and its weight for a :class:`~hf_kd.teachers.ensemble.TeacherEnsemble`), the
tokenizer (vocabulary hash), the data set (content hash of the columns the teacher reads), ``k``, the temperature
and the vocabulary size. :class:`hf_kd.teachers.cache.CachedTeacher` reads it. The command line is
:mod:`hf_kd.cli.cache_teacher`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetInfo, Features, Sequence, Value
from datasets.table import InMemoryTable
from torch import nn

from hf_kd.errors import ConfigError
from hf_kd.losses import IGNORE_INDEX, MIN_LOG_PROB, log_probs
from hf_kd.teachers.ensemble import TeacherEnsemble
from hf_kd.teachers.loading import output_width
from hf_kd.teachers.placement import input_device, state_tensors
from hf_kd.teachers.shards import Workers, data_files, load_sharded, shard_dir, write_sharded

CACHE_KIND = "hf-kd-teacher-topk-cache"
COMMAND = "`hf-kd cache-teacher`"
ROW_CHUNK = 1024
# Columns the teacher reads; the data set hash covers exactly these.
INPUT_COLUMNS = ("input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask")


# ---- fingerprints -----------------------------------------------------------------------------------------


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the token -> id map: what decides whether two tokenizers' ids mean the same tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def config_hash(model: nn.Module) -> str:
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(key, None)  # where a model was loaded from, not what it computes
    return _sha256_json(config)


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in state_tensors(model):  # offloaded weights read back, quantized ones as their parts
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_hash(dataset: Dataset, columns: tuple[str, ...] = INPUT_COLUMNS) -> str:
    """sha256 of the content of ``columns`` (those present), in row order: stable across processes and copies."""
    present = [c for c in columns if c in dataset.column_names]
    digest = hashlib.sha256(json.dumps([len(dataset), present]).encode())
    for table in dataset.select_columns(present).with_format("arrow").iter(batch_size=10_000):
        for name in present:
            column = table.column(name).combine_chunks()
            while pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                digest.update(np.asarray(pa.compute.list_value_length(column).fill_null(-1)).tobytes())
                column = column.flatten()
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                digest.update(json.dumps(column.to_pylist(), ensure_ascii=False).encode())
            else:
                digest.update(np.asarray(column.cast(pa.int64())).tobytes())
    return digest.hexdigest()


def _members(teacher: nn.Module) -> list[nn.Module]:
    """The models whose outputs make the teacher's: an ensemble's members, else the teacher itself."""
    return list(teacher.members) if isinstance(teacher, TeacherEnsemble) else [teacher]


def _model_name(model: nn.Module) -> str:
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


def teacher_identity(teacher: nn.Module) -> dict[str, Any]:
    """The fingerprint keys that say which teacher wrote a cache: its config and weights hashes and its name.

    An ensemble is named ``"A + B"`` (as :class:`hf_kd.DistillationTrainer` names it) and also records its
    members' names and mixture weights, which its weights hash does not cover; its config hash covers every
    member's config. A single teacher's keys are those of caches made before ensembles existed (they resume).
    """
    members = _members(teacher)
    names = [_model_name(member) for member in members]
    configs = [config_hash(member) for member in members]
    identity = {
        "teacher_config_sha256": configs[0] if len(members) == 1 else _sha256_json(configs),
        "teacher_weights_sha256": weights_hash(teacher),
        "teacher_name": " + ".join(names),
    }
    if isinstance(teacher, TeacherEnsemble):
        identity.update(teacher_names=names, teacher_weights=list(teacher.weights))
    return identity


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def cache_fingerprint(
    teacher: nn.Module,
    tokenizer: Any,
    dataset: Dataset,
    k: int,
    temperature: float,
    vocab_size: int,
    tail_samples: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    # Tail-sample keys only when used: caches made before they existed keep their fingerprint (and resume).
    tail = {"tail_samples": tail_samples, "tail_seed": seed, "tail_sampling": TAIL_SAMPLING} if tail_samples else {}
    return {
        "kind": CACHE_KIND,
        **teacher_identity(teacher),
        "tokenizer_sha256": tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "dataset_sha256": dataset_hash(dataset),
        "dataset_rows": len(dataset),
        "k": k,
        "temperature": float(temperature),
        "vocab_size": vocab_size,
        "is_encoder_decoder": bool(getattr(teacher.config, "is_encoder_decoder", False)),
        **tail,
    }


# ---- the teacher's top-k ----------------------------------------------------------------------------------


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_for_teacher(rows: list[dict[str, Any]], pad_token_id: int, is_encoder_decoder: bool) -> dict[str, Any]:
    """Right-padded model inputs and the target ids aligned with the logits (shifted for causal models)."""
    batch = {"input_ids": _pad([r["input_ids"] for r in rows], pad_token_id)}
    if "attention_mask" in rows[0]:
        batch["attention_mask"] = _pad([r["attention_mask"] for r in rows], 0)
    else:
        batch["attention_mask"] = _pad([[1] * len(r["input_ids"]) for r in rows], 0)
    if "labels" in rows[0]:
        labels = _pad([r["labels"] for r in rows], IGNORE_INDEX)
    elif is_encoder_decoder:
        raise ValueError("An encoder-decoder teacher needs a `labels` column (the decoder targets).")
    else:  # as the trainer does without labels: every attended input token is a target
        labels = batch["input_ids"].masked_fill(batch["attention_mask"].eq(0), IGNORE_INDEX)
    for name in ("decoder_input_ids", "decoder_attention_mask"):
        if name in rows[0]:
            batch[name] = _pad([r[name] for r in rows], pad_token_id if name == "decoder_input_ids" else 0)
    return {"inputs": batch, "targets": labels if is_encoder_decoder else labels[:, 1:]}


TAIL_SAMPLING = "systematic"  # recorded in the fingerprint: how the tail samples were drawn


def sample_tail(
    lp: torch.Tensor, top_ids: torch.Tensor, m: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` token ids per row from its distribution outside ``top_ids``, and that tail's ``sum p log p``, from the
    full log-probabilities ``lp [N, V]``.

    Systematic sampling: one uniform ``u`` per row and the points ``(u + j) / m``, j < m, of the tail's
    cumulative distribution. Every point is distributed as the tail, so the sample mean is an unbiased estimate
    (as with independent draws), but a token holding a share ``s`` of the tail is drawn ``floor(m s)`` or
    ``ceil(m s)`` times instead of a binomial count: much less noise where the tail's mass is.
    """
    p_tail = lp.exp().scatter_(-1, top_ids, 0.0)
    plogp = (p_tail * lp).sum(-1)
    empty = p_tail.sum(-1) <= 0  # a tail that underflowed in float32: its weight is ~0, any draw will do
    if empty.any():
        p_tail[empty] = torch.ones_like(p_tail[empty]).scatter_(-1, top_ids[empty], 0.0)
    cdf = p_tail.double().cumsum(-1)  # float64: the points must not fall past the last tail token by rounding
    u = torch.rand(lp.shape[0], 1, generator=generator, device=lp.device, dtype=torch.float64)
    total = cdf[:, -1:]
    points = (u + torch.arange(m, device=lp.device, dtype=torch.float64)) / m * total
    points = torch.minimum(points, torch.nextafter(total, torch.zeros_like(total)))  # below the total, always
    # right=True: the first token whose cumulative mass exceeds the point, which has a non-zero tail probability.
    return torch.searchsorted(cdf, points, right=True), plogp


@torch.no_grad()
def teacher_topk(
    teacher: nn.Module,
    inputs: dict[str, torch.Tensor],
    targets: torch.Tensor,
    k: int,
    temperature: float,
    vocab: int,
    tail_samples: int = 0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Top-k ids and log-probabilities and the tail log-mass at every target position, in row-major order;
    with ``tail_samples`` also the tail samples and ``sum p log p`` (see :func:`sample_tail`)."""
    inputs = dict(inputs)
    if getattr(teacher.config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
        # An ensemble's members share the decoder's start token (they share one tokenizer): the first shifts.
        inputs["decoder_input_ids"] = _members(teacher)[0].prepare_decoder_input_ids_from_labels(labels=targets)
    logits = teacher(**inputs, use_cache=False).logits
    if not getattr(teacher.config, "is_encoder_decoder", False):
        logits = logits[:, :-1]
    mask = targets.ne(IGNORE_INDEX)
    rows = logits[mask][:, :vocab]
    parts: dict[str, list[torch.Tensor]] = {"topk_ids": [], "topk_logprobs": [], "tail_logmass": []}
    if tail_samples:
        parts.update(tail_ids=[], tail_plogp=[])
    # Row chunks bound the float32 copies to ROW_CHUNK x vocab, whatever the batch (large vocabularies).
    for start in range(0, rows.shape[0], ROW_CHUNK):
        lp = log_probs(rows[start : start + ROW_CHUNK], temperature)
        top_lp, top_ids = lp.topk(k, dim=-1)
        # The tail as a log-sum-exp over the other tokens: log1p(-sum(exp(top))) would cancel to 0 or NaN when
        # the top-k hold nearly all the mass.
        tail = lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1).clamp_min(MIN_LOG_PROB)
        parts["topk_ids"].append(top_ids)
        parts["topk_logprobs"].append(top_lp)
        parts["tail_logmass"].append(tail)
        if tail_samples:
            ids, plogp = sample_tail(lp, top_ids, tail_samples, generator)
            parts["tail_ids"].append(ids)
            parts["tail_plogp"].append(plogp)
    widths = {"topk_ids": k, "topk_logprobs": k, "tail_ids": tail_samples}
    out = {name: torch.cat(values) if values else _empty(name, widths, rows) for name, values in parts.items()}
    return {"target_ids": targets[mask], **out}


def _empty(name: str, widths: dict[str, int], rows: torch.Tensor) -> torch.Tensor:
    """A batch without any target token still yields correctly shaped (empty) columns."""
    if name not in widths:
        return rows.new_zeros(0, dtype=torch.float32)
    return rows.new_zeros((0, widths[name]), dtype=torch.long if name.endswith("_ids") else torch.float32)


def cache_features(vocab_size: int, tail_samples: int = 0) -> Features:
    id_type = "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"
    features = {
        "target_ids": Sequence(Value(id_type)),
        "topk_ids": Sequence(Value(id_type)),
        "topk_logprobs": Sequence(Value("float16")),
        "tail_logmass": Sequence(Value("float32")),
    }
    if tail_samples:
        features.update(tail_ids=Sequence(Value(id_type)), tail_plogp=Sequence(Value("float32")))
    return Features(features)


def _rows_to_dataset(per_row: list[dict[str, np.ndarray]], features: Features) -> Dataset:
    """One Arrow list per column, built from numpy without a detour through Python lists."""
    columns = {}
    for name, feature in features.items():
        values = [row[name].reshape(-1) for row in per_row]
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
        flat = np.concatenate(values).astype(feature.feature.dtype) if values else np.zeros(0)
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return Dataset(InMemoryTable(pa.table(columns)), info=DatasetInfo(features=features))


def _shard_maker(teacher: nn.Module, dataset: Dataset, settings: dict[str, Any]):  # noqa: ANN202
    device = input_device(teacher)
    is_ed = bool(getattr(teacher.config, "is_encoder_decoder", False))
    features = cache_features(settings["vocab_size"], settings["tail_samples"])

    def make_shard(start: int, end: int, progress: Any) -> Dataset:
        rows = dataset.select(range(start, end))
        # Seeded per shard: a resumed run redraws the same tail samples for the shards it makes again.
        generator = torch.Generator(device=device).manual_seed(settings["seed"] * 1_000_003 + start)
        # Batches of similar length waste less compute on padding; results go back to row order below.
        lengths = [len(r) + (len(lab) if is_ed else 0) for r, lab in _lengths(rows, is_ed)]
        order = sorted(range(len(rows)), key=lambda i: -lengths[i])
        per_row: list[dict[str, np.ndarray] | None] = [None] * len(rows)
        for b in range(0, len(order), settings["batch_size"]):
            ids = order[b : b + settings["batch_size"]]
            batch = collate_for_teacher([rows[i] for i in ids], settings["pad_token_id"], is_ed)
            inputs = {key: value.to(device) for key, value in batch["inputs"].items()}
            targets = batch["targets"].to(device)
            out = teacher_topk(
                teacher, inputs, targets, settings["k"], settings["temperature"], settings["vocab_size"],
                settings["tail_samples"], generator,
            )  # fmt: skip
            counts = batch["targets"].ne(IGNORE_INDEX).sum(1).tolist()
            out = {name: value.cpu().numpy() for name, value in out.items()}
            offset = 0
            for i, count in zip(ids, counts, strict=True):
                per_row[i] = {name: value[offset : offset + count] for name, value in out.items()}
                offset += count
            progress.update(len(ids))
        return _rows_to_dataset(per_row, features)

    return make_shard


def _lengths(rows: Dataset, is_ed: bool) -> list[tuple[list[int], list[int]]]:
    labels = rows["labels"] if is_ed and "labels" in rows.column_names else [[]] * len(rows)
    return list(zip(rows["input_ids"], labels, strict=True))


def check_cache_settings(k: int, temperature: float, tail_samples: int, batch_size: int, vocab_size: int) -> None:
    if not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be a positive number; use e.g. 1.0 or 2.0.")
    if not 1 <= k <= vocab_size:
        raise ConfigError(f"k={k} must be between 1 and the vocabulary size {vocab_size}; pass a k in that range.")
    if tail_samples < 0 or (tail_samples and k == vocab_size):
        raise ConfigError(
            f"tail_samples={tail_samples} with k={k} of {vocab_size} tokens; use 0, or a positive count with k below "
            "the vocabulary size."
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be 1 or more rows; pass e.g. 8.")


def _is_int_list(feature: Any) -> bool:
    inner = getattr(feature, "feature", None)  # List / Sequence / LargeList of a Value
    return "int" in str(getattr(inner, "dtype", ""))


def check_tokenised(dataset: Dataset, name: str, is_encoder_decoder: bool | None = None) -> None:
    """Refuse a data set the teacher cannot read: no rows, no token ids, or no decoder targets for an
    encoder-decoder (``is_encoder_decoder=None``: not known yet)."""
    columns = ", ".join(dataset.column_names) or "none"
    if len(dataset) == 0:
        raise ConfigError(f"{name} has no rows; pass a data set with at least one example.")
    if "input_ids" not in dataset.column_names:
        raise ConfigError(
            f"{name} has no input_ids column (its columns: {columns}), so it is not tokenised; tokenise it first, "
            "e.g. with a recipe config's save_tokenized_train (see docs/cache.md)."
        )
    for column in ("input_ids", "labels"):
        if column in dataset.column_names and not _is_int_list(dataset.features[column]):
            raise ConfigError(
                f"{name}: column {column} holds {dataset.features[column]}, not lists of token ids; tokenise the "
                "data set first (see docs/cache.md)."
            )
    if is_encoder_decoder and "labels" not in dataset.column_names:
        raise ConfigError(
            f"{name} has no labels column (its columns: {columns}), and an encoder-decoder teacher needs the "
            "decoder targets; tokenise the targets into labels."
        )


def build_teacher_cache(
    teacher: nn.Module,
    dataset: Dataset,
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_size: int = 1000,
    overwrite: bool = False,
    on_shard: Any = None,
    tail_samples: int = 0,
    seed: int = 0,
    on_rebuild: Callable[[int, str], None] | None = None,
    workers: Workers | None = None,
) -> Path:
    """Run ``teacher`` over ``dataset`` (rows with ``input_ids`` and, for encoder-decoders, ``labels``) and
    write its top-``k`` cache to ``output_dir``; resumes an interrupted run with the same inputs.

    ``tokenizer`` fixes the vocabulary size (the logits are cut to ``len(tokenizer)``, as the trainer cuts them
    to the shared vocabulary) and is fingerprinted; ``temperature`` is baked into the stored log-probabilities.
    ``tail_samples`` tokens per target are also drawn from the teacher's tail (``seed`` seeds them), for the
    unbiased ``"sampled"`` tail treatment of :mod:`hf_kd.losses.topk`.

    Run again on a finished or interrupted cache, it first verifies the shards written so far and computes the
    missing or corrupt ones again (``on_rebuild(index, problem)`` is told of each). Bad arguments or data raise
    :class:`~hf_kd.recipe.args.ConfigError`; see :func:`hf_kd.teachers.shards.write_sharded` for ``overwrite``.

    ``workers`` (:class:`~hf_kd.teachers.shards.Workers`): this process's share of the shards (default: its rank's
    under ``torchrun`` / ``accelerate launch``, else all). The finished cache is identical whoever wrote which shard;
    the manifest is complete once the last share is done (read it with ``read_manifest(output_dir)["complete"]``).
    """
    is_ed = bool(getattr(teacher.config, "is_encoder_decoder", False))
    check_tokenised(dataset, "the data set", is_encoder_decoder=is_ed)
    vocab_size = len(tokenizer) if tokenizer is not None else output_width(teacher)
    check_cache_settings(k, temperature, tail_samples, batch_size, vocab_size)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(teacher.config, "pad_token_id", None) or 0
    settings = {"k": k, "temperature": temperature, "vocab_size": vocab_size, "batch_size": batch_size}
    settings.update(tail_samples=tail_samples, seed=seed)
    settings["pad_token_id"] = pad
    was_training = teacher.training
    teacher.eval()
    try:
        write_sharded(
            output_dir,
            cache_fingerprint(teacher, tokenizer, dataset, k, temperature, vocab_size, tail_samples, seed),
            len(dataset),
            shard_size,
            _shard_maker(teacher, dataset, settings),
            desc="Caching teacher top-k",
            overwrite=overwrite,
            on_shard=on_shard,
            on_rebuild=on_rebuild,
            command=COMMAND,
            workers=workers,
            # For information only: `datasets` fingerprints change with the code of every .map that made the
            # data, so the identity check is the content hash in the fingerprint.
            extra={"dataset_fingerprint": getattr(dataset, "_fingerprint", None)},
        )
    finally:
        teacher.train(was_training)
    return Path(output_dir)


def cache_size(path: str | os.PathLike) -> dict[str, float]:
    """Bytes on disk (Arrow files), target tokens, and bytes per target token of a finished cache."""
    data, manifest = load_sharded(path, verify=False, command=COMMAND)
    folders = [shard_dir(Path(path), int(index)) for index in manifest["shards"]]
    total = sum(f.stat().st_size for shard in folders for f in data_files(shard))
    tokens = int(pa.compute.sum(pa.compute.list_value_length(data.data.column("target_ids"))).as_py() or 0)
    return {"bytes": total, "target_tokens": tokens, "bytes_per_target_token": total / max(tokens, 1)}
