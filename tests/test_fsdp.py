"""FSDP2 as recipes/accelerate/fsdp.yaml sets it up: 2 processes, the teacher sharded and frozen, the student saved
whole, the weights those of a DDP run (tests/fsdp_run.py).

Without CUDA: torchrun with 2 CPU processes (gloo) and the environment `accelerate launch` builds from the yaml;
fsdp_run.py then sets the FSDP state Accelerate sets up only on accelerators (see its docstring). With CUDA:
`accelerate launch --config_file recipes/accelerate/fsdp.yaml` itself, on up to 2 GPUs, with no override.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_saved_like_a_fresh_student
from safetensors.torch import load_file
from test_recipes import accelerate_setup
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).with_name("fsdp_run.py")
RECIPE = SCRIPT.parents[1] / "recipes" / "accelerate" / "fsdp.yaml"
# Plain SGD: a wrong gradient scale shows in the weights (Adam would normalize it away).
TRAINING = {"max_steps": 3, "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant", "alpha": 0.5,
            "temperature": 2.0}  # fmt: skip
LOGGED = ("loss", "grad_norm", "kd_loss", "ce_loss", "teacher_agreement")
GPUS = min(torch.cuda.device_count(), 2)


def launch_command(out: Path) -> tuple[list[str], dict[str, str]]:
    """How the runs are launched here: accelerate launch on GPUs, torchrun + the yaml's environment on CPUs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    arguments = [str(SCRIPT), str(out), json.dumps(TRAINING)]
    if GPUS:
        launcher = ["-m", "accelerate.commands.launch", "--config_file", str(RECIPE), f"--num_processes={GPUS}"]
        return [sys.executable, *launcher, "--main_process_port=29561", *arguments], env
    _, recipe_env, _ = accelerate_setup(RECIPE)
    env.update({key: value for key, value in recipe_env.items() if key.startswith(("ACCELERATE_", "FSDP_"))})
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561"]
    return [sys.executable, *launcher, *arguments], env


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The DDP reference and the two FSDP runs (float32, the recipe's bf16), in one launch."""
    out = tmp_path_factory.mktemp("fsdp")
    command, env = launch_command(out)
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    rank_errors = "\n".join(line for line in result.stderr.splitlines() if line.startswith("[rank"))
    assert result.returncode == 0, (rank_errors or result.stderr)[-3000:]
    return out


def reports(runs: Path, mode: str) -> list[dict]:
    world = GPUS or 2
    return [json.loads((runs / mode / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "recipe"])
def test_fsdp_shards_the_student_and_the_frozen_teacher(runs, mode):
    for report in reports(runs, mode):
        assert report["distributed_type"] == "DistributedType.FSDP" and report["world_size"] == (GPUS or 2)
        assert report["student_class"].startswith("FSDP")  # fully_shard's class for the student
        # The teacher's parameters are DTensor shards: each process holds 1/world of it (padding aside) ...
        full, world = report["teacher_full_numel"], report["world_size"]
        assert report["teacher_dtensors"] and full / world <= report["teacher_shard_numel"] < full / world * 1.02
        # ... on the student's device, frozen and untouched.
        assert report["teacher_device"].startswith("cuda" if GPUS else "cpu")
        assert not report["teacher_requires_grad"] and not report["teacher_grads"] and report["teacher_unchanged"]
        assert report["teacher_dtype"] == ("torch.bfloat16" if mode == "recipe" else "torch.float32")
        assert report["steps"] == 3 and len(report["logs"]) == 3
    ddp = reports(runs, "ddp")[0]
    assert ddp["distributed_type"] != "DistributedType.FSDP" and not ddp["teacher_dtensors"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "recipe"])
def test_fsdp_saves_the_student_whole_and_matches_ddp(runs, mode, tmp_path):
    saved = runs / mode / "saved"
    assert_saved_like_a_fresh_student(saved, tmp_path / "fresh")

    reloaded = dict(AutoModelForCausalLM.from_pretrained(saved).named_parameters())
    trained = load_file(str(runs / mode / "trained.safetensors"))
    reference = load_file(str(runs / "ddp" / "trained.safetensors"))
    assert sorted(reloaded) == sorted(trained) == sorted(reference)
    for name, tensor in trained.items():
        assert torch.equal(reloaded[name].to(tensor.dtype), tensor), f"the saved {name} is not the trained one"
        if mode == "fsdp":  # float32: the numbers of the DDP run
            torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-5, msg=name)
    # bf16 follows the float32 curve to bf16 precision.
    rel, abs_ = (1e-5, 1e-6) if mode == "fsdp" else (2e-2, 1e-3)
    for got, want in zip(reports(runs, mode)[0]["logs"], reports(runs, "ddp")[0]["logs"], strict=True):
        for key in LOGGED:
            assert got[key] == pytest.approx(want[key], rel=rel, abs=abs_), (key, got, want)


@pytest.mark.slow
def test_fsdp_shards_other_teachers_exactly(runs):
    for rank in range(GPUS or 2):
        errors = json.loads((runs / f"teachers{rank}.json").read_text())
        assert sorted(errors) == ["bart", "ensemble", "t5"]
        for name, error in errors.items():
            assert error < 1e-5, (name, error)  # the same weights, gathered: the same logits
