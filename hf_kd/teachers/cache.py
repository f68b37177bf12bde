"""Training from a teacher cache: load and validate it, join it to the training rows, collate it, score with it.

A cache written by :func:`hf_kd.teachers.cache_writer.build_teacher_cache` has one row per training example.
``attach`` checks that the training data set is the one the cache was made for and adds the cache's columns to it
(prefixed ``teacher_``), so that shuffling, sampling and sharding the data set keep each example with its cache row;
:class:`CacheCollator` takes those columns out of the features, runs the ordinary collator on the rest and
adds ``batch["teacher_cache"]``, which ``Trainer._prepare_inputs`` moves to the device like any tensor dict.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets

from hf_kd.errors import ConfigError
from hf_kd.losses import DistillationLossOutput
from hf_kd.losses.topk import TopKRows, check_tail_treatment, sparse_distillation_loss
from hf_kd.teachers.base import RowRequest, TeacherPass
from hf_kd.teachers.cache_writer import CACHE_KIND, COMMAND, dataset_hash, tokenizer_hash
from hf_kd.teachers.loading import output_width
from hf_kd.teachers.shards import ShardError, load_sharded

PREFIX = "teacher_"
CACHE_FIELDS = ("target_ids", "topk_ids", "topk_logprobs", "tail_logmass")
TAIL_SAMPLE_FIELDS = ("tail_ids", "tail_plogp")
CACHE_COLUMNS = tuple(PREFIX + name for name in CACHE_FIELDS + TAIL_SAMPLE_FIELDS)
BATCH_KEY = "teacher_cache"


def cache_fields(tail_samples: int) -> tuple[str, ...]:
    """The columns a cache row holds: the tail samples' only when it has some."""
    return CACHE_FIELDS + (TAIL_SAMPLE_FIELDS if tail_samples else ())


class CacheMismatchError(ConfigError):
    """The cache was made for another tokenizer, data set or temperature than the training run uses (a
    :class:`~hf_kd.recipe.args.ConfigError`: ``hf-kd distill`` prints it as one line)."""


class CachedTeacher:
    """A finished top-k teacher cache, checked on load (missing shards, row counts, checksums): a bad one raises
    :class:`hf_kd.teachers.shards.ShardError`, whose one-line message names the fix.

    Args:
        path: the cache folder.
        verify: recompute the shards' checksums (reads the whole cache once).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = str(path)
        self.data, manifest = load_sharded(path, verify=verify, command=COMMAND)
        self.fingerprint: dict[str, Any] = manifest["fingerprint"]
        if self.fingerprint.get("kind") != CACHE_KIND:
            raise ShardError(
                f"{path} is not a teacher cache (kind {self.fingerprint.get('kind')!r}); point teacher_cache at a "
                f"folder written by {COMMAND}."
            )
        self.k: int = self.fingerprint["k"]
        self.temperature: float = self.fingerprint["temperature"]
        self.vocab_size: int = self.fingerprint["vocab_size"]
        self.is_encoder_decoder: bool = self.fingerprint["is_encoder_decoder"]
        self.tail_samples: int = self.fingerprint.get("tail_samples", 0)
        self.fields = cache_fields(self.tail_samples)

    def __repr__(self) -> str:
        return (
            f"CachedTeacher({self.path!r}, rows={len(self.data)}, k={self.k}, tail_samples={self.tail_samples}, "
            f"temperature={self.temperature}, teacher={self.fingerprint.get('teacher_name')!r})"
        )

    # ---- checks ---------------------------------------------------------------------------------------

    def check_tokenizer(self, tokenizer: Any) -> None:
        expected = self.fingerprint.get("tokenizer_sha256")
        if expected is not None and tokenizer is not None and tokenizer_hash(tokenizer) != expected:
            raise CacheMismatchError(
                f"The teacher cache {self.path} was made with another tokenizer than "
                f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} (their vocabularies differ), so "
                "its token ids mean other tokens. Rebuild the cache with the student's tokenizer."
            )

    def check_dataset(self, dataset: Dataset) -> None:
        if len(dataset) != self.fingerprint["dataset_rows"]:
            raise CacheMismatchError(
                f"The teacher cache {self.path} was made for another data set: {self.fingerprint['dataset_rows']} "
                f"rows, this one has {len(dataset)}; train on the rows it was made for, or rebuild it with {COMMAND} "
                "--dataset on these."
            )
        if dataset_hash(dataset) != self.fingerprint["dataset_sha256"]:
            raise CacheMismatchError(
                f"The teacher cache {self.path} was made for another data set: the tokenised rows (input_ids / "
                "labels) differ from those it was computed on. Rebuild it with `hf-kd cache-teacher`."
            )

    def check_temperature(self, temperature: float) -> None:
        if abs(float(temperature) - self.temperature) > 1e-9:
            raise CacheMismatchError(
                f"The teacher cache {self.path} holds log-probabilities at temperature {self.temperature}, but "
                f"training asks for {temperature}: set temperature={self.temperature} or rebuild the cache."
            )

    def check_student(self, student: torch.nn.Module) -> None:
        if bool(getattr(student.config, "is_encoder_decoder", False)) != self.is_encoder_decoder:
            kinds = {True: "encoder-decoder", False: "causal"}
            raise CacheMismatchError(
                f"The teacher cache {self.path} was made by a {kinds[self.is_encoder_decoder]} teacher, but the "
                f"student is {kinds[not self.is_encoder_decoder]}; use a student of the teacher's kind."
            )
        width = output_width(student)
        if width < self.vocab_size:
            raise CacheMismatchError(
                f"The student's output layer has {width} columns but the cache's vocabulary has {self.vocab_size}; "
                "resize it with student.resize_token_embeddings(len(tokenizer))."
            )

    def tail_treatment(self, requested: str, loss: str) -> str:
        """The tail treatment to train with: ``"auto"`` is ``"sampled"`` when the cache has tail samples (an
        unbiased estimate, forward KL only), else ``"bucket"``; a request the cache or loss cannot serve fails."""
        if requested == "auto":
            requested = "sampled" if self.tail_samples and loss == "forward_kl" else "bucket"
        if requested == "sampled" and not self.tail_samples:
            raise CacheMismatchError(
                f"teacher_cache_tail='sampled' needs tail samples, and {self.path} has none: rebuild it with "
                "`hf-kd cache-teacher --tail-samples 64`, or use 'bucket' or 'uniform'."
            )
        check_tail_treatment(requested, loss)
        return requested

    # ---- joining and collating ------------------------------------------------------------------------

    def attach(self, dataset: Dataset, tokenizer: Any = None) -> Dataset:
        """``dataset`` with the cache's columns added, after checking it is the data set the cache was made for.

        The cache columns come back as numpy arrays (the rest unchanged), which collate much faster than lists.
        """
        self.check_dataset(dataset)
        self.check_tokenizer(tokenizer)
        columns = [PREFIX + name for name in self.fields]
        cache = self.data.rename_columns({name: PREFIX + name for name in self.fields}).select_columns(columns)
        joined = concatenate_datasets([dataset.remove_columns(_present(dataset, CACHE_COLUMNS)), cache], axis=1)
        return joined.with_format("numpy", columns=columns, output_all_columns=True)

    def collator(self, base: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> CacheCollator:
        return CacheCollator(base=base, k=self.k, tail_samples=self.tail_samples)

    def loss(
        self, student_logits: torch.Tensor, cache_batch: dict[str, torch.Tensor], labels: torch.Tensor, **kwargs: Any
    ) -> DistillationLossOutput:
        """:func:`hf_kd.losses.topk.sparse_distillation_loss` after checking the temperature and vocabulary."""
        self.check_temperature(kwargs.get("temperature", 1.0))
        if student_logits.shape[-1] != self.vocab_size:
            raise CacheMismatchError(
                f"Student logits have {student_logits.shape[-1]} columns; slice them to the cache's vocabulary "
                f"({self.vocab_size})."
            )
        return sparse_distillation_loss(student_logits, cache_batch, labels, **kwargs)

    def source(self, tail_treatment: str) -> CacheRows:
        """This cache as the trainer's teacher source, its tail read as ``tail_treatment`` (see
        :meth:`tail_treatment`)."""
        return CacheRows(tail_treatment)


class CacheRows:
    """A teacher cache as a teacher source: the batch's cached top-k rows, or ``None`` for rows without a cache
    (an evaluation set), which the loss scores by cross-entropy alone."""

    def __init__(self, tail_treatment: str) -> None:
        self.tail_treatment = tail_treatment

    def student_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inputs.items() if k != BATCH_KEY}

    def rows(self, request: RowRequest) -> TeacherPass:
        rows = request.inputs.get(BATCH_KEY)  # computed ahead of training
        return TeacherPass(TopKRows.from_batch(rows, self.tail_treatment) if rows is not None else None)


def _present(dataset: Dataset, columns: tuple[str, ...]) -> list[str]:
    return [c for c in columns if c in dataset.column_names]


@dataclass
class CacheCollator:
    """Wraps a collator: cache columns become ``batch["teacher_cache"]``, one row per target token.

    Features without cache columns are passed to ``base`` unchanged, so one collator serves a training set
    with a cache and an evaluation set without one.

    The rows are concatenated in feature order, which is the row-major order of the batch's target tokens:
    what the loss selects with ``labels != -100``.
    """

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    k: int
    tail_samples: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features or PREFIX + CACHE_FIELDS[0] not in features[0]:
            return self.base(features)  # rows without a cache (e.g. an evaluation set): the plain batch
        fields = cache_fields(self.tail_samples)
        parts = {name: [] for name in fields}
        rest = []
        for feature in features:
            feature = dict(feature)
            for name in fields:
                parts[name].append(np.asarray(feature.pop(PREFIX + name)))
            rest.append(feature)
        batch = self.base(rest)
        flat = {name: np.concatenate(values) for name, values in parts.items()}
        batch[BATCH_KEY] = {
            "target_ids": torch.from_numpy(flat["target_ids"].astype(np.int64)),
            "topk_ids": torch.from_numpy(flat["topk_ids"].astype(np.int64)).view(-1, self.k),
            # float16 on the way to the device (half the bytes); the loss casts to float32.
            "topk_logprobs": torch.from_numpy(flat["topk_logprobs"].astype(np.float16)).view(-1, self.k),
            "tail_logmass": torch.from_numpy(flat["tail_logmass"].astype(np.float32)),
        }
        if self.tail_samples:
            ids = torch.from_numpy(flat["tail_ids"].astype(np.int64)).view(-1, self.tail_samples)
            batch[BATCH_KEY].update(tail_ids=ids, tail_plogp=torch.from_numpy(flat["tail_plogp"].astype(np.float32)))
        return batch
