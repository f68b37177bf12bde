"""What `hf-kd cache-teacher` and `hf-kd pseudo-label` check of their inputs before the teacher runs.

Each check raises a one-line :class:`~hf_kd.errors.ConfigError` naming the fix, so that nothing is computed (and
nothing written) for inputs that would crash half way or, worse, give a cache or labels that silently mean
something else: another tokenizer's ids, rows past the teacher's positions, a data set these commands assembled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset
from torch import nn

from hf_kd.errors import ConfigError, TokenizerMismatchError
from hf_kd.teachers.loading import check_same_tokenizer, encoder_ids, load_saved_tokenizer

# Files that mean a teacher folder holds a tokenizer of its own (as hf_kd.cli.common.TOKENIZER_FILES).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")
# Columns `hf-kd pseudo-label` adds when it assembles a data set (plus reference_<target column>).
ASSEMBLED_COLUMNS = ("teacher_output", "teacher_rouge_l", "teacher_wer", "target_source")


def check_named_tokenizer(tokenizer: Any, named: str | None, teachers: list[str], trust: bool = False) -> None:
    """``--tokenizer`` (``named``, loaded as ``tokenizer``) must map tokens to the ids of every teacher folder's own
    tokenizer: the cache or labels are the teacher's ids, read back with ``tokenizer``'s. A teacher without tokenizer
    files (or a Hub id) is taken to share it, as a live teacher is."""
    if not named or tokenizer is None:
        return
    for name in teachers:
        if not any((Path(name) / file).is_file() for file in _TOKENIZER_FILES):
            continue
        own = load_saved_tokenizer(name, trust_remote_code=trust)
        if own is None:
            continue
        try:
            check_same_tokenizer(tokenizer, own, fix="")
        except TokenizerMismatchError:
            raise ConfigError(
                f"--tokenizer {named} ({len(tokenizer)} tokens) maps tokens to other ids than the tokenizer saved "
                f"with --teacher {name} ({len(own)} tokens), and the teacher reads and writes its own ids; leave "
                "--tokenizer out (the teacher's is used), or name the teacher's own tokenizer."
            ) from None


def position_limit(model: nn.Module) -> int | None:
    """How many positions ``model`` has (``max_position_embeddings`` / ``n_positions``); None for relative
    positions (T5). An ensemble's is its smallest member's."""
    members = list(getattr(model, "members", None) or [model])
    limits = [getattr(m.config, "max_position_embeddings", None) for m in members]
    limits = [int(x) for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


def check_cache_lengths(dataset: Dataset, teacher: nn.Module, name: str) -> None:
    """No row of the tokenised ``dataset`` is longer than the teacher's positions (an IndexError half way through
    otherwise). Rows are not cut here: the cache must hold the training set's own tokens, row for row."""
    limit = position_limit(teacher)
    if limit is None:
        return
    is_ed = bool(getattr(teacher.config, "is_encoder_decoder", False))
    columns = ["input_ids"] + (["labels"] if is_ed and "labels" in dataset.column_names else [])
    for column in columns:
        lengths = [len(ids) for ids in dataset[column]]
        longest = max(lengths, default=0)
        if longest > limit:
            over = sum(n > limit for n in lengths)
            raise ConfigError(
                f"{name}: {over} of {len(lengths)} rows have more {column} tokens than the teacher's {limit} positions "
                f"(the longest: {longest}); tokenise the data set again with max_length={limit} (truncation), and "
                "train on that same data set."
            )


def check_not_assembled(dataset: Dataset, name: str, target_column: str) -> None:
    """``dataset`` is not one `hf-kd pseudo-label` assembled: its columns would be added twice, after all the
    generation ran."""
    assembled = [c for c in (*ASSEMBLED_COLUMNS, f"reference_{target_column}") if c in dataset.column_names]
    if assembled:
        raise ConfigError(
            f"{name} already has the column(s) {', '.join(assembled)} that hf-kd pseudo-label adds: it looks like a "
            "data set this command assembled; label the original data set, or remove those columns first."
        )


def check_pseudo_label_inputs(dataset: Dataset, teacher: nn.Module, tokenizer: Any, name: str, args: Any) -> None:
    """Before generating: every source has tokens (a causal teacher continues the source), and the sources and
    ``--max-new-tokens`` fit the teacher's positions. ``args``: source_column, source_prefix, max_source_length,
    max_new_tokens."""
    is_ed = bool(getattr(teacher.config, "is_encoder_decoder", False))
    sources = [args.source_prefix + (s or "") for s in dataset[args.source_column]]
    encoded = tokenizer(sources)["input_ids"]
    if is_ed:  # what generate_batch feeds the encoder: the source ending with </s>, cut to --max-source-length
        lengths = [len(encoder_ids(ids, tokenizer.eos_token_id, args.max_source_length)) for ids in encoded]
    else:
        lengths = [min(len(ids), args.max_source_length) for ids in encoded]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty and not is_ed:
        shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
        raise ConfigError(
            f"{name}: {len(empty)} rows have an empty source (rows {shown}), and a causal teacher only continues "
            "its source; drop those rows, or give every row a source (e.g. with --source-prefix)."
        )
    limit = position_limit(teacher)
    longest = max(lengths, default=0)
    if limit is None:
        return
    if not is_ed and longest + args.max_new_tokens > limit:  # a causal teacher's positions hold both
        raise ConfigError(
            f"{name}: the longest source has {longest} tokens and --max-new-tokens is {args.max_new_tokens}, "
            f"{longest + args.max_new_tokens} positions in all, but the teacher has {limit}; pass --max-source-length "
            f"{max(1, limit - args.max_new_tokens)} or less (or fewer --max-new-tokens)."
        )
    if is_ed and longest > limit:
        raise ConfigError(
            f"{name}: the longest source has {longest} tokens, more than the teacher's {limit} positions; pass "
            f"--max-source-length {limit} or less."
        )
    if is_ed and args.max_new_tokens + 1 > limit:  # the decoder's start token takes a position too
        raise ConfigError(
            f"--max-new-tokens {args.max_new_tokens}: the teacher's decoder has {limit} positions, one for its start "
            f"token; pass --max-new-tokens {limit - 1} or less."
        )
