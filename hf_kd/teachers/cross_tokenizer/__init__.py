"""Distillation across tokenizers: the shared vocabulary (:mod:`.vocabulary`), character-offset alignment
(:mod:`.alignment`), the batches both models read (:mod:`.inputs`) and the teacher source (:mod:`.source`).
The loss itself is :mod:`hf_kd.losses.cross_tokenizer`."""

from hf_kd.teachers.cross_tokenizer.inputs import CrossTokenizerAligner, CrossTokenizerCollator, TokenAlignment
from hf_kd.teachers.cross_tokenizer.source import CrossTokenizerTeacher
from hf_kd.teachers.cross_tokenizer.vocabulary import VocabularyMap

__all__ = [
    "CrossTokenizerAligner", "CrossTokenizerCollator", "CrossTokenizerTeacher", "TokenAlignment", "VocabularyMap",
]  # fmt: skip
