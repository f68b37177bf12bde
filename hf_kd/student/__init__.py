"""The student's side: a smaller copy of the teacher (:mod:`.make`, its layers chosen by :mod:`.depth` or a fixed map,
narrowed by :mod:`.prune` on :mod:`.calibration` batches), what training freezes (:mod:`.freeze`) and the
hidden-state term (:mod:`.hidden`)."""

from hf_kd.student.calibration import calibration_batches
from hf_kd.student.depth import block_importance, layers_by_importance
from hf_kd.student.hidden import HiddenStateDistiller
from hf_kd.student.make import make_student

__all__ = ["HiddenStateDistiller", "block_importance", "calibration_batches", "layers_by_importance", "make_student"]
