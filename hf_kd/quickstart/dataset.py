"""The quickstart's data: the task's splits of the standard-library docstrings, the tokenizer trained on them, the
tokenised rows and their collator."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hf_kd.errors import ConfigError, first_line
from hf_kd.quickstart.settings import COLUMNS, Settings

# Nothing below reaches the Hub: data, tokenizer and models are all made locally. The tokenizer is used
# before and after the Trainer's dataloader forks; keep its thread pool quiet about it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def head(dataset: Any, n: int | None) -> Any:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def load_data(settings: Settings, cache_dir: Path) -> Any:
    """The task's splits, from the data cache under ``cache_dir`` (made on the first run); a damaged cache is a
    one-line ConfigError naming its folder."""
    from hf_kd.data import cache_path

    try:
        return _load_data(settings, cache_dir)
    except (OSError, ValueError, KeyError, IndexError) as err:  # what load_from_disk raises for a damaged folder
        folder = cache_path("summarize" if settings.task == "summarize" else "lm", cache_dir).parent
        raise ConfigError(
            f"the quickstart's data cache {folder} cannot be read ({first_line(err, 160)}); delete that folder (it "
            "is made again from the standard library), or pass another --cache-dir."
        ) from None


def _load_data(settings: Settings, cache_dir: Path) -> Any:
    from hf_kd.data import infilling_dataset, load_stdlib_docstrings

    if settings.task == "denoise":
        data = infilling_dataset(
            load_stdlib_docstrings("lm", cache_dir), settings.mask_fraction, max_words=settings.max_words
        )
    else:
        data = load_stdlib_docstrings(settings.task, cache_dir=cache_dir)
    data["train"] = head(data["train"].shuffle(seed=settings.seed), settings.max_train_docs)
    data["test"] = head(data["test"], settings.max_test_docs)
    return data


def train_tokenizer(texts: list[str], vocab_size: int, extra_special: tuple[str, ...] = ()) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``: <pad>=0, </s>=1 (end of sequence), <sep>=2, then
    ``extra_special`` (the denoise task's <mask>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<sep>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    special = {"mask_token": extra_special[0]} if extra_special else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="</s>", sep_token="<sep>", **special
    )


def tokenizer_texts(task: str, train: Any) -> list[str]:
    if task == "lm":
        return list(train["text"])
    source, target = COLUMNS[task]
    # denoise: the sources are the targets with words cut out, so the targets alone cover the text.
    columns = (target,) if task == "denoise" else (source, target)
    return [row[c] for row in train for c in columns]


def featurize(task: str, dataset: Any, tokenizer: Any, settings: Settings) -> Any:
    """Tokenised rows with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where not scored).

    lm: the docstrings, each ended by </s>, concatenated and cut into blocks of ``block_size`` tokens, all
    scored. Encoder-decoder tasks: ``input_ids`` = source </s>, ``labels`` = target </s>, both truncated.
    """
    eos = tokenizer.eos_token_id
    if task == "lm":

        def blocks(batch: dict[str, list]) -> dict[str, list]:
            ids = [i for text in batch["text"] for i in [*tokenizer(text)["input_ids"], eos]]
            size = settings.block_size
            chunks = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]
            return {"input_ids": chunks, "attention_mask": [[1] * size for _ in chunks], "labels": chunks}

        return dataset.map(blocks, batched=True, batch_size=1000, remove_columns=dataset.column_names)

    source_column, target_column = COLUMNS[task]

    def pairs(row: dict[str, str]) -> dict[str, list]:
        source = tokenizer(row[source_column])["input_ids"][: settings.source_length - 1] + [eos]
        target = tokenizer(row[target_column])["input_ids"][: settings.target_length - 1] + [eos]
        return {"input_ids": source, "attention_mask": [1] * len(source), "labels": target}

    return dataset.map(pairs, remove_columns=dataset.column_names)


def collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq

    # Pads input_ids with <pad> and labels with -100; lm blocks are already of equal length. No model is given,
    # so no decoder_input_ids are made here: each model shifts the labels itself, and in distillation the
    # student's are passed to the teacher (both start the decoder with <pad>, see build_seq2seq).
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
