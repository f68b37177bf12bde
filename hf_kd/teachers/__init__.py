"""Where the teacher's rows come from. Every source answers the trainer's two questions the same way:

- ``student_inputs(inputs)``: the part of a collated batch the student reads (labels included);
- ``rows(request)``: given a :class:`~hf_kd.teachers.base.RowRequest` (the batch, the student's inputs and
  outputs, the aligned labels), a :class:`~hf_kd.teachers.base.TeacherPass` holding the rows of the batch's
  targets, of a kind :func:`hf_kd.losses.score` reads, and (``with_outputs``) the teacher's full outputs for the
  hidden-state term.

Sources: :class:`~hf_kd.teachers.live.LiveTeacher` (a model, or a
:class:`~hf_kd.teachers.ensemble.TeacherEnsemble`, run on the student's inputs: dense rows),
:class:`~hf_kd.teachers.cache.CacheRows` (a top-k cache written by ``hf-kd cache-teacher``:
:class:`~hf_kd.losses.TopKRows`), :class:`~hf_kd.teachers.cross_tokenizer.CrossTokenizerTeacher` (a teacher with
another tokenizer: :class:`~hf_kd.losses.AlignedRows`). Loading, checking and preparing teachers
is :mod:`~hf_kd.teachers.loading`; writing caches and pseudo-labels, :mod:`~hf_kd.teachers.cache_writer` and
:mod:`~hf_kd.teachers.pseudo_label`.
"""

from hf_kd.teachers.base import RowRequest, TeacherPass, TeacherSource
from hf_kd.teachers.cache import CachedTeacher, CacheRows
from hf_kd.teachers.cross_tokenizer import CrossTokenizerTeacher
from hf_kd.teachers.ensemble import TeacherEnsemble
from hf_kd.teachers.live import LiveTeacher

__all__ = [
    "CacheRows", "CachedTeacher", "CrossTokenizerTeacher", "LiveTeacher", "RowRequest", "TeacherEnsemble",
    "TeacherPass", "TeacherSource",
]  # fmt: skip
