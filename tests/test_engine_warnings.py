"""A launch that asks for more processes, or for FSDP, than Accelerate runs gets one warning saying what runs."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from conftest import make_tokenizer, tiny_gpt2
from helpers import config

from hf_kd import DistillationTrainer
from hf_kd.trainer import engine_in_words


@pytest.fixture(autouse=True)
def _restore_launch_env(monkeypatch):
    """Accelerate writes these when it sees FSDP; monkeypatch puts back what was there before the test."""
    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _trainer(tmp_path, **kwargs) -> DistillationTrainer:
    tokenizer = make_tokenizer()
    student, teacher = tiny_gpt2(len(tokenizer)), tiny_gpt2(len(tokenizer), seed=2)
    return DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, **kwargs))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hf_kd.trainer" and r.levelno == logging.WARNING]


def test_no_warning_when_the_launch_gets_what_it_asked(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path)
    assert _warnings(caplog) == []


def test_processes_launched_but_not_joined_warn_once(tmp_path, monkeypatch, caplog):
    # What torchrun sets for 2 processes when use_cpu is off on a machine without GPUs: Accelerate forms no
    # process group. (No LOCAL_RANK here, so that no process group is started for a rank that never comes.)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, use_cpu=False)
    [message] = _warnings(caplog)
    assert (
        "2 processes were launched (WORLD_SIZE=2), but Accelerate runs one process, without distributed "
        "training: each process" in message
    )
    assert "each process trains alone, on all the data" in message
    if trainer.args.device.type == "cpu":
        assert "Accelerate forms a process group (gloo) only with use_cpu=True" in message


def test_fsdp_asked_but_not_active_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` with an FSDP config sets it
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path)
    [message] = _warnings(caplog)
    assert (
        "FSDP was asked for (ACCELERATE_USE_FSDP=true), but Accelerate runs one process, without distributed "
        "training: the" in message
    )
    assert "the student is not sharded, it is held whole" in message
    assert "not for a CPU process group (use_cpu=True)" in message


def test_fsdp_on_a_cpu_process_group_warns_that_ddp_runs(tmp_path, monkeypatch, caplog):
    # The state 2 processes get on CPUs from `accelerate launch --config_file recipes/accelerate/fsdp.yaml`, or
    # from torchrun with fsdp=True (transformers refuses fsdp in a single process itself).
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(trainer.args, "fsdp", True)
    monkeypatch.setattr(trainer, "accelerator", SimpleNamespace(distributed_type=DistributedType.MULTI_CPU,
                                                                num_processes=2))  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING):
        trainer._warn_engine_fallback()
    [message] = _warnings(caplog)
    assert (
        "FSDP was asked for (fsdp=True), but Accelerate runs DDP over gloo between CPU processes with 2 "
        "processes: the" in message
    )
    assert "the student is not sharded, every process holds all of it, as in DDP" in message


def test_deepspeed_counting_more_processes_than_accelerate_warns(tmp_path, monkeypatch, caplog):
    # DeepSpeed on CPUs without use_cpu: DeepSpeed joins both ranks, Accelerate counts one.
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(trainer, "accelerator", SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                                                num_processes=1))  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING):
        trainer._warn_engine_fallback()
    [message] = _warnings(caplog)
    assert "runs DeepSpeed with 1 process: DeepSpeed still counts 2 and refuses the batch size" in message


@pytest.mark.parametrize("engine", list(DistributedType))
def test_every_engine_is_named_in_words(engine):
    words = engine_in_words(engine, 2)
    if engine not in (DistributedType.FSDP, DistributedType.XLA):  # their names are the words
        assert engine.value not in words  # not "NO", "MULTI_CPU", "DEEPSPEED" ...
    assert " " in words and "_" not in words
    assert engine == DistributedType.NO or words.endswith("with 2 processes")
    assert engine_in_words(DistributedType.MULTI_GPU, 1).endswith("with 1 process")
