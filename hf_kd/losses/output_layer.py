"""A model's forward pass stopped at its output layer, so the loss can apply that layer chunk by chunk.

:func:`forward_without_logits` runs the model's own forward (through any DDP or DeepSpeed wrapper) with the
output layer replaced by one that records its input and returns an empty tensor: everything the model does
before the projection (T5's ``d_model ** -0.5`` rescale of tied embeddings included) happens as usual, and
``[batch, seq, vocab]`` logits are never formed. :func:`output_layer` returns the projection itself, with
BART's ``final_logits_bias``, which those models add after it. Models that change their logits in other
ways after the projection (soft-capping, logit scales) are refused with :class:`UnfusableModelError` rather
than distilled with subtly wrong logits. :func:`resolve_fusion` decides ``fuse_output_layer="auto"``: fused
wherever the model allows it, which is the fastest exact path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Config fields of models whose forward changes the logits after the output layer (Gemma 2/3, Cohere, Granite).
_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


@dataclass(frozen=True)
class OutputLayer:
    """What a model does to its last hidden state to get logits: ``linear(h * scale, weight) + bias``.

    ``bias`` is added after the projection, as BART adds its ``final_logits_bias``; ``scale`` is T5's
    ``d_model ** -0.5`` when its embeddings are tied. Only the first ``vocab_size`` rows of ``weight`` (and
    entries of ``bias``) are used: output layers are often wider than the vocabulary.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0


class UnfusableModelError(ValueError):
    """The model's logits cannot be reproduced from the input of its output layer."""


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "module"):  # DDP, DeepSpeed engines
            model = model.module
        elif hasattr(model, "get_base_model"):  # a PEFT model: its buffers (final_logits_bias) are the base model's
            model = model.get_base_model()
        else:
            return model


def _head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UnfusableModelError(
            f"{type(model).__name__} has no linear output layer (get_output_embeddings() is "
            f"{type(head).__name__}), so the loss cannot apply it chunk by chunk. Set fuse_output_layer=False."
        )
    if head.weight.numel() == 0:
        raise UnfusableModelError(
            "The output layer's weight is sharded (DeepSpeed ZeRO-3 or FSDP), so the loss cannot apply it outside "
            "the model's forward. Set fuse_output_layer=False."
        )
    return head


def output_layer(model: nn.Module) -> OutputLayer:
    """The output projection of ``model``, to be applied to what :func:`forward_without_logits` returns."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    head = _head(model)
    for field in _LOGIT_MODIFIERS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise UnfusableModelError(
                f"{type(model).__name__} changes its logits after the output layer (config.{field}="
                f"{getattr(config, field)!r}), which the fused loss does not reproduce. Set fuse_output_layer=False."
            )
    bias = head.bias
    final_bias = getattr(model, "final_logits_bias", None)
    if final_bias is not None:  # BART-like: added to the logits after lm_head
        if bias is not None:
            raise UnfusableModelError(f"{type(model).__name__} has both an output-layer bias and final_logits_bias.")
        bias = final_bias
    return OutputLayer(weight=head.weight, bias=bias)


@contextmanager
def _capturing_output_layer(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    inner = _unwrap(model)
    head = _head(inner)
    captured: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        captured.append(hidden)
        # Empty logits, but in the graph of the hidden states and the weight: DDP's search for unused parameters
        # (find_unused_parameters, the Trainer's default without gradient checkpointing) starts from the outputs,
        # and would otherwise call every parameter unused, then fail when the loss's gradients reach them.
        return hidden[..., :0] * head.weight.reshape(-1)[:1]

    final_bias = getattr(inner, "final_logits_bias", None)
    head.forward = forward
    if final_bias is not None:
        inner.final_logits_bias = final_bias.new_empty(1, 0)  # so that "empty logits + bias" stays empty
    try:
        yield captured
    finally:
        del head.forward
        if final_bias is not None:
            inner.final_logits_bias = final_bias


def forward_without_logits(model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """Run ``model(**inputs)`` up to its output layer: the layer's input ``[..., hidden]`` and the outputs.

    The outputs' ``logits`` are empty (last dimension 0); the rest (an encoder-decoder's
    ``encoder_last_hidden_state``) is as usual. Do not pass ``labels``: the model cannot compute its loss.
    """
    with _capturing_output_layer(model) as captured:
        outputs = model(**inputs)
    if len(captured) != 1:
        raise UnfusableModelError(
            f"{type(_unwrap(model)).__name__} called its output layer {len(captured)} times in one forward pass; "
            "the fused loss supports models that call it once. Set fuse_output_layer=False."
        )
    return captured[0], outputs


def resolve_fusion(
    setting: bool | str,
    model: nn.Module,
    *,
    chunked: bool = True,
    cross_tokenizer: bool = False,
    sharded: bool = False,
    say: bool = True,
) -> bool:
    """Whether training applies ``model``'s output layer inside the loss, for ``fuse_output_layer=setting``.

    ``True`` checks that it can (raises :class:`UnfusableModelError` otherwise), ``False`` is False, and ``"auto"``
    fuses wherever it can: unless the loss is unchunked (``chunked`` False: the reference was asked for), the
    student reads other tokens than the teacher (``cross_tokenizer``), its weights are sharded (``sharded``:
    DeepSpeed ZeRO-3, FSDP), or :func:`output_layer` refuses the model. A fallback is logged once, naming why,
    when ``say`` (the local main process).
    """
    if setting is True:
        output_layer(model)
        return True
    if setting is False or not chunked:
        return False
    why = "cross_tokenizer is on (the loss compares whole rows of two vocabularies)" if cross_tokenizer else None
    if why is None and sharded:
        why = "the student's weights are sharded (DeepSpeed ZeRO-3 or FSDP)"
    if why is None:
        try:
            output_layer(model)
            return True
        except UnfusableModelError as err:
            why = str(err).removesuffix(" Set fuse_output_layer=False.")
    if say:
        logger.warning(
            "fuse_output_layer='auto': the loss uses the student's logits (the chunked loss), not its fused output "
            "layer: %s. Same loss and gradients; set fuse_output_layer=False to choose this path and silence this.",
            why,
        )
    return False
