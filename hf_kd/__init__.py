"""hf_kd: knowledge distillation of text-generation models for the Hugging Face Trainer."""

__version__ = "0.1.0"

from hf_kd.config import DistillationConfig  # noqa: E402
from hf_kd.losses import DIVERGENCES, distillation_loss  # noqa: E402
from hf_kd.student import make_student  # noqa: E402
from hf_kd.teacher import TokenizerMismatchError  # noqa: E402
from hf_kd.trainer import DistillationTrainer  # noqa: E402

__all__ = [
    "DIVERGENCES",
    "DistillationConfig",
    "DistillationTrainer",
    "TokenizerMismatchError",
    "__version__",
    "distillation_loss",
    "make_student",
]
