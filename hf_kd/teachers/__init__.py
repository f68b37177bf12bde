"""Where the teacher's rows come from. Every source answers the trainer's two questions the same way:

- ``student_inputs(inputs)``: the part of a collated batch the student reads (labels included);
- ``rows(inputs, student_inputs, labels, student_outputs, with_outputs=False)``: a
  :class:`~hf_kd.teachers.live.TeacherPass` holding the rows of the batch's targets, of a kind
  :func:`hf_kd.losses.score` reads, and (``with_outputs``) the teacher's full outputs for the hidden-state term.

Sources: :class:`~hf_kd.teachers.live.LiveTeacher` (a model, or a
:class:`~hf_kd.teachers.ensemble.TeacherEnsemble`, run on the student's inputs: dense rows),
:class:`~hf_kd.teachers.cache.CacheRows` (a top-k cache written by ``hf-kd cache-teacher``:
:class:`~hf_kd.losses.TopKRows`), :class:`~hf_kd.teachers.cross_tokenizer.CrossTokenizerTeacher` (a teacher with
another tokenizer: :class:`~hf_kd.losses.AlignedRows`). Loading, checking and preparing teachers
is :mod:`~hf_kd.teachers.loading`; writing caches and pseudo-labels, :mod:`~hf_kd.teachers.cache_writer` and
:mod:`~hf_kd.teachers.pseudo_label`.
"""

from typing import Any, Protocol

import torch

from hf_kd.teachers.cache import CachedTeacher, CacheRows
from hf_kd.teachers.cross_tokenizer import CrossTokenizerTeacher
from hf_kd.teachers.ensemble import TeacherEnsemble
from hf_kd.teachers.live import LiveTeacher, TeacherPass


class TeacherSource(Protocol):
    """What the trainer asks of a teacher source (see the module docstring)."""

    def student_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]: ...

    def rows(
        self,
        inputs: dict[str, Any],
        student_inputs: dict[str, Any],
        labels: torch.Tensor,
        student_outputs: Any,
        with_outputs: bool = False,
    ) -> TeacherPass: ...


__all__ = [
    "CacheRows", "CachedTeacher", "CrossTokenizerTeacher", "LiveTeacher", "TeacherEnsemble", "TeacherPass",
    "TeacherSource",
]  # fmt: skip
