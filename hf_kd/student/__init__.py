"""The student's side: a smaller copy of the teacher (:mod:`.make`) and the hidden-state term (:mod:`.hidden`)."""

from hf_kd.student.hidden import HiddenStateDistiller
from hf_kd.student.make import make_student

__all__ = ["HiddenStateDistiller", "make_student"]
