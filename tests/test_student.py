"""make_student: students copied from their teacher, checked against a teacher with layers removed by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tokenizer, tiny_bart, tiny_gpt2, tiny_llama, tiny_t5
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MT5Config,
    MT5ForConditionalGeneration,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_kd.cli import main as cli_main
from hf_kd.student.make import PUBLISHED_MAPS, RECORD_FILE, default_layers, make_student, resolve_layer_map

VOCAB = 48

# DistilBART's LAYERS_TO_COPY for a 12-layer teacher, as published in transformers'
# examples/research_projects/seq2seq-distillation/make_student.py.
DISTILBART_12 = {
    1: [0],
    2: [0, 6],
    3: [0, 6, 11],
    4: [0, 4, 8, 11],
    6: [0, 2, 4, 7, 9, 11],
    9: [0, 1, 2, 4, 5, 7, 9, 10, 11],
    12: list(range(12)),
}


TEACHERS = {
    "bart": lambda: tiny_bart(VOCAB, layers=4),
    "t5": lambda: tiny_t5(VOCAB, num_layers=4),
    # Flan-T5: gated-gelu feed-forward and an untied lm_head.
    "flan-t5": lambda: tiny_t5(VOCAB, num_layers=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": lambda: tiny_t5(VOCAB, num_layers=4, model_cls=MT5ForConditionalGeneration, config_cls=MT5Config),
    "gpt2": lambda: tiny_gpt2(VOCAB, n_layer=4),
    "llama": lambda: tiny_llama(VOCAB, 4, LlamaForCausalLM, LlamaConfig),
    "mistral": lambda: tiny_llama(VOCAB, 4, MistralForCausalLM, MistralConfig, sliding_window=3),
    # Sliding attention on layers >= 2 only: a copied layer must keep its own attention type.
    "qwen2": lambda: tiny_llama(
        VOCAB,
        4,
        Qwen2ForCausalLM,
        Qwen2Config,
        tie_word_embeddings=False,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=2,
    ),
}

# Where each family keeps its layer lists, to remove layers from a teacher copy by hand.
LAYER_LISTS = {
    "bart": {
        "encoder": ("model.encoder.layers", "encoder_layers"),
        "decoder": ("model.decoder.layers", "decoder_layers"),
    },
    "t5": {"encoder": ("encoder.block", "num_layers"), "decoder": ("decoder.block", "num_decoder_layers")},
    "gpt2": {"decoder": ("transformer.h", "n_layer")},
    "llama": {"decoder": ("model.layers", "num_hidden_layers")},
}
LAYER_LISTS.update({"flan-t5": LAYER_LISTS["t5"], "mt5": LAYER_LISTS["t5"]})
LAYER_LISTS.update({"mistral": LAYER_LISTS["llama"], "qwen2": LAYER_LISTS["llama"]})


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(4, VOCAB, (2, 6), generator=g)
    return inputs


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs, use_cache=False).logits


def _pruned_by_hand(teacher: nn.Module, family: str, layer_map: dict[str, list[int]]) -> nn.Module:
    """The reference: a deep copy of the teacher whose layer lists keep only the mapped layers."""
    pruned = copy.deepcopy(teacher)
    for stack, layers in layer_map.items():
        path, count_attribute = LAYER_LISTS[family][stack]
        parent_path, name = path.rsplit(".", 1)
        parent = pruned.get_submodule(parent_path)
        setattr(parent, name, nn.ModuleList([getattr(parent, name)[i] for i in layers]))
        setattr(pruned.config, count_attribute, len(layers))
    if family == "qwen2":  # Qwen2Model reads each layer's attention type from the config
        pruned.config.layer_types = [teacher.config.layer_types[i] for i in layer_map["decoder"]]
    return pruned


def test_default_maps_are_distilbarts_published_ones():
    for student_layers, expected in DISTILBART_12.items():
        assert default_layers(12, student_layers) == expected
    # The even spread alone (no table) gives the published 12 -> 6 and 12 -> 3 maps too.
    for student_layers in (3, 6):
        step = 11 / (student_layers - 1)
        assert [int(i * step + 0.5) for i in range(student_layers)] == DISTILBART_12[student_layers]
    assert PUBLISHED_MAPS[12][6] == [0, 2, 4, 7, 9, 11]


def test_default_maps_without_a_published_one_keep_first_and_last():
    assert default_layers(8, 3) == [0, 4, 7]
    assert default_layers(24, 5) == [0, 6, 12, 17, 23]
    for teacher_layers in range(2, 33):
        for student_layers in range(2, teacher_layers + 1):
            if student_layers in PUBLISHED_MAPS.get(teacher_layers, {}):
                continue  # DistilBART's 12 -> 2 is [0, 6]: published, not spread
            layers = default_layers(teacher_layers, student_layers)
            assert layers[0] == 0 and layers[-1] == teacher_layers - 1
            assert all(b > a for a, b in zip(layers, layers[1:], strict=False))


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_keeping_every_layer_reproduces_the_teacher(family):
    teacher = TEACHERS[family]().eval()
    student = make_student(teacher)
    inputs = _inputs(teacher)
    assert torch.equal(_logits(student, inputs), _logits(teacher, inputs))
    assert student is not teacher and student.state_dict().keys() == teacher.state_dict().keys()


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_student_equals_the_teacher_with_layers_removed(family):
    teacher = TEACHERS[family]().eval()
    layer_map = {"decoder": [0, 3]}
    if teacher.config.is_encoder_decoder:
        layer_map["encoder"] = [0, 1, 3]
    student = make_student(teacher, layer_map=layer_map)
    inputs = _inputs(teacher)
    expected = _logits(_pruned_by_hand(teacher, family, layer_map), inputs)
    torch.testing.assert_close(_logits(student, inputs), expected, rtol=0, atol=1e-6)
    assert student.config.hf_kd_layer_map == layer_map
    # Weights are copies, not shared with the teacher.
    first = next(student.parameters())
    assert first.data_ptr() != next(teacher.parameters()).data_ptr()


def test_t5_first_block_keeps_the_relative_attention_bias():
    teacher = tiny_t5(VOCAB, num_layers=4).eval()
    student = make_student(teacher, layer_map={"encoder": [2, 3], "decoder": [1, 2, 3]})
    for stack in ("encoder", "decoder"):
        t_blocks, s_blocks = getattr(teacher, stack).block, getattr(student, stack).block
        source = student.config.hf_kd_layer_map[stack][0]
        bias = s_blocks[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(bias, t_blocks[0].layer[0].SelfAttention.relative_attention_bias.weight)
        assert torch.equal(
            s_blocks[0].layer[0].SelfAttention.q.weight, t_blocks[source].layer[0].SelfAttention.q.weight
        )
    # Teacher block 0 copied to a later student block: its bias has nowhere to go and is not needed.
    student = make_student(teacher, layer_map={"encoder": [0, 1], "decoder": [0, 3]})
    inputs = _inputs(teacher)
    expected = _logits(_pruned_by_hand(teacher, "t5", student.config.hf_kd_layer_map), inputs)
    torch.testing.assert_close(_logits(student, inputs), expected, rtol=0, atol=1e-6)


def test_twelve_layer_bart_default_students():
    teacher = tiny_bart(VOCAB, d_model=16, layers=12).eval()
    student = make_student(teacher, encoder_layers=12, decoder_layers=6)
    assert student.config.hf_kd_layer_map == {"encoder": list(range(12)), "decoder": [0, 2, 4, 7, 9, 11]}
    assert student.config.decoder_layers == 6 and student.config.encoder_layers == 12
    for i, t in enumerate([0, 2, 4, 7, 9, 11]):
        s_fc, t_fc = student.model.decoder.layers[i].fc1.weight, teacher.model.decoder.layers[t].fc1.weight
        assert torch.equal(s_fc, t_fc)
    assert torch.equal(student.final_logits_bias, teacher.final_logits_bias)
    student = make_student(teacher, encoder_layers=3, decoder_layers=3)
    assert student.config.hf_kd_layer_map == {"encoder": [0, 6, 11], "decoder": [0, 6, 11]}


@pytest.mark.parametrize("family", ["t5", "qwen2"])
def test_saved_student_reloads_with_tokenizer_and_record(tmp_path, family):
    teacher = TEACHERS[family]().eval()
    teacher.generation_config.num_beams = 3
    tokenizer = make_tokenizer()
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    out = tmp_path / "student"
    student = make_student(str(teacher_dir), decoder_layers=2, output_dir=out)

    auto = AutoModelForSeq2SeqLM if teacher.config.is_encoder_decoder else AutoModelForCausalLM
    reloaded = auto.from_pretrained(out)
    expected_map = {"decoder": [0, 3]}
    if teacher.config.is_encoder_decoder:
        expected_map["encoder"] = [0, 1, 2, 3]
        assert reloaded.config.num_decoder_layers == 2 and len(reloaded.decoder.block) == 2
    else:
        assert reloaded.config.num_hidden_layers == 2 and len(reloaded.model.layers) == 2
        assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    assert reloaded.config.hf_kd_layer_map == expected_map
    assert reloaded.generation_config.num_beams == 3
    inputs = _inputs(teacher)
    assert torch.equal(_logits(reloaded, inputs), _logits(student, inputs))
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["layer_map"] == expected_map and record["teacher"] == str(teacher_dir)
    assert record["student_layers"]["decoder"] == 2 and record["teacher_layers"]["decoder"] == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decoder_layers": 5}, r"between 1 and 4 .*smaller number"),
        ({"decoder_layers": 0}, r"between 1 and 4"),
        ({"layer_map": {"decoder": [0, 4]}}, r"layer 4.*layers 0\.\.3\. Use indices in that range"),
        ({"layer_map": {"decoder": [0, 1, 2, 3, 3]}}, r"5 layers, more than the teacher's 4"),
        ({"layer_map": {"decoder": [0, 2, 2]}}, r"repeats a layer or is out of order.*\[0, 2\]"),
        ({"layer_map": {"decoder": [3, 0]}}, r"increasing order, e\.g\. \[0, 3\]"),
        ({"layer_map": {"decoder": []}}, r"at least one layer"),
        ({"layer_map": {"decoder": [0, 1]}, "decoder_layers": 3}, r"disagrees.*give one or the other"),
        ({"layer_map": {"encoder": [0]}}, r"Unknown stack.*\['decoder'\]"),
        ({"encoder_layers": 2}, r"has no encoder: use decoder_layers"),
    ],
)
def test_bad_maps_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_student(TEACHERS["gpt2"](), **kwargs)


def test_unsupported_architecture_and_seq2seq_list_map():
    torch.manual_seed(0)
    opt = OPTForCausalLM(
        OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match=r"model_type='opt'.*Supported: \['bart'.*build the student yourself"):
        make_student(opt, decoder_layers=1)
    with pytest.raises(ValueError, match=r'"encoder": \[\.\.\.\], "decoder"'):
        resolve_layer_map(TEACHERS["bart"]().config, layer_map=[0, 1])


def test_cli_make_student(tmp_path, capsys):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    TEACHERS["bart"]().save_pretrained(teacher_dir)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    args = ["make-student", str(teacher_dir), str(out), "--encoder-layers", "2", "--decoder-map", "1,3"]
    assert cli_main([*args, "--tokenizer", str(tmp_path / "tok")]) == 0
    assert "teacher layers: encoder [0, 3], decoder [1, 3]" in capsys.readouterr().out
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert (reloaded.config.encoder_layers, reloaded.config.decoder_layers) == (2, 2)
    assert (out / "tokenizer.json").exists()
    assert cli_main(["make-student", str(teacher_dir), str(tmp_path / "bad"), "--decoder-map", "0,9"]) == 2
    assert "Use indices in that range" in capsys.readouterr().err
    assert cli_main(["make-student", str(tmp_path / "missing"), str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.startswith("hf-kd make-student: error:")
