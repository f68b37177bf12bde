"""The trainer's side of cross-tokenizer distillation: checks, the collator, the teacher source, re-alignment.

:class:`hf_kd.DistillationTrainer` calls these when ``args.cross_tokenizer`` is on; they read the config's fields
with ``getattr`` defaults (``uld_weight``, ``teacher_prompt_template``, ``teacher_max_length``,
``cross_tokenizer_text_column``, ``cross_tokenizer_prompt_column``), so they are usable on their own too. See
``docs/cross-tokenizer.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_kd.losses import IGNORE_INDEX, AlignedRows
from hf_kd.teachers.base import RowRequest, TeacherPass
from hf_kd.teachers.cross_tokenizer.inputs import CrossTokenizerAligner, CrossTokenizerCollator, split_inputs
from hf_kd.teachers.cross_tokenizer.vocabulary import VocabularyMap


def check_cross_tokenizer(
    student: nn.Module, teacher: nn.Module, student_tokenizer: Any, teacher_tokenizer: Any
) -> None:
    """Refuse what cross-tokenizer distillation cannot do: an encoder-decoder teacher, or a missing or slow
    tokenizer (character offsets come from fast tokenizers only)."""
    if getattr(getattr(teacher, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            "Cross-tokenizer distillation needs a causal (decoder-only) teacher: it reads the source as its prompt "
            "and scores the target. The student may be causal or encoder-decoder."
        )
    for name, tok in (("processing_class (the student's tokenizer)", student_tokenizer),
                      ("teacher_processing_class", teacher_tokenizer)):  # fmt: skip
        if tok is None or not getattr(tok, "is_fast", False):
            raise ValueError(f"Cross-tokenizer distillation needs {name}, a fast tokenizer (for character offsets).")


def make_collator(
    args: Any, is_encoder_decoder: bool, student_tokenizer: Any, teacher_tokenizer: Any, max_length: int | None = None
) -> CrossTokenizerCollator:
    """The collator for the config's layout: seq2seq (``prompt_column`` is the source, ``text_column`` the target)
    for an encoder-decoder student; causal (``text_column``, optionally after ``prompt_column``) otherwise. The
    student's sequences are truncated to ``max_length`` (the trainer passes the student's position limit)."""
    aligner = CrossTokenizerAligner(
        student_tokenizer,
        teacher_tokenizer,
        prompt_template=getattr(args, "teacher_prompt_template", "{source}\n"),
        max_length=max_length,
        teacher_max_length=getattr(args, "teacher_max_length", None),
    )
    text_column = getattr(args, "cross_tokenizer_text_column", "text")
    prompt_column = getattr(args, "cross_tokenizer_prompt_column", None)
    if is_encoder_decoder:
        if prompt_column is None:
            raise ValueError("An encoder-decoder student needs cross_tokenizer_prompt_column (its source text column).")
        return CrossTokenizerCollator(aligner, source_column=prompt_column, target_column=text_column)
    return CrossTokenizerCollator(aligner, text_column=text_column, prompt_column=prompt_column)


def student_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch without the teacher's inputs and the alignment: what ``model.generate`` may be given."""
    return split_inputs(inputs)[0] if "alignment_batch_index" in inputs else inputs


class CrossTokenizerTeacher:
    """A causal teacher with its own tokenizer as a teacher source: it reads its own tokens of the batch (put
    there by :class:`CrossTokenizerCollator`), and its rows are :class:`~hf_kd.losses.AlignedRows`."""

    def __init__(self, model: nn.Module, vocab_map: VocabularyMap) -> None:
        self.model = model
        self.vocab_map = vocab_map

    def student_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return student_inputs(inputs)

    def rows(self, request: RowRequest) -> TeacherPass:
        _, teacher_batch, alignment = split_inputs(request.inputs)  # the teacher reads its own tokens
        with torch.no_grad():
            logits = self.model(**teacher_batch, use_cache=False).logits
        return TeacherPass(AlignedRows(logits, alignment, self.vocab_map))


def realign(batch: dict[str, torch.Tensor], aligner: CrossTokenizerAligner, is_encoder_decoder: bool) -> dict:
    """Rebuild a batch whose targets the student generated (on-policy): decode its prompts and targets with the
    student's tokenizer and align them again with the teacher's (as TRL's GOLD trainer does).

    ``batch`` has the trainer's layout: ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the targets;
    for a causal student the prompt is the attended part before the first target).
    """

    def decode(rows: list[list[int]]) -> list[str]:
        return aligner.student_tokenizer.batch_decode(rows, skip_special_tokens=True)

    keep = batch["labels"].ne(IGNORE_INDEX)
    targets = decode([row[mask].tolist() for row, mask in zip(batch["labels"], keep, strict=True)])
    attention = batch["attention_mask"].bool()
    if is_encoder_decoder:
        sources = decode([row[mask].tolist() for row, mask in zip(batch["input_ids"], attention, strict=True)])
        return aligner.seq2seq(sources, targets).to_dict()
    prompts = []
    for row, mask, target in zip(batch["input_ids"], attention, keep, strict=True):
        first = int(target.nonzero()[0]) if target.any() else int(mask.sum())
        prompts.append(row[:first][mask[:first]].tolist())
    return aligner.causal(targets, decode(prompts)).to_dict()
