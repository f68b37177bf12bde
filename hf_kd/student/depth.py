"""Block importance: how much each layer changes its input, to choose which layers a shallower student keeps.

ShortGPT's Block Influence (Men et al., 2024) and Minitron's depth ranking (Muralidharan et al., 2024):
``BI_i = 1 - mean cos(x_in_i, x_out_i)`` over the counted tokens of some calibration batches, where ``x_in_i`` and
``x_out_i`` are the hidden states entering and leaving layer ``i``. A layer that barely turns its input (BI near 0)
is the cheapest to drop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hf_kd.student.hidden import hidden_masks
from hf_kd.student.make import stacks_of


def layer_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """Each stack's ModuleList of layers, by stack name (``"encoder"``/``"decoder"``)."""
    return {name: model.get_submodule(stack.prefix) for name, stack in stacks_of(model.config).items()}


class _Influence:
    """Float64 sums of per-token cosines and token counts, per layer of each stack, fed by forward hooks."""

    def __init__(self, layers: Mapping[str, nn.ModuleList]) -> None:
        self.cos_sums = {name: [0.0] * len(stack) for name, stack in layers.items()}
        self.tokens = {name: [0] * len(stack) for name, stack in layers.items()}
        self.masks: dict[str, Tensor | None] = {}

    def hook(self, stack: str, index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            # float32 per token (bf16 teachers too), float64 sums: the scores do not depend on how batches split.
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1).double()
            mask = self.masks.get(stack)
            if mask is None:
                count = cos.numel()
            else:
                if mask.shape != cos.shape:
                    raise ValueError(
                        f"The {stack} mask has shape {tuple(mask.shape)} but the {stack} hidden states are "
                        f"{tuple(cos.shape)} tokens: pad the batch's mask and its ids to the same length."
                    )
                mask = mask.to(cos.device).bool()
                cos, count = cos[mask], int(mask.sum())
            self.cos_sums[stack][index] += float(cos.sum())
            self.tokens[stack][index] += count

        return record

    def scores(self) -> dict[str, list[float]]:
        out = {}
        for stack, sums in self.cos_sums.items():
            if min(self.tokens[stack]) == 0:
                raise ValueError(
                    f"No {stack} token was counted: every calibration position is padding (attention_mask 0, or "
                    "labels -100 on the decoder side); give batches with real tokens."
                )
            out[stack] = [1.0 - s / n for s, n in zip(sums, self.tokens[stack], strict=True)]
        return out


def _check_batch(batch: Any, is_encoder_decoder: bool) -> None:
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"A calibration batch is a {type(batch).__name__}, not a dict of tensors: give dicts to call "
            "model(**batch) with, e.g. a data collator's output."
        )
    if is_encoder_decoder and not {"labels", "decoder_input_ids", "decoder_inputs_embeds"} & set(batch):
        raise ValueError(
            "An encoder-decoder model's calibration batches need labels or decoder_input_ids so that its decoder "
            "runs; pad them with a seq2seq collator (e.g. DataCollatorForSeq2Seq)."
        )


@torch.no_grad()
def block_importance(
    model: nn.Module, batches: Sequence[Mapping[str, Tensor]] | Iterable[Mapping[str, Tensor]]
) -> dict[str, list[float]]:
    """Block Influence of every layer of every stack: ``1 - mean cos(x_in, x_out)`` over the counted tokens.

    Tokens count where ``attention_mask`` is 1 (encoder, causal models) and, in a decoder, where
    ``decoder_attention_mask`` is 1 or else where the labels are not -100 (all tokens when a batch has no mask).
    The mean is over all counted tokens of all batches together (float64 sums), so splitting the same rows into
    other batches gives the same scores. The model runs in eval mode without gradients; each module's training
    mode is restored afterwards.

    Args:
        model: a model of a family :func:`hf_kd.student.make.stacks_of` supports.
        batches: dicts of tensors to call ``model(**batch)`` with (moved to the model's device); an
            encoder-decoder model's need ``labels`` or ``decoder_input_ids``.

    Returns:
        ``{"encoder": [...], "decoder": [...]}`` (causal models: ``"decoder"`` only), one score per layer.
    """
    layers = layer_lists(model)
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    influence = _Influence(layers)
    handles = [
        layer.register_forward_hook(influence.hook(name, i), with_kwargs=True)
        for name, stack in layers.items()
        for i, layer in enumerate(stack)
    ]
    modes = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    seen = 0
    try:
        model.eval()
        for batch in batches:
            _check_batch(batch, is_encoder_decoder)
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            influence.masks = hidden_masks(batch, is_encoder_decoder)
            model(**{"use_cache": False, **batch})
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if seen == 0:
        raise ValueError(
            "block_importance got no calibration batches: pass a few batches (dicts of tensors for model(**batch)) "
            "of the data the student will see."
        )
    return influence.scores()


def _check_counts(counts: Any, layers: Mapping[str, nn.ModuleList], model_type: str) -> dict[str, int]:
    if not isinstance(counts, Mapping) or not counts:
        raise ValueError(
            f"counts={counts!r}: give the number of layers to keep per stack, e.g. {{'decoder': 2}} "
            f"(a {model_type} model has {sorted(layers)})."
        )
    unknown = sorted(set(counts) - set(layers))
    if unknown:
        raise ValueError(f"Unknown stack(s) {unknown} in counts: a {model_type} model has {sorted(layers)}.")
    for name, count in counts.items():
        available = len(layers[name])
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= available:
            raise ValueError(
                f"counts[{name!r}]={count!r}, but the {name} has {available} layers: keep between 1 and {available}."
            )
    return dict(counts)


def layers_by_importance(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]] | Iterable[Mapping[str, Tensor]],
    counts: Mapping[str, int],
) -> dict[str, list[int]]:
    """For each stack in ``counts``, the ``count`` layers of highest :func:`block_importance`, in increasing order
    (ties: the lower index first). The result is a layer map for ``make_student(layer_map=...)``.

    Example:
        >>> layers_by_importance(teacher, batches, {"decoder": 2})  # doctest: +SKIP
        {'decoder': [0, 2]}
    """
    layers = layer_lists(model)
    counts = _check_counts(counts, layers, model.config.model_type)
    scores = block_importance(model, batches)
    chosen = {}
    for name, count in counts.items():
        ranked = sorted(range(len(scores[name])), key=lambda i: (-scores[name][i], i))
        chosen[name] = sorted(ranked[:count])
    return chosen
