"""2-process CPU data parallelism (torchrun, gloo) equals a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_run.py")


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["one", "ensemble"])
def test_two_process_ddp_matches_one_process(tmp_path, teacher):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    extra = ["ensemble"] if teacher == "ensemble" else []
    _run([*launcher, str(SCRIPT), str(ddp), "4", *extra], cwd=tmp_path)
    _run([sys.executable, str(SCRIPT), str(single), "8", *extra], cwd=tmp_path)

    rank0, rank1 = load_file(str(ddp / "rank0.safetensors")), load_file(str(ddp / "rank1.safetensors"))
    reference = load_file(str(single / "rank0.safetensors"))
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), f"ranks diverged on {name}"
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)

    ddp_logs = json.loads((ddp / "rank0.json").read_text())
    single_logs = json.loads((single / "rank0.json").read_text())
    assert ddp_logs["world_size"] == 2 and single_logs["world_size"] == 1
    for a, b in zip(ddp_logs["logs"], single_logs["logs"], strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "teacher_agreement"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
