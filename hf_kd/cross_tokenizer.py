"""Distillation between models with different tokenizers: a shared vocabulary of token strings, and the loss.

Two vocabularies share a token when both have a token for the same text. Token strings are spelled differently:
byte-level BPE (GPT-2, Llama 3, Qwen) writes bytes as printable characters (``"Ġthe"`` is ``b" the"``), and
SentencePiece-style tokenizers (T5, Llama 2) write a space as ``"▁"`` and may fall back to byte tokens
(``"<0xE2>"``). :func:`normalized_vocabulary` undoes both, so each token maps to the bytes it stands for, and
:class:`VocabularyMap` pairs the tokens whose bytes exist in both vocabularies.

:func:`cross_tokenizer_loss` compares the student's and the teacher's next-token distributions at the positions
an alignment pairs (see :mod:`hf_kd.alignment` and :mod:`hf_kd.cross_inputs`): over the shared strings by one
of the divergences of :mod:`hf_kd.losses`, with one extra bucket holding the probability of everything else, and
over the tokens that have no counterpart by ULD (Boizard et al. 2024): the L1 distance between the two sorted
probability vectors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from hf_kd.losses import IGNORE_INDEX, DistillationLossOutput, get_divergence, log_probs

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


@dataclass
class CrossTokenizerLossOutput(DistillationLossOutput):
    """:class:`hf_kd.losses.DistillationLossOutput` plus the parts of the cross-tokenizer divergence.

    ``kd_sum`` is summed over the aligned positions; like ``ce_sum`` it is divided by the number of the
    student's target tokens (``num_tokens``), so positions without a counterpart add nothing to the divergence.
    ``agreement`` counts aligned positions where both models' most likely token is the same shared string.
    """

    num_aligned: int = 0
    """How many student target positions have a teacher position with the same context."""
    shared_sum: torch.Tensor | None = None
    """The divergence over the shared strings (plus the rest bucket), summed over aligned positions, detached."""
    uld_sum: torch.Tensor | None = None
    """ULD over the unshared tokens (unweighted), summed over aligned positions, detached."""


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD (Boizard et al. 2024): ``sum_i |sort(p)_i - sort(q)_i|`` per row, the shorter vector padded with zeros.

    Sorting forgets which token is which, so the two vocabularies need not match; what is taught is the shape of
    the distribution (how confident, how spread). It is the Wasserstein-1 distance when every pair of tokens is
    taken to be equally far apart.
    """
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    s = F.pad(student_probs.sort(dim=-1, descending=True).values, (0, width - student_probs.shape[-1]))
    t = F.pad(teacher_probs.sort(dim=-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (s - t).abs().sum(-1)


def grouped_log_probs(log_p: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``log sum_{i in g} p_i`` for each group ``g`` of ``group`` (``[rows, vocab]`` to ``[rows, num_groups]``).

    Probabilities below float32's smallest normal number count as that number: such a string is impossible
    for practical purposes, and the log stays finite with finite gradients.
    """
    probs = log_p.new_zeros(log_p.shape[0], num_groups).index_add_(1, group, log_p.exp())
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def cross_tokenizer_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    vocab_map: VocabularyMap,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    uld_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per aligned row: ``(divergence over shared strings + rest bucket, ULD over unshared tokens, agreement)``.

    Args:
        student_logits: ``[rows, student_vocab]`` (columns past the tokenizer's length are dropped).
        teacher_logits: ``[rows, teacher_vocab]``, row ``r`` having the same context as the student's row ``r``.
        vocab_map: the token pairing.
        loss: a divergence of :data:`hf_kd.losses.DIVERGENCES`, computed on the ``num_shared + 1`` buckets.
        uld_weight: the weight of the ULD term in the returned total; 0 skips it.
    Returns:
        ``(total, shared, uld)``: ``shared + uld_weight * uld``, and the two parts, each of shape ``[rows]``.
    """
    s_group, t_group, s_unmatched, t_unmatched = vocab_map.tensors(student_logits.device)
    s_log = log_probs(student_logits[:, : vocab_map.student_size], temperature)
    t_log = log_probs(teacher_logits[:, : vocab_map.teacher_size], temperature)
    buckets = vocab_map.num_shared + 1  # the last bucket: every token without a counterpart
    divergence = get_divergence(loss, beta=beta, skew=skew)
    shared = divergence(grouped_log_probs(s_log, s_group, buckets), grouped_log_probs(t_log, t_group, buckets))
    if uld_weight == 0.0 or (s_unmatched.numel() == 0 and t_unmatched.numel() == 0):
        uld = torch.zeros_like(shared)
    else:
        uld = uld_distance(s_log[:, s_unmatched].exp(), t_log[:, t_unmatched].exp())
    return shared + uld_weight * uld, shared, uld


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alignment: Any,
    *,
    vocab_map: VocabularyMap,
    labels: torch.Tensor,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    uld_weight: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> CrossTokenizerLossOutput:
    """``alpha * CE + (1 - alpha) * T**2 * D`` where ``D`` compares the aligned positions across tokenizers.

    Args:
        student_logits: ``[batch, rows, student_vocab]``; row ``i`` predicts ``labels[:, i]`` (for a causal
            student, the logits without their last position and the labels without their first).
        teacher_logits: ``[batch, teacher_rows, teacher_vocab]``, the teacher's raw output on its own inputs.
        alignment: a :class:`hf_kd.cross_inputs.TokenAlignment` (``batch_index``, ``student_index``,
            ``teacher_index``): which student row and which teacher row share a context.
        vocab_map: pairs the two vocabularies' tokens, see :class:`VocabularyMap`.
        labels: ``[batch, rows]`` the student's target ids, -100 where there is none.
        loss, temperature, alpha, beta, skew: as in :func:`hf_kd.losses.distillation_loss`; ``loss`` is applied
            to the shared strings.
        uld_weight: the weight of the ULD term on the tokens without a counterpart.
        num_items_in_batch: the normalizer (the Trainer's count of target tokens over accumulated batches);
            the batch's own number of target tokens when ``None``.
        chunk_size: compute over this many aligned positions at a time.
    """
    s_vocab = vocab_map.student_size
    if student_logits.shape[-1] < s_vocab or teacher_logits.shape[-1] < vocab_map.teacher_size:
        raise ValueError(
            f"The logits ({student_logits.shape[-1]} student, {teacher_logits.shape[-1]} teacher columns) do not "
            f"cover the tokenizers ({s_vocab} and {vocab_map.teacher_size} tokens): resize the model's embeddings "
            "with model.resize_token_embeddings(len(tokenizer))."
        )
    student_logits = student_logits[..., :s_vocab]
    targets = labels.ne(IGNORE_INDEX)
    num_tokens = int(targets.sum())
    b, s_idx, t_idx = alignment.batch_index, alignment.student_index, alignment.teacher_index
    num_aligned = int(b.numel())

    zero = student_logits.new_zeros((), dtype=torch.float32)
    kd_sum, shared_sum, uld_sum = zero, zero.detach(), zero.detach()
    agreement = torch.zeros((), dtype=torch.long, device=student_logits.device)
    s_group, t_group, _, _ = vocab_map.tensors(student_logits.device)
    step = chunk_size or max(num_aligned, 1)
    for start in range(0, num_aligned, step):
        rows = slice(start, start + step)
        s_rows = student_logits[b[rows], s_idx[rows]]
        t_rows = teacher_logits[b[rows], t_idx[rows]].detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1.0):
            total, shared, uld = cross_tokenizer_divergence(
                s_rows,
                t_rows,
                vocab_map,
                loss=loss,
                temperature=temperature,
                beta=beta,
                skew=skew,
                uld_weight=uld_weight,
            )
            kd_sum = kd_sum + total.sum()
        shared_sum = shared_sum + shared.detach().sum()
        uld_sum = uld_sum + uld.detach().sum()
        with torch.no_grad():
            s_top = s_group[s_rows.argmax(-1)]
            t_top = t_group[t_rows[:, : vocab_map.teacher_size].argmax(-1)]
            agreement += ((s_top == t_top) & (s_top < vocab_map.num_shared)).sum()

    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0.0):
        ce_sum = (
            F.cross_entropy(student_logits[targets].float(), labels[targets], reduction="sum") if num_tokens else zero
        )

    normalizer = num_items_in_batch if num_items_in_batch is not None else max(num_tokens, 1)
    if torch.is_tensor(normalizer):
        normalizer = normalizer.to(kd_sum.device)
    ce_term = alpha * ce_sum if alpha > 0.0 else 0.0
    kd_term = (1.0 - alpha) * temperature**2 * kd_sum if alpha < 1.0 else 0.0
    total = (ce_term + kd_term) / normalizer
    if num_tokens == 0:
        total = student_logits.sum().float() * 0.0  # a zero tied to the graph: backward gives zero gradients
    return CrossTokenizerLossOutput(
        loss=total,
        kd_sum=kd_sum.detach(),
        ce_sum=ce_sum.detach(),
        num_tokens=num_tokens,
        agreement=agreement,
        num_aligned=num_aligned,
        shared_sum=shared_sum,
        uld_sum=uld_sum,
    )
