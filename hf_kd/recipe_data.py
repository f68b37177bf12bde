"""A recipe's data: load the raw splits (Hub, local files or the offline stdlib data set) and tokenise them."""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from hf_kd.recipe_args import STDLIB_DOCSTRINGS, ConfigError, DataArguments

# File extension -> the `datasets` packaged builder that reads it.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def load_raw_datasets(data_args: DataArguments, task: str) -> DatasetDict:
    """The raw splits named by ``data_args``; ``task`` is ``"seq2seq"`` or ``"causal"``.

    Missing files, unknown data sets and unreachable Hubs are :class:`ConfigError`\\ s naming what failed.
    """
    if data_args.dataset_name == STDLIB_DOCSTRINGS:
        from hf_kd.data import load_stdlib_docstrings

        return load_stdlib_docstrings(task="summarize" if task == "seq2seq" else "lm", cache_dir=data_args.cache_dir)
    if data_args.data_files is not None:
        files = data_args.data_files
        files = {data_args.train_split: files} if isinstance(files, str) else dict(files)
        for split, path in files.items():
            if not Path(path).is_file():
                raise ConfigError(f"data_files: the {split!r} file {str(path)!r} does not exist.")
        suffixes = {Path(p).suffix.lower() for p in files.values()}
        builders = {_BUILDERS.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise ConfigError(
                f"data_files: cannot read {sorted(suffixes)} files together; use one of {sorted(_BUILDERS)}."
            )
        try:
            return load_dataset(builders.pop(), data_files=files, cache_dir=data_args.cache_dir)
        except Exception as err:  # noqa: BLE001 - a malformed file: say which, in one line
            raise ConfigError(f"data_files {files}: cannot be read ({_one_line(err)}).") from None
    try:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=data_args.cache_dir)
    except Exception as err:  # noqa: BLE001 - DatasetNotFoundError, ConnectionError, ValueError ...
        raise ConfigError(
            f"dataset_name={data_args.dataset_name!r} (dataset_config_name={data_args.dataset_config_name!r}) "
            f"cannot be loaded: {_one_line(err)}"
        ) from None
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict({data_args.train_split: raw})
    return raw


def select_splits(raw: DatasetDict, data_args: DataArguments) -> tuple[Dataset, Dataset | None]:
    """The train split and the eval split (None when not configured or absent), cut to the sample limits."""
    if data_args.train_split not in raw:
        raise ConfigError(f"train_split={data_args.train_split!r} is not a split of the data: {sorted(raw)}.")
    train = raw[data_args.train_split]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    evaluation = raw[data_args.eval_split] if data_args.eval_split in raw else None
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def check_columns(dataset: Dataset, names: dict[str, str]) -> None:
    """``names`` maps a config key (e.g. source_column) to the column it names."""
    for key, column in names.items():
        if column not in dataset.column_names:
            raise ConfigError(f"{key}={column!r} is not a column of the data: {dataset.column_names}.")


def tokenize_seq2seq(dataset: Dataset, tokenizer: Any, data_args: DataArguments) -> Dataset:
    """input_ids / attention_mask from the prefixed source, labels from the target (both truncated)."""
    check_columns(dataset, {"source_column": data_args.source_column, "target_column": data_args.target_column})

    def encode(batch: dict[str, list]) -> dict[str, list]:
        sources = [data_args.source_prefix + (s or "") for s in batch[data_args.source_column]]
        targets = [t or "" for t in batch[data_args.target_column]]
        inputs = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
        labels = tokenizer(text_target=targets, max_length=data_args.max_target_length, truncation=True)
        inputs["labels"] = labels["input_ids"]
        return inputs

    return dataset.map(
        encode,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=data_args.preprocessing_num_workers,
        desc="Tokenising",
    )


def tokenize_causal(dataset: Dataset, tokenizer: Any, data_args: DataArguments, max_positions: int | None) -> Dataset:
    """Blocks of ``block_size`` tokens with labels (group_texts), or one truncated row per non-empty text.

    ``block_size`` is capped at ``max_positions``, the longest sequence both models take.
    """
    check_columns(dataset, {"text_column": data_args.text_column})
    block_size = min(data_args.block_size, max_positions or data_args.block_size)
    column = data_args.text_column
    dataset = dataset.filter(lambda b: [bool(t and t.strip()) for t in b[column]], batched=True, desc="Dropping empty")

    if not data_args.group_texts:

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return tokenizer(batch[column], max_length=block_size, truncation=True)

        return dataset.map(
            encode,
            batched=True,
            remove_columns=dataset.column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc="Tokenising",
        )

    def encode_and_group(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[column])["input_ids"]
        flat = list(chain.from_iterable(ids))
        # The tail shorter than a block is dropped, as in transformers' run_clm.py.
        blocks = [flat[i : i + block_size] for i in range(0, len(flat) - block_size + 1, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": blocks}

    grouped = dataset.map(
        encode_and_group,
        batched=True,
        batch_size=1000,
        remove_columns=dataset.column_names,
        num_proc=data_args.preprocessing_num_workers,
        desc=f"Tokenising and grouping into blocks of {block_size}",
    )
    if len(grouped) == 0:
        raise ConfigError(
            f"block_size={block_size}: the texts hold fewer tokens than one block; lower block_size or set "
            "group_texts: false."
        )
    return grouped
