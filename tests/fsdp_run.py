"""FSDP2 distillation with DistillationTrainer, launched by tests/test_fsdp.py with torchrun (2 processes) and the
environment `accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets (ACCELERATE_USE_FSDP, FSDP_*):
`python -m torch.distributed.run --nproc_per_node=2 fsdp_run.py OUT TRAINING_JSON`.

Three runs, one after the other: "ddp", the reference (the FSDP variables hidden: plain DDP, float32); "recipe",
the recipe's FSDP settings with its bf16; "fsdp", the same in float32. Each writes what each rank saw
to OUT/MODE/rank{RANK}.json, the student to OUT/MODE/saved (save_model) and its full trained weights to
OUT/MODE/trained.safetensors. Then OUT/teachers{RANK}.json: for other teachers (T5 with its tied embeddings,
BART, an ensemble), how far the logits of the teacher sharded by hf_kd are from the whole teacher's.

On CPUs Accelerate never turns FSDP on: AcceleratorState sets DistributedType.FSDP only for a MULTI_GPU (or other
accelerator) process group, and a gloo group of CPU processes is MULTI_CPU (accelerate/state.py), so the Trainer
runs DDP and hf_kd warns. CpuFsdpTrainer sets the state Accelerate sets up on GPUs, with the plugin built from the
same environment; from there everything is Accelerate's and the Trainer's own FSDP2 code (fully_shard over a gloo
device mesh), and hf_kd's. With CUDA the script runs unchanged, without the override.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from conftest import make_tokenizer, tiny_bart, tiny_gpt2, tiny_t5  # noqa: E402
from helpers import config, lm_collator, lm_dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402
from hf_kd.teachers import TeacherEnsemble  # noqa: E402
from hf_kd.teachers.loading import prepare_teacher  # noqa: E402

ON_GPU = torch.cuda.is_available()


class CpuFsdpTrainer(DistillationTrainer):
    """The Trainer with the FSDP state Accelerate would set up for these processes if they had GPUs."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as Accelerator() does
        if state.mixed_precision != "no":
            state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
        # AcceleratorState copies PartialState's fields whenever it is built again: set both.
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


def distill(
    out: Path, training: dict[str, Any], mode: str
) -> tuple[dict, dict[str, torch.Tensor], DistillationTrainer]:
    """Train, save to OUT/saved; what this rank saw, the trained student's full weights, and the trainer."""
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3, n_embd=48)
    teacher_before = {k: v.detach().clone() for k, v in teacher.named_parameters()}
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if mode == "recipe" else "no"
    args = config(
        out, use_cpu=not ON_GPU, ddp_backend=None if ON_GPU else "gloo", bf16=mode == "recipe", **training
    )  # fmt: skip
    trainer_class = CpuFsdpTrainer if mode != "ddp" and not ON_GPU else DistillationTrainer
    trainer = trainer_class(
        model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(tokenizer, n=24, seed=5),
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(out / "saved"))

    shards = list(trainer.teacher.parameters())
    report = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "world_size": trainer.args.world_size,
        "student_class": type(trainer.model).__name__,
        "teacher_dtensors": all(isinstance(p, DTensor) for p in shards),
        "teacher_shard_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in shards),
        "teacher_full_numel": sum(v.numel() for v in teacher_before.values()),
        "teacher_device": str(shards[0].device),
        "teacher_requires_grad": any(p.requires_grad for p in shards),
        "teacher_grads": any(p.grad is not None for p in shards),
        "teacher_dtype": str(shards[0].dtype),
        # In the teacher's compute dtype: prepare_teacher casts it to bf16 under bf16 (it never trains).
        "teacher_unchanged": all(
            torch.equal(teacher_before[name].to(p.dtype), full(p)) for name, p in trainer.teacher.named_parameters()
        ),
        "steps": trainer.state.global_step,
        "logs": [log for log in trainer.state.log_history if "loss" in log],
    }
    return report, {name: full(p) for name, p in trainer.model.named_parameters()}, trainer


def teacher_errors(trainer: DistillationTrainer) -> dict[str, float]:
    """Largest |logit difference| between each teacher prepared as under FSDP (sharded) and a whole copy of it."""
    vocab = len(make_tokenizer())
    teachers = {
        "t5": lambda: tiny_t5(vocab, seed=3),
        "bart": lambda: tiny_bart(vocab, seed=4),
        "ensemble": lambda: TeacherEnsemble([tiny_gpt2(vocab, seed=5), tiny_gpt2(vocab, seed=6, n_layer=3)]),
    }
    ids = torch.randint(4, vocab, (2, 7), generator=torch.Generator().manual_seed(0)).to(trainer.args.device)
    errors = {}
    for name, build in teachers.items():
        whole = build().to(trainer.args.device).eval()
        sharded = prepare_teacher(build(), trainer.args, trainer.accelerator)
        assert all(isinstance(p, DTensor) for p in sharded.parameters()), name
        inputs = {"input_ids": ids, "labels": ids} if name != "ensemble" else {"input_ids": ids}
        with torch.inference_mode():
            errors[name] = (sharded(**inputs).logits - whole(**inputs).logits).abs().max().item()
    return errors


def main(out: str, training: dict[str, Any]) -> None:
    rank = int(os.environ["RANK"])
    fsdp_env = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith(("FSDP_", "ACCELERATE_USE"))}
    for mode in ("ddp", "recipe", "fsdp"):
        if mode != "ddp":
            os.environ.update(fsdp_env)
        report, trained, trainer = distill(Path(out) / mode, training, mode)
        if rank == 0:
            save_file(trained, os.path.join(out, mode, "trained.safetensors"))
        with open(os.path.join(out, mode, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    with open(os.path.join(out, f"teachers{rank}.json"), "w") as f:
        json.dump(teacher_errors(trainer), f)  # under the float32 FSDP settings of the "fsdp" run


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
