"""What every loss path shares: the settings, the output, and the one place where the terms are mixed.

``alpha * CE + (1 - alpha) * T**2 * D``, summed over target tokens and divided by one normaliser: the dense
reference, the top-k rows, the chunk engine and the cross-tokenizer loss all end in :func:`mix_terms` and
:func:`normalizer` (the chunk engine per chunk, the others once through :func:`finish`), and all return a
:class:`DistillationLossOutput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

from hf_kd.losses.divergences import get_divergence

IGNORE_INDEX = -100
"""The label of positions that are not targets, as in Transformers."""

DEFAULT_CHUNK_SIZE = 1024
DEFAULT_CHUNK_MIB = 512
"""The default memory budget of one chunk of the loss, in MiB (see :func:`chunk_rows`)."""
CHUNK_ARRAYS = 4
"""How many float32 ``[rows, vocab]`` arrays a chunk holds at its peak, which :func:`chunk_rows` sizes the chunk by:
forward KL, the default, holds four on the fused path (the chunk's logits, the student's and the teacher's
log-probabilities, the teacher's probabilities) and fewer from given logits or a top-k cache; the divergences that
go through autograd hold a few more."""


class LossKeywords(TypedDict, total=False):
    """The keywords every loss function takes (``distillation_loss(..., loss="jsd", alpha=0)``), with the
    defaults and meanings of :class:`LossSettings`."""

    loss: str
    temperature: float
    alpha: float
    beta: float
    skew: float


@dataclass(frozen=True)
class LossSettings:
    """How the token-level loss is computed: the divergence, its parameters, the mix and the path.

    Attributes:
        loss: the divergence, a key of :data:`hf_kd.losses.DIVERGENCES`.
        temperature: both distributions are softened by it; the divergence is scaled by its square so that
            its gradients keep their size (Hinton et al. 2015).
        alpha: weight of the cross-entropy term; ``1 - alpha`` weighs the divergence.
        beta: the ``jsd`` mixture weight.
        skew: the skew of ``skew_forward_kl`` and ``skew_reverse_kl``.
        chunk_size: target tokens per chunk; ``None`` computes the unchunked reference.
        chunk_mib: the memory budget of one chunk in MiB: chunks hold fewer than ``chunk_size`` target tokens where
            the vocabulary is large (see :func:`chunk_rows`); ``None``: ``chunk_size`` whatever the vocabulary.
        fuse_output_layer: apply the student's output layer inside the chunked loss (training only).
        uld_weight: the weight of the ULD term of the cross-tokenizer loss.

    The trainer builds it once from a :class:`hf_kd.DistillationConfig` (:meth:`from_config`); the loss
    functions build it from their :class:`LossKeywords`.
    """

    loss: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    skew: float = 0.1
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    chunk_mib: float | None = DEFAULT_CHUNK_MIB
    fuse_output_layer: bool = False
    uld_weight: float = 1.0

    @classmethod
    def from_config(cls, args: Any, **overrides: Any) -> LossSettings:
        """The settings of a :class:`hf_kd.DistillationConfig`; ``overrides`` replace fields (the trainer passes
        ``fuse_output_layer``, which it resolves from "auto" by the student: see
        :func:`hf_kd.losses.output_layer.resolve_fusion`)."""
        same_names = {name: getattr(args, name) for name in LossKeywords.__annotations__}
        fields = {
            **same_names,
            "chunk_size": args.loss_chunk_size,
            "chunk_mib": getattr(args, "loss_chunk_mib", DEFAULT_CHUNK_MIB),
            "uld_weight": getattr(args, "uld_weight", 1.0),
            "fuse_output_layer": args.fuse_output_layer is True,
        }
        return cls(**{**fields, **overrides})

    @property
    def divergence(self) -> Callable[..., torch.Tensor]:
        return get_divergence(self.loss, beta=self.beta, skew=self.skew)

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments of the public loss functions (``distillation_loss`` and its relatives)."""
        return {"loss": self.loss, "temperature": self.temperature, "alpha": self.alpha, "beta": self.beta,
                "skew": self.skew}  # fmt: skip


@dataclass
class DistillationLossOutput:
    """The combined loss and the sums it was made of, kept for logging."""

    loss: torch.Tensor
    """alpha * CE + (1 - alpha) * temperature**2 * divergence, each summed over target tokens and divided by
    the normalizer (``num_items_in_batch`` when given, else the number of target tokens)."""
    kd_sum: torch.Tensor | None
    """Divergence at the temperature, summed over target tokens (no temperature**2 factor), detached; None when
    there was no teacher to compare with."""
    ce_sum: torch.Tensor
    """Cross-entropy of the student against the labels, summed over target tokens, detached."""
    num_tokens: int
    """How many target tokens the batch held."""
    agreement: torch.Tensor | None
    """How many target tokens have the same top-1 token under student and teacher, detached; None without a
    teacher."""


def chunk_rows(chunk_size: int, chunk_mib: float | None, vocab: int) -> int:
    """Target tokens per chunk: ``chunk_size``, fewer where :data:`CHUNK_ARRAYS` float32 ``[rows, vocab]`` arrays would
    not fit ``chunk_mib`` MiB, and at least 1.

    So the loss's working memory stays flat in the vocabulary: with the defaults (1024 tokens, 512 MiB), chunks
    hold 1024 tokens up to a vocabulary of 32,768, 667 at GPT-2's 50,257 and 128 at 262,144.
    """
    if chunk_mib is None:
        return chunk_size
    fit = int(chunk_mib * 2**20) // (CHUNK_ARRAYS * 4 * max(vocab, 1))
    return max(1, min(chunk_size, fit))


def mix_terms(ce: torch.Tensor, kd: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """``alpha * ce + (1 - alpha) * temperature**2 * kd``, a term whose weight is 0 left out.

    Left out rather than multiplied by 0: an infinite CE (a target the student rules out with -inf) would
    otherwise make an alpha = 0 loss NaN.
    """
    if alpha <= 0.0:
        return temperature**2 * kd
    if alpha >= 1.0:
        return ce
    return alpha * ce + (1.0 - alpha) * temperature**2 * kd


def normalizer(num_items_in_batch: int | torch.Tensor | None, num_tokens: int) -> int | torch.Tensor:
    """What the summed loss is divided by: the Trainer's count over accumulated micro-batches (and devices) when
    it passes one, else this batch's target tokens (at least 1)."""
    return num_items_in_batch if num_items_in_batch is not None else max(num_tokens, 1)


def finish(
    ce_sum: torch.Tensor,
    kd_sum: torch.Tensor,
    num_tokens: int,
    agreement: torch.Tensor,
    settings: LossSettings,
    num_items_in_batch: int | torch.Tensor | None,
    anchor: torch.Tensor,
) -> DistillationLossOutput:
    """The output from the two sums: the loss mixed and divided by the :func:`normalizer`, the sums detached.

    With no target token the loss is a zero tied to ``anchor`` (the student's graph), so that backward gives zero
    gradients; not the quotient, which is 0 / 0 = NaN when ``num_items_in_batch`` counts no target either.
    """
    if num_tokens == 0:
        total = anchor.flatten()[:0].float().sum()
    else:
        n = normalizer(num_items_in_batch, num_tokens)
        n = n.to(kd_sum.device) if torch.is_tensor(n) else n
        total = mix_terms(ce_sum, kd_sum, settings.alpha, settings.temperature) / n
    return DistillationLossOutput(total, kd_sum.detach(), ce_sum.detach(), num_tokens, agreement)
