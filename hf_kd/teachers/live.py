"""The teacher's forward pass at the least cost: inference mode, target positions only, a shared encoder reused.

Prompt and padding positions are never targets, so their logits are dropped before anything is cast to
float32. Causal models of Transformers 5 can skip them earlier still: given a boolean ``logits_to_keep`` mask
they apply their output layer to the kept positions only, so the teacher's ``[batch, seq, vocab]`` logits are
never formed. When the student's encoder is a frozen copy of the teacher's (DistilBART, distil-whisper), the
teacher can take the student's encoder outputs instead of running its own encoder:
:func:`check_shared_encoder` makes sure that it is so.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_kd.losses import IGNORE_INDEX
from hf_kd.teachers.base import RowRequest, TeacherPass

try:  # Transformers >= 5: boolean logits_to_keep masks are understood by (almost) every causal LM
    from transformers.modeling_utils import slice_logits_to_keep as _slice_logits_to_keep  # noqa: F401

    _MASKS_SUPPORTED = True
except ImportError:
    _MASKS_SUPPORTED = False


def accepts_logits_mask(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped from DDP/DeepSpeed) can be given a boolean ``logits_to_keep`` mask."""
    model = getattr(model, "module", model)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return _MASKS_SUPPORTED and "logits_to_keep" in params


def target_logits(
    model: nn.Module, inputs: dict[str, Any], targets: torch.Tensor, vocab_size: int, is_encoder_decoder: bool
) -> torch.Tensor:
    """``[num_targets, vocab_size]`` logits of ``model`` at the positions where ``targets`` != -100.

    Args:
        model: the teacher (frozen).
        inputs: its forward kwargs.
        targets: labels aligned with the logits, already shifted for causal models (``[batch, seq - 1]``).
        vocab_size: how many leading logit columns to keep.
        is_encoder_decoder: whether logits line up with ``targets`` directly (else position ``i`` predicts
            ``targets[:, i]`` for ``i < seq - 1``).

    Rows come in the order of ``targets.reshape(-1)``, as :func:`hf_kd.losses.chunked.chunked_distillation_loss`
    expects. The result is an inference tensor: read it, never write to it or save it for backward.
    """
    mask = targets.ne(IGNORE_INDEX)
    with torch.inference_mode():
        if not is_encoder_decoder and accepts_logits_mask(model):
            keep = F.pad(mask, (0, 1), value=False)  # the last position predicts nothing
            logits = model(**inputs, logits_to_keep=keep).logits
            if logits.dim() == 2 and logits.shape[0] == int(mask.sum()):
                return logits[:, :vocab_size]
            raise RuntimeError(
                f"{type(model).__name__} accepts logits_to_keep but returned logits of shape {tuple(logits.shape)} "
                "for a boolean mask; please report this model."
            )
        return rows_at_targets(model(**inputs).logits, targets, vocab_size, is_encoder_decoder)


def rows_at_targets(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, is_encoder_decoder: bool
) -> torch.Tensor:
    """The ``[num_targets, vocab_size]`` rows of full ``[batch, seq, width]`` logits where ``targets`` != -100."""
    if not is_encoder_decoder:
        logits = logits[:, :-1]
    return logits[..., :vocab_size][targets.ne(IGNORE_INDEX)]


def check_shared_encoder(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse ``teacher_reuses_student_encoder`` unless the student's encoder is a frozen copy of the teacher's."""
    problem = shared_encoder_problem(student, teacher)
    if problem is not None:
        raise ValueError(f"teacher_reuses_student_encoder: {problem}")


def shared_encoder_problem(student: nn.Module, teacher: nn.Module) -> str | None:
    """Why the teacher cannot take the student's encoder outputs for its own (and what to do), or None when the
    student's encoder is a frozen copy of the teacher's: the same parameter names, shapes and values."""
    student, teacher = getattr(student, "module", student), getattr(teacher, "module", teacher)
    if not (
        getattr(student.config, "is_encoder_decoder", False) and getattr(teacher.config, "is_encoder_decoder", False)
    ):
        return "it needs encoder-decoder models (BART, T5, Whisper ...)."
    s_params = dict(student.get_encoder().named_parameters())
    t_params = dict(teacher.get_encoder().named_parameters())
    trainable = [name for name, p in s_params.items() if p.requires_grad]
    if trainable:
        return (
            f"the student's encoder trains ({len(trainable)} parameters, e.g. {trainable[0]!r}), so its outputs are "
            "not the teacher's. Freeze it first: set freeze_encoder=True."
        )
    same = s_params.keys() == t_params.keys() and all(
        p.shape == t_params[name].shape and torch.equal(p.detach().to(t_params[name]), t_params[name].detach())
        for name, p in s_params.items()
    )
    if not same:
        return (
            "the student's encoder is not a copy of the teacher's (its parameters differ in names, shapes or "
            "values), so the teacher would see different encoder outputs. Copy the teacher's encoder into the "
            "student, or turn the option off."
        )
    return None


# Config fields by which an encoder's training forward differs from its evaluation one (BART, Whisper, T5, BERT-like).
_ENCODER_NOISE = (
    "dropout", "attention_dropout", "activation_dropout", "dropout_rate", "encoder_layerdrop", "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)  # fmt: skip


def encoder_dropout(student: nn.Module) -> str | None:
    """What makes the student's encoder outputs in training differ from the teacher's (eval-mode) ones, e.g.
    ``"dropout=0.1"``: a dropout or layer-drop setting above 0, or a dropout module; None when there is none."""
    student = getattr(student, "module", student)
    for name in _ENCODER_NOISE:
        value = getattr(student.config, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return f"{name}={value}"
    for name, module in student.get_encoder().named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"{name} p={module.p}"
    return None


class LiveTeacher:
    """A teacher model (or a :class:`~hf_kd.teachers.ensemble.TeacherEnsemble`) run on the student's inputs:
    dense rows at the target positions.

    Args:
        model: the frozen teacher, prepared on the student's device.
        vocab_size: the columns shared with the student.
        reuse_student_encoder: take the student's encoder outputs instead of running the teacher's encoder
            (checked by :func:`check_shared_encoder` before this is built).
    """

    def __init__(self, model: nn.Module, vocab_size: int, reuse_student_encoder: bool = False) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.reuse_student_encoder = reuse_student_encoder
        self.is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

    def student_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs

    def rows(self, request: RowRequest) -> TeacherPass:
        """The teacher's rows where the labels (aligned with the output positions) are targets."""
        teacher_inputs = request.student_inputs  # the teacher reads what the student reads
        if self.reuse_student_encoder:
            encoder_states = request.student_outputs.encoder_last_hidden_state
            encoder_states = encoder_states.to(next(self.model.parameters()).dtype)
            teacher_inputs = {**teacher_inputs, "encoder_outputs": (encoder_states,)}
        # target_logits takes the labels as the logits of a causal model read them: shifted, one position shorter.
        labels = request.labels
        targets = labels if self.is_encoder_decoder else labels[:, :-1]
        if not request.with_outputs:
            # Inference mode, the teacher's dtype, and only the target rows kept (or computed at all).
            rows = target_logits(self.model, teacher_inputs, targets, self.vocab_size, self.is_encoder_decoder)
            return TeacherPass(rows)
        # The hidden-state term keeps the teacher's states in the student's graph: no inference mode for them.
        with torch.no_grad():
            outputs = self.model(**{**teacher_inputs, "output_hidden_states": True})
        return TeacherPass(rows_at_targets(outputs.logits, targets, self.vocab_size, self.is_encoder_decoder), outputs)
