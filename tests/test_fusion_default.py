"""fuse_output_layer="auto", the default: the fused loss wherever the student allows it, else the chunked loss on its
logits, said once; True and False as before. Loss and gradients are those of the chunked path either way."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import tiny_gpt2, tiny_t5
from helpers import config, lm_collator, lm_dataset
from torch import nn

from hf_kd import DistillationTrainer
from hf_kd.losses import UnfusableModelError, resolve_fusion
from hf_kd.trainer import settings_in_use

LOGGER = "hf_kd.losses.output_layer"


class Adapter(nn.Module):
    """An output layer wrapped as adapters (LoRA) wrap it: no longer an nn.Linear, and its logits changed."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head
        self.down = nn.Linear(head.in_features, 2, bias=False)
        self.up = nn.Linear(2, head.out_features, bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) + self.up(self.down(hidden))


def _soft_capped(student: nn.Module) -> nn.Module:
    student.config.final_logit_softcapping = 30.0  # GPT-2 ignores it; the fused path must not assume so
    return student


def _adapted(student: nn.Module) -> nn.Module:
    student.lm_head = Adapter(student.lm_head)
    return student


def _trainer(tmp_path, tokenizer, student, **fields) -> DistillationTrainer:
    teacher = tiny_gpt2(len(tokenizer) + 2, seed=2, n_layer=3)
    args = config(tmp_path, **{"alpha": 0.4, "temperature": 2.0, "loss": "jsd", "loss_chunk_size": 3, **fields})
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)


def _step(trainer: DistillationTrainer, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    student = trainer.model
    student.train()
    student.zero_grad(set_to_none=True)
    loss, outputs = trainer.compute_loss(student, dict(batch), return_outputs=True, num_items_in_batch=torch.tensor(23))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}, outputs


def _batch(tokenizer) -> dict:
    data = lm_dataset(tokenizer, n=4)
    batch = lm_collator(tokenizer)([data[i] for i in range(4)])
    batch["labels"][0, :3] = -100  # a prompt
    return batch


def _same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    assert a[1].keys() == b[1].keys()
    for key, grad in a[1].items():
        scale = b[1][key].abs().max().item()
        assert (grad - b[1][key]).abs().max().item() <= max(1e-5 * scale, 1e-9), key


def test_default_is_auto_and_fuses_a_fusable_student(tmp_path, tokenizer, caplog) -> None:
    """GPT-2: the default fuses (no [batch, seq, vocab] logits in training) with the loss and gradients of the
    chunked path (fuse_output_layer=False), and says nothing."""
    student = tiny_gpt2(len(tokenizer) + 5, seed=1)
    batch = _batch(tokenizer)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        auto = _trainer(tmp_path, tokenizer, copy.deepcopy(student))
    assert auto.args.fuse_output_layer == "auto" and auto.loss_settings.fuse_output_layer is True
    assert not caplog.records
    chunked = _trainer(tmp_path, tokenizer, copy.deepcopy(student), fuse_output_layer=False)
    assert chunked.loss_settings.fuse_output_layer is False
    auto_step, chunked_step = _step(auto, batch), _step(chunked, batch)
    assert auto_step[2].logits.numel() == 0  # fused: the model never formed its logits
    assert chunked_step[2].logits.shape[-1] == student.config.vocab_size
    _same(auto_step, chunked_step)


@pytest.mark.parametrize(
    ("unfusable", "named"), [(_soft_capped, "final_logit_softcapping"), (_adapted, "no linear output layer")]
)
def test_auto_falls_back_to_chunked_and_says_so_once(tmp_path, tokenizer, caplog, unfusable, named) -> None:
    student = unfusable(tiny_gpt2(len(tokenizer) + 5, seed=1))
    batch = _batch(tokenizer)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        auto = _trainer(tmp_path, tokenizer, copy.deepcopy(student))
        first = _step(auto, batch)
        _step(auto, batch)
    assert auto.loss_settings.fuse_output_layer is False
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1 and named in messages[0] and "fuse_output_layer='auto'" in messages[0], messages
    assert first[2].logits.shape[-1] == student.config.vocab_size  # the model's own logits were used
    _same(first, _step(_trainer(tmp_path, tokenizer, copy.deepcopy(student), fuse_output_layer=False), batch))
    with pytest.raises(UnfusableModelError, match=named):  # True still refuses what it cannot do
        _trainer(tmp_path, tokenizer, copy.deepcopy(student), fuse_output_layer=True)


def test_auto_keeps_the_unchunked_loss_when_asked_for(tmp_path, tokenizer, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = _trainer(tmp_path, tokenizer, tiny_gpt2(len(tokenizer) + 5, seed=1), loss_chunk_size=None)
    assert trainer.loss_settings.fuse_output_layer is False and trainer.loss_settings.chunk_size is None
    assert not caplog.records


@pytest.mark.parametrize(
    ("facts", "named"),
    [({"cross_tokenizer": True}, "cross_tokenizer"), ({"sharded": True}, "DeepSpeed ZeRO-3 or FSDP")],
)
def test_auto_falls_back_for_what_the_model_cannot_tell(caplog, facts, named) -> None:
    """Settings that rule fusing out whatever the model: cross_tokenizer, sharded weights (ZeRO-3, FSDP)."""
    model = tiny_t5(45)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_fusion("auto", model, **facts) is False
        assert resolve_fusion("auto", model, **facts, say=False) is False  # other processes: silent
    assert len(caplog.records) == 1 and named in caplog.records[0].getMessage()
    assert resolve_fusion("auto", model) is True
    assert resolve_fusion(False, model) is False


def test_only_an_explicit_true_counts_for_the_refusals(tmp_path) -> None:
    """cross_tokenizer refuses fuse_output_layer=True, but the default "auto" falls back instead."""
    assert "fuse_output_layer" not in settings_in_use(config(tmp_path))
    assert "fuse_output_layer" not in settings_in_use(config(tmp_path, fuse_output_layer=False))
    assert "fuse_output_layer" in settings_in_use(config(tmp_path, fuse_output_layer=True))


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (True, True), ("false", False), ("True", True)])
def test_fuse_output_layer_values(tmp_path, value, expected) -> None:
    resolved = config(tmp_path, fuse_output_layer=value).fuse_output_layer
    assert resolved == expected and type(resolved) is type(expected)
    with pytest.raises(ValueError, match="fuse_output_layer"):
        config(tmp_path, fuse_output_layer="sometimes")
