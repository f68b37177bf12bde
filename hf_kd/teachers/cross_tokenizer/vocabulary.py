"""Distillation between models with different tokenizers: a shared vocabulary of token strings.

Two vocabularies share a token when both have a token for the same text. Token strings are spelled differently:
byte-level BPE (GPT-2, Llama 3, Qwen) writes bytes as printable characters (``"Ġthe"`` is ``b" the"``), and
SentencePiece-style tokenizers (T5, Llama 2) write a space as ``"▁"`` and may fall back to byte tokens
(``"<0xE2>"``). :func:`normalized_vocabulary` undoes both, so each token maps to the bytes it stands for, and
:class:`VocabularyMap` pairs the tokens whose bytes exist in both vocabularies.

The loss that reads it is :func:`hf_kd.losses.cross_tokenizer.cross_tokenizer_loss`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

TokenKey = bytes | str
"""A token's text as bytes; a ``str`` for special tokens, so that they never equal any text."""

EOS_KEY = "<eos>"
"""Both tokenizers' end-of-sequence tokens normalise to this key, so the teacher teaches the student to stop."""

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


@dataclass(frozen=True)
class TokenScheme:
    """How a tokenizer spells text in its token strings, read from its ``tokenizer.json`` components."""

    byte_level: bool = False
    """Token strings are GPT-2's printable stand-ins for bytes (``ByteLevel`` pre-tokenizer or decoder)."""
    space_marker: str | None = None
    """The character that stands for a space (``"▁"`` for ``Metaspace`` or a ``Replace("▁", " ")`` decoder)."""
    byte_fallback: bool = False
    """``<0xAB>`` tokens stand for single bytes (SentencePiece byte fallback)."""


def token_scheme(tokenizer: Any) -> TokenScheme:
    """Read how a fast tokenizer spells its tokens from its backend's decoder and pre-tokenizer."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = _components(backend.get("decoder")) + _components(backend.get("pre_tokenizer"))
    byte_level = any(part.get("type") == "ByteLevel" for part in parts)
    marker = None
    for part in parts:
        if part.get("type") == "Metaspace":
            marker = part.get("replacement", "▁")
        elif part.get("type") == "Replace" and part.get("content") == " " and "String" in part.get("pattern", {}):
            marker = part["pattern"]["String"]
        if marker:
            break
    fallback = bool((backend.get("model") or {}).get("byte_fallback")) or any(
        p.get("type") == "ByteFallback" for p in parts
    )
    return TokenScheme(byte_level=byte_level, space_marker=marker, byte_fallback=fallback)


def _components(node: dict | None) -> list[dict]:
    """A decoder or pre-tokenizer and, for a ``Sequence``, its members, flattened."""
    if not node:
        return []
    members = node.get("decoders") or node.get("pretokenizers")
    if node.get("type") == "Sequence" and members:
        return [part for member in members for part in _components(member)]
    return [node]


def token_bytes(token: str, scheme: TokenScheme) -> bytes:
    """The text a token string stands for, as bytes: ``"Ġthe"`` and ``"▁the"`` both give ``b" the"``."""
    if scheme.byte_level:
        decoder = _byte_decoder()
        if all(char in decoder for char in token):
            return bytes(decoder[char] for char in token)
    if scheme.byte_fallback and (match := _BYTE_FALLBACK.fullmatch(token)):
        return bytes([int(match.group(1), 16)])
    if scheme.space_marker:
        token = token.replace(scheme.space_marker, " ")
    return token.encode("utf-8")


def normalized_vocabulary(tokenizer: Any) -> list[TokenKey | None]:
    """Each token id's key: the bytes it stands for, :data:`EOS_KEY` for the EOS, ``"special:<content>"`` for
    other special tokens, ``None`` for ids no token has. Tokens added as plain text (``special=False``) stand for
    their literal content."""
    scheme = token_scheme(tokenizer)
    vocab = tokenizer.get_vocab()
    keys: list[TokenKey | None] = [None] * (max(vocab.values(), default=-1) + 1)
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    for token, index in vocab.items():
        if token in added and added[token].special:
            keys[index] = f"special:{token}"
        elif token in added:
            keys[index] = token.encode("utf-8")
        else:
            keys[index] = token_bytes(token, scheme)
    if tokenizer.eos_token_id is not None:
        keys[tokenizer.eos_token_id] = EOS_KEY
    return keys


def adds_prefix_space(tokenizer: Any) -> bool:
    """Whether the tokenizer reads a text as if it began with a space (SentencePiece's ``"▁"`` on the first word)."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not ids:
        return False
    return token_bytes(tokenizer.convert_ids_to_tokens(ids[0]), token_scheme(tokenizer)).startswith(b" ")


@dataclass
class VocabularyMap:
    """Which student and teacher token ids stand for the same string.

    ``student_group[i]`` is the index of student token ``i``'s string among the :attr:`strings` both vocabularies
    share, or ``len(strings)`` (the rest) when the teacher has no token for it; ``teacher_group`` likewise. Tokens
    with the same string in one vocabulary (SentencePiece's ``"▁"`` and ``"<0x20>"``) share a group, and their
    probabilities are added.
    """

    student_group: torch.Tensor
    teacher_group: torch.Tensor
    strings: list[TokenKey]
    _on_device: dict[torch.device, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_keys(
        cls, student_keys: Sequence[TokenKey | None], teacher_keys: Sequence[TokenKey | None]
    ) -> VocabularyMap:
        """Build from each id's key (``None``: a token that matches nothing)."""
        shared = sorted(
            ({k for k in student_keys if k is not None} & {k for k in teacher_keys if k is not None}),
            key=lambda k: (isinstance(k, str), k),
        )
        index = {key: i for i, key in enumerate(shared)}
        rest = len(shared)
        student = torch.tensor([index.get(k, rest) if k is not None else rest for k in student_keys], dtype=torch.long)
        teacher = torch.tensor([index.get(k, rest) if k is not None else rest for k in teacher_keys], dtype=torch.long)
        return cls(student_group=student, teacher_group=teacher, strings=shared)

    @classmethod
    def from_tokenizers(cls, student_tokenizer: Any, teacher_tokenizer: Any) -> VocabularyMap:
        """Pair the two fast tokenizers' tokens by normalised string (see :func:`normalized_vocabulary`)."""
        return cls.from_keys(normalized_vocabulary(student_tokenizer), normalized_vocabulary(teacher_tokenizer))

    @property
    def num_shared(self) -> int:
        return len(self.strings)

    @property
    def student_size(self) -> int:
        return int(self.student_group.numel())

    @property
    def teacher_size(self) -> int:
        return int(self.teacher_group.numel())

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(student_group, teacher_group, student_unmatched_ids, teacher_unmatched_ids)`` on ``device``, cached."""
        device = torch.device(device)
        if device not in self._on_device:
            rest = self.num_shared
            s_un = (self.student_group == rest).nonzero().flatten()
            t_un = (self.teacher_group == rest).nonzero().flatten()
            self._on_device[device] = tuple(t.to(device) for t in (self.student_group, self.teacher_group, s_un, t_un))
        return self._on_device[device]
