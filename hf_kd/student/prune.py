"""Width pruning, Minitron style (Muralidharan et al., 2024): rank hidden channels, MLP neurons and attention heads
by their mean activation on calibration batches, keep the top ones, and slice every weight that touches them."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_kd.student.width_specs import WIDTH_SPECS, Sizes, WidthSpec

# What the config and hf_kd_student.json record: the kept indices per dimension (teacher numbering).
PRUNING_ATTRIBUTE = "hf_kd_pruning"

WIDTH_ARGUMENTS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def spec_of(config: Any) -> WidthSpec:
    spec = WIDTH_SPECS.get(getattr(config, "model_type", None))
    if spec is None:
        raise ValueError(
            f"Width pruning does not support model_type={config.model_type!r} (supported: {sorted(WIDTH_SPECS)}); "
            "make the student by layers only."
        )
    return spec


def _check_size(name: str, value: Any, teacher: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= teacher:
        raise ValueError(
            f"{name}={value!r}: pruning keeps between 1 and {teacher} here (the teacher's {name}); it cannot widen "
            "a model; pass a smaller number."
        )
    return value


def target_sizes(
    config: Any,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
) -> Sizes:
    """The student's widths (the teacher's where not given), validated for the family; one ValueError otherwise."""
    spec = spec_of(config)
    model_type = config.model_type
    if model_type == "bart" and config.encoder_attention_heads != config.decoder_attention_heads:
        raise ValueError(
            "This BART teacher has different encoder and decoder head counts, which width pruning does not "
            "handle; make the student by layers only (no hidden_size, intermediate_size, num_attention_heads)."
        )
    teacher = spec.sizes(config, None)
    hidden = _check_size("hidden_size", hidden_size, teacher.hidden) if hidden_size is not None else teacher.hidden
    ffn = _check_size("intermediate_size", intermediate_size, teacher.ffn) if intermediate_size is not None else None
    ffn = ffn if ffn is not None else teacher.ffn
    if num_key_value_heads is not None and not spec.grouped_query:
        raise ValueError(
            f"num_key_value_heads: a {model_type} model has no grouped-query attention (every head has its own "
            "keys and values); use num_attention_heads instead."
        )
    group = teacher.heads // teacher.kv_heads
    kv = teacher.kv_heads
    if num_key_value_heads is not None:
        kv = _check_size("num_key_value_heads", num_key_value_heads, teacher.kv_heads)
    if num_attention_heads is not None:
        heads = _check_size("num_attention_heads", num_attention_heads, teacher.heads)
    else:
        heads = kv * group  # whole groups: each kept key-value head keeps its query heads
    if spec.grouped_query:
        if heads % kv or heads // kv > group:
            raise ValueError(
                f"num_attention_heads={heads} with num_key_value_heads={kv}: each key-value head must serve the "
                f"same number of query heads, at most the teacher's {group}; pass a multiple of {kv} up to "
                f"{kv * group}."
            )
    else:
        kv = heads
    if not spec.head_dim_is_free and hidden != heads * teacher.head_dim:
        # GPT-2 and BART split the hidden size into the heads: the head size stays the teacher's.
        if hidden_size is not None and hidden % teacher.head_dim == 0:
            fix = f"num_attention_heads={hidden // teacher.head_dim} with hidden_size={hidden}"
        elif hidden_size is not None:
            fix = f"a hidden_size that is a multiple of {teacher.head_dim}"
        else:
            fix = f"hidden_size={heads * teacher.head_dim} with num_attention_heads={heads}"
        raise ValueError(
            f"A {model_type} student's hidden_size must equal num_attention_heads x {teacher.head_dim} (the "
            f"teacher's head size), not {hidden} with {heads} heads; pass {fix}."
        )
    return Sizes(hidden, ffn, heads, kv, teacher.head_dim)


# Importance ----------------------------------------------------------------------------------------------------------


def _token_masks(batch: Mapping[str, torch.Tensor], is_encoder_decoder: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(source mask, target mask): which positions are real tokens on the encoder's and on the decoder's side."""
    ids = batch["input_ids"]
    source = batch.get("attention_mask", torch.ones_like(ids))
    if not is_encoder_decoder:
        return source, source
    if "decoder_attention_mask" in batch:
        target = batch["decoder_attention_mask"]
    elif "labels" in batch:
        target = (batch["labels"] != -100).long()
    else:
        target = torch.ones_like(batch["decoder_input_ids"])
    return source, target


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over real tokens of ``values`` (batch, seq, ...), their count)."""
    if mask.shape != values.shape[:2]:
        raise ValueError(
            f"A calibration batch's mask has shape {tuple(mask.shape)} but the model ran on {tuple(values.shape[:2])} "
            "tokens; give attention_mask (and labels or decoder_attention_mask) shaped like the token ids."
        )
    weights = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.dim() - 2)))
    return (values * weights).sum(dim=(0, 1)), mask.sum()


@torch.no_grad()
def activation_importance(model: PreTrainedModel, batches: Sequence[Mapping[str, torch.Tensor]]) -> dict:
    """Minitron's activation estimators, averaged over the real (unmasked) tokens of all batches.

    Returns ``{("hidden", ""): (hidden,), ("ffn", layer): (neurons,), ("heads", group): (heads,)}``:

    - hidden channels: mean absolute output of every norm (LayerNorm / RMSNorm), summed over all norms;
    - MLP neurons: mean absolute activation entering the down (out) projection;
    - heads: mean L2 norm of each head's attention output entering the out projection (summed over the attention
      modules of a group: one T5 stack's self-attention).
    """
    spec = spec_of(model.config)
    sums: dict[tuple[str, str], torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}

    def side(name: str) -> str:
        root = spec.encoder_root
        return "source" if root is not None and (name == root or name.startswith(root + ".")) else "target"

    def add(key: tuple[str, str], name: str, values: torch.Tensor) -> None:
        total, count = _masked_sum(values.float(), masks[side(name)].to(values.device))
        # Per module: mean over its real tokens; a key fed by several modules sums their means.
        sums[key] = sums.get(key, 0) + total.cpu() / count.clamp(min=1).cpu()

    handles = []
    for name, module in model.named_modules():
        if (match := spec.down_module.match(name)) is not None:
            key = ("ffn", match["layer"])
            handles.append(module.register_forward_pre_hook(lambda m, a, k=key, n=name: add(k, n, a[0].abs())))
        elif (match := spec.out_module.match(name)) is not None:
            attn = match["attn"]
            sizes = spec.sizes(model.config, attn)
            key = ("heads", spec.head_group(attn))

            def per_head(m, args, k=key, n=name, s=sizes):
                x = args[0]
                add(k, n, x.float().reshape(*x.shape[:-1], s.heads, s.head_dim).norm(dim=-1))

            handles.append(module.register_forward_pre_hook(per_head))
        elif "norm" in type(module).__name__.lower() and not list(module.children()):
            handles.append(module.register_forward_hook(lambda m, a, out, n=name: add(("hidden", ""), n, out.abs())))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        # Every batch weighs the same: per-batch means, averaged over the batches below.
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            if not model.config.is_encoder_decoder:
                batch.pop("labels", None)
            masks["source"], masks["target"] = _token_masks(batch, model.config.is_encoder_decoder)
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {key: total / max(len(batches), 1) for key, total in sums.items()}


# Selection -----------------------------------------------------------------------------------------------------------


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in increasing index order (ties: the lower index)."""
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return order.sort().values


def choose_heads(scores: torch.Tensor, teacher: Sizes, target: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, key-value heads) to keep. Whole key-value groups go by the summed importance of their query
    heads; each kept group keeps its ``target.heads // target.kv_heads`` most important query heads."""
    group = teacher.heads // teacher.kv_heads
    groups = _top(scores.reshape(teacher.kv_heads, group).sum(dim=1), target.kv_heads)
    per_group = target.heads // target.kv_heads
    heads = [g * group + _top(scores[g * group : (g + 1) * group], per_group) for g in groups.tolist()]
    return torch.cat(heads), groups


def choose(importance: Mapping, model: PreTrainedModel, target: Sizes) -> dict[tuple[str, str], torch.Tensor]:
    """The indices each dimension keeps: ``("hidden", "")``, ``("ffn", layer)``, ``("heads", group)`` and
    ``("kv", group)``, each sorted."""
    spec = spec_of(model.config)
    kept = {("hidden", ""): _top(importance[("hidden", "")], target.hidden)}
    for key, scores in importance.items():
        if key[0] == "ffn":
            kept[key] = _top(scores, target.ffn)
        elif key[0] == "heads":
            kept[key], kept[("kv", key[1])] = choose_heads(scores, spec.sizes(model.config, key[1]), target)
    return kept


# Slicing -------------------------------------------------------------------------------------------------------------


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def slice_state_dict(model: PreTrainedModel, kept: Mapping[tuple[str, str], torch.Tensor]) -> dict:
    """The model's state dict cut to the kept indices: every axis of every weight labelled by the family's rules."""
    spec = spec_of(model.config)
    sliced = {}
    for key, tensor in model.state_dict().items():
        found = [(m, axes) for pattern, axes in spec.rules if (m := pattern.search(key)) is not None]
        if not found:
            raise ValueError(
                f"Width pruning has no rule for the weight {key!r} of this {model.config.model_type} model (a variant "
                "it does not know); make the student by layers only."
            )
        match, axes = found[0]  # the first rule that matches
        groups = match.groupdict()
        for axis, label in enumerate(axes):
            if label is None:
                continue
            if label == "hidden":
                index = kept[("hidden", "")]
            elif label == "ffn":
                index = kept[("ffn", groups["layer"])]
            else:
                group = spec.head_group(groups["attn"])
                sizes = spec.sizes(model.config, groups["attn"])
                heads, kv = kept[("heads", group)], kept[("kv", group)]
                if label == "heads":
                    index = _rows(heads, sizes.head_dim)
                elif label == "kv":
                    index = _rows(kv, sizes.head_dim)
                elif label == "head_index":
                    index = heads
                else:  # "qkv": GPT-2's fused projection, q, k and v of width heads x head_dim each
                    width = sizes.heads * sizes.head_dim
                    index = torch.cat([_rows(heads, sizes.head_dim) + part * width for part in range(3)])
            tensor = tensor.index_select(axis, index.to(tensor.device))
        sliced[key] = tensor.clone()
    return sliced


def prune_width(
    model: PreTrainedModel,
    batches: Sequence[Mapping[str, torch.Tensor]],
    target: Sizes,
    importance: Mapping[tuple[str, str], torch.Tensor] | None = None,
) -> PreTrainedModel:
    """A narrower copy of ``model`` with ``target``'s widths (from :func:`target_sizes`), keeping what ranks
    highest on ``batches`` (or by ``importance``, scores shaped as :func:`activation_importance` returns them).

    The kept indices are recorded in ``config.hf_kd_pruning``; the model is left as it was.
    """
    spec = spec_of(model.config)
    teacher = spec.sizes(model.config, None)
    if importance is None:
        importance = activation_importance(model, batches)
    kept = choose(importance, model, target)
    config = copy.deepcopy(model.config)
    spec.set_sizes(config, target)
    state = slice_state_dict(model, kept)
    scaled = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False))
    if config.model_type in ("t5", "mt5") and scaled and target.hidden != teacher.hidden:
        # T5 with tied embeddings scales the decoder output by d_model ** -0.5: keep the teacher's scale.
        name = "decoder.final_layer_norm.weight"
        state[name] = state[name] * math.sqrt(target.hidden / teacher.hidden)
    setattr(config, PRUNING_ATTRIBUTE, pruning_record(kept, teacher, target))
    student = type(model)._from_config(config, dtype=model.dtype)
    student.load_state_dict(state, strict=True)
    student.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(model.generation_config)
    return student.to(next(model.parameters()).device).eval()


def pruning_record(kept: Mapping[tuple[str, str], torch.Tensor], teacher: Sizes, target: Sizes) -> dict:
    """What the config and ``hf_kd_student.json`` say about the widths: sizes before and after, and the kept
    indices per dimension (MLP neurons per layer, heads per attention module, named by the student's modules)."""
    record: dict[str, Any] = {
        "method": "minitron-activation",
        "teacher_sizes": _sizes_dict(teacher),
        "student_sizes": _sizes_dict(target),
        "hidden_size": kept[("hidden", "")].tolist(),
        "intermediate_size": {},
        "attention_heads": {},
    }
    if target.kv_heads != target.heads or teacher.kv_heads != teacher.heads:
        record["key_value_heads"] = {}
    for (kind, name), index in sorted(kept.items()):
        if kind == "ffn":
            record["intermediate_size"][name] = index.tolist()
        elif kind == "heads":
            record["attention_heads"][name] = index.tolist()
        elif kind == "kv" and "key_value_heads" in record:
            record["key_value_heads"][name] = index.tolist()
    return record


def _sizes_dict(s: Sizes) -> dict[str, int]:
    return {
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
    }


__all__ = ["PRUNING_ATTRIBUTE", "activation_importance", "prune_width", "target_sizes"]
