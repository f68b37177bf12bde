"""HiddenStateDistiller against per-position loops written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_bart, tiny_gpt2
from transformers import GPT2Config

from hf_kd.losses import IGNORE_INDEX
from hf_kd.student.hidden import (
    PROJECTION_CONFIG_FILE,
    PROJECTION_FILE,
    HiddenStateDistiller,
    default_hidden_layer_map,
    hidden_masks,
)
from hf_kd.student.make import make_student

VOCAB = 48


def _gpt2_config(layers: int, width: int) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_layer=layers, n_embd=width, n_head=2, n_positions=32)


def _states(layers: int, width: int, batch: int = 2, length: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, width, generator=g) for _ in range(layers + 1))


def _layer_norm(v: list[float]) -> list[float]:
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + 1e-5) for x in v]


def _manual_loss(distiller, student, teacher, mask, loss, normalize) -> float:
    """Loop over pairs and positions; the projection applied as an explicit matrix-vector product."""
    pair_losses = []
    for s, t in distiller.layer_map["decoder"]:
        projection = distiller.projections[f"decoder_{s}_to_{t}"] if len(distiller.projections) else None
        total, count = 0.0, 0
        for b in range(mask.shape[0]):
            for p in range(mask.shape[1]):
                if not mask[b, p]:
                    continue
                x = student[s][b, p].tolist()
                if projection is not None:
                    w, bias = projection.weight.tolist(), projection.bias.tolist()
                    x = [sum(w[i][j] * x[j] for j in range(len(x))) + bias[i] for i in range(len(w))]
                y = teacher[t][b, p].tolist()
                if normalize:
                    x, y = _layer_norm(x), _layer_norm(y)
                if loss == "mse":
                    value = sum((a - c) ** 2 for a, c in zip(x, y, strict=True)) / len(y)
                else:
                    dot = sum(a * c for a, c in zip(x, y, strict=True))
                    value = 1 - dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(c * c for c in y)))
                total, count = total + value, count + 1
        pair_losses.append(total / count)
    return sum(pair_losses) / len(pair_losses)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("widths", [(8, 12), (12, 12)])
def test_loss_matches_a_manual_computation(loss, normalize, widths):
    torch.manual_seed(0)
    student_config, teacher_config = _gpt2_config(2, widths[0]), _gpt2_config(4, widths[1])
    distiller = HiddenStateDistiller(
        student_config, teacher_config, layer_map=[(0, 0), (1, 2), (2, 4)], loss=loss, normalize=normalize
    )
    assert len(list(distiller.parameters())) == (6 if widths[0] != widths[1] else 0)
    student, teacher = _states(2, widths[0], seed=1), _states(4, widths[1], seed=2)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    got = distiller({"decoder": student}, {"decoder": teacher}, {"decoder": mask})
    expected = _manual_loss(distiller, student, teacher, mask, loss, normalize)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_masked_positions_do_not_count_and_gradients_reach_student_and_projection():
    distiller = HiddenStateDistiller(_gpt2_config(2, 8), _gpt2_config(2, 16))
    student = tuple(s.requires_grad_() for s in _states(2, 8, seed=1))
    teacher = _states(2, 16, seed=2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    loss = distiller({"decoder": student}, {"decoder": teacher}, {"decoder": mask})
    changed = tuple(t.clone() for t in teacher)
    for t in changed:
        t[mask == 0] = 1e3
    assert torch.equal(distiller({"decoder": student}, {"decoder": changed}, {"decoder": mask}), loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.parameters())
    assert student[2].grad[mask == 0].abs().sum() == 0 and student[2].grad[mask == 1].abs().sum() > 0
    assert student[0].grad is None  # the embeddings are not paired by the default map


def test_default_map_follows_make_student_record():
    teacher = tiny_gpt2(VOCAB, n_layer=4)
    student = make_student(teacher, layer_map=[0, 3])
    assert default_hidden_layer_map(student.config, teacher.config) == {"decoder": [(1, 1), (2, 4)]}
    bart_teacher = tiny_bart(VOCAB, layers=4)
    bart_student = make_student(bart_teacher, encoder_layers=3, decoder_layers=2)
    assert default_hidden_layer_map(bart_student.config, bart_teacher.config) == {
        "encoder": [(1, 1), (2, 3), (3, 4)],
        "decoder": [(1, 1), (2, 4)],
    }


def test_default_map_without_record_is_evenly_spaced():
    teacher_config = _gpt2_config(12, 8)
    # DistilBART's LAYERS_TO_SUPERVISE for 12 -> 3 is [3, 7, 11] (0-based layers) = hidden states 4, 8, 12.
    assert default_hidden_layer_map(_gpt2_config(3, 8), teacher_config) == {"decoder": [(1, 4), (2, 8), (3, 12)]}
    assert default_hidden_layer_map(_gpt2_config(6, 8), teacher_config)["decoder"] == [(k, 2 * k) for k in range(1, 7)]
    assert default_hidden_layer_map(_gpt2_config(5, 8), _gpt2_config(7, 8))["decoder"] == [
        (1, 1),
        (2, 3),
        (3, 4),
        (4, 6),
        (5, 7),
    ]


def test_identical_student_gives_zero_and_real_seq2seq_outputs_work():
    teacher = tiny_bart(VOCAB, layers=4).eval()
    student = make_student(teacher)
    distiller = HiddenStateDistiller(student.config, teacher.config)
    ids = torch.randint(4, VOCAB, (2, 7))
    labels = torch.randint(4, VOCAB, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        out_s, out_t = (m(**inputs, output_hidden_states=True) for m in (student, teacher))
    assert distiller.loss_from_outputs(out_s, out_t, inputs, is_encoder_decoder=True).item() == 0.0
    masks = hidden_masks(inputs, is_encoder_decoder=True)
    assert torch.equal(masks["decoder"], labels.ne(IGNORE_INDEX)) and masks["encoder"] is inputs["attention_mask"]

    small = tiny_bart(VOCAB, d_model=16, layers=2).eval()
    distiller = HiddenStateDistiller(small.config, teacher.config, loss="cosine")
    out_small = small(**inputs, output_hidden_states=True)
    value = distiller.loss_from_outputs(out_small, out_t, inputs, is_encoder_decoder=True)
    # Reference: the same two stacks computed one by one and averaged over pairs.
    per_stack = [
        HiddenStateDistiller(small.config, teacher.config, layer_map={stack: pairs}, loss="cosine")
        for stack, pairs in distiller.layer_map.items()
    ]
    for part in per_stack:
        part.load_state_dict(
            {k: v for k, v in distiller.state_dict().items() if k.split(".")[1] in dict(part.projections)}
        )
    weights = [len(p) for p in distiller.layer_map.values()]
    parts = [part.loss_from_outputs(out_small, out_t, inputs, True) for part in per_stack]
    expected = sum(w * p for w, p in zip(weights, parts, strict=True)) / sum(weights)
    torch.testing.assert_close(value, expected)


def test_save_and_reload(tmp_path):
    student_config, teacher_config = _gpt2_config(2, 8), _gpt2_config(4, 12)
    distiller = HiddenStateDistiller(student_config, teacher_config, layer_map='{"decoder": [[1, 2], [2, 4]]}')
    distiller.save_pretrained(tmp_path)
    assert (tmp_path / PROJECTION_FILE).exists() and (tmp_path / PROJECTION_CONFIG_FILE).exists()
    reloaded = HiddenStateDistiller.from_pretrained(tmp_path, student_config, teacher_config)
    assert reloaded.layer_map == {"decoder": [(1, 2), (2, 4)]}
    for (name, a), (_, b) in zip(distiller.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # Equal widths: no projection, but the settings still round-trip.
    same = HiddenStateDistiller(student_config, _gpt2_config(4, 8), normalize=True)
    same.save_pretrained(tmp_path / "same")
    assert HiddenStateDistiller.from_pretrained(tmp_path / "same", student_config, _gpt2_config(4, 8)).normalize


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "l1"}, r"use one of \['mse', 'cosine'\]"),
        ({"layer_map": [(3, 1)]}, r"out of range.*0\.\.2 for the student and 0\.\.4"),
        ({"layer_map": {"encoder": [(1, 1)]}}, r"Unknown stack.*\['decoder'\]"),
        ({"layer_map": [(1,)]}, r"\[student, teacher\] pair"),
        ({"layer_map": {"decoder": [1, 2]}}, r"entry 1 must be a \[student, teacher\] pair"),
        ({"layer_map": []}, r"at least one"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HiddenStateDistiller(_gpt2_config(2, 8), _gpt2_config(4, 8), **kwargs)


def test_missing_hidden_states_is_a_clear_error():
    model = tiny_gpt2(VOCAB)
    out = model(input_ids=torch.tensor([[4, 5, 6]]))
    distiller = HiddenStateDistiller(model.config, model.config)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        distiller.loss_from_outputs(out, out, {}, is_encoder_decoder=False)
