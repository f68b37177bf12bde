"""Freezing parts of the student, DistilBART and distil-whisper style: ``requires_grad`` False before the optimizer
is built, so the optimizer holds no state for them and weight decay cannot move them.

Three switches (:class:`hf_kd.DistillationConfig`): ``freeze_encoder`` (everything in ``get_encoder()``, its token
embedding included, which BART and T5 share with the decoder and the tied output layer: what DistilBART's
``freeze_params(model.get_encoder())`` did), ``freeze_embeddings`` (the token embeddings, and so a tied output layer)
and ``freeze_positional_embeddings`` (learned position tables: BART's and Whisper's ``embed_positions``, GPT-2's
``wpe``). T5's relative attention bias is a parameter of attention, not a table of positions: it is never frozen.

With PEFT, the trainable copies of ``modules_to_save`` are what the user asked to train: no switch freezes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

FREEZE_SWITCHES = ("freeze_encoder", "freeze_embeddings", "freeze_positional_embeddings")

# The last name of the modules that hold learned position tables (BART, mBART, OPT, Whisper, LED: embed_positions;
# GPT-2, GPT-Neo, GPT-BigCode: wpe; BERT-like and ProphetNet: position_embeddings).
POSITION_TABLES = ("embed_positions", "wpe", "position_embeddings")

# Where PEFT keeps the trainable copy of a module listed in modules_to_save.
_PEFT_COPY = ".modules_to_save."


@dataclass
class Frozen:
    """What the freeze switches do to a student: per switch, the names of the trainable parameters it freezes (each
    counted once, under the first switch that covers it), the modules_to_save copies it leaves trainable, and the
    parameters themselves, frozen by :meth:`apply`."""

    by_switch: dict[str, list[str]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list, repr=False)

    def apply(self) -> None:
        for param in self.params:
            param.requires_grad_(False)

    def describe(self) -> str:
        parts = [f"{name}: {len(names)} tensors" for name, names in self.by_switch.items()]
        kept = f"; kept trainable (PEFT modules_to_save): {len(self.kept)} tensors" if self.kept else ""
        return ", ".join(parts) + kept


def switches_on(args: Any) -> list[str]:
    """The freeze switches ``args`` turns on."""
    return [name for name in FREEZE_SWITCHES if getattr(args, name, False)]


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module"):  # DDP, DeepSpeed engines
        model = model.module
    return model


def _named(module: nn.Module | None, prefix_of: dict[int, str]) -> list[tuple[str, nn.Parameter]]:
    if module is None:
        return []
    return [(prefix_of[id(p)], p) for p in module.parameters() if id(p) in prefix_of]


def encoder_parameters(model: nn.Module, prefix_of: dict[int, str]) -> list[tuple[str, nn.Parameter]]:
    if not getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        raise ValueError(
            f"freeze_encoder=True needs an encoder-decoder student (BART, T5, Whisper ...), but {type(model).__name__} "
            "has no encoder; set freeze_encoder=False (to freeze a causal model's layers, call requires_grad_(False) "
            "on them before building the trainer)."
        )
    return _named(model.get_encoder(), prefix_of)


def token_embedding_parameters(model: nn.Module, prefix_of: dict[int, str]) -> list[tuple[str, nn.Parameter]]:
    """The shared (or decoder's) token table, and an encoder's or decoder's own ``embed_tokens`` when untied."""
    try:
        tables = [model.get_input_embeddings()]
    except NotImplementedError:
        tables = []
    if getattr(model.config, "is_encoder_decoder", False):
        tables += [getattr(stack, "embed_tokens", None) for stack in (model.get_encoder(), model.get_decoder())]
    found = [pair for table in tables for pair in _named(table, prefix_of)]
    if not found:
        raise ValueError(
            f"freeze_embeddings=True: {type(model).__name__} has no token embedding hf_kd can find "
            "(get_input_embeddings()); set freeze_embeddings=False and freeze its input layer yourself."
        )
    return found


def position_parameters(model: nn.Module, prefix_of: dict[int, str]) -> list[tuple[str, nn.Parameter]]:
    tables = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in POSITION_TABLES]
    found = [pair for table in tables for pair in _named(table, prefix_of)]
    if not found:
        raise ValueError(
            f"freeze_positional_embeddings=True: {type(model).__name__} has no position embedding table "
            f"({', '.join(POSITION_TABLES)}); its positions are relative or rotary, inside attention (T5's relative "
            "attention bias is an attention parameter, left trainable), so set freeze_positional_embeddings=False."
        )
    return found


_FINDERS = {
    "freeze_encoder": encoder_parameters,
    "freeze_embeddings": token_embedding_parameters,
    "freeze_positional_embeddings": position_parameters,
}


def freeze_student(model: nn.Module, args: Any) -> Frozen:
    """Set ``requires_grad`` False on what ``args``'s freeze switches name (:func:`plan_freezing`, applied)."""
    frozen = plan_freezing(model, args)
    frozen.apply()
    return frozen


def plan_freezing(model: nn.Module, args: Any) -> Frozen:
    """What ``args``'s freeze switches freeze in ``model``, nothing changed yet; a ValueError for a switch the model
    cannot take, or when nothing would be left to train."""
    model = _unwrap(model)
    on = switches_on(args)
    if not on:
        return Frozen()
    # Names of the model's own parameters, tied ones once (under their first name), as named_parameters() gives them.
    prefix_of = {id(p): name for name, p in model.named_parameters()}
    chosen = {switch: _FINDERS[switch](model, prefix_of) for switch in on}
    frozen, to_freeze = Frozen(), {}
    for switch, pairs in chosen.items():
        names = []
        for name, param in pairs:
            if id(param) in to_freeze or name in frozen.kept:
                continue  # tied, or covered by an earlier switch: counted once
            if _PEFT_COPY in f".{name}":
                frozen.kept.append(name)
            elif param.requires_grad:
                to_freeze[id(param)] = param
                names.append(name)
        frozen.by_switch[switch] = names
    if not any(p.requires_grad and id(p) not in to_freeze for p in model.parameters()):
        raise ValueError(f"{' + '.join(on)} would leave no parameter of the student to train; turn one of them off.")
    frozen.params = list(to_freeze.values())
    return frozen
