"""Aligning two tokenizations of the same text by character offsets.

A causal language model's distribution at position ``k - 1`` is over token ``k`` given the text before it. Two
models with different tokenizers make comparable predictions only where their contexts cover exactly the same
text: at a character position where *both* tokenizations have a token boundary. This module finds those positions
from the ``offset_mapping`` a fast tokenizer returns (``return_offsets_mapping=True``), with plain Python and no
tensors, so that it can be checked by hand.

Offsets are ``(start, end)`` character positions into the text. Tokens added by the tokenizer's post-processor
(BOS, EOS, ``</s>``: ``special_tokens_mask == 1``) carry no text; they are context, except that a special token
after the last text token marks the end of the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Offsets = Sequence[tuple[int, int]]


def boundaries(
    offsets: Offsets, special: Sequence[bool] | None = None, text_length: int | None = None
) -> dict[int, int]:
    """Where each clean context ends: ``{character position c: index of the first token after the text [0, c)}``.

    Token ``k`` follows a clean context when its earlier text tokens end at ``c = max(end)`` and it starts at or
    after ``c``. It does not when it overlaps them: the second byte token of a character that byte-level BPE split
    in two has the same offsets as the first, so no boundary falls inside the character. Gaps between tokens
    (spaces a tokenizer folds into the next token or drops) do not break a boundary. For each ``c`` the first
    such token counts: the one predicted from exactly that context.

    A special token after the last text token (an EOS) is keyed at ``text_length``: it stands for "the text is
    over", even where a tokenizer dropped trailing spaces. When the tokens end without one, ``text_length`` maps
    to ``len(offsets)``, one past the last token: the position a causal model predicts after the whole text.

    Args:
        offsets: ``(start, end)`` per token.
        special: per token, whether the post-processor added it (no text); all ``False`` when ``None``.
        text_length: the text's length in characters; the largest end offset when ``None``.
    """
    special = list(special) if special is not None else [False] * len(offsets)
    last_text = max((k for k, is_special in enumerate(special) if not is_special), default=-1)
    if text_length is None:
        text_length = text_end(offsets, special)
    points: dict[int, int] = {}
    context_end = 0
    for k, ((start, end), is_special) in enumerate(zip(offsets, special, strict=True)):
        if is_special:
            if k > last_text:
                points.setdefault(text_length, k)
            continue
        if start >= context_end:
            points.setdefault(context_end, k)
        context_end = max(context_end, end)
    points.setdefault(text_length, len(offsets))
    return points


def text_end(offsets: Offsets, special: Sequence[bool] | None = None) -> int:
    """The largest end offset of a text token: the text's length, unless a tokenizer dropped its trailing spaces."""
    special = special if special is not None else [False] * len(offsets)
    return max((end for (_, end), is_special in zip(offsets, special, strict=True) if not is_special), default=0)


def shared_boundaries(first: dict[int, int], second: dict[int, int]) -> list[tuple[int, int, int]]:
    """``(c, k_first, k_second)`` for every character position ``c`` that is a boundary of both, in text order."""
    return [(c, first[c], second[c]) for c in sorted(first.keys() & second.keys())]


@dataclass(frozen=True)
class Span:
    """A stretch of text ``[start, end)`` that both tokenizations cover with whole tokens."""

    start: int
    end: int
    teacher_tokens: range
    """Indices of the teacher's tokens inside the span."""
    student_tokens: range
    """Indices of the student's tokens inside the span."""


def aligned_spans(
    teacher_offsets: Offsets,
    student_offsets: Offsets,
    teacher_special: Sequence[bool] | None = None,
    student_special: Sequence[bool] | None = None,
    text_length: int | None = None,
) -> list[Span]:
    """Cut the text at the shared boundaries into spans that start and end at the same place for both.

    A span holds one token on each side where the two tokenizers agree, and several on one side where a token
    of one covers two or more of the other's (``" unbelievable"`` against ``" un" + "believable"``). The last span
    ends at ``text_length``, before a closing EOS.
    """
    if text_length is None:
        text_length = max(text_end(teacher_offsets, teacher_special), text_end(student_offsets, student_special))
    teacher = boundaries(teacher_offsets, teacher_special, text_length)
    student = boundaries(student_offsets, student_special, text_length)
    shared = shared_boundaries(teacher, student)
    spans = []
    for (start, t_from, s_from), (end, t_to, s_to) in zip(shared, shared[1:], strict=False):
        spans.append(Span(start, end, range(t_from, t_to), range(s_from, s_to)))
    return spans
