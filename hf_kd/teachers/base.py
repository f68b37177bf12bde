"""What the trainer asks of a teacher source, and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from hf_kd.losses import TeacherRows


@dataclass(frozen=True)
class RowRequest:
    """One batch, as a source may read it.

    Attributes:
        inputs: the collated batch (a cross-tokenizer teacher's tokens and a cache's rows are in it).
        student_inputs: what the student's forward took.
        labels: targets aligned with the student's output positions (-100 where there is none).
        student_outputs: the student's outputs (an encoder-decoder's encoder states may be reused).
        with_outputs: also return the teacher's full outputs, with hidden states (the hidden-state term).
    """

    inputs: dict[str, Any]
    student_inputs: dict[str, Any]
    labels: torch.Tensor
    student_outputs: Any = None
    with_outputs: bool = False


class TeacherPass(NamedTuple):
    """A source's answer: the rows the loss reads (see :func:`hf_kd.losses.score`) and, only when asked for,
    the teacher's full outputs."""

    rows: TeacherRows
    outputs: Any = None


class TeacherSource(Protocol):
    """A teacher source: the student's part of a batch, and the teacher's rows for its targets."""

    def student_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]: ...

    def rows(self, request: RowRequest) -> TeacherPass: ...
