"""The shared vocabulary of two tokenizers and the cross-tokenizer loss, against references computed other ways."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tokenizer, random_sentences, tiny_gpt2, tiny_t5
from cross_tokenizer_helpers import byte_bpe_tokenizer, corpus, sentencepiece_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from hf_kd.losses import IGNORE_INDEX, LossSettings, StudentOutput, cross_tokenizer_loss, distillation_loss, score
from hf_kd.teachers import RowRequest
from hf_kd.teachers.cross_tokenizer.inputs import CrossTokenizerAligner, TokenAlignment
from hf_kd.teachers.cross_tokenizer.source import CrossTokenizerTeacher, check_cross_tokenizer, make_collator, realign
from hf_kd.teachers.cross_tokenizer.vocabulary import (
    EOS_KEY,
    TokenScheme,
    VocabularyMap,
    normalized_vocabulary,
    token_bytes,
    token_scheme,
)

# ---- token strings --------------------------------------------------------------------------------------------


def test_token_bytes_undo_each_spelling():
    byte_level, metaspace = token_scheme(byte_bpe_tokenizer()), token_scheme(sentencepiece_tokenizer())
    assert byte_level == TokenScheme(byte_level=True)
    assert metaspace == TokenScheme(space_marker="▁")
    assert token_bytes("Ġthe", byte_level) == b" the" == token_bytes("▁the", metaspace)
    assert token_bytes("ĠcafÃ©", byte_level) == " café".encode() == token_bytes("▁café", metaspace)
    assert token_bytes("Ã", byte_level) == b"\xc3"  # half a character: bytes, not text
    assert token_bytes("ĊĠĠ", byte_level) == b"\n  "


def _llama_style_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x20>": 3, "<0xE2>": 4, "▁": 5, "▁the": 6, "the": 7}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_byte_fallback_and_duplicate_strings():
    tok = _llama_style_tokenizer()
    assert token_scheme(tok) == TokenScheme(space_marker="▁", byte_fallback=True)
    keys = normalized_vocabulary(tok)
    assert keys[:3] == ["special:<unk>", "special:<s>", EOS_KEY]
    assert keys[3:] == [b" ", b"\xe2", b" ", b" the", b"the"]
    # "<0x20>" and "▁" are the same text: one group, whose probability is the sum of both.
    vocab_map = VocabularyMap.from_tokenizers(tok, byte_bpe_tokenizer())
    assert vocab_map.student_group[3] == vocab_map.student_group[5] < vocab_map.num_shared
    assert vocab_map.strings[vocab_map.student_group[3]] == b" "


def _decoded_key(tokenizer, token_id: int, after: int | None = None) -> bytes:
    """A token's text from the tokenizer's own decoder: alone, or as what it adds after token ``after``."""
    if after is None:
        return tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode()
    both = tokenizer.decode([after, token_id], clean_up_tokenization_spaces=False)
    return both[len(tokenizer.decode([after], clean_up_tokenization_spaces=False)) :].encode()


def test_vocabulary_map_pairs_the_tokens_the_decoders_read_alike():
    student, teacher = sentencepiece_tokenizer(), byte_bpe_tokenizer()
    vocab_map = VocabularyMap.from_tokenizers(student, teacher)
    teacher_text = {_decoded_key(teacher, j) for j in range(len(teacher)) if j not in teacher.all_special_ids}
    teacher_text.discard("\ufffd".encode())  # half characters decode to the replacement character
    after = student("a", add_special_tokens=False)["input_ids"][0]
    shared = 0
    for i in range(len(student)):
        if i in student.all_special_ids:
            continue
        text = _decoded_key(student, i, after)
        group = int(vocab_map.student_group[i])
        assert (group < vocab_map.num_shared) == (text in teacher_text), text
        if text in teacher_text:
            assert vocab_map.strings[group] == text
            shared += 1
    assert shared > 50 and vocab_map.num_shared == shared + 1  # the words, and EOS
    eos = vocab_map.strings.index(EOS_KEY)
    assert vocab_map.student_group[student.eos_token_id] == eos == vocab_map.teacher_group[teacher.eos_token_id]


# ---- the loss -------------------------------------------------------------------------------------------------

STUDENT_KEYS = [b"a", b" b", b"c", "special:<pad>", EOS_KEY, b"a"]
TEACHER_KEYS = [b" b", b"a", EOS_KEY, b"dd", b"e", b"f", None]


def _reference(s_logits, t_logits, pairs, labels, loss, temperature, alpha, beta, uld_weight):
    """The loss with plain Python loops in float64: buckets by string, then the divergence and sorted L1."""
    shared = sorted(
        {k for k in STUDENT_KEYS if k} & {k for k in TEACHER_KEYS if k}, key=lambda k: (isinstance(k, str), k)
    )
    kd = 0.0
    for b, s, t in pairs:
        q = torch.softmax(s_logits[b, s].double() / temperature, -1).tolist()
        p = torch.softmax(t_logits[b, t].double() / temperature, -1).tolist()
        q_b = [sum(x for x, k in zip(q, STUDENT_KEYS, strict=True) if k == key) for key in shared]
        p_b = [sum(x for x, k in zip(p, TEACHER_KEYS, strict=True) if k == key) for key in shared]
        q_b.append(1.0 - sum(q_b))
        p_b.append(1.0 - sum(p_b))
        if loss == "forward_kl":
            kd += sum(pi * math.log(pi / qi) for pi, qi in zip(p_b, q_b, strict=True))
        else:  # jsd
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p_b, q_b, strict=True)]
            kd += beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p_b, m, strict=True))
            kd += (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q_b, m, strict=True))
        q_rest = sorted((x for x, k in zip(q, STUDENT_KEYS, strict=True) if k not in shared), reverse=True)
        p_rest = sorted((x for x, k in zip(p, TEACHER_KEYS, strict=True) if k not in shared), reverse=True)
        width = max(len(q_rest), len(p_rest))
        q_rest += [0.0] * (width - len(q_rest))
        p_rest += [0.0] * (width - len(p_rest))
        kd += uld_weight * sum(abs(x - y) for x, y in zip(q_rest, p_rest, strict=True))
    mask = labels.ne(IGNORE_INDEX)
    ce = torch.nn.functional.cross_entropy(s_logits[mask].double(), labels[mask], reduction="sum").item()
    return (alpha * ce + (1 - alpha) * temperature**2 * kd) / int(mask.sum()), kd


@pytest.mark.parametrize(
    "loss,temperature,alpha,beta,uld_weight", [("forward_kl", 1.0, 0.0, 0.5, 1.0), ("jsd", 2.0, 0.3, 0.3, 0.5)]
)
def test_loss_matches_a_reference_computed_by_hand(loss, temperature, alpha, beta, uld_weight):
    torch.manual_seed(0)
    s_logits = torch.randn(2, 4, len(STUDENT_KEYS)) * 2
    t_logits = torch.randn(2, 5, len(TEACHER_KEYS)) * 2
    labels = torch.tensor([[0, 1, 4, IGNORE_INDEX], [2, 5, 1, 0]])
    pairs = [(0, 0, 1), (0, 2, 3), (1, 1, 0), (1, 3, 4)]
    alignment = TokenAlignment(*torch.tensor(pairs).T)
    vocab_map = VocabularyMap.from_keys(STUDENT_KEYS, TEACHER_KEYS)
    result = cross_tokenizer_loss(
        s_logits, t_logits, alignment, vocab_map=vocab_map, labels=labels,
        loss=loss, temperature=temperature, alpha=alpha, beta=beta, uld_weight=uld_weight,
    )  # fmt: skip
    expected, kd = _reference(s_logits, t_logits, pairs, labels, loss, temperature, alpha, beta, uld_weight)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert result.kd_sum.item() == pytest.approx(kd, rel=1e-5)
    assert (result.shared_sum + uld_weight * result.uld_sum).item() == pytest.approx(kd, rel=1e-5)
    assert result.num_tokens == 7 and result.num_aligned == 4


def _same_tokenizer_setup():
    tok = make_tokenizer()
    aligner = CrossTokenizerAligner(tok, tok, append_eos=False, teacher_bos=False)
    batch = aligner.causal(random_sentences(6, seed=1))
    student, teacher = tiny_gpt2(len(tok), seed=0), tiny_gpt2(len(tok), seed=1)
    with torch.no_grad():
        teacher_logits = teacher(**batch.teacher).logits * 3
    return tok, batch, student, teacher_logits


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_one_tokenizer_on_both_sides_gives_the_ordinary_distillation_loss(loss):
    tok, batch, student, teacher_logits = _same_tokenizer_setup()
    assert torch.equal(batch.teacher["input_ids"], batch.student["input_ids"])
    labels = batch.student["labels"][:, 1:]
    kwargs = dict(loss=loss, temperature=2.0, alpha=0.25, beta=0.4)
    logits = student(**{k: v for k, v in batch.student.items() if k != "labels"}).logits[:, :-1]
    ordinary = distillation_loss(logits, teacher_logits[:, :-1], labels, **kwargs)
    (ordinary_grad,) = torch.autograd.grad(ordinary.loss, logits, retain_graph=True)
    vocab_map = VocabularyMap.from_tokenizers(tok, tok)
    cross = cross_tokenizer_loss(logits, teacher_logits, batch.alignment, vocab_map=vocab_map, labels=labels, **kwargs)
    (cross_grad,) = torch.autograd.grad(cross.loss, logits)
    # Every target position is aligned and every token is shared: nothing is left for ULD.
    assert cross.num_aligned == cross.num_tokens == ordinary.num_tokens
    assert cross.uld_sum.item() == 0.0
    assert cross.loss.item() == pytest.approx(ordinary.loss.item(), rel=1e-4)
    assert cross.kd_sum.item() == pytest.approx(ordinary.kd_sum.item(), rel=1e-4)
    assert cross.ce_sum.item() == pytest.approx(ordinary.ce_sum.item(), rel=1e-5)
    assert int(cross.agreement) == int(ordinary.agreement)
    torch.testing.assert_close(cross_grad, ordinary_grad, rtol=1e-3, atol=1e-6)


def test_chunks_and_normalizer():
    tok, batch, student, teacher_logits = _same_tokenizer_setup()
    labels = batch.student["labels"][:, 1:]
    logits = student(**{k: v for k, v in batch.student.items() if k != "labels"}).logits[:, :-1].detach()
    vocab_map = VocabularyMap.from_tokenizers(tok, tok)
    whole = cross_tokenizer_loss(logits, teacher_logits, batch.alignment, vocab_map=vocab_map, labels=labels)
    chunked = cross_tokenizer_loss(
        logits, teacher_logits, batch.alignment, vocab_map=vocab_map, labels=labels, chunk_size=5
    )
    assert chunked.loss.item() == pytest.approx(whole.loss.item(), rel=1e-6)
    doubled = cross_tokenizer_loss(
        logits,
        teacher_logits,
        batch.alignment,
        vocab_map=vocab_map,
        labels=labels,
        num_items_in_batch=2 * whole.num_tokens,
    )
    assert doubled.loss.item() == pytest.approx(whole.loss.item() / 2, rel=1e-6)


def test_no_target_gives_a_zero_with_gradients():
    vocab_map = VocabularyMap.from_keys(STUDENT_KEYS, TEACHER_KEYS)
    logits = torch.randn(1, 3, len(STUDENT_KEYS), requires_grad=True)
    empty = TokenAlignment(*torch.zeros(3, 0, dtype=torch.long))
    labels = torch.full((1, 3), IGNORE_INDEX)
    result = cross_tokenizer_loss(
        logits, torch.randn(1, 2, len(TEACHER_KEYS)), empty, vocab_map=vocab_map, labels=labels
    )
    result.loss.backward()
    assert result.loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_logits_narrower_than_a_vocabulary_are_refused():
    vocab_map = VocabularyMap.from_keys(STUDENT_KEYS, TEACHER_KEYS)
    alignment = TokenAlignment(*torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        cross_tokenizer_loss(
            torch.randn(1, 2, len(STUDENT_KEYS)), torch.randn(1, 2, len(TEACHER_KEYS) - 1), alignment,
            vocab_map=vocab_map, labels=torch.zeros(1, 2, dtype=torch.long),
        )  # fmt: skip


# ---- training -------------------------------------------------------------------------------------------------


def test_training_a_t5_style_student_on_a_gpt2_style_teacher_reduces_the_loss():
    student_tok, teacher_tok = sentencepiece_tokenizer(), byte_bpe_tokenizer()
    teacher = tiny_gpt2(len(teacher_tok), seed=1).eval()
    with torch.no_grad():
        teacher.transformer.ln_f.weight.mul_(20.0)  # a confident teacher: a random tiny one is nearly uniform
    student = tiny_t5(len(student_tok), seed=2)
    aligner = CrossTokenizerAligner(student_tok, teacher_tok, prompt_template="{source}\n", teacher_max_length=64)
    vocab_map = VocabularyMap.from_tokenizers(student_tok, teacher_tok)
    sentences = corpus(64, seed=3)
    batches = [aligner.seq2seq(sentences[i : i + 8], sentences[i + 32 : i + 40]) for i in range(0, 32, 8)]
    with torch.no_grad():
        teacher_logits = [teacher(**batch.teacher).logits for batch in batches]
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses, agreement = [], []
    for step in range(40):
        batch, t_logits = batches[step % 4], teacher_logits[step % 4]
        logits = student(**batch.student).logits
        result = cross_tokenizer_loss(
            logits, t_logits, batch.alignment, vocab_map=vocab_map, labels=batch.student["labels"], alpha=0.0
        )
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
        agreement.append(int(result.agreement) / result.num_aligned)
        assert result.num_aligned > 0.9 * result.num_tokens  # nearly every target position has a teacher twin
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.6 * first, (first, last)
    assert sum(agreement[-8:]) > sum(agreement[:8])


# ---- the trainer's side ---------------------------------------------------------------------------------------


def test_source_runs_the_teacher_on_its_own_inputs_and_scores_a_shifted_causal_student():
    tok, batch, student, _ = _same_tokenizer_setup()
    teacher = tiny_gpt2(len(tok), seed=1)
    settings = LossSettings(loss="jsd", temperature=1.5, alpha=0.4, beta=0.5, skew=0.1, uld_weight=1.0)
    source = CrossTokenizerTeacher(teacher, VocabularyMap.from_tokenizers(tok, tok))
    inputs = batch.to_dict()
    student_inputs = {k: v for k, v in source.student_inputs(inputs).items() if k != "labels"}
    outputs = student(**student_inputs)
    labels = torch.nn.functional.pad(batch.student["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    rows = source.rows(RowRequest(inputs, student_inputs, labels, outputs)).rows
    result = score(StudentOutput(outputs.logits), rows, labels, settings, vocab_size=None)
    with torch.no_grad():
        teacher_logits = teacher(**batch.teacher).logits
    expected = distillation_loss(outputs.logits[:, :-1], teacher_logits[:, :-1], batch.student["labels"][:, 1:],
                                 loss="jsd", temperature=1.5, alpha=0.4)  # fmt: skip
    assert result.loss.item() == pytest.approx(expected.loss.item(), rel=1e-4)


@pytest.mark.parametrize("layout", ["causal", "seq2seq"])
def test_realign_rebuilds_a_batch_from_the_student_ids(layout):
    aligner = CrossTokenizerAligner(sentencepiece_tokenizer(), byte_bpe_tokenizer(), prompt_template="Q: {source}\nA:")
    prompts, texts = ["the big cat", "a dog runs"], ["sleeps on the road!", "The café is naïve"]
    built = aligner.causal(texts, prompts) if layout == "causal" else aligner.seq2seq(prompts, texts)
    rebuilt = realign(built.student, aligner, is_encoder_decoder=layout == "seq2seq")
    for key, value in built.to_dict().items():
        assert torch.equal(rebuilt[key], value), key


def test_make_collator_reads_the_layout_from_the_config():
    student_tok, teacher_tok = sentencepiece_tokenizer(), byte_bpe_tokenizer()
    args = SimpleNamespace(
        cross_tokenizer_text_column="target",
        cross_tokenizer_prompt_column="source",
        teacher_prompt_template="{source} =",
    )
    seq2seq = make_collator(args, True, student_tok, teacher_tok)
    causal = make_collator(SimpleNamespace(), False, student_tok, teacher_tok)
    assert seq2seq.columns == ["source", "target"] and causal.columns == ["text"]
    assert seq2seq.aligner.prompt_template == "{source} ="
    with pytest.raises(ValueError, match="prompt_column"):
        make_collator(SimpleNamespace(), True, student_tok, teacher_tok)
    with pytest.raises(ValueError, match="causal"):
        check_cross_tokenizer(tiny_t5(8), tiny_t5(8), student_tok, teacher_tok)
