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
weights hashes), the tokenizer (vocabulary hash), the data set (content hash of the columns the teacher
reads), ``k``, the temperature and the vocabulary size. :class:`hf_kd.teachers.cache.CachedTeacher` reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
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
from hf_kd.teachers.shards import data_files, load_sharded, shard_dir, write_sharded

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
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
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
        "teacher_config_sha256": config_hash(teacher),
        "teacher_weights_sha256": weights_hash(teacher),
        "teacher_name": str(getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__),
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
        inputs["decoder_input_ids"] = teacher.prepare_decoder_input_ids_from_labels(labels=targets)
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
    device = next(teacher.parameters()).device
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
    """
    is_ed = bool(getattr(teacher.config, "is_encoder_decoder", False))
    check_tokenised(dataset, "the data set", is_encoder_decoder=is_ed)
    vocab_size = len(tokenizer) if tokenizer is not None else int(teacher.get_output_embeddings().weight.shape[0])
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


# ---- command line -----------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cache-teacher",
        help="Run a teacher once over a tokenised data set and store its top-k log-probabilities.",
        description="Writes a resumable top-k teacher cache (see docs/cache.md); run it again to resume.",
    )
    parser.add_argument("--teacher", required=True, help="Teacher model folder or Hub id.")
    parser.add_argument("--dataset", required=True, help="A tokenised data set saved with save_to_disk.")
    parser.add_argument("--split", default=None, help="Split to cache when --dataset is a DatasetDict.")
    parser.add_argument(
        "--output", required=True, help="Cache folder (created; when it exists, verified, repaired and resumed)."
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the teacher's).")
    parser.add_argument("--k", type=int, default=64, help="Teacher tokens kept per position (default 64).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature of the cache.")
    parser.add_argument(
        "--tail-samples",
        type=int,
        default=0,
        help="Also draw this many tokens per position from the teacher's tail (2 bytes each), for the unbiased "
        "'sampled' tail treatment (default 0: none).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tail samples.")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per teacher forward pass (default 8).")
    parser.add_argument("--shard-size", type=int, default=1000, help="Rows per resumable shard.")
    add_teacher_runtime_options(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a cache made with other settings (deletes its manifest and shards, nothing else).",
    )
    parser.set_defaults(run=run)
    return parser


def add_teacher_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --trust-remote-code: how a command that runs the teacher loads it."""
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


def run_command(command: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``body(args)``, with a :class:`ConfigError` (bad input: arguments, data, models, an output folder) printed
    as one line, exit code 2, as ``hf-kd distill`` does."""
    try:
        return body(args)
    except ConfigError as err:
        print(f"hf-kd {command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


def _looks_local(name: str) -> bool:
    """A path, not a Hub id (``name`` or ``org/name``): the Hub's own error for it is misleading."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name


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
            f"--dataset {path} cannot be read as a saved data set ({_first_line(err)}); pass a folder written by "
            "Dataset.save_to_disk, or save it again."
        ) from None
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise ConfigError(f"--dataset {path} is a DatasetDict with splits {sorted(data)}; choose one with --split.")
        data = data[split]
    return data


def _load_teacher_for_cli(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    from safetensors import SafetensorError

    from hf_kd.teachers.loading import load_teacher

    folder = Path(args.teacher)
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("pytorch_model*.bin")):
        raise ConfigError(
            f"--teacher {args.teacher} holds only pytorch_model.bin weights, and hf-kd loads safetensors only "
            "(a pickle can run code); convert it once with from_pretrained(folder, use_safetensors=False) and "
            "save_pretrained(folder)."
        )
    if not folder.exists() and _looks_local(args.teacher):
        raise ConfigError(f"--teacher {args.teacher} does not exist; pass a model folder or a Hub id.")
    kwargs = {} if args.dtype == "auto" else {"dtype": getattr(torch, args.dtype)}
    options = argparse.Namespace(trust_remote_code=args.trust_remote_code, teacher_model_init_kwargs=kwargs)
    try:
        return load_teacher(args.teacher, options)
    except SafetensorError as err:
        raise ConfigError(
            f"--teacher {args.teacher}: its safetensors weights cannot be read ({_first_line(err)}), so the file is "
            "truncated or corrupt; copy or save the model again."
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"--teacher {args.teacher} cannot be loaded ({_first_line(err)}); pass a folder written by "
            "save_pretrained (config.json and safetensors weights) or a Hub id."
        ) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def _load_tokenizer_for_cli(name: str, trust_remote_code: bool, option: str = "--tokenizer") -> Any:
    from transformers import AutoTokenizer

    from hf_kd.teachers.loading import has_vocabulary

    if not Path(name).exists() and _looks_local(name):
        raise ConfigError(
            f"{option} {name} does not exist; pass the folder holding the tokenizer files, or leave --tokenizer "
            "out to use the teacher's."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{option} {name}: its tokenizer cannot be loaded ({_first_line(err)}); pass a folder written by "
            "tokenizer.save_pretrained or a Hub id with --tokenizer."
        ) from None
    if not has_vocabulary(tokenizer):  # transformers 5 builds an empty tokenizer for a folder without its files
        raise ConfigError(f"{option} {name} holds no tokenizer files; pass the folder the tokenizer was saved to.")
    return tokenizer


def _device(name: str | None) -> torch.device:
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


def load_model_for_cli(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The teacher (on ``--device``) and its tokenizer, or ``--tokenizer``; any failure is a ConfigError."""
    device = _device(args.device)
    teacher, tokenizer = _load_teacher_for_cli(args)
    if args.tokenizer:
        tokenizer = _load_tokenizer_for_cli(args.tokenizer, args.trust_remote_code)
    elif tokenizer is None and any((Path(args.teacher) / name).is_file() for name in TOKENIZER_FILES):
        # load_teacher takes an unreadable tokenizer for none; here it would silently cache another vocabulary
        tokenizer = _load_tokenizer_for_cli(args.teacher, args.trust_remote_code, option="--teacher")
    return teacher.to(device), tokenizer


def _check_cli_numbers(args: argparse.Namespace) -> None:
    """Before any model is loaded: the settings that cannot be right whatever the teacher."""
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        raise ConfigError(f"--temperature {args.temperature} must be a positive number; use e.g. 1.0 or 2.0.")
    for option, value, least, example in (
        ("--k", args.k, 1, 64),
        ("--tail-samples", args.tail_samples, 0, 64),
        ("--batch-size", args.batch_size, 1, 8),
        ("--shard-size", args.shard_size, 1, 1000),
    ):
        if value < least:
            raise ConfigError(f"{option} {value} must be {least} or more; pass e.g. {option} {example}.")


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


def run(args: argparse.Namespace) -> int:
    return run_command("cache-teacher", _cache_teacher, args)


def _cache_teacher(args: argparse.Namespace) -> int:
    _check_cli_numbers(args)
    dataset = load_tokenised(args.dataset, args.split)
    check_tokenised(dataset, f"--dataset {args.dataset}")
    teacher, tokenizer = load_model_for_cli(args)
    rebuilt: list[int] = []
    path = build_teacher_cache(
        teacher,
        dataset,
        args.output,
        tokenizer=tokenizer,
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        tail_samples=args.tail_samples,
        seed=args.seed,
        on_rebuild=rebuild_reporter(args.output, rebuilt),
    )
    size = cache_size(path)
    per_token = size["bytes_per_target_token"]
    print(
        f"Cache written to {path}{rebuilt_note(rebuilt)}: {size['target_tokens']} target tokens, "
        f"{per_token:.0f} bytes each."
    )
    return 0
