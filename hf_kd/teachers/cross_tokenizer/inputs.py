"""Batches for cross-tokenizer distillation: the same text in both tokenizations, and where their contexts meet.

:class:`CrossTokenizerAligner` tokenizes raw text with the student's and the teacher's tokenizers (with offsets),
builds the student's batch (``input_ids``, ``attention_mask``, ``labels``) and the teacher's (``input_ids``,
``attention_mask``), and a :class:`TokenAlignment`: for each student target position whose context ends at a
character position where the teacher's tokens also end, the teacher position with that same context (see
:func:`hf_kd.teachers.cross_tokenizer.alignment.boundaries`). Two layouts:

- causal (:meth:`CrossTokenizerAligner.causal`): both models read the text; the student learns every token;
- seq2seq (:meth:`CrossTokenizerAligner.seq2seq`): an encoder-decoder student reads ``source`` and predicts
  ``target``; the causal teacher reads ``prompt_template.format(source=source)`` followed by the target, and only
  target positions are compared.

:class:`CrossTokenizerCollator` does the same per batch as a Trainer ``data_collator``, from text columns (or,
without them, from text decoded from the student's ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_kd.losses import IGNORE_INDEX
from hf_kd.teachers.cross_tokenizer.alignment import boundaries, shared_boundaries
from hf_kd.teachers.cross_tokenizer.vocabulary import adds_prefix_space
from hf_kd.teachers.loading import encoder_ids

TEACHER_PREFIX = "teacher_"
ALIGNMENT_KEYS = ("alignment_batch_index", "alignment_student_index", "alignment_teacher_index")


@dataclass
class TokenAlignment:
    """Aligned positions of a batch, one entry per pair, as ``long`` tensors of equal length.

    ``student_logits[batch_index[i], student_index[i]]`` (the row that predicts ``labels[batch_index[i],
    student_index[i]]``) and ``teacher_logits[batch_index[i], teacher_index[i]]`` (raw teacher output) are
    next-token distributions after exactly the same text.
    """

    batch_index: torch.Tensor
    student_index: torch.Tensor
    teacher_index: torch.Tensor

    def to(self, device: torch.device | str) -> TokenAlignment:
        return TokenAlignment(*(t.to(device) for t in (self.batch_index, self.student_index, self.teacher_index)))

    def __len__(self) -> int:
        return int(self.batch_index.numel())


@dataclass
class CrossTokenizerBatch:
    """What :class:`CrossTokenizerAligner` builds for one batch."""

    student: dict[str, torch.Tensor]
    """The student's model inputs plus ``labels`` (-100 on padding)."""
    teacher: dict[str, torch.Tensor]
    """The teacher's ``input_ids`` and ``attention_mask``."""
    alignment: TokenAlignment

    def to_dict(self) -> dict[str, torch.Tensor]:
        """One flat dict (student keys as they are, ``teacher_*``, ``alignment_*``), as a collator returns."""
        flat = dict(self.student)
        flat.update({TEACHER_PREFIX + k: v for k, v in self.teacher.items()})
        a = self.alignment
        flat.update(dict(zip(ALIGNMENT_KEYS, (a.batch_index, a.student_index, a.teacher_index), strict=True)))
        return flat


def split_inputs(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], TokenAlignment]:
    """Undo :meth:`CrossTokenizerBatch.to_dict`: ``(student inputs with labels, teacher inputs, alignment)``."""
    student = {k: v for k, v in inputs.items() if not k.startswith(TEACHER_PREFIX) and k not in ALIGNMENT_KEYS}
    teacher = {k[len(TEACHER_PREFIX) :]: v for k, v in inputs.items() if k.startswith(TEACHER_PREFIX)}
    return student, teacher, TokenAlignment(*(inputs[k] for k in ALIGNMENT_KEYS))


@dataclass
class _Tokens:
    """One tokenization of one text: ids, character offsets into the text, and which tokens are special."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]

    def points(self, text_length: int) -> dict[int, int]:
        return boundaries(self.offsets, self.special, text_length)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, prefix_space: bool = False) -> _Tokens:
    """Tokenize with offsets; with ``prefix_space`` the text is read as ``" " + text``, offsets still into text."""
    shift = int(prefix_space)
    enc = tokenizer(
        " " * shift + text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    offsets = [(max(s - shift, 0), max(e - shift, 0)) for s, e in enc["offset_mapping"]]
    return _Tokens(list(enc["input_ids"]), offsets, [bool(m) for m in enc["special_tokens_mask"]])


def _append(tokens: _Tokens, token_id: int | None, at_start: bool = False) -> _Tokens:
    """Add a special token (no text) at the end, or at the start, unless it is already there."""
    if token_id is None or (tokens.ids and tokens.ids[0 if at_start else -1] == token_id):
        return tokens
    if at_start:
        return _Tokens([token_id] + tokens.ids, [(0, 0)] + tokens.offsets, [True] + tokens.special)
    return _Tokens(tokens.ids + [token_id], tokens.offsets + [(0, 0)], tokens.special + [True])


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(
        len(rows), width
    )


def _mask(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0)


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


class CrossTokenizerAligner:
    """Builds student and teacher batches from raw text, and the positions where their contexts are the same.

    Args:
        student_tokenizer: the student's fast tokenizer (offsets are needed).
        teacher_tokenizer: the teacher's fast tokenizer; the teacher must be a causal LM.
        prompt_template: what the teacher reads before the target when there is a prompt (seq2seq ``source``, or
            the ``prompts`` of :meth:`causal`), with ``{source}`` in it. Use the format the teacher knows (its chat
            template rendered to text, an instruction format).
        max_length: truncate the student's sequences (the text, or source and target each) to this many tokens.
        teacher_max_length: truncate the teacher's sequence (prompt and target together) to this many tokens; the
            prompt is cut from the left, the target from the right.
        append_eos: end the student's and the teacher's token sequences with their EOS when the tokenizer does not,
            so that the teacher teaches the student where to stop.
        teacher_bos: without a prompt (or with an empty one), start the teacher's sequence with its BOS, so that it
            predicts the first token of the text too.
        teacher_prefix_space: read the text as ``" " + text`` on the teacher's side. ``None`` (default): when the
            student's tokenizer adds a prefix space (SentencePiece's ``"▁"`` on the first word) and the teacher's
            does not, so that the first word is ``" word"`` on both sides and its strings match.
    """

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        *,
        prompt_template: str = "{source}\n",
        max_length: int | None = None,
        teacher_max_length: int | None = None,
        append_eos: bool = True,
        teacher_bos: bool = True,
        teacher_prefix_space: bool | None = None,
    ) -> None:
        for name, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            if not getattr(tok, "is_fast", False):
                raise ValueError(f"The {name} tokenizer must be a fast tokenizer: offsets are needed to align tokens.")
        if "{source}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{source}}', got {prompt_template!r}.")
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.prompt_template = prompt_template
        self.max_length = max_length
        self.teacher_max_length = teacher_max_length
        self.append_eos = append_eos
        self.teacher_bos = teacher_bos
        if teacher_prefix_space is None:
            teacher_prefix_space = adds_prefix_space(student_tokenizer) and not adds_prefix_space(teacher_tokenizer)
        self.teacher_prefix_space = teacher_prefix_space

    def _student(self, text: str, add_special_tokens: bool) -> _Tokens:
        tokens = _encode(self.student_tokenizer, text, add_special_tokens)
        return _append(tokens, self.student_tokenizer.eos_token_id) if self.append_eos else tokens

    def _teacher(self, text: str, prompt: str | None) -> tuple[list[int], _Tokens]:
        """The teacher's prefix (prompt, or BOS) and its tokens of ``text``, truncated together."""
        tok = self.teacher_tokenizer
        tokens = _encode(tok, text, add_special_tokens=False, prefix_space=self.teacher_prefix_space)
        if self.append_eos:
            tokens = _append(tokens, tok.eos_token_id)
        prefix = tok(self.prompt_template.format(source=prompt))["input_ids"] if prompt is not None else []
        if not prefix and self.teacher_bos and tok.bos_token_id is not None:
            prefix = [tok.bos_token_id]
        limit = self.teacher_max_length
        if limit is not None and len(prefix) + len(tokens.ids) > limit:
            keep = max(limit - len(tokens.ids), min(len(prefix), limit // 2))
            prefix = prefix[len(prefix) - keep :] if keep < len(prefix) else prefix
        return prefix, tokens

    def _example(
        self, b: int, text: str, prompt: str | None, student: _Tokens, s_prefix: list[int], decoder: bool, pairs: list
    ) -> tuple[list[int], list[int]]:
        """Append example ``b``'s aligned pairs to ``pairs``; return the student's and the teacher's ids."""
        t_prefix, teacher = self._teacher(text, prompt)
        s_ids = (s_prefix + student.ids)[: self.max_length]
        t_ids = (t_prefix + teacher.ids)[: self.teacher_max_length]
        for _, k_t, k_s in shared_boundaries(teacher.points(len(text)), student.points(len(text))):
            target = len(s_prefix) + k_s  # where the predicted token sits in the student's sequence
            s_row = target if decoder else target - 1  # a decoder's row k predicts label k; a causal LM's, k + 1
            t_row = len(t_prefix) + k_t - 1
            if 0 <= s_row and target < len(s_ids) and 0 <= t_row < len(t_ids):
                pairs.append((b, s_row, t_row))
        return s_ids, t_ids

    def causal(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> CrossTokenizerBatch:
        """Both models read each text; student row ``k - 1`` predicts its token ``k``.

        With ``prompts``, the student reads ``prompt`` then ``text`` and learns only the text's tokens (labels
        -100 on the prompt); the teacher reads ``prompt_template.format(source=prompt)`` then the text.
        """
        if prompts is not None and len(prompts) != len(texts):
            raise ValueError(f"{len(prompts)} prompts but {len(texts)} texts.")
        student_rows, prompt_lengths, teacher_rows, pairs = [], [], [], []
        for b, text in enumerate(texts):
            prompt = prompts[b] if prompts is not None else None
            if prompt is None:
                student, s_prefix = self._student(text, add_special_tokens=True), []
            else:
                student = self._student(text, add_special_tokens=False)
                s_prefix = self.student_tokenizer(prompt)["input_ids"]
            s_ids, t_ids = self._example(b, text, prompt, student, s_prefix, False, pairs)
            student_rows.append(s_ids)
            prompt_lengths.append(len(s_prefix))
            teacher_rows.append(t_ids)
        input_ids = _pad(student_rows, _pad_id(self.student_tokenizer))
        attention_mask = _mask(student_rows)
        labels = input_ids.masked_fill(attention_mask.eq(0), IGNORE_INDEX)
        for b, length in enumerate(prompt_lengths):
            labels[b, :length] = IGNORE_INDEX
        student_batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return CrossTokenizerBatch(student_batch, self._teacher_batch(teacher_rows), _alignment(pairs))

    def seq2seq(self, sources: Sequence[str], targets: Sequence[str]) -> CrossTokenizerBatch:
        """The student encodes ``source`` and decodes ``target`` (row ``k`` predicts label ``k``); the teacher
        reads the prompt, then the target: its row ``len(prompt) + k - 1`` predicts target token ``k``."""
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets.")
        source_rows, label_rows, teacher_rows, pairs = [], [], [], []
        for b, (source, target) in enumerate(zip(sources, targets, strict=True)):
            student = self._student(target, add_special_tokens=True)
            labels, t_ids = self._example(b, target, source, student, [], True, pairs)
            eos = self.student_tokenizer.eos_token_id if self.append_eos else None
            source_rows.append(encoder_ids(self.student_tokenizer(source)["input_ids"], eos, self.max_length))
            label_rows.append(labels)
            teacher_rows.append(t_ids)
        student_batch = {
            "input_ids": _pad(source_rows, _pad_id(self.student_tokenizer)),
            "attention_mask": _mask(source_rows),
            "labels": _pad(label_rows, IGNORE_INDEX),
        }
        return CrossTokenizerBatch(student_batch, self._teacher_batch(teacher_rows), _alignment(pairs))

    def _teacher_batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        return {"input_ids": _pad(rows, _pad_id(self.teacher_tokenizer)), "attention_mask": _mask(rows)}


def _alignment(pairs: list[tuple[int, int, int]]) -> TokenAlignment:
    columns = torch.tensor(pairs, dtype=torch.long).reshape(-1, 3)
    return TokenAlignment(columns[:, 0].clone(), columns[:, 1].clone(), columns[:, 2].clone())


class CrossTokenizerCollator:
    """A Trainer ``data_collator`` that builds :class:`CrossTokenizerBatch` es from text columns.

    Layouts: causal with ``text_column`` (and ``prompt_column`` for prompt-completion data, where only the
    completion is learned); seq2seq with ``source_column`` and ``target_column``. A row without its text column is
    decoded from the student's ids instead (``input_ids``; ``labels`` for a seq2seq target), which loses what the
    student's tokenizer could not represent (unknown characters, runs of spaces it normalises). Keep the text
    columns in the dataset: ``remove_unused_columns=False``, or a trainer that keeps :attr:`columns`.
    """

    def __init__(
        self,
        aligner: CrossTokenizerAligner,
        text_column: str = "text",
        prompt_column: str | None = None,
        source_column: str | None = None,
        target_column: str | None = None,
    ) -> None:
        if (source_column is None) != (target_column is None):
            raise ValueError("Give both source_column and target_column (seq2seq), or neither (causal).")
        self.aligner = aligner
        self.text_column = text_column
        self.prompt_column = prompt_column
        self.source_column = source_column
        self.target_column = target_column

    @property
    def columns(self) -> list[str]:
        """The dataset columns the collator reads."""
        if self.source_column is not None:
            return [self.source_column, self.target_column]
        return [self.text_column] + ([self.prompt_column] if self.prompt_column else [])

    def _text(self, feature: dict[str, Any], column: str, ids_key: str) -> str:
        if column in feature:
            return feature[column]
        ids = [i for i in feature[ids_key] if i != IGNORE_INDEX]
        return self.aligner.student_tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.source_column is not None:
            sources = [self._text(f, self.source_column, "input_ids") for f in features]
            targets = [self._text(f, self.target_column, "labels") for f in features]
            return self.aligner.seq2seq(sources, targets).to_dict()
        texts = [self._text(f, self.text_column, "input_ids") for f in features]
        prompts = [f[self.prompt_column] for f in features] if self.prompt_column else None
        return self.aligner.causal(texts, prompts).to_dict()
