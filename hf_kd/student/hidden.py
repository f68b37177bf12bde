"""Hidden-state distillation: match chosen student layers to teacher layers (MSE or cosine), an optional extra loss.

Layer maps pair indices into the models' ``hidden_states`` tuples (``output_hidden_states=True``): index 0 is the
embedding output, index ``k`` the output of the ``k``-th layer (1-based), so the last index is the stack's output.
For T5, GPT-2 and Llama-style models that last entry is taken after the final layer norm; BART has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_kd.losses import IGNORE_INDEX
from hf_kd.student.make import CONFIG_ATTRIBUTE, maps_per_stack

HIDDEN_LOSSES = ("mse", "cosine")
PROJECTION_FILE = "hidden_projection.safetensors"
PROJECTION_CONFIG_FILE = "hidden_projection.json"

LayerPairs = list[tuple[int, int]]


def hidden_width(config: Any) -> int:
    """The width of a model's hidden states (``hidden_size``; ``d_model`` / ``n_embd`` map onto it)."""
    for name in ("hidden_size", "d_model", "n_embd"):
        width = getattr(config, name, None)
        if isinstance(width, int):
            return width
    raise ValueError(f"Cannot tell the hidden width of a {type(config).__name__}: it has no hidden_size or d_model.")


def stack_depths(config: Any) -> dict[str, int]:
    """Layers per stack: ``{"encoder": n, "decoder": m}`` for encoder-decoder models, ``{"decoder": n}`` else."""
    if not getattr(config, "is_encoder_decoder", False):
        return {"decoder": int(config.num_hidden_layers)}
    decoder = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None)
    return {"encoder": int(config.num_hidden_layers), "decoder": int(decoder)}


def default_hidden_layer_map(student_config: Any, teacher_config: Any) -> dict[str, LayerPairs]:
    """Which hidden states to match when no map is given.

    A student made by :func:`hf_kd.make_student` matches each of its layers to the teacher layer it was copied
    from. Otherwise student layer ``k`` (1-based) is matched to teacher layer ``round(k * n_teacher / n_student)``:
    the ends of evenly sized blocks, last with last (DistilBART's 12 -> 3 supervision, ``[3, 7, 11]`` 0-based).
    """
    student_depths, teacher_depths = stack_depths(student_config), stack_depths(teacher_config)
    record = getattr(student_config, CONFIG_ATTRIBUTE, None) or {}
    layer_map = {}
    for stack, n_student in student_depths.items():
        n_teacher = teacher_depths[stack]
        copied = record.get(stack)
        if copied is not None and len(copied) == n_student and max(copied) < n_teacher:
            layer_map[stack] = [(i + 1, t + 1) for i, t in enumerate(copied)]
        else:
            layer_map[stack] = [(k, int(k * n_teacher / n_student + 0.5)) for k in range(1, n_student + 1)]
    return layer_map


def parse_hidden_layer_map(
    layer_map: Mapping[str, Sequence[Sequence[int]]] | Sequence[Sequence[int]] | str,
    student_config: Any,
    teacher_config: Any,
) -> dict[str, LayerPairs]:
    """A validated layer map from a dict, a JSON string, or (for a causal model) a plain list of pairs."""
    if isinstance(layer_map, str):
        layer_map = json.loads(layer_map)
    student_depths, teacher_depths = stack_depths(student_config), stack_depths(teacher_config)
    layer_map = maps_per_stack(layer_map, student_depths, "hidden-state layer map")
    parsed = {}
    for stack, pairs in layer_map.items():
        parsed[stack] = []
        for pair in pairs:
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
            ):
                raise ValueError(
                    f"The {stack} hidden-state map entry {pair!r} must be a [student, teacher] pair of ints."
                )
            s, t = pair
            if not 0 <= s <= student_depths[stack] or not 0 <= t <= teacher_depths[stack]:
                raise ValueError(
                    f"The {stack} pair {[s, t]} is out of range: hidden-state indices run 0..{student_depths[stack]} "
                    f"for the student and 0..{teacher_depths[stack]} for the teacher (0 is the embeddings, k the "
                    "output of layer k)."
                )
            parsed[stack].append((s, t))
    if not any(parsed.values()):
        raise ValueError("The hidden-state layer map pairs no layers: give at least one [student, teacher] pair.")
    return {stack: pairs for stack, pairs in parsed.items() if pairs}


def hidden_states_of(outputs: Any, is_encoder_decoder: bool) -> dict[str, Sequence[torch.Tensor]]:
    """The hidden-state tuples of a model output, by stack."""
    if is_encoder_decoder:
        states = {"encoder": outputs.encoder_hidden_states, "decoder": outputs.decoder_hidden_states}
    else:
        states = {"decoder": outputs.hidden_states}
    if any(value is None for value in states.values()):
        raise ValueError("The model output has no hidden states: call the model with output_hidden_states=True.")
    return states


def hidden_masks(inputs: Mapping[str, Any], is_encoder_decoder: bool) -> dict[str, torch.Tensor | None]:
    """Which positions count, by stack: the attention mask (encoder, causal), the decoder mask or labels != -100."""
    if not is_encoder_decoder:
        return {"decoder": inputs.get("attention_mask")}
    decoder = inputs.get("decoder_attention_mask")
    if decoder is None and inputs.get("labels") is not None:
        decoder = inputs["labels"].ne(IGNORE_INDEX)
    return {"encoder": inputs.get("attention_mask"), "decoder": decoder}


class HiddenStateDistiller(nn.Module):
    """Mean MSE or cosine distance between paired student and teacher hidden states, over unmasked positions.

    When the widths differ, each pair gets a learned ``nn.Linear(student_width, teacher_width)`` applied to the
    student's states; these weights must be trained with the student (hand :meth:`parameters` to the optimizer)
    and are saved beside it by :meth:`save_pretrained`, not in the student's weights.

    Args:
        student_config: the student's config.
        teacher_config: the teacher's config.
        layer_map: ``{"encoder": [(s, t), ...], "decoder": [...]}`` of hidden-state indices (0 = embeddings, k =
            output of layer k), a JSON string of it, or a list of pairs for a causal model; default:
            :func:`default_hidden_layer_map`.
        loss: ``"mse"`` (mean over the hidden dimension of the squared difference) or ``"cosine"``
            (``1 - cosine similarity``).
        normalize: apply a layer norm without learned parameters to both sides before comparing, so the loss
            ignores each position's scale and offset.

    The loss is averaged over the unmasked positions of each pair, then over all pairs of all stacks.
    """

    def __init__(
        self,
        student_config: Any,
        teacher_config: Any,
        layer_map: Mapping[str, Sequence[Sequence[int]]] | Sequence[Sequence[int]] | str | None = None,
        loss: str = "mse",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden-state loss={loss!r} is not supported: use one of {list(HIDDEN_LOSSES)}.")
        if layer_map is None:
            layer_map = default_hidden_layer_map(student_config, teacher_config)
        self.layer_map = parse_hidden_layer_map(layer_map, student_config, teacher_config)
        self.loss = loss
        self.normalize = normalize
        self.student_width, self.teacher_width = hidden_width(student_config), hidden_width(teacher_config)
        self.projections = nn.ModuleDict()
        if self.student_width != self.teacher_width:
            for stack, pairs in self.layer_map.items():
                for s, t in pairs:
                    self.projections[_key(stack, s, t)] = nn.Linear(self.student_width, self.teacher_width)

    def forward(
        self,
        student_hidden_states: Mapping[str, Sequence[torch.Tensor]],
        teacher_hidden_states: Mapping[str, Sequence[torch.Tensor]],
        masks: Mapping[str, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """The loss for one batch.

        Args:
            student_hidden_states: ``{"encoder": tuple, "decoder": tuple}`` (``{"decoder": tuple}`` for a causal
                model) of ``[batch, length, width]`` tensors, as :func:`hidden_states_of` gives them.
            teacher_hidden_states: the same for the teacher (no gradient flows into it).
            masks: ``[batch, length]`` masks by stack (1 = counts), see :func:`hidden_masks`; missing = all count.
        """
        masks = masks or {}
        losses = []
        for stack, pairs in self.layer_map.items():
            student_states, teacher_states = student_hidden_states[stack], teacher_hidden_states[stack]
            mask = masks.get(stack)
            for s, t in pairs:
                if s >= len(student_states) or t >= len(teacher_states):
                    raise ValueError(
                        f"The {stack} pair {[s, t]} needs hidden state {s} of the student and {t} of the teacher, "
                        f"but they returned {len(student_states)} and {len(teacher_states)}."
                    )
                losses.append(self._pair_loss(stack, s, t, student_states[s], teacher_states[t].detach(), mask))
        return torch.stack(losses).mean()

    def _pair_loss(
        self, stack: str, s: int, t: int, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        key = _key(stack, s, t)
        if key in self.projections:
            projection = self.projections[key]
            student = projection(student.to(projection.weight.dtype))
        student, teacher = student.float(), teacher.float()
        if self.normalize:
            student = F.layer_norm(student, student.shape[-1:])
            teacher = F.layer_norm(teacher, teacher.shape[-1:])
        if self.loss == "mse":
            per_position = (student - teacher).pow(2).mean(-1)
        else:
            per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
        if mask is None:
            return per_position.mean()
        mask = mask.to(per_position.dtype)
        # A batch with no counted position contributes 0, not NaN.
        return (per_position * mask).sum() / mask.sum().clamp(min=1.0)

    def loss_from_outputs(
        self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any], is_encoder_decoder: bool
    ) -> torch.Tensor:
        """The loss from two model outputs (``output_hidden_states=True``) and the batch they were run on."""
        return self(
            hidden_states_of(student_outputs, is_encoder_decoder),
            hidden_states_of(teacher_outputs, is_encoder_decoder),
            hidden_masks(inputs, is_encoder_decoder),
        )

    # ---- saving -----------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``hidden_projection.safetensors`` (the projections) and ``hidden_projection.json`` (the map)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, PROJECTION_FILE))
        settings = {
            "layer_map": {stack: [list(p) for p in pairs] for stack, pairs in self.layer_map.items()},
            "loss": self.loss,
            "normalize": self.normalize,
            "student_width": self.student_width,
            "teacher_width": self.teacher_width,
        }
        with open(os.path.join(directory, PROJECTION_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, student_config: Any, teacher_config: Any
    ) -> HiddenStateDistiller:
        """Rebuild a distiller saved by :meth:`save_pretrained` (to resume training)."""
        from safetensors.torch import load_file

        with open(os.path.join(directory, PROJECTION_CONFIG_FILE), encoding="utf-8") as f:
            settings = json.load(f)
        distiller = cls(
            student_config,
            teacher_config,
            settings["layer_map"],
            loss=settings["loss"],
            normalize=settings["normalize"],
        )
        distiller.load_state_dict(load_file(os.path.join(directory, PROJECTION_FILE)))
        return distiller


def _key(stack: str, s: int, t: int) -> str:
    return f"{stack}_{s}_to_{t}"
