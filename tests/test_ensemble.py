"""Teacher ensembles: the mixture against plain torch in float64, every loss path, the cache, the refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import WORDS, make_tokenizer, tiny_bart, tiny_gpt2
from helpers import config, lm_collator, lm_dataset, seq2seq_collator, seq2seq_dataset
from transformers import DataCollatorForSeq2Seq

from hf_kd import DIVERGENCES, DistillationTrainer, TokenizerMismatchError
from hf_kd.losses import IGNORE_INDEX
from hf_kd.teachers import TeacherEnsemble

WEIGHTS = [0.7, 0.3]


def _mixture(teachers, weights, inputs) -> torch.Tensor:
    """log(sum_i w_i softmax(z_i)) by the formula, in float64."""
    with torch.no_grad():
        probs = sum(w * torch.softmax(t(**inputs).logits.double(), -1) for t, w in zip(teachers, weights, strict=True))
    return probs.log()


def _plain_divergence(name: str, p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Per-row divergences written out directly (p the teacher, q the student), float64."""
    p, q = p_log.exp(), q_log.exp()
    if name == "forward_kl":
        return (p * (p_log - q_log)).sum(-1)
    if name == "reverse_kl":
        return (q * (q_log - p_log)).sum(-1)
    if name == "jsd":  # beta 0.5
        m = 0.5 * (p + q)
        return 0.5 * (p * (p_log - m.log())).sum(-1) + 0.5 * (q * (q_log - m.log())).sum(-1)
    if name == "skew_forward_kl":  # skew 0.1
        return (p * (p_log - (0.1 * p + 0.9 * q).log())).sum(-1)
    if name == "skew_reverse_kl":
        return (q * (q_log - (0.1 * q + 0.9 * p).log())).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)  # tvd


def test_ensemble_logits_are_the_log_of_the_weighted_mean_probability():
    tok = make_tokenizer()
    members = [tiny_gpt2(len(tok), seed=s).double().eval() for s in (1, 2, 3)]
    weights = [2.0, 1.0, 1.0]  # normalised to 0.5, 0.25, 0.25
    ids = torch.randint(4, len(tok), (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        mixed = TeacherEnsemble(members, weights)(**inputs).logits
    expected = _mixture(members, [0.5, 0.25, 0.25], inputs)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-12)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(2, 7, dtype=torch.float64))


@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
@pytest.mark.parametrize("path", ["reference", "chunked", "fused"])
def test_causal_ensemble_loss_equals_a_float64_reference(tmp_path, loss, path):
    tok = make_tokenizer()
    vocab = len(tok)
    student = tiny_gpt2(vocab, seed=0).double()
    teachers = [tiny_gpt2(vocab, seed=1).double(), tiny_gpt2(vocab, seed=2, n_layer=3).double()]
    chunk = {"reference": None, "chunked": 5, "fused": 5}[path]
    args = config(tmp_path, loss=loss, alpha=0.3, temperature=2.0, teacher_weights=WEIGHTS, loss_chunk_size=chunk,
                  fuse_output_layer=path == "fused")  # fmt: skip
    trainer = DistillationTrainer(model=student, teacher_model=teachers, args=args, processing_class=tok)
    batch = lm_collator(tok)([lm_dataset(tok, n=3, seed=4)[i] for i in range(3)])
    loss_value = trainer.compute_loss(student, dict(batch))

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    mask = labels.ne(IGNORE_INDEX)
    with torch.no_grad():
        z = student(**inputs).logits[:, :-1][mask]
    p_log = torch.log_softmax(_mixture(teachers, WEIGHTS, inputs)[:, :-1][mask] / 2.0, -1)
    q_log = torch.log_softmax(z / 2.0, -1)
    kd = _plain_divergence(loss, p_log, q_log).sum()
    ce = torch.nn.functional.cross_entropy(z, labels[mask], reduction="sum")
    expected = (0.3 * ce + 0.7 * 4.0 * kd) / mask.sum()
    assert loss_value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_seq2seq_ensemble_through_the_chunked_path_equals_one_teacher_when_the_members_are_copies(tmp_path):
    """Two copies of one teacher mix to that teacher: the ensemble's loss and gradients are the single one's."""
    tok = make_tokenizer()
    student, teacher = tiny_bart(len(tok), seed=0), tiny_bart(len(tok), seed=1)
    batch = seq2seq_collator(tok, student)([seq2seq_dataset(tok, n=4)[i] for i in range(4)])
    grads = []
    for teacher_model in (teacher, [teacher, copy.deepcopy(teacher)]):
        s = copy.deepcopy(student)
        weights = WEIGHTS if isinstance(teacher_model, list) else None
        args = config(tmp_path, loss="jsd", alpha=0.0, loss_chunk_size=7, teacher_weights=weights)
        trainer = DistillationTrainer(model=s, teacher_model=teacher_model, args=args, processing_class=tok)
        trainer.compute_loss(s, dict(batch)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in s.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_a_cache_of_an_ensemble_trains_as_the_live_ensemble(tmp_path):
    """k = the whole vocabulary: the cached rows of the mixture give the live ensemble's loss."""
    from hf_kd.teachers.cache_writer import build_teacher_cache

    tok = make_tokenizer()
    vocab = len(tok)
    teachers = [tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2)]
    data = lm_dataset(tok, n=6, seed=3).map(lambda row: {"labels": row["input_ids"]})
    build_teacher_cache(TeacherEnsemble(teachers, WEIGHTS), data, tmp_path / "cache", k=vocab)
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    losses = []
    for source in ("live", "cache"):
        student = tiny_gpt2(vocab, seed=0)
        kwargs = {"teacher_cache": str(tmp_path / "cache")} if source == "cache" else {"teacher_model": teachers}
        args = config(tmp_path / source, alpha=0.0, teacher_weights=WEIGHTS if source == "live" else None)
        trainer = DistillationTrainer(model=student, args=args, processing_class=tok, train_dataset=data,
                                      data_collator=collator, **kwargs)  # fmt: skip
        rows = next(iter(trainer.get_train_dataloader()))
        losses.append(trainer.compute_loss(student, rows).item())
        if source == "live":
            assert trainer.teacher_name.count("+") == 1
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)  # float16 storage of the cache


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_kd": True}, "seq_kd .*single teacher"),
        ({"hidden_state_loss_weight": 1.0}, "hidden_state_loss_weight > 0 needs a single teacher"),
        ({"teacher_weights": [1.0, 2.0, 3.0]}, "3 values for 2 teachers"),
        ({"teacher_weights": [1.0, -1.0]}, "finite and > 0"),
    ],
)
def test_what_an_ensemble_cannot_do_is_refused_at_construction(tmp_path, kwargs, message):
    tok = make_tokenizer()
    teachers = [tiny_gpt2(len(tok), seed=1), tiny_gpt2(len(tok), seed=2)]
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=tiny_gpt2(len(tok)), teacher_model=teachers, args=config(tmp_path, **kwargs),
                            processing_class=tok)  # fmt: skip


def test_weights_without_an_ensemble_and_members_with_other_tokenizers_are_refused(tmp_path):
    tok, other = make_tokenizer(), make_tokenizer(list(reversed(WORDS)), name="reversed")
    with pytest.raises(ValueError, match="teacher_weights weighs the teachers of an ensemble"):
        DistillationTrainer(model=tiny_gpt2(len(tok)), teacher_model=tiny_gpt2(len(tok), seed=1),
                            args=config(tmp_path, teacher_weights=[1.0]), processing_class=tok)  # fmt: skip
    paths = []
    for name, tokenizer in (("a", tok), ("b", other)):
        tiny_gpt2(len(tok), seed=1).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    with pytest.raises(TokenizerMismatchError, match="share one tokenizer"):
        DistillationTrainer(model=tiny_gpt2(len(tok)), teacher_model=paths, args=config(tmp_path),
                            processing_class=tok)  # fmt: skip


def test_weights_are_normalised():
    tok = make_tokenizer()
    ensemble = TeacherEnsemble([tiny_gpt2(len(tok), seed=1), tiny_gpt2(len(tok), seed=2)], [3.0, 1.0])
    assert ensemble.weights == [0.75, 0.25]
    assert math.isclose(sum(TeacherEnsemble([tiny_gpt2(len(tok))] * 2).weights), 1.0)


_SETTING_KWARGS = {
    "lmbda > 0": {"lmbda": 0.5},
    "seq_kd": {"seq_kd": True},
    "cross_tokenizer": {"cross_tokenizer": True},
    "hidden_state_loss_weight > 0": {"hidden_state_loss_weight": 1.0},
    "teacher_reuses_student_encoder": {"teacher_reuses_student_encoder": True},
    "fuse_output_layer": {"fuse_output_layer": True},
}
_FACTS = {"teacher_cache", "teacher ensemble", "DeepSpeed or FSDP"}


def _in_use(tmp_path, names):
    from hf_kd.trainer import settings_in_use

    kwargs = {k: v for name in names if name in _SETTING_KWARGS for k, v in _SETTING_KWARGS[name].items()}
    return settings_in_use(config(tmp_path, **kwargs), **{name: True for name in names if name in _FACTS})


def test_every_refusal_fires_for_its_pair_and_only_for_it(tmp_path):
    """Each REFUSALS pair, and nothing else, raises its message; each setting alone is accepted."""
    from hf_kd.trainer import REFUSALS, check_refusals

    for first, second, message in REFUSALS:
        assert _in_use(tmp_path, [first, second]) == {first, second}, (first, second)
        with pytest.raises(ValueError) as raised:
            check_refusals({first, second})
        assert str(raised.value) == message
    for name in [*_SETTING_KWARGS, *_FACTS]:
        check_refusals(_in_use(tmp_path, [name]))
