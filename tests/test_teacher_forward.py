"""The teacher's target-row logits against slicing its full logits."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bart, tiny_gpt2

from hf_kd.losses import IGNORE_INDEX
from hf_kd.teachers.live import check_shared_encoder, target_logits


def test_causal_rows_equal_sliced_full_logits() -> None:
    teacher = tiny_gpt2(45, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 41, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask.eq(0), IGNORE_INDEX)[:, 1:]
    labels[0, :4] = IGNORE_INDEX  # a prompt
    inputs = {"input_ids": ids, "attention_mask": mask}

    rows = target_logits(teacher, inputs, labels, vocab_size=41, is_encoder_decoder=False)
    with torch.no_grad():
        full = teacher(**inputs).logits[:, :-1, :41]
    expected = full[labels.ne(IGNORE_INDEX)]
    assert rows.shape == expected.shape == (int(labels.ne(IGNORE_INDEX).sum()), 41)
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)
    assert rows.is_inference()


def test_encoder_decoder_rows_equal_sliced_full_logits() -> None:
    teacher = tiny_bart(45, seed=1).eval()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(4, 41, (2, 6), generator=g)
    labels[1, -2:] = IGNORE_INDEX
    inputs = {
        "input_ids": torch.randint(4, 41, (2, 7), generator=g),
        "decoder_input_ids": teacher.prepare_decoder_input_ids_from_labels(labels=labels),
    }
    rows = target_logits(teacher, inputs, labels, vocab_size=41, is_encoder_decoder=True)
    with torch.no_grad():
        expected = teacher(**inputs).logits[..., :41][labels.ne(IGNORE_INDEX)]
    torch.testing.assert_close(rows, expected)


def _distilbart_pair(vocab: int):
    """A teacher and a student whose encoder is a frozen copy of the teacher's and whose decoder differs."""
    teacher = tiny_bart(vocab, seed=1)
    with torch.no_grad():  # make the decoder depend strongly on the encoder, so that the test can fail
        for layer in teacher.get_decoder().layers:
            layer.encoder_attn.out_proj.weight.mul_(30.0)
    student = copy.deepcopy(teacher)
    torch.manual_seed(3)
    for p in student.get_decoder().layers.parameters():
        p.data.normal_(0, 0.05)
    student.get_encoder().requires_grad_(False)
    return student, teacher


def test_teacher_reusing_student_encoder_gives_the_same_loss_without_its_encoder(tmp_path, tokenizer):
    from helpers import config, seq2seq_collator, seq2seq_dataset

    from hf_kd import DistillationTrainer

    student, teacher = _distilbart_pair(len(tokenizer))
    data = seq2seq_dataset(tokenizer, n=4)
    batch = seq2seq_collator(tokenizer, student)([data[i] for i in range(4)])
    results = []
    for reuse in (False, True):
        s = copy.deepcopy(student)
        args = config(tmp_path, loss_chunk_size=5, teacher_reuses_student_encoder=reuse)
        trainer = DistillationTrainer(model=s, teacher_model=teacher, args=args, processing_class=tokenizer)
        calls = []
        hook = teacher.get_encoder().register_forward_hook(lambda *_, calls=calls: calls.append(1))
        loss = trainer.compute_loss(s, dict(batch))
        loss.backward()
        hook.remove()
        assert len(calls) == (0 if reuse else 1)
        results.append((loss.detach(), [p.grad.clone() for p in s.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0])
    # The control: other encoder outputs change the loss, so the equality above is not a given.
    s = copy.deepcopy(student)
    with torch.no_grad():
        s.get_encoder().layers[0].fc2.bias.add_(5 * torch.randn(s.config.d_model))
    args = config(tmp_path, loss_chunk_size=5, teacher_reuses_student_encoder=False)
    other = DistillationTrainer(model=s, teacher_model=teacher, args=args, processing_class=tokenizer)
    args.teacher_reuses_student_encoder = True  # skip the construction check to feed the wrong encoder outputs
    assert (other.compute_loss(s, dict(batch)) - results[0][0]).abs() > 1e-4  # 100x the tolerance above
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b)


def test_shared_encoder_is_checked() -> None:
    student, teacher = _distilbart_pair(45)
    check_shared_encoder(student, teacher)  # a frozen copy: accepted
    student.get_encoder().requires_grad_(True)
    with pytest.raises(ValueError, match="encoder trains"):
        check_shared_encoder(student, teacher)
    student.get_encoder().requires_grad_(False)
    with torch.no_grad():
        next(student.get_encoder().parameters()).add_(1.0)
    with pytest.raises(ValueError, match="not a copy"):
        check_shared_encoder(student, teacher)
    with pytest.raises(ValueError, match="encoder-decoder"):
        check_shared_encoder(tiny_gpt2(45), tiny_gpt2(45))


@pytest.mark.parametrize("efficient", [True, False])
def test_fsdp_cpu_ram_efficient_loading_is_refused_for_the_teacher(efficient: bool) -> None:
    """Under it, ranks other than 0 would keep an unwrapped teacher's random weights: an error, not a wrong loss."""
    from types import SimpleNamespace

    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    from hf_kd.teachers.loading import prepare_teacher

    assert "cpu_ram_efficient_loading" in FullyShardedDataParallelPlugin.__dataclass_fields__  # what we read
    plugin = SimpleNamespace(cpu_ram_efficient_loading=efficient, fsdp_version=1)  # FSDP1: moved, not sharded
    prepared = []
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        device=torch.device("cpu"),
        state=SimpleNamespace(fsdp_plugin=plugin),
        prepare_model=lambda model, evaluation_mode: prepared.append(evaluation_mode) or model,
    )
    args = SimpleNamespace(bf16=False, fp16=False)
    teacher = tiny_gpt2(20)
    if efficient:
        with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading: false"):
            prepare_teacher(teacher, args, accelerator)
    else:
        assert prepare_teacher(teacher, args, accelerator) is teacher and prepared == [True]
