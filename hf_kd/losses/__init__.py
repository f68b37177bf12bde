"""Token-level distillation losses.

- :mod:`~hf_kd.losses.divergences`: the divergences, small pure functions of log-probabilities;
- :mod:`~hf_kd.losses.base`: the settings, the output, and the alpha mix and normaliser all paths share;
- :mod:`~hf_kd.losses.reference`: the dense reference (autograd, all rows at once);
- :mod:`~hf_kd.losses.topk`: rows of a top-k teacher cache and their tail treatments;
- :mod:`~hf_kd.losses.chunked`: the chunk engine (the gradient formed chunk by chunk; the fused output layer);
- :mod:`~hf_kd.losses.output_layer`: a student's forward pass stopped before its output layer;
- :mod:`~hf_kd.losses.cross_tokenizer`: the loss across two tokenizers;
- :mod:`~hf_kd.losses.scoring`: the one function that picks the path for a batch's rows.
"""

from hf_kd.losses.base import (
    DEFAULT_CHUNK_MIB,
    DEFAULT_CHUNK_SIZE,
    IGNORE_INDEX,
    DistillationLossOutput,
    LossSettings,
    finish,
    mix_terms,
    normalizer,
)
from hf_kd.losses.chunked import chunked_distillation_loss, fused_distillation_loss
from hf_kd.losses.cross_tokenizer import AlignedRows, CrossTokenizerLossOutput, cross_tokenizer_loss
from hf_kd.losses.divergences import (
    DIVERGENCES,
    MIN_LOG_PROB,
    forward_kl,
    get_divergence,
    jsd,
    log_probs,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from hf_kd.losses.output_layer import (
    OutputLayer,
    UnfusableModelError,
    forward_without_logits,
    output_layer,
    resolve_fusion,
)
from hf_kd.losses.reference import distillation_loss
from hf_kd.losses.scoring import StudentOutput, TeacherRows, score
from hf_kd.losses.topk import TAIL_TREATMENTS, CacheAlignmentError, TopKRows, sparse_distillation_loss

__all__ = [
    "DEFAULT_CHUNK_MIB", "DEFAULT_CHUNK_SIZE", "DIVERGENCES", "IGNORE_INDEX", "MIN_LOG_PROB", "TAIL_TREATMENTS",
    "AlignedRows",
    "CacheAlignmentError", "CrossTokenizerLossOutput", "DistillationLossOutput", "LossSettings", "OutputLayer",
    "StudentOutput", "TeacherRows", "TopKRows", "UnfusableModelError", "chunked_distillation_loss",
    "cross_tokenizer_loss", "distillation_loss", "forward_kl", "forward_without_logits", "fused_distillation_loss",
    "get_divergence", "jsd", "log_probs", "mix_terms", "finish", "normalizer", "output_layer", "resolve_fusion",
    "reverse_kl", "score", "skew_forward_kl", "skew_reverse_kl", "sparse_distillation_loss", "tvd",
]  # fmt: skip
