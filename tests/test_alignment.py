"""Aligning two tokenizations by offsets: hand-made cases, and real tokenizers checked against decoding."""

from __future__ import annotations

import re
import unicodedata

import pytest
import torch
from cross_tokenizer_helpers import byte_bpe_tokenizer, corpus, sentencepiece_tokenizer

from hf_kd.losses import IGNORE_INDEX
from hf_kd.teachers.cross_tokenizer.alignment import Span, aligned_spans, boundaries, shared_boundaries
from hf_kd.teachers.cross_tokenizer.inputs import CrossTokenizerAligner, CrossTokenizerCollator, split_inputs

# ---- hand-made offsets ---------------------------------------------------------------------------------------


def test_a_character_split_into_two_byte_tokens_has_no_boundary_inside():
    # "né!": byte-level BPE gives "é" as two byte tokens with the same offsets; SentencePiece keeps it whole.
    teacher = [(0, 1), (1, 2), (1, 2), (2, 3)]
    student = [(0, 1), (1, 3)]
    assert boundaries(teacher) == {0: 0, 1: 1, 2: 3, 3: 4}
    assert boundaries(student) == {0: 0, 1: 1, 3: 2}
    assert shared_boundaries(boundaries(teacher), boundaries(student)) == [(0, 0, 0), (1, 1, 1), (3, 4, 2)]


def test_runs_of_spaces():
    # "Hello  world": GPT-2 keeps the first space as its own token; T5 folds the run into one "▁", mapped to the
    # second space, and appends </s>.
    text = "Hello  world"
    teacher = [(0, 5), (5, 6), (6, 12)]  # Hello, Ġ, Ġworld
    student = [(0, 5), (7, 12), (0, 0)]  # ▁Hello, ▁world, </s>
    special = [False, False, True]
    assert boundaries(teacher, text_length=len(text)) == {0: 0, 5: 1, 6: 2, 12: 3}
    assert boundaries(student, special, len(text)) == {0: 0, 5: 1, 12: 2}
    assert aligned_spans(teacher, student, None, special, len(text)) == [
        Span(0, 5, range(0, 1), range(0, 1)),
        Span(5, 12, range(1, 3), range(1, 2)),
    ]


def test_special_tokens_are_context_and_a_final_one_marks_the_end():
    # "the cat ": the teacher adds BOS and EOS; the student drops the trailing space, then appends </s>.
    text = "the cat "
    teacher = [(0, 0), (0, 3), (3, 7), (7, 8), (0, 0)]  # BOS, the, Ġcat, Ġ, EOS
    t_special = [True, False, False, False, True]
    student = [(0, 3), (4, 7), (0, 0)]  # ▁the, ▁cat, </s>
    s_special = [False, False, True]
    t_points = boundaries(teacher, t_special, len(text))
    s_points = boundaries(student, s_special, len(text))
    assert t_points == {0: 1, 3: 2, 7: 3, 8: 4}
    assert s_points == {0: 0, 3: 1, 8: 2}
    # The EOS of both is predicted after the whole text: the teacher teaches the student to stop.
    assert shared_boundaries(t_points, s_points) == [(0, 1, 0), (3, 2, 1), (8, 4, 2)]


def test_a_special_token_written_in_the_text_is_text():
    # "x<|endoftext|>y" read by GPT-2: the special token has real offsets and is not post-processor added.
    assert boundaries([(0, 1), (1, 14), (14, 15)], [False, False, False]) == {0: 0, 1: 1, 14: 2, 15: 3}


def test_a_token_that_spans_two_of_the_other():
    text = "an unbelievable cat"
    teacher = [(0, 2), (2, 15), (15, 17), (17, 19)]  # an, Ġunbelievable, Ġc, at
    student = [(0, 2), (3, 5), (5, 15), (16, 19)]  # ▁an, ▁un, believable, ▁cat
    assert aligned_spans(teacher, student, text_length=len(text)) == [
        Span(0, 2, range(0, 1), range(0, 1)),
        Span(2, 15, range(1, 2), range(1, 3)),  # one teacher token, two student tokens
        Span(15, 19, range(2, 4), range(3, 4)),  # two teacher tokens, one student token
    ]


def test_a_prefix_space_overlapping_the_first_character():
    # T5 with an unknown first character: "▁" and "<unk>" both map to character 0.
    assert boundaries([(0, 1), (0, 1), (1, 2)]) == {0: 0, 1: 2, 2: 3}


# ---- real tokenizers, checked against decoding ---------------------------------------------------------------

TEXTS = [
    "The café is unbelievable 🙂",
    "日本 語 naïve jalapeño über façade",
    "cat   dog  runs",
    "Hello world, the big cat sleeps!",
    "an unable able doable",
    *corpus(12, seed=7),
]


def _canonical(text: str) -> str:
    """What the SentencePiece tokenizer's normaliser makes of text (runs of spaces folded)."""
    return re.sub(" {2,}", " ", unicodedata.normalize("NFKC", text))


def _decoded_boundaries(tokenizer, ids, text, canonical=lambda s: s):
    """{c: k} from decoding: token k is the first whose preceding tokens decode to (the canonical) text[:c]."""
    points = {}
    for k in range(len(ids) + 1):
        decoded = tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        matches = [c for c in range(len(text) + 1) if canonical(text[:c]) == decoded]
        if matches:  # a run of spaces folded into one: the context is the whole run
            points.setdefault(max(matches), k)
    return points


@pytest.mark.parametrize("text", TEXTS)
def test_boundaries_agree_with_decoding(text):
    for tokenizer, canonical in ((byte_bpe_tokenizer(), lambda s: s), (sentencepiece_tokenizer(), _canonical)):
        enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = enc["input_ids"]
        points = boundaries(enc["offset_mapping"], enc["special_tokens_mask"], len(text))
        expected = _decoded_boundaries(tokenizer, ids, text, canonical)
        inner = {c: k for c, k in points.items() if c < len(text)}
        assert inner == {c: k for c, k in expected.items() if c < len(text)}, tokenizer.name_or_path
        # The end of the text: </s> where the tokenizer appends it, else one past the last token.
        assert points[len(text)] == len(ids) - 1 if enc["special_tokens_mask"][-1] else len(ids)


@pytest.mark.parametrize("text", ["Ωmega costs €5 😀", "ñandú  über 🦜🦜 x"])
def test_byte_tokens_of_unseen_characters_agree_with_decoding(text):
    # Characters the BPE never saw are split into byte tokens: no boundary may fall inside a character.
    tokenizer = byte_bpe_tokenizer()
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    assert len(enc["input_ids"]) > len(text.replace(" ", "")), "some character must be split into bytes"
    points = boundaries(enc["offset_mapping"], enc["special_tokens_mask"], len(text))
    assert points == _decoded_boundaries(tokenizer, enc["input_ids"], text)


def _same_text(student_context: str, teacher_context: str) -> bool:
    return _canonical(student_context).strip() == _canonical(teacher_context).strip()


def test_seq2seq_pairs_see_the_same_target_text():
    student_tok, teacher_tok = sentencepiece_tokenizer(), byte_bpe_tokenizer()
    aligner = CrossTokenizerAligner(student_tok, teacher_tok, prompt_template="Q: {source}\nA:")
    sources, targets = TEXTS[5:], TEXTS[: len(TEXTS) - 5]
    batch = aligner.seq2seq(sources, targets)
    a = batch.alignment
    for b, (source, target) in enumerate(zip(sources, targets, strict=True)):
        # The teacher reads the prompt, then the target with the prefix space the student's tokenizer adds, then EOS.
        prompt = teacher_tok(f"Q: {source}\nA:")["input_ids"]
        expected = (
            prompt + teacher_tok(" " + target, add_special_tokens=False)["input_ids"] + [teacher_tok.eos_token_id]
        )
        row = batch.teacher["input_ids"][b][batch.teacher["attention_mask"][b].bool()].tolist()
        assert row == expected
        labels = batch.student["labels"][b]
        assert labels[labels.ne(IGNORE_INDEX)].tolist() == student_tok(target)["input_ids"]
        pairs = [
            (s, t)
            for i, (s, t) in enumerate(zip(a.student_index.tolist(), a.teacher_index.tolist(), strict=True))
            if a.batch_index[i] == b
        ]
        assert len(pairs) >= len(target.split()), "at least every word start is a shared boundary"
        for s, t in pairs:
            assert labels[s] != IGNORE_INDEX
            student_context = student_tok.decode(labels[:s], skip_special_tokens=True)
            teacher_context = teacher_tok.decode(row[len(prompt) : t + 1], skip_special_tokens=True)
            assert _same_text(student_context, teacher_context), (student_context, teacher_context)
        # The last pair predicts the two EOS tokens after the whole target.
        s, t = pairs[-1]
        assert labels[s] == student_tok.eos_token_id and row[t + 1] == teacher_tok.eos_token_id


def test_causal_pairs_see_the_same_text_and_truncation_drops_what_is_cut():
    student_tok, teacher_tok = sentencepiece_tokenizer(), byte_bpe_tokenizer()
    full = CrossTokenizerAligner(student_tok, teacher_tok).causal(TEXTS)
    short = CrossTokenizerAligner(student_tok, teacher_tok, teacher_max_length=6).causal(TEXTS)
    assert short.teacher["input_ids"].shape[1] == 6
    for batch in (full, short):
        a = batch.alignment
        for b, s, t in zip(a.batch_index.tolist(), a.student_index.tolist(), a.teacher_index.tolist(), strict=True):
            ids = batch.student["input_ids"][b]
            # Student row s predicts token s + 1 from tokens [0, s]; teacher row t reads tokens [0, t] (BOS first).
            assert batch.student["labels"][b, s + 1] != IGNORE_INDEX
            assert t < int(batch.teacher["attention_mask"][b].sum())
            student_context = student_tok.decode(ids[: s + 1], skip_special_tokens=True)
            teacher_context = teacher_tok.decode(batch.teacher["input_ids"][b, : t + 1], skip_special_tokens=True)
            assert _same_text(student_context, teacher_context), (student_context, teacher_context)
    full_pairs = set(
        zip(*(x.tolist() for x in (full.alignment.batch_index, full.alignment.student_index)), strict=True)
    )
    short_pairs = set(
        zip(*(x.tolist() for x in (short.alignment.batch_index, short.alignment.student_index)), strict=True)
    )
    assert short_pairs < full_pairs and len(short_pairs) > 0


def test_causal_prompt_completion_pairs_only_the_completion():
    student_tok, teacher_tok = sentencepiece_tokenizer(), byte_bpe_tokenizer()
    aligner = CrossTokenizerAligner(student_tok, teacher_tok, prompt_template="Q: {source}\nA:")
    prompts, texts = ["the big cat", "a dog"], ["sleeps on the road!", "The café is naïve"]
    batch = aligner.causal(texts, prompts)
    a = batch.alignment
    for b, prompt in enumerate(prompts):
        s_prompt = student_tok(prompt)["input_ids"]
        t_prompt = teacher_tok(f"Q: {prompt}\nA:")["input_ids"]
        ids = batch.student["input_ids"][b]
        labels = batch.student["labels"][b]
        assert (labels[: len(s_prompt)] == IGNORE_INDEX).all() and labels[len(s_prompt)] != IGNORE_INDEX
        rows = [
            (s, t)
            for i, (s, t) in enumerate(zip(a.student_index.tolist(), a.teacher_index.tolist(), strict=True))
            if a.batch_index[i] == b
        ]
        # The first pair predicts the first completion token from the end of the prompt, on both sides.
        assert rows[0] == (len(s_prompt) - 1, len(t_prompt) - 1)
        assert len(rows) == int(labels.ne(IGNORE_INDEX).sum()), "every completion token has a teacher twin here"
        for s, t in rows:
            student_context = student_tok.decode(ids[len(s_prompt) : s + 1], skip_special_tokens=True)
            teacher_context = teacher_tok.decode(batch.teacher["input_ids"][b, len(t_prompt) : t + 1])
            assert _same_text(student_context, teacher_context), (student_context, teacher_context)


def test_collator_from_text_columns_and_from_decoded_ids():
    student_tok, teacher_tok = sentencepiece_tokenizer(), byte_bpe_tokenizer()
    aligner = CrossTokenizerAligner(student_tok, teacher_tok)
    collator = CrossTokenizerCollator(aligner, source_column="source", target_column="target")
    features = [{"source": "the cat", "target": "a dog runs"}, {"source": "big sky", "target": "the sun  sings"}]
    batch = collator(features)
    student, teacher, alignment = split_inputs(batch)
    assert set(student) == {"input_ids", "attention_mask", "labels"} and set(teacher) == {"input_ids", "attention_mask"}
    expected = aligner.seq2seq(["the cat", "big sky"], ["a dog runs", "the sun  sings"])
    for key, value in expected.student.items():
        assert torch.equal(student[key], value)
    assert torch.equal(alignment.teacher_index, expected.alignment.teacher_index)
    # Without text columns, the text is decoded from the student's ids: the run of spaces comes back as one.
    ids_only = [
        {"input_ids": student["input_ids"][i].tolist(), "labels": student["labels"][i].tolist()} for i in range(2)
    ]
    decoded = aligner.seq2seq(["the cat", "big sky"], ["a dog runs", "the sun sings"])
    assert torch.equal(split_inputs(collator(ids_only))[1]["input_ids"], decoded.teacher["input_ids"])


def test_seq2seq_sources_end_with_eos_even_when_the_tokenizer_adds_none():
    """An encoder reads ``source </s>`` (as T5 and BART tokenizers write it); a tokenizer trained without a
    post-processor adds no </s>, so the aligner does, once, and keeps it when it truncates."""
    from conftest import make_tokenizer

    bare = make_tokenizer()
    assert bare("the cat")["input_ids"][-1] != bare.eos_token_id  # the case being tested
    for max_length in (None, 3):
        aligner = CrossTokenizerAligner(bare, byte_bpe_tokenizer(), max_length=max_length)
        batch = aligner.seq2seq(["the big cat sees a dog", "a bird"], ["the dog runs", "it sings"])
        for b, source in enumerate(["the big cat sees a dog", "a bird"]):
            row = batch.student["input_ids"][b][batch.student["attention_mask"][b].bool()].tolist()
            expected = bare(source)["input_ids"] + [bare.eos_token_id]
            if max_length is not None and len(expected) > max_length:
                expected = expected[: max_length - 1] + [bare.eos_token_id]
            assert row == expected
    spm = sentencepiece_tokenizer()  # adds </s> itself: not doubled
    row = CrossTokenizerAligner(spm, byte_bpe_tokenizer()).seq2seq(["the cat"], ["a dog"]).student["input_ids"][0]
    assert row.tolist() == spm("the cat")["input_ids"] and row.tolist().count(spm.eos_token_id) == 1
