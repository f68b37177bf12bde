"""Freezing switches (freeze_encoder, freeze_embeddings, freeze_positional_embeddings): what they freeze stays
bit-identical through training and holds no optimizer state, everything else moves, and a copy student with a frozen
encoder lets the teacher skip its own encoder with the same loss and gradients.

Run as a script (``python -m torch.distributed.run --nproc_per_node=2 tests/test_freeze.py OUT``) it is the worker of
the 2-process DDP test.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import make_tokenizer, tiny_bart, tiny_gpt2, tiny_t5  # noqa: E402
from helpers import config, lm_collator, lm_dataset, seq2seq_collator, seq2seq_dataset  # noqa: E402

from hf_kd import DistillationTrainer, make_student  # noqa: E402

LOGGER = "hf_kd.trainer"


def copy_pair(vocab: int):
    """A tiny BART teacher whose decoder leans hard on the encoder (so that other encoder outputs change the loss),
    and its make_student copy with one decoder layer: the encoder a copy of the teacher's."""
    teacher = tiny_bart(vocab, seed=1)
    with torch.no_grad():
        for layer in teacher.get_decoder().layers:
            layer.encoder_attn.out_proj.weight.mul_(30.0)
    return make_student(teacher, decoder_layers=1), teacher


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def check_frozen_and_moved(model, before: dict[str, torch.Tensor], frozen: set[str]) -> None:
    """The ``frozen`` tensors bit-identical and not trainable, every other one trainable and changed."""
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and torch.equal(p, before[name]), name
        else:
            assert p.requires_grad and not torch.equal(p, before[name]), f"{name} did not move"


def check_optimizer(trainer, model, frozen: set[str]) -> None:
    """The optimizer holds every trainable parameter and no frozen one, and keeps state for none of those."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in held) == (name not in frozen), name
        assert (p in optimizer.state) == (name not in frozen), name


def train(model, teacher, tokenizer, tmp_path, data=None, collator=None, **kwargs):
    seq2seq = model.config.is_encoder_decoder
    data = data if data is not None else (seq2seq_dataset if seq2seq else lm_dataset)(tokenizer, n=12)
    collator = collator or (seq2seq_collator(tokenizer, model) if seq2seq else lm_collator(tokenizer))
    defaults = dict(max_steps=3, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant")
    args = config(tmp_path, **{**defaults, **kwargs})
    trainer = DistillationTrainer(
        model=model, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer,
        data_collator=collator,
    )  # fmt: skip
    trainer.train()
    return trainer


# What each switch freezes, by parameter name (tied tensors are listed once, under their first name): written out
# by hand, not derived from the code under test.
def _bart_encoder(names):
    return {n for n in names if n.startswith("model.encoder.") or n == "model.shared.weight"}


CASES = {
    # model, switches, loss path, the frozen names
    "bart-encoder-fused": ("bart", ["freeze_encoder"], {"fuse_output_layer": True}, _bart_encoder),
    "bart-embeddings-positions-chunked": (
        "bart", ["freeze_embeddings", "freeze_positional_embeddings"], {"fuse_output_layer": False},
        lambda names: {"model.shared.weight", "model.encoder.embed_positions.weight",
                       "model.decoder.embed_positions.weight"},
    ),
    "gpt2-embeddings-fused-tied-head": (
        "gpt2", ["freeze_embeddings"], {"fuse_output_layer": True}, lambda names: {"transformer.wte.weight"}
    ),
    "gpt2-positions-unchunked": (
        "gpt2", ["freeze_positional_embeddings"], {"loss_chunk_size": None}, lambda names: {"transformer.wpe.weight"}
    ),
    "t5-embeddings-auto": ("t5", ["freeze_embeddings"], {}, lambda names: {"shared.weight"}),
    "t5-encoder-chunked": (
        "t5", ["freeze_encoder"], {"fuse_output_layer": False},
        lambda names: {n for n in names if n.startswith("encoder.") or n == "shared.weight"},
    ),
}  # fmt: skip


def _models(kind: str, vocab: int):
    if kind == "bart":
        return copy_pair(vocab)
    if kind == "t5":
        return tiny_t5(vocab, seed=1), tiny_t5(vocab, seed=2)
    return tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3)


@pytest.mark.parametrize("case", list(CASES))
def test_frozen_parameters_stay_bit_identical_and_hold_no_optimizer_state(tmp_path, tokenizer, case):
    kind, switches, path, expected = CASES[case]
    student, teacher = _models(kind, len(tokenizer))
    frozen = expected([n for n, _ in student.named_parameters()])
    before = snapshot(student)
    trainer = train(student, teacher, tokenizer, tmp_path, **path, **dict.fromkeys(switches, True))
    check_frozen_and_moved(student, before, frozen)
    check_optimizer(trainer, student, frozen)
    assert sorted(n for names in trainer.frozen.by_switch.values() for n in names) == sorted(frozen)
    assert set(trainer.frozen.by_switch) == set(switches)


# ---- the teacher reuses a frozen copy's encoder --------------------------------------------------------------

PATHS = {
    "unchunked": {"loss_chunk_size": None, "fuse_output_layer": False},
    "chunked": {"loss_chunk_size": 5, "fuse_output_layer": False},
    "fused": {"loss_chunk_size": 5, "fuse_output_layer": True},
}


def _loss_and_grads(student, teacher, tokenizer, tmp_path, batch, **kwargs):
    """One compute_loss + backward on ``batch``: the loss, the gradients by name, the teacher's encoder calls."""
    args = config(tmp_path, alpha=0.3, temperature=2.0, **kwargs)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    calls = []
    hook = teacher.get_encoder().register_forward_hook(lambda *_: calls.append(1))
    student.train()
    try:
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return trainer, loss.detach(), grads, len(calls)


@pytest.mark.parametrize("path", list(PATHS))
def test_frozen_copy_encoder_is_reused_with_the_same_loss_and_gradients(tmp_path, tokenizer, caplog, path):
    student, teacher = copy_pair(len(tokenizer))
    data = seq2seq_dataset(tokenizer, n=4)
    batch = seq2seq_collator(tokenizer, student)([data[i] for i in range(4)])
    runs, said = {}, {}
    for reuse in (None, False):  # None: automatic with freeze_encoder; False: the teacher runs its encoder
        with caplog.at_level(logging.INFO, logger=LOGGER):
            caplog.clear()
            runs[reuse] = _loss_and_grads(
                copy.deepcopy(student), teacher, tokenizer, tmp_path, batch, freeze_encoder=True,
                teacher_reuses_student_encoder=reuse, **PATHS[path],
            )  # fmt: skip
            said[reuse] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("freeze_encoder:")]
    assert len(said[None]) == 1 and "reuses the student's encoder outputs" in said[None][0] and not said[False]
    (auto, loss, grads, calls), (_, ref_loss, ref_grads, ref_calls) = runs[None], runs[False]
    assert auto.reuses_student_encoder
    assert (calls, ref_calls) == (0, 1)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads  # the decoder's, only: the encoder and tied embedding frozen
    assert not any(n.startswith("model.encoder.") or n == "model.shared.weight" for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    # The control: the teacher's rows depend on its encoder outputs (another encoder changes the loss), so the
    # equality above is not a given.
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.get_encoder().layers[0].fc2.bias.add_(5.0 * torch.randn(other.config.d_model))
    _, other_loss, _, _ = _loss_and_grads(
        copy.deepcopy(student), other, tokenizer, tmp_path, batch, freeze_encoder=True, **PATHS[path]
    )
    assert (other_loss - ref_loss).abs() > 1e-3


def test_training_with_the_reused_encoder_never_runs_the_teachers_encoder(tmp_path, tokenizer):
    student, teacher = copy_pair(len(tokenizer))
    calls = []
    teacher.get_encoder().register_forward_hook(lambda *_: calls.append(1))
    before = snapshot(student)
    trainer = train(student, teacher, tokenizer, tmp_path, freeze_encoder=True)
    assert trainer.reuses_student_encoder and calls == []
    check_frozen_and_moved(student, before, _bart_encoder(before))
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| frozen in training | `freeze_encoder` |" in card and "| teacher's encoder | not run" in card


@pytest.mark.parametrize(
    "change, why",
    [
        ("other weights", "not a copy of the teacher's"),
        ("dropout", "dropout=0.1"),
        ("hidden_state_loss_weight", "hidden_state_loss_weight > 0"),
        ("ensemble", "needs a single teacher"),
    ],
)
def test_the_teachers_encoder_runs_where_the_copy_cannot_stand_in_for_it(tmp_path, tokenizer, caplog, change, why):
    student, teacher = copy_pair(len(tokenizer))
    kwargs = {"freeze_encoder": True}
    if change == "other weights":
        with torch.no_grad():
            student.get_encoder().layers[0].fc1.weight.add_(1e-3)
    elif change == "dropout":
        student.config.dropout = 0.1
    elif change == "hidden_state_loss_weight":
        kwargs["hidden_state_loss_weight"] = 1.0
    else:
        teacher = [teacher, copy.deepcopy(teacher)]
    args = config(tmp_path, **kwargs)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("freeze_encoder:")]
    assert len(said) == 1 and "runs its own encoder" in said[0] and why in said[0], said
    assert not trainer.reuses_student_encoder and not trainer.teacher_source.reuse_student_encoder


def test_hidden_state_term_trains_with_frozen_parts(tmp_path, tokenizer):
    """The hidden-state term with a narrower student: its projections train, the frozen tables do not move."""
    vocab = len(tokenizer)
    student, teacher = tiny_bart(vocab, seed=1, d_model=16), tiny_bart(vocab, seed=2)
    before = snapshot(student)
    trainer = train(
        student, teacher, tokenizer, tmp_path, hidden_state_loss_weight=1.0, freeze_embeddings=True,
        freeze_positional_embeddings=True,
    )  # fmt: skip
    frozen = {"model.shared.weight", "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
    check_frozen_and_moved(student, before, frozen)
    assert trainer.hidden_distiller.projections and all("hidden_loss" in log for log in trainer.state.log_history[:3])
    optimizer = trainer.optimizer.optimizer
    assert all(p in optimizer.state for p in trainer.hidden_distiller.parameters())


def test_training_from_a_teacher_cache_keeps_frozen_parts(tmp_path, tokenizer):
    from hf_kd.teachers.cache_writer import build_teacher_cache

    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3)
    data = seq2seq_dataset(tokenizer, n=8).map(lambda row: {"labels": row["input_ids"]})
    build_teacher_cache(teacher, data, tmp_path / "cache", tokenizer=tokenizer, k=8, batch_size=4)
    before = snapshot(student)
    args = config(
        tmp_path, max_steps=3, weight_decay=0.1, teacher_cache=str(tmp_path / "cache"), freeze_embeddings=True,
        freeze_positional_embeddings=True,
    )  # fmt: skip
    from transformers import DataCollatorForSeq2Seq

    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=data, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )  # fmt: skip
    trainer.train()
    assert trainer.teacher is None
    frozen = {"transformer.wte.weight", "transformer.wpe.weight"}
    check_frozen_and_moved(student, before, frozen)
    check_optimizer(trainer, student, frozen)


def test_whisper_switches_freeze_what_distil_whisper_froze():
    """distil-whisper's --freeze_encoder (convolutions and layers; its sinusoidal positions are fixed already) and
    --freeze_embed_positions (the decoder's learned positions); the token table is tied to proj_out."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from hf_kd.student.freeze import freeze_student

    def whisper():
        config = WhisperConfig(
            vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_mel_bins=8,
            max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=1,
            decoder_start_token_id=2,
        )  # fmt: skip
        return WhisperForConditionalGeneration(config)

    for switches, expected in [
        (["freeze_encoder"], lambda n: n.startswith("model.encoder.") and n != "model.encoder.embed_positions.weight"),
        (["freeze_positional_embeddings"], lambda n: n == "model.decoder.embed_positions.weight"),
        (["freeze_embeddings"], lambda n: n == "model.decoder.embed_tokens.weight"),
    ]:
        model = whisper()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert "model.encoder.embed_positions.weight" not in trainable  # Whisper fixes it itself
        frozen = freeze_student(model, type("Args", (), dict.fromkeys(switches, True))())
        now_frozen = {n for n, p in model.named_parameters() if not p.requires_grad} & trainable
        assert now_frozen == {n for n in trainable if expected(n)} and now_frozen
        assert sorted(frozen.by_switch[switches[0]]) == sorted(now_frozen)
    assert model.get_output_embeddings().weight is model.model.decoder.embed_tokens.weight  # so proj_out is frozen


# ---- PEFT -----------------------------------------------------------------------------------------------------


def test_lora_student_freezes_its_encoder_adapters_and_keeps_modules_to_save(tmp_path, tokenizer, caplog):
    peft = pytest.importorskip("peft")
    student, teacher = copy_pair(len(tokenizer))
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"],
        task_type="SEQ_2_SEQ_LM",
    )  # fmt: skip
    student = peft.get_peft_model(student, lora)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    encoder_adapters = {n for n in trainable if ".encoder." in n and "lora_" in n}
    kept = {n for n in trainable if ".modules_to_save." in n}  # the table copies PEFT trains: not frozen by a switch
    assert encoder_adapters and kept
    before = snapshot(student)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer = train(student, teacher, tokenizer, tmp_path, freeze_encoder=True, freeze_embeddings=True)
    frozen = set(before) - (trainable - encoder_adapters)  # the base weights (PEFT's) and the encoder's adapters
    for name, p in student.named_parameters():
        if name in frozen:
            assert not p.requires_grad and torch.equal(p, before[name]), name
        elif "lora_A" not in name:  # lora_A gets no gradient while lora_B is still 0 at the first step
            assert not torch.equal(p, before[name]), f"{name} did not move"
    # Each tensor counted once: what the switches froze is exactly the encoder's adapters (the rest was frozen).
    assert sorted(trainer.frozen.by_switch["freeze_encoder"]) == sorted(encoder_adapters)
    assert trainer.frozen.by_switch["freeze_embeddings"] == [] and set(trainer.frozen.kept) == kept
    assert not trainer.reuses_student_encoder  # an encoder with adapters is no copy of the teacher's
    assert any("runs its own encoder" in r.getMessage() for r in caplog.records)
    assert trainer.loss_settings.fuse_output_layer  # "auto" fuses a PEFT student's plain lm_head


def test_a_lora_bart_student_gets_the_same_loss_fused_and_unfused(tmp_path, tokenizer):
    """The fused output layer on a PEFT model: BART's final_logits_bias is found on the base model, not the wrapper
    (which it was not before: the fused path failed on a LoRA BART student)."""
    peft = pytest.importorskip("peft")
    student, teacher = copy_pair(len(tokenizer))
    student = peft.get_peft_model(student, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        student.get_base_model().final_logits_bias.normal_()  # so that a bias left out would show
    data = seq2seq_dataset(tokenizer, n=4)
    batch = seq2seq_collator(tokenizer, student)([data[i] for i in range(4)])
    (_, fused, grads, _), (_, plain, plain_grads, _) = (
        _loss_and_grads(
            copy.deepcopy(student), teacher, tokenizer, tmp_path, batch, fuse_output_layer=fuse, loss_chunk_size=5
        )
        for fuse in (True, False)
    )
    torch.testing.assert_close(fused, plain)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], msg=name)


# ---- refused settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, switch, words",
    [
        ("gpt2", "freeze_encoder", ["freeze_encoder=True needs an encoder-decoder student", "freeze_encoder=False"]),
        ("t5", "freeze_positional_embeddings", ["no position embedding table", "freeze_positional_embeddings=False"]),
    ],
)
def test_a_switch_the_student_cannot_take_is_one_line(tmp_path, tokenizer, model, switch, words):
    student = (tiny_gpt2 if model == "gpt2" else tiny_t5)(len(tokenizer))
    teacher = copy.deepcopy(student)
    with pytest.raises(ValueError) as error:
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, **{switch: True}))
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert all(p.requires_grad for p in student.parameters())  # refused before anything was frozen


def test_freezing_everything_that_trains_is_refused(tmp_path, tokenizer):
    student = tiny_gpt2(len(tokenizer))
    student.requires_grad_(False)
    student.transformer.wte.requires_grad_(True)
    with pytest.raises(ValueError, match="would leave no parameter of the student to train"):
        DistillationTrainer(
            model=student, teacher_model=tiny_gpt2(len(tokenizer)), args=config(tmp_path, freeze_embeddings=True)
        )
    assert student.transformer.wte.weight.requires_grad


def test_a_refused_run_leaves_the_student_as_it_was(tmp_path, tokenizer):
    student = tiny_gpt2(len(tokenizer))
    teachers = [tiny_gpt2(len(tokenizer), seed=2), tiny_gpt2(len(tokenizer), seed=3)]
    args = config(tmp_path, freeze_embeddings=True, seq_kd=True)  # seq_kd needs a single teacher
    with pytest.raises(ValueError, match="seq_kd"):
        DistillationTrainer(model=student, teacher_model=teachers, args=args, processing_class=tokenizer)
    assert all(p.requires_grad for p in student.parameters())


def test_an_explicit_reuse_still_refuses_a_student_whose_encoder_trains(tmp_path, tokenizer):
    student, teacher = copy_pair(len(tokenizer))
    args = config(tmp_path, teacher_reuses_student_encoder=True)
    with pytest.raises(ValueError, match="set freeze_encoder=True"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    args = config(tmp_path, teacher_reuses_student_encoder=True, freeze_encoder=True)
    assert DistillationTrainer(model=student, teacher_model=teacher, args=args).reuses_student_encoder


# ---- recipes and the command line -------------------------------------------------------------------------------


def test_recipe_yaml_and_overrides_take_the_switches(tmp_path):
    import yaml

    from hf_kd.errors import ConfigError
    from hf_kd.recipe.args import parse_recipe_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data_files": "x.jsonl", "freeze_encoder": True, "freeze_embeddings": True}))
    _, _, args = parse_recipe_config(
        recipe, ["--freeze_positional_embeddings", "--teacher_reuses_student_encoder", "false"]
    )
    assert (args.freeze_encoder, args.freeze_embeddings, args.freeze_positional_embeddings) == (True, True, True)
    assert args.teacher_reuses_student_encoder is False
    _, _, args = parse_recipe_config(None, ["--data_files", "x.jsonl"])
    assert args.teacher_reuses_student_encoder is None and not args.freeze_encoder
    with pytest.raises(ConfigError, match="freeze_encoder"):
        parse_recipe_config(None, ["--data_files", "x.jsonl", "--freeze_encoder", "maybe"])


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    from recipe_helpers import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _recipe(saved_models, tmp_path: Path, family: str, **changes) -> str:
    import yaml
    from recipe_helpers import tiny_overrides

    (tmp_path / "data").mkdir()
    values = tiny_overrides({"teacher_model_name_or_path": family, "student_model_name_or_path": "x"},
                            saved_models, tmp_path / "data", tmp_path / "out")  # fmt: skip
    values.update(save_strategy="no", eval_split=None, validation_split_percentage=0, **changes)
    values = {k: v for k, v in values.items() if v is not None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "family, switch, words",
    [("gpt2", "freeze_encoder", ["freeze_encoder", "encoder-decoder"]),
     ("t5", "freeze_positional_embeddings", ["freeze_positional_embeddings=False"])],
)  # fmt: skip
def test_distill_refuses_a_switch_the_student_cannot_take_in_one_line(
    saved_models, tmp_path, capsys, family, switch, words
):
    from helpers import one_line_error

    recipe = _recipe(saved_models, tmp_path, family)
    one_line_error(capsys, ["distill", "--config", recipe, f"--{switch}", "true"], *words)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_distill_trains_with_the_switches_and_the_card_says_so(saved_models, tmp_path, capsys):
    from recipe_helpers import run_distill
    from safetensors.torch import load_file

    recipe = _recipe(saved_models, tmp_path, "bart", freeze_embeddings=True, freeze_positional_embeddings=True)
    code, _, err = run_distill(capsys, recipe)
    assert code == 0, err
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert "| frozen in training | `freeze_embeddings`, `freeze_positional_embeddings` |" in card
    saved, initial = load_file(str(out / "model.safetensors")), tiny_bart(len(make_tokenizer()), seed=2).state_dict()
    for name in ("model.shared.weight", "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"):
        assert torch.equal(saved[name], initial[name]), name
    assert not torch.equal(saved["model.decoder.layers.0.fc1.weight"], initial["model.decoder.layers.0.fc1.weight"])


# ---- 2-process DDP ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_with_a_frozen_reused_encoder(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547"]
    for command, out, batch in ((launcher, tmp_path / "ddp", "2"), ([sys.executable], tmp_path / "one", "4")):
        out.mkdir()
        result = subprocess.run(
            [*command, __file__, str(out), batch], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from safetensors.torch import load_file

    initial = load_file(str(tmp_path / "one" / "initial.safetensors"))
    rank0, rank1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    facts = json.loads((tmp_path / "ddp" / "rank0.json").read_text())
    assert facts == {"world_size": 2, "reuses": True, "teacher_encoder_calls": 0}
    frozen = _bart_encoder(initial) | {"model.decoder.embed_positions.weight"}
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), f"ranks diverged on {name}"
        torch.testing.assert_close(tensor, single[name], rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(tensor, initial[name]) == (name in frozen), name


def _ddp_worker(out: str, per_device_batch: int) -> None:
    from safetensors.torch import save_file

    tokenizer = make_tokenizer()
    student, teacher = copy_pair(len(tokenizer))
    save_file(snapshot(student), os.path.join(out, "initial.safetensors"))
    calls = []
    teacher.get_encoder().register_forward_hook(lambda *_: calls.append(1))
    args = config(
        Path(out), per_device_train_batch_size=per_device_batch, max_steps=3, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", freeze_encoder=True, freeze_positional_embeddings=True,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=seq2seq_dataset(tokenizer, n=12, seed=5),
        processing_class=tokenizer, data_collator=seq2seq_collator(tokenizer, student),
    )  # fmt: skip
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    facts = {"world_size": trainer.args.world_size, "reuses": trainer.reuses_student_encoder}
    facts["teacher_encoder_calls"] = len(calls)
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))
    save_file(snapshot(student), os.path.join(out, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    _ddp_worker(sys.argv[1], int(sys.argv[2]))
