"""Several teachers read as one: the log of the weighted mean of their next-token probabilities.

``log p(v) = logsumexp_i (log w_i + log_softmax(z_i)(v))``, computed in float32 (float64 for float64 members) member
by member, so that only one extra ``[positions, vocab]`` buffer exists at a time. The result is returned as the
ensemble's ``logits`` (log-probabilities are logits), so every path that reads a teacher's logits reads an
ensemble's: dense, chunked and fused losses, every divergence, the temperature (which softens the mixture), ``hf-kd
cache-teacher`` and DDP. The members must share the student's tokenizer; each is cut to the narrowest output layer
before its softmax, as a single teacher is cut to the shared vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput, Seq2SeqLMOutput

from hf_kd.teachers.live import accepts_logits_mask
from hf_kd.teachers.loading import output_width


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """The members' weights normalised to sum to 1 (equal without ``weights``); a clear error for bad ones."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"teacher_weights has {len(weights)} values for {count} teachers: give one per teacher.")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"teacher_weights must be finite and > 0, got {weights}.")
    return [w / sum(weights) for w in weights]


class TeacherEnsemble(nn.Module):
    """Teachers with one tokenizer mixed in probability space.

    Args:
        teachers: the member models, all causal or all encoder-decoder.
        weights: one positive weight per member (normalised); equal weights when ``None``.
    """

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(teachers) < 2:
            raise ValueError("A teacher ensemble needs at least two teachers; pass one model as teacher_model.")
        kinds = {bool(getattr(t.config, "is_encoder_decoder", False)) for t in teachers}
        if len(kinds) > 1:
            raise ValueError("The teachers of an ensemble must be all causal or all encoder-decoder models.")
        self.members = nn.ModuleList(teachers)
        self.weights = check_weights(weights, len(teachers))
        self.config = teachers[0].config
        self.vocab_width = min(output_width(t) for t in teachers)
        self._takes_mask = [accepts_logits_mask(t) for t in teachers]

    def get_output_embeddings(self) -> nn.Module | None:
        """The narrowest member's output layer: the ensemble's logits are as wide as it (width checks read it)."""
        return min(self.members, key=output_width).get_output_embeddings()

    def forward(self, logits_to_keep: Any = None, **inputs: Any) -> CausalLMOutput | Seq2SeqLMOutput:
        """The members' forward passes on the same inputs; ``logits`` are the mixture's log-probabilities."""
        mixed = None
        for member, weight, takes_mask in zip(self.members, self.weights, self._takes_mask, strict=True):
            kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep is not None and takes_mask else {}
            logits = member(**inputs, **kwargs).logits[..., : self.vocab_width]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
            weighted = F.log_softmax(logits, dim=-1) + math.log(weight)
            mixed = weighted if mixed is None else torch.logaddexp(mixed, weighted)
        output = Seq2SeqLMOutput if self.config.is_encoder_decoder else CausalLMOutput
        return output(logits=mixed)
