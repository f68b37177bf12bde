"""Width pruning (Minitron): students narrowed by activation importance, checked against the teacher, against
dead units put there on purpose, and against importance computed by hand."""

from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, random_sentences, tiny_gpt2, tiny_llama, tiny_t5
from helpers import config, lm_collator, lm_dataset, one_line_error, seq2seq_collator, seq2seq_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MT5Config,
    MT5ForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_kd import DistillationTrainer
from hf_kd.cli import main as cli_main
from hf_kd.student.calibration import calibration_batches
from hf_kd.student.make import RECORD_FILE, make_student
from hf_kd.student.prune import activation_importance, prune_width, spec_of, target_sizes

VOCAB = len(make_tokenizer())


def _bart(**extra):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               pad_token_id=0, eos_token_id=1, bos_token_id=3, decoder_start_token_id=1, forced_eos_token_id=1,
               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip
    cfg.update(extra)
    return BartForConditionalGeneration(BartConfig(**cfg))


def _t5(cls=T5ForConditionalGeneration, config_cls=T5Config, **extra):
    return tiny_t5(VOCAB, model_cls=cls, config_cls=config_cls, num_heads=4, **extra)


def _llama(cls=LlamaForCausalLM, config_cls=LlamaConfig, **extra):
    return tiny_llama(VOCAB, 2, cls, config_cls, **extra)


TEACHERS = {
    "bart": _bart,
    "t5": _t5,
    "flan-t5": lambda: _t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": lambda: _t5(MT5ForConditionalGeneration, MT5Config),
    "gpt2": lambda: tiny_gpt2(VOCAB, n_layer=2),
    "llama": _llama,
    "mistral": lambda: _llama(MistralForCausalLM, MistralConfig, sliding_window=3),
    "qwen2": lambda: _llama(Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=False),
}
FAMILIES = sorted(TEACHERS)

# A narrower student each family can take: (hidden, MLP neurons, heads, key-value heads or None).
NARROW = {
    "bart": (16, 40, 2, None),  # hidden = heads x 8, the teacher's head size
    "gpt2": (16, 72, 1, None),  # GPT-2's teacher: 2 heads of 16
    "t5": (24, 40, 3, None),
    "llama": (24, 40, 2, 1),
}
NARROW.update({"flan-t5": NARROW["t5"], "mt5": NARROW["t5"], "mistral": NARROW["llama"], "qwen2": NARROW["llama"]})


def _widths(family: str) -> dict:
    hidden, ffn, heads, kv = NARROW[family]
    widths = dict(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads)
    if kv is not None:
        widths["num_key_value_heads"] = kv
    return widths


def _batches(model, n: int = 3, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """Random token batches with right padding (and -100 label padding), as a collator makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -4:] = 0
        mask[2, -1:] = 0
        batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
        if model.config.is_encoder_decoder:
            labels = torch.randint(4, VOCAB, (4, 7), generator=g)
            labels[1, -3:] = -100
            batch["labels"] = labels
        out.append(batch)
    return out


def _inputs(model) -> dict[str, torch.Tensor]:
    batch = dict(_batches(model, n=1, seed=11)[0])
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = batch.pop("labels").clamp(min=0)
    return batch


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        logits = model.eval()(**inputs, use_cache=False).logits
    # Padded positions of a causal model see no real token the student must match: compare real ones only.
    return logits[inputs["attention_mask"].bool()] if not model.config.is_encoder_decoder else logits


# (a) full size ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_to_the_full_size_gives_the_teacher(family):
    teacher = TEACHERS[family]().eval()
    sizes = spec_of(teacher.config).sizes(teacher.config, None)
    widths = dict(hidden_size=sizes.hidden, intermediate_size=sizes.ffn, num_attention_heads=sizes.heads)
    student = make_student(teacher, calibration=_batches(teacher), **widths)
    inputs = _inputs(teacher)
    assert torch.equal(_logits(student, inputs), _logits(teacher, inputs))
    record = student.config.hf_kd_pruning
    assert record["hidden_size"] == list(range(sizes.hidden))
    assert all(kept == list(range(sizes.ffn)) for kept in record["intermediate_size"].values())
    assert record["student_sizes"] == record["teacher_sizes"]


# (b) dead units go first --------------------------------------------------------------------------------------------


def _max_diff(a, b, inputs) -> float:
    return (_logits(a, inputs) - _logits(b, inputs)).abs().max().item()


def _barely_moves(pruned, randomly_pruned, teacher, inputs) -> None:
    """Removing dead units leaves the logits as they were (float noise); removing live ones moves them."""
    dead, live = _max_diff(pruned, teacher, inputs), _max_diff(randomly_pruned, teacher, inputs)
    scale = _logits(teacher, inputs).abs().max().item()
    assert dead < 1e-5 * scale and live > 1e-2 * scale, (dead, live, scale)


def _random_scores(model, batches, seed: int) -> dict:
    """Importance with every score replaced by a random one: pruning by it removes random units."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) for k, v in activation_importance(model, batches).items()}


def test_dead_mlp_neurons_are_the_ones_removed():
    teacher = _bart(init_std=0.2).eval()  # weights large enough that a live neuron moves the logits
    dead = [3, 17, 40, 41, 63]
    with torch.no_grad():
        for stack in (teacher.model.encoder, teacher.model.decoder):
            for layer in stack.layers:
                layer.fc1.weight[dead] = 0  # gelu(0) = 0: these neurons never fire
                layer.fc1.bias[dead] = 0
    batches = _batches(teacher)
    target = target_sizes(teacher.config, intermediate_size=64 - len(dead))
    student = prune_width(teacher, batches, target)
    alive = [i for i in range(64) if i not in dead]
    assert all(kept == alive for kept in student.config.hf_kd_pruning["intermediate_size"].values())
    inputs = _inputs(teacher)
    randomly = prune_width(teacher, batches, target, importance=_random_scores(teacher, batches, 0))
    _barely_moves(student, randomly, teacher, inputs)


def test_dead_heads_and_key_value_groups_are_the_ones_removed():
    # T5: a head whose values are zero outputs zero; its self-attention heads are one set per stack.
    t5 = _t5().eval()
    with torch.no_grad():
        for stack in (t5.encoder, t5.decoder):
            for block in stack.block:
                for sub in block.layer[:-1]:  # self-attention (and the decoder's cross-attention)
                    attention = sub.SelfAttention if hasattr(sub, "SelfAttention") else sub.EncDecAttention
                    attention.v.weight[8:16] = 0  # head 1 of 4 (d_kv 8)
    batches = _batches(t5)
    student = prune_width(t5, batches, target_sizes(t5.config, num_attention_heads=3))
    heads = student.config.hf_kd_pruning["attention_heads"]
    assert set(heads) == {"encoder.SelfAttention", "decoder.SelfAttention", "decoder.block.0.layer.1.EncDecAttention",
                          "decoder.block.1.layer.1.EncDecAttention"}  # fmt: skip
    assert all(kept == [0, 2, 3] for kept in heads.values())
    assert student.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape == (32, 3)
    randomly = prune_width(t5, batches, target_sizes(t5.config, num_attention_heads=3),
                           importance=_random_scores(t5, batches, 1))  # fmt: skip
    _barely_moves(student, randomly, t5, _inputs(t5))

    # Llama: key-value group 0 (query heads 0, 1) has zero values; num_key_value_heads=1 keeps group 1 only.
    llama = _llama().eval()
    with torch.no_grad():
        for layer in llama.model.layers:
            layer.self_attn.v_proj.weight[0:8] = 0
    batches = _batches(llama)
    student = prune_width(llama, batches, target_sizes(llama.config, num_key_value_heads=1))
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (2, 1)
    record = student.config.hf_kd_pruning
    assert all(kept == [2, 3] for kept in record["attention_heads"].values())
    assert all(kept == [1] for kept in record["key_value_heads"].values())
    reversed_scores = {k: -v for k, v in activation_importance(llama, batches).items()}
    live_removed = prune_width(llama, batches, target_sizes(llama.config, num_key_value_heads=1),
                               importance=reversed_scores)  # fmt: skip
    assert live_removed.config.hf_kd_pruning["key_value_heads"]["model.layers.0.self_attn"] == [0]
    _barely_moves(student, live_removed, llama, _inputs(llama))
    # Pruning query heads within the groups: 2 of 4, one per group.
    one_per_group = prune_width(llama, batches, target_sizes(llama.config, num_attention_heads=2))
    assert one_per_group.config.num_key_value_heads == 2
    assert all(kept[0] in (0, 1) and kept[1] in (2, 3) for kept in one_per_group.config.hf_kd_pruning[
        "attention_heads"].values())  # fmt: skip


def test_dead_hidden_channels_are_the_ones_removed():
    """Channels nothing writes to are ranked last. Removing them changes the LayerNorm statistics (their zeros
    counted in the mean and variance), so the output moves a little, but far less than removing live ones."""
    teacher = _bart().eval()
    dead = [5, 6, 20, 31]
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if param.dim() == 1 and ("norm" in name or name.endswith(("out_proj.bias", "fc2.bias"))):
                param[dead] = 0
            elif "embed" in name or "shared" in name or "lm_head" in name:
                param[:, dead] = 0
            elif name.endswith(("out_proj.weight", "fc2.weight")):
                param[dead] = 0
    batches = _batches(teacher)
    target = target_sizes(teacher.config, hidden_size=32 - len(dead) - 4, num_attention_heads=3)
    student = prune_width(teacher, batches, target)
    kept = student.config.hf_kd_pruning["hidden_size"]
    assert len(kept) == 24 and not set(kept) & set(dead)
    randomly = prune_width(teacher, batches, target, importance=_random_scores(teacher, batches, 2))
    assert set(randomly.config.hf_kd_pruning["hidden_size"]) & set(dead)  # the random choice kept a dead one
    inputs = _inputs(teacher)
    assert _max_diff(student, teacher, inputs) * 2 < _max_diff(randomly, teacher, inputs)


# (c) importance against a hand-written forward ---------------------------------------------------------------------


def test_importance_equals_a_plain_torch_forward():
    """A one-layer GPT-2 run by hand: the three estimators as formulas, over the real tokens of each batch."""
    model = tiny_gpt2(VOCAB, n_layer=1, n_embd=32).eval()
    batches = _batches(model)
    got = activation_importance(model, batches)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    eps, heads, hd = model.config.layer_norm_epsilon, 2, 16
    expected = {"hidden": 0, "ffn": 0, "heads": 0}

    def ln(x, name):
        return F.layer_norm(x, (32,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def mean(values, real):  # mean over real tokens
        return values[real].mean(dim=0)

    for batch in batches:
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        h = sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][torch.arange(ids.shape[1])]
        a = ln(h, "transformer.h.0.ln_1")
        q, k, v = (a @ sd["transformer.h.0.attn.c_attn.weight"] + sd["transformer.h.0.attn.c_attn.bias"]).split(32, -1)
        q, k, v = (t.reshape(*t.shape[:2], heads, hd).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / hd**0.5
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        per_head = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (batch, heads, seq, hd)
        merged = per_head.transpose(1, 2).reshape(*ids.shape, 32)
        h = h + merged @ sd["transformer.h.0.attn.c_proj.weight"] + sd["transformer.h.0.attn.c_proj.bias"]
        m = ln(h, "transformer.h.0.ln_2")
        act = F.gelu(
            m @ sd["transformer.h.0.mlp.c_fc.weight"] + sd["transformer.h.0.mlp.c_fc.bias"], approximate="tanh"
        )
        h = h + act @ sd["transformer.h.0.mlp.c_proj.weight"] + sd["transformer.h.0.mlp.c_proj.bias"]
        final = ln(h, "transformer.ln_f")
        expected["hidden"] += sum(mean(x.abs(), real) for x in (a, m, final)) / len(batches)
        expected["ffn"] += mean(act.abs(), real) / len(batches)
        expected["heads"] += mean(per_head.norm(dim=-1).transpose(1, 2), real) / len(batches)
    torch.testing.assert_close(got[("hidden", "")].double(), expected["hidden"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[("ffn", "transformer.h.0")].double(), expected["ffn"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[("heads", "transformer.h.0.attn")].double(), expected["heads"], rtol=1e-4,
                               atol=1e-6)  # fmt: skip


# (d) save, reload, train ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_student_saves_reloads_and_trains(family, tmp_path):
    teacher = TEACHERS[family]().eval()
    tokenizer = make_tokenizer()
    out = tmp_path / "student"
    student = make_student(teacher, calibration=_batches(teacher), output_dir=out, tokenizer=tokenizer,
                           **_widths(family))  # fmt: skip
    auto = AutoModelForSeq2SeqLM if teacher.config.is_encoder_decoder else AutoModelForCausalLM
    reloaded = auto.from_pretrained(out)
    inputs = _inputs(teacher)
    assert torch.equal(_logits(reloaded, inputs), _logits(student, inputs))
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["pruning"] == reloaded.config.hf_kd_pruning == student.config.hf_kd_pruning
    hidden, ffn, heads, kv = NARROW[family]
    assert record["pruning"]["student_sizes"]["hidden_size"] == hidden
    assert reloaded.num_parameters() < teacher.num_parameters()

    if teacher.config.is_encoder_decoder:
        data, collator = seq2seq_dataset(tokenizer, n=8), seq2seq_collator(tokenizer, reloaded)
    else:
        data, collator = lm_dataset(tokenizer, n=8), lm_collator(tokenizer)
    before = {k: v.clone() for k, v in reloaded.state_dict().items()}
    trainer = DistillationTrainer(
        model=reloaded, teacher_model=teacher, args=config(tmp_path, max_steps=3, alpha=0.5), train_dataset=data,
        processing_class=tokenizer, data_collator=collator,
    )  # fmt: skip
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2


# (e) impossible sizes are one line -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "widths", "message"),
    [
        ("bart", {"hidden_size": 24}, r"num_attention_heads x 8 .*; pass num_attention_heads=3 with hidden_size=24"),
        ("bart", {"hidden_size": 20}, r"; pass a hidden_size that is a multiple of 8"),
        ("bart", {"num_attention_heads": 2}, r"; pass hidden_size=16 with num_attention_heads=2"),
        ("gpt2", {"hidden_size": 16}, r"num_attention_heads x 16 .*num_attention_heads=1 with hidden_size=16"),
        ("gpt2", {"num_key_value_heads": 1}, r"no grouped-query attention.*; use num_attention_heads"),
        ("bart", {"intermediate_size": 65}, r"intermediate_size=65: pruning keeps between 1 and 64.*; pass a"),
        ("t5", {"hidden_size": 33}, r"hidden_size=33: .*between 1 and 32"),
        ("t5", {"num_attention_heads": 0}, r"num_attention_heads=0"),
        ("llama", {"num_attention_heads": 3}, r"each key-value head must serve the same number.*multiple of 2"),
        ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1}, r"at most the teacher's 2.*up to 2"),
        ("llama", {"num_key_value_heads": 3}, r"num_key_value_heads=3: pruning keeps between 1 and 2"),
        ("llama", {"intermediate_size": 32}, r"none was given; pass calibration="),
    ],
)
def test_impossible_sizes_are_one_line_errors(family, widths, message):
    teacher = TEACHERS[family]()
    calibration = None if "none was given" in message else _batches(teacher)
    with pytest.raises(ValueError, match=message) as info:
        make_student(teacher, calibration=calibration, **widths)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def saved_bart(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bart-teacher")
    _bart().save_pretrained(folder / "teacher")
    make_tokenizer().save_pretrained(folder / "teacher")
    rows = [
        {"article": s, "highlights": t} for s, t in zip(random_sentences(12), random_sentences(12, seed=9), strict=True)
    ]
    (folder / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--hidden-size", "24"], ["num_attention_heads x 8", "num_attention_heads=3 with hidden_size=24"]),
        (["--intermediate-size", "32", "--calibration-file", "{d}/nothere.jsonl"], ["no such file"]),
        (["--num-key-value-heads", "1"], ["no grouped-query attention"]),
        (["--intermediate-size", "99"], ["between 1 and 64"]),
        (["--intermediate-size", "32", "--source-column", "body"], ["no column 'body'", "--source-column"]),
    ],
)
def test_cli_bad_widths_are_one_line(capsys, tmp_path, saved_bart, extra, words):
    extra = [e.format(d=saved_bart) for e in extra]
    if "--calibration-file" not in extra:
        extra += ["--calibration-file", str(saved_bart / "calib.jsonl")]
    one_line_error(capsys, ["make-student", str(saved_bart / "teacher"), str(tmp_path / "s"), *extra], *words)
    assert not (tmp_path / "s").exists()


def test_cli_width_without_calibration_is_one_line(capsys, tmp_path, saved_bart):
    argv = ["make-student", str(saved_bart / "teacher"), str(tmp_path / "s"), "--intermediate-size", "32"]
    one_line_error(capsys, argv, "--calibration-file")
    argv = ["make-student", str(saved_bart / "teacher"), str(tmp_path / "s"), "--layer-selection", "importance"]
    one_line_error(capsys, argv, "--calibration-file")


def test_cli_prunes_width_and_depth(capsys, tmp_path, saved_bart):
    out = tmp_path / "student"
    argv = ["make-student", str(saved_bart / "teacher"), str(out), "--decoder-layers", "1", "--hidden-size", "16",
            "--num-attention-heads", "2", "--intermediate-size", "48", "--calibration-file",
            str(saved_bart / "calib.jsonl"), "--calibration-rows", "5"]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "hidden_size 32 -> 16" in printed and "decoder [0]" in printed
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    c = reloaded.config
    assert (c.d_model, c.encoder_ffn_dim, c.decoder_ffn_dim, c.decoder_attention_heads, c.decoder_layers) == (
        16, 48, 48, 2, 1)  # fmt: skip
    assert json.loads((out / RECORD_FILE).read_text())["layer_selection"] == "spread"


# (f) width and depth together ---------------------------------------------------------------------------------------


def test_width_after_depth_matches_pruning_the_layer_copy():
    teacher = _bart().eval()
    batches = _batches(teacher)
    student = make_student(teacher, decoder_layers=1, intermediate_size=40, hidden_size=24, num_attention_heads=3,
                           calibration=batches)  # fmt: skip
    c = student.config
    assert (c.encoder_layers, c.decoder_layers, c.d_model, c.encoder_ffn_dim, c.decoder_attention_heads) == (
        2, 1, 24, 40, 3)  # fmt: skip
    assert c.hf_kd_layer_map == {"encoder": [0, 1], "decoder": [0]}
    assert sorted(c.hf_kd_pruning["intermediate_size"]) == [
        "model.decoder.layers.0", "model.encoder.layers.0", "model.encoder.layers.1"]  # fmt: skip
    # The same as pruning the layer copy by hand: importance is measured on the layers that stay.
    reference = prune_width(make_student(teacher, decoder_layers=1), batches, target_sizes(
        teacher.config, intermediate_size=40, hidden_size=24, num_attention_heads=3))  # fmt: skip
    inputs = _inputs(teacher)
    assert torch.equal(_logits(student, inputs), _logits(reference, inputs))


def test_importance_layer_selection_calls_depth_then_prunes_width(monkeypatch, tmp_path):
    calls = []

    def layers_by_importance(model, batches, counts):
        calls.append((model, batches, dict(counts)))
        return {"decoder": [1]}

    monkeypatch.setitem(
        sys.modules, "hf_kd.student.depth", types.SimpleNamespace(layers_by_importance=layers_by_importance)
    )
    teacher = _llama(num_hidden_layers=3).eval()
    batches = _batches(teacher)
    student = make_student(teacher, decoder_layers=1, layer_selection="importance", intermediate_size=40,
                           calibration=batches, output_dir=tmp_path / "s")  # fmt: skip
    ((model, given, counts),) = calls
    assert model is teacher and counts == {"decoder": 1}
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(given, batches, strict=True))
    assert student.config.hf_kd_layer_map == {"decoder": [1]} and student.config.intermediate_size == 40
    reference = make_student(teacher, layer_map=[1], intermediate_size=40, calibration=batches)
    inputs = _inputs(teacher)
    assert torch.equal(_logits(student, inputs), _logits(reference, inputs))
    assert json.loads((tmp_path / "s" / RECORD_FILE).read_text())["layer_selection"] == "importance"
    with pytest.raises(ValueError, match=r"needs to know how many layers to keep; pass"):
        make_student(teacher, layer_selection="importance", calibration=batches)
    with pytest.raises(ValueError, match=r"chooses the layers itself; pass"):
        make_student(teacher, layer_map=[0], layer_selection="importance", calibration=batches)


# Calibration batches --------------------------------------------------------------------------------------------------


def test_calibration_batches_from_rows_and_texts():
    tokenizer = make_tokenizer()
    bart = _bart()
    rows = [{"input_ids": [4, 5, 6], "labels": [7]}, {"input_ids": [8], "labels": [9, 10]}, {"input_ids": [11, 12],
            "labels": [13]}]  # fmt: skip
    first, second = calibration_batches(rows, bart, batch_size=2)
    assert first["input_ids"].tolist() == [[4, 5, 6], [8, 0, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert first["labels"].tolist() == [[7, -100], [9, 10]]
    assert second["input_ids"].tolist() == [[11, 12]]
    texts = calibration_batches(["the cat", ("a dog runs", "sun")], bart, tokenizer, max_rows=2)
    assert texts[0]["input_ids"].tolist() == [tokenizer("the cat")["input_ids"] + [0], tokenizer("a dog runs")[
        "input_ids"]]  # fmt: skip
    assert texts[0]["labels"].tolist() == [tokenizer("the cat")["input_ids"], tokenizer("sun")["input_ids"] + [-100]]
    gpt2 = tiny_gpt2(VOCAB)
    assert "labels" not in calibration_batches(["the cat"], gpt2, tokenizer)[0]
    long = calibration_batches([{"input_ids": list(range(100))}], gpt2)[0]  # 64 positions
    assert long["input_ids"].tolist() == [list(range(64))] and long["attention_mask"].shape == (1, 64)
    given = [{"input_ids": torch.ones(2, 3, dtype=torch.long), "extra": "x"}]
    assert list(calibration_batches(given, gpt2)[0]) == ["input_ids"]


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ([], r"empty; give at least one"),
        ([{"text": "the cat"}], r"no input_ids; tokenize"),
        ([{"input_ids": [4, 5]}], r"need labels \(or decoder_input_ids\).*; add the target token ids"),
        ([{"input_ids": torch.ones(1, 2, dtype=torch.long)}], r"need labels"),
        (["the cat"], r"need a tokenizer.*; pass tokenizer="),
        ("the cat", r"not str; pass e\.g\. a list of texts"),
        ([3, 4], r"not int; convert"),
        ([{"input_ids": []}], r"no tokens"),
    ],
)
def test_calibration_errors(calibration, message):
    with pytest.raises(ValueError, match=message):
        calibration_batches(calibration, _bart())


def test_t5_tied_output_scale_is_kept():
    """T5 with tied embeddings scales the decoder output by d_model ** -0.5: a narrower student must keep the
    teacher's scale. Reference: the same teacher untied, its lm_head the embedding times that scale (same logits,
    no scaling), pruned alike."""
    tied = _t5().eval()
    config = copy.deepcopy(tied.config)
    config.tie_word_embeddings = config.scale_decoder_outputs = False
    untied = T5ForConditionalGeneration(config).eval()
    untied.load_state_dict({k: v for k, v in tied.state_dict().items() if k != "lm_head.weight"}, strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(tied.shared.weight * 32**-0.5)
    inputs = _inputs(tied)
    torch.testing.assert_close(_logits(untied, inputs), _logits(tied, inputs))
    batches = _batches(tied)
    narrow_tied = make_student(tied, hidden_size=20, calibration=batches)
    narrow_untied = make_student(untied, hidden_size=20, calibration=batches)
    assert narrow_tied.config.hf_kd_pruning["hidden_size"] == narrow_untied.config.hf_kd_pruning["hidden_size"]
    torch.testing.assert_close(_logits(narrow_tied, inputs), _logits(narrow_untied, inputs))


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("c.txt", "the cat\n\na dog\n", ["the cat", "a dog"]),
        ("c.jsonl", '{"text": "the cat", "n": 1}\n{"text": "a dog", "n": 2}\n', ["the cat", "a dog"]),
        ("c.json", '[{"text": "the cat"}]', ["the cat"]),
        ("c.csv", "n,text\n1,the cat\n2,a dog\n", ["the cat", "a dog"]),
        ("c.jsonl", '{"input_ids": [4, 5]}\n', [{"input_ids": [4, 5]}]),
        ("c.jsonl", "{not json\n", r"cannot be read as \.jsonl .*; fix the file"),
        ("c.json", '{"text": "the cat"}', r"not a list of rows; give a list of JSON objects"),
        ("c.parquet", "", r"unknown format \.parquet; use \.jsonl"),
        ("c.jsonl", '{"body": "x"}\n', r"no column 'text' \(it has \['body'\]\); name the columns with --text-column"),
    ],
)
def test_read_calibration_file(tmp_path, name, text, expected):
    from hf_kd.student.calibration import read_calibration_file

    path = tmp_path / name
    path.write_text(text)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            read_calibration_file(path, is_encoder_decoder=False)
    else:
        assert read_calibration_file(path, is_encoder_decoder=False) == expected


def test_read_calibration_folder_and_pairs(tmp_path):
    from datasets import Dataset, DatasetDict

    from hf_kd.student.calibration import read_calibration_file

    Dataset.from_dict({"article": ["the cat"], "highlights": ["cat"]}).save_to_disk(tmp_path / "one")
    assert read_calibration_file(tmp_path / "one", is_encoder_decoder=True) == [("the cat", "cat")]
    DatasetDict({"test": Dataset.from_dict({"text": ["x"]})}).save_to_disk(tmp_path / "splits")
    with pytest.raises(ValueError, match=r"holds splits \['test'\] and no 'train'; save one split"):
        read_calibration_file(tmp_path / "splits", is_encoder_decoder=False)


def test_cli_prunes_a_causal_model_from_a_text_file(capsys, tmp_path):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    tiny_gpt2(VOCAB, n_layer=2).save_pretrained(teacher_dir)
    make_tokenizer().save_pretrained(teacher_dir)
    (tmp_path / "calib.txt").write_text("\n".join(random_sentences(6)) + "\n")
    argv = ["make-student", str(teacher_dir), str(out), "--hidden-size", "16", "--num-attention-heads", "1",
            "--calibration-file", str(tmp_path / "calib.txt")]  # fmt: skip
    one_line_error(capsys, [*argv, "--calibration-rows", "0"], "--calibration-rows 0")
    assert cli_main(argv) == 0
    assert "widths: hidden_size 32 -> 16, num_attention_heads 2 -> 1)" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (reloaded.config.n_embd, reloaded.config.n_head, reloaded.config.n_inner) == (16, 1, 128)


def test_a_folder_not_saved_with_save_to_disk_is_named(tmp_path):
    from hf_kd.student.calibration import read_calibration_file

    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "notes.txt").write_text("the cat\n")
    with pytest.raises(ValueError, match=r"was not written by save_to_disk; give such a folder, or a \.jsonl"):
        read_calibration_file(tmp_path / "rows", is_encoder_decoder=False)
