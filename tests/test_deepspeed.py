"""DeepSpeed ZeRO-3 on CPU: 2 processes (torchrun, gloo), as recipes/accelerate/deepspeed_zero3.yaml sets it up.

Two runs (tests/deepspeed_run.py): "recipe", the yaml's DeepSpeed config and bf16, and "optimizer", the same with
an `optimizer` block (the Trainer then holds Accelerate's DummyOptim) in float32, checked against a plain
single-process run on the same global batches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_gpt2
from helpers import assert_saved_like_a_fresh_student, config, lm_collator, lm_dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_kd import DistillationTrainer

SCRIPT = Path(__file__).with_name("deepspeed_run.py")
# Plain SGD: a wrong gradient scale shows in the weights (Adam would normalize it away).
TRAINING = {"max_steps": 3, "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant", "alpha": 0.5,
            "temperature": 2.0}  # fmt: skip
LOGGED = ("loss", "grad_norm", "kd_loss", "ce_loss", "teacher_agreement")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both DeepSpeed runs (recipe settings, then with an `optimizer` block), in one 2-process launch."""
    out = tmp_path_factory.mktemp("deepspeed")
    for mode in ("recipe", "optimizer"):
        (out / mode).mkdir()
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU accelerator: gloo when oneCCL is not installed
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(SCRIPT.parents[1]),
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547"]
    command = [*launcher, str(SCRIPT), str(out), json.dumps(TRAINING)]
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    rank_errors = "\n".join(line for line in result.stderr.splitlines() if line.startswith("[rank"))
    assert result.returncode == 0, (rank_errors or result.stderr)[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The same distillation without DeepSpeed, in this process, one batch of 2 x 4 rows a step: weights, logs."""
    tokenizer = make_tokenizer()
    student, teacher = tiny_gpt2(len(tokenizer), seed=1), tiny_gpt2(len(tokenizer), seed=2, n_layer=3, n_embd=48)
    args = config(tmp_path_factory.mktemp("reference"), per_device_train_batch_size=8, **TRAINING)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(tokenizer, n=24, seed=5),
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    trainer.train()
    weights = {name: p.detach().clone() for name, p in student.named_parameters()}
    return weights, [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recipe", "optimizer"])
def test_zero3_teacher_is_sharded_and_frozen(runs, mode):
    reports = [json.loads((runs / mode / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["distributed_type"] == "DistributedType.DEEPSPEED"
        assert report["world_size"] == report["torch_world_size"] == 2
        assert report["teacher_engine"] == "DeepSpeedEngine" and report["teacher_zero_stage"] == 3
        # ZeRO-3 partitioned: no full parameter held, and each rank keeps half (padding aside) of the teacher.
        assert report["teacher_local_numel"] == 0
        assert report["teacher_full_numel"] / 2 <= report["teacher_shard_numel"] < report["teacher_full_numel"] * 0.51
        assert not report["teacher_requires_grad"] and not report["teacher_grads"] and report["teacher_unchanged"]
        assert report["teacher_dtype"] == ("torch.bfloat16" if mode == "recipe" else "torch.float32")
        assert report["steps"] == 3 and len(report["logs"]) == 3 and report["student_changed"]
        assert "not supported with DeepSpeed" in report["hidden_state_refusal"]
    # The recipe's config leaves the optimizer to the Trainer; the `optimizer` block has DeepSpeed build it.
    assert reports[0]["client_optimizer"] == ("SGD" if mode == "recipe" else "NoneType")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recipe", "optimizer"])
def test_zero3_saves_the_student_alone_and_matches_a_plain_run(runs, reference, mode, tmp_path):
    saved = runs / mode / "saved"
    assert_saved_like_a_fresh_student(saved, tmp_path / "fresh")

    reloaded = dict(AutoModelForCausalLM.from_pretrained(saved).named_parameters())
    trained = load_file(str(runs / mode / "trained.safetensors"))
    weights, logs = reference
    assert sorted(reloaded) == sorted(trained) == sorted(weights)
    for name, tensor in trained.items():
        assert torch.equal(reloaded[name].to(tensor.dtype), tensor), f"the saved {name} is not the trained one"
        if mode == "optimizer":  # float32: the same numbers as without DeepSpeed
            torch.testing.assert_close(tensor, weights[name], rtol=1e-4, atol=1e-5, msg=name)
    # bf16 follows the float32 curve to bf16 precision.
    rel = 1e-4 if mode == "optimizer" else 2e-2
    report = json.loads((runs / mode / "rank0.json").read_text())
    for got, want in zip(report["logs"], logs, strict=True):
        for key in LOGGED:
            assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-6 if mode == "optimizer" else 1e-3), (key, got)
