"""The student's side: a smaller copy of the teacher (:mod:`.make`, narrowed by :mod:`.prune` on
:mod:`.calibration` batches) and the hidden-state term (:mod:`.hidden`)."""

from hf_kd.student.calibration import calibration_batches
from hf_kd.student.hidden import HiddenStateDistiller
from hf_kd.student.make import make_student

__all__ = ["HiddenStateDistiller", "calibration_batches", "make_student"]
