"""hf_kd: knowledge distillation of text-generation models for the Hugging Face Trainer."""

from hf_kd.config import DistillationConfig
from hf_kd.errors import TokenizerMismatchError
from hf_kd.losses import DIVERGENCES, distillation_loss
from hf_kd.student import make_student
from hf_kd.trainer import DistillationTrainer
from hf_kd.version import __version__

__all__ = [
    "DIVERGENCES",
    "DistillationConfig",
    "DistillationTrainer",
    "TokenizerMismatchError",
    "__version__",
    "distillation_loss",
    "make_student",
]
