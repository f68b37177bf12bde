"""A recipe's data: load the raw splits (Hub, local files or the offline stdlib data set) and tokenise them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from hf_kd.data import is_saved_dataset
from hf_kd.recipe.args import STDLIB_DOCSTRINGS, ConfigError, DataArguments, missing_reason, not_utf8

logger = logging.getLogger(__name__)

# File extension -> the `datasets` packaged builder that reads it.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _unicode_error(err: BaseException) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError behind ``err`` (datasets wraps it in a DatasetGenerationError), if any."""
    while err is not None:
        if isinstance(err, UnicodeDecodeError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _not_utf8_message(data_args: DataArguments, err: UnicodeDecodeError) -> str:
    """Which data file holds the bytes that are not UTF-8 (searched only once reading has failed)."""
    files = data_args.data_files
    paths = [files] if isinstance(files, str) else list((files or {}).values())
    for path in paths:
        if not Path(path).is_file():
            continue
        with open(path, "rb") as file:
            for number, line in enumerate(file, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as found:
                    return f"data_files: {str(path)!r} is {not_utf8(line, found, number)}."
    return f"the data is not UTF-8 text ({_one_line(err)}); re-save it as UTF-8."


@contextmanager
def utf8_errors_named(data_args: DataArguments) -> Iterator[None]:
    """Turn a UnicodeDecodeError while reading the data (pyarrow decodes JSON strings lazily) into a ConfigError."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless a decoding error is behind it
        cause = _unicode_error(err)
        if cause is None:
            raise
        raise ConfigError(_not_utf8_message(data_args, cause)) from None


def _load_saved(paths: dict[str, str]) -> DatasetDict:
    """Saved data sets (e.g. ``hf-kd pseudo-label``'s ``<output>/dataset``): one folder per split, or a
    DatasetDict's folder, or a Dataset's folder (the train split)."""
    splits: dict[str, Dataset] = {}
    for split, path in paths.items():
        loaded = load_from_disk(path)
        if isinstance(loaded, DatasetDict):
            if len(paths) > 1:
                raise ConfigError(f"data_files: {str(path)!r} holds several splits ({sorted(loaded)}); name it alone.")
            return loaded
        splits[split] = loaded
    return DatasetDict(splits)


def load_raw_datasets(data_args: DataArguments, task: str) -> DatasetDict:
    """The raw splits named by ``data_args``; ``task`` is ``"seq2seq"`` or ``"causal"``.

    Missing files, unknown data sets and unreachable Hubs are :class:`ConfigError`\\ s naming what failed.
    """
    if data_args.dataset_name == STDLIB_DOCSTRINGS:
        from hf_kd.data import load_stdlib_docstrings

        return load_stdlib_docstrings(task="summarize" if task == "seq2seq" else "lm", cache_dir=data_args.cache_dir)
    if data_args.dataset_name is not None and is_saved_dataset(data_args.dataset_name):
        return _load_saved({data_args.train_split: data_args.dataset_name})
    if data_args.data_files is not None:
        files = data_args.data_files
        files = {data_args.train_split: files} if isinstance(files, str) else dict(files)
        saved = {split: path for split, path in files.items() if is_saved_dataset(path)}
        if saved and len(saved) == len(files):
            return _load_saved(files)
        for split, path in files.items():
            if not Path(path).is_file():
                folder = Path(path).is_dir()
                what = "is a folder but not one saved with save_to_disk" if folder else missing_reason(path)
                raise ConfigError(f"data_files: the {split!r} file {str(path)!r} {what}.")
        suffixes = {Path(p).suffix.lower() for p in files.values()}
        builders = {_BUILDERS.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise ConfigError(
                f"data_files: cannot read {sorted(suffixes)} files together; use one of {sorted(_BUILDERS)}."
            )
        try:
            return load_dataset(builders.pop(), data_files=files, cache_dir=data_args.cache_dir)
        except Exception as err:  # noqa: BLE001 - a malformed file: say which, in one line
            cause = _unicode_error(err)
            if cause is not None:
                raise ConfigError(_not_utf8_message(data_args, cause)) from None
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
    """The train split and the eval split, cut to the sample limits.

    Without an eval split in the data, ``validation_split_percentage`` of the train split's first rows are held
    out to evaluate on (as transformers' run_clm.py does); the eval split is None when ``eval_split`` is null or
    that percentage is 0.
    """
    if data_args.train_split not in raw:
        raise ConfigError(f"train_split={data_args.train_split!r} is not a split of the data: {sorted(raw)}.")
    train = raw[data_args.train_split]
    evaluation = raw[data_args.eval_split] if data_args.eval_split in raw else None
    if evaluation is None and data_args.eval_split is not None:
        held_out = len(train) * data_args.validation_split_percentage // 100
        if held_out > 0:
            logger.info(
                "The data has no %r split: evaluating on the first %d rows (validation_split_percentage=%d) of "
                "the %r split and training on the other %d.",
                data_args.eval_split, held_out, data_args.validation_split_percentage, data_args.train_split,
                len(train) - held_out,
            )  # fmt: skip
            evaluation, train = train.select(range(held_out)), train.select(range(held_out, len(train)))
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def select_test(raw: DatasetDict, data_args: DataArguments, do_predict: bool) -> Dataset | None:
    """The split predicted on (cut to max_predict_samples) when ``do_predict``; a ConfigError when there is none."""
    if not do_predict:
        return None
    if data_args.test_split not in raw:
        raise ConfigError(
            f"do_predict: the data has no test_split={data_args.test_split!r} split (its splits: {sorted(raw)}); add "
            'one (e.g. data_files: {"train": ..., "test": FILE}), name another with test_split, or set do_predict: '
            "false."
        )
    test = raw[data_args.test_split]
    if data_args.max_predict_samples is not None:
        test = test.select(range(min(data_args.max_predict_samples, len(test))))
    return test


def split_uses(raw: DatasetDict, data_args: DataArguments, evaluated: bool, do_predict: bool) -> list[str]:
    """One line per split of the data: what the run does with it."""
    lines = []
    used = [data_args.train_split, data_args.eval_split, data_args.test_split]
    for name in sorted(raw, key=lambda split: used.index(split) if split in used else len(used)):
        rows = f"split {name!r} ({len(raw[name])} rows)"
        if name == data_args.train_split:
            use = "trained on"
        elif name == data_args.eval_split:
            use = "evaluated on" if evaluated else "not used: evaluation is off"
        elif name == data_args.test_split:
            use = "predicted on (do_predict)" if do_predict else "not used: do_predict is off (true predicts on it)"
        else:
            use = (
                f"not used: only train_split={data_args.train_split!r}, eval_split={data_args.eval_split!r} and "
                f"test_split={data_args.test_split!r} are"
            )
        lines.append(f"Data: {rows}: {use}.")
    return lines


def adopt_example_columns(data_args: DataArguments, task: str) -> None:
    """transformers' run_summarization.py calls the source column of an encoder-decoder model ``text_column``;
    hf-kd calls it ``source_column`` (its ``text_column`` is the causal models' text). A text_column set for an
    encoder-decoder model is taken as its source, unless source_column names another column."""
    fields = DataArguments.__dataclass_fields__
    default_text, default_source = fields["text_column"].default, fields["source_column"].default
    if task != "seq2seq" or data_args.text_column in (default_text, data_args.source_column):
        return
    if data_args.source_column != default_source:
        raise ConfigError(
            f"text_column={data_args.text_column!r} and source_column={data_args.source_column!r}: for an "
            "encoder-decoder model both name the source text (text_column as in run_summarization.py); keep one."
        )
    logger.info(
        "text_column=%r is the source text of this encoder-decoder model (run_summarization.py's name for "
        "hf-kd's source_column).",
        data_args.text_column,
    )
    data_args.source_column = data_args.text_column


def check_columns(dataset: Dataset, names: dict[str, str]) -> None:
    """``names`` maps a config key (e.g. source_column) to the column it names."""
    for key, column in names.items():
        if column not in dataset.column_names:
            raise ConfigError(f"{key}={column!r} is not a column of the data: {dataset.column_names}.")


def _check_not_all_empty(dataset: Dataset, key: str, column: str) -> None:
    """Refuse a split whose every ``column`` text is empty: not one target token to learn from or score."""
    texts = dataset.with_format("arrow")[column]
    if len(dataset) and pc.max(pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(texts, "")))).as_py():
        return
    split = f"the {dataset.split} split" if dataset.split else "this split"
    raise ConfigError(
        f"{key}={column!r}: every text of {split} ({len(dataset)} rows) is empty, so there is nothing to learn "
        "from; name the column that holds the texts, or fill it (e.g. with hf-kd pseudo-label)."
    )


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

    with utf8_errors_named(data_args):
        tokenised = dataset.map(
            encode,
            batched=True,
            remove_columns=dataset.column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc="Tokenising",
        )
    _check_not_all_empty(dataset, "target_column", data_args.target_column)
    return _drop_rows_without_labels(tokenised)


def _drop_rows_without_labels(dataset: Dataset) -> Dataset:
    """Rows whose target has no token add nothing to the loss, and a batch of only such rows has no label
    positions at all (the collator then fails), so they are left out, with a log line."""
    lengths = pc.list_value_length(dataset.with_format("arrow")["labels"])
    empty = len(dataset) - (pc.sum(pc.greater(lengths, 0)).as_py() or 0)
    if not empty:
        return dataset
    logger.warning("Leaving out %d of %d rows whose target has no token.", empty, len(dataset))
    return dataset.filter(lambda b: [len(labels) > 0 for labels in b["labels"]], batched=True, desc="Dropping empty")


def tokenize_causal(dataset: Dataset, tokenizer: Any, data_args: DataArguments, max_positions: int | None) -> Dataset:
    """Blocks of ``block_size`` tokens with labels (group_texts), or one truncated row per non-empty text.

    ``block_size`` is capped at ``max_positions``, the longest sequence both models take.
    """
    check_columns(dataset, {"text_column": data_args.text_column})
    block_size = min(data_args.block_size, max_positions or data_args.block_size)
    column = data_args.text_column
    with utf8_errors_named(data_args):
        dataset = dataset.filter(
            lambda b: [bool(t and t.strip()) for t in b[column]], batched=True, desc="Dropping empty"
        )
    if len(dataset) == 0:
        _check_not_all_empty(dataset, "text_column", column)

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
