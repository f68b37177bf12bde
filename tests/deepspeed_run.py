"""DeepSpeed ZeRO-3 distillation on CPU, launched by tests/test_deepspeed.py with torchrun (2 processes):
`DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node=2 deepspeed_run.py OUT TRAINING_JSON`.

Two runs, one after the other: "recipe", with the DeepSpeed config and mixed precision (bf16) that `accelerate
launch` builds from recipes/accelerate/deepspeed_zero3.yaml, and "optimizer", the same config in float32 plus an
`optimizer` block (the Trainer then holds Accelerate's DummyOptim). use_cpu=True (tests/helpers.config) is what
gives Accelerate a gloo process group of 2 on a machine without GPUs; DeepSpeed then shards over it. Each run
writes what each rank saw to OUT/MODE/rank{RANK}.json, the student to OUT/MODE/saved (save_model) and its full
trained weights to OUT/MODE/trained.safetensors.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from accelerate.utils import DeepSpeedPlugin  # noqa: E402
from conftest import make_tokenizer, tiny_gpt2  # noqa: E402
from helpers import config, lm_collator, lm_dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hf_kd import DistillationConfig, DistillationTrainer  # noqa: E402

RECIPE = Path(__file__).parents[1] / "recipes" / "accelerate" / "deepspeed_zero3.yaml"
# The recipe's yaml keys that are DeepSpeedPlugin fields (all of its deepspeed_config block).
PLUGIN_KEYS = (
    "zero_stage", "zero3_init_flag", "zero3_save_16bit_model", "offload_optimizer_device", "offload_param_device",
    "gradient_accumulation_steps", "gradient_clipping",
)  # fmt: skip


def recipe_deepspeed_config(mixed_precision: str, with_optimizer: bool) -> dict:
    """The DeepSpeed config `accelerate launch --mixed_precision MIXED_PRECISION` builds from the recipe's yaml."""
    settings = yaml.safe_load(RECIPE.read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(**{key: settings[key] for key in PLUGIN_KEYS})
    plugin.set_mixed_precision(mixed_precision)
    ds_config = dict(plugin.deepspeed_config)
    ds_config.pop("steps_per_print", None)  # Accelerate's float("inf"): not a valid JSON config value
    if with_optimizer:
        # Plain SGD keeps the comparison with a run without DeepSpeed sharp (Adam would normalize gradient errors
        # away), and needs none of DeepSpeed's C++ optimizers, which are compiled on first use (minutes).
        ds_config["optimizer"] = {"type": "SGD", "params": {"lr": "auto"}}
        ds_config["zero_allow_untested_optimizer"] = True  # ZeRO asks for it for optimizers other than its own
    return ds_config


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of a (possibly ZeRO-3 partitioned) model's parameters, on every rank."""
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.detach().clone() for name, p in params.items()}


def main(out: str, training: dict[str, Any]) -> None:
    # Skip DeepSpeed's JIT-compiled shared-memory all-reduce (minutes of C++ compilation on a first run): gloo
    # does the communication. DeepSpeed keeps this dict on purpose so that edits to it persist.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    rank = int(os.environ["RANK"])
    recipe_precision = yaml.safe_load(RECIPE.read_text())["mixed_precision"]
    # One launch for both runs: most of a run's time is imports and start-up.
    for mode, precision in (("recipe", recipe_precision), ("optimizer", "no")):
        report, trained = distill(os.path.join(out, mode), training, precision, with_optimizer=mode == "optimizer")
        if rank == 0:
            save_file(trained, os.path.join(out, mode, "trained.safetensors"))
        with open(os.path.join(out, mode, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)


def distill(
    out: str, training: dict[str, Any], mixed_precision: str, with_optimizer: bool
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train, save to OUT/saved; what each rank saw, and the trained student's full weights."""
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3, n_embd=48)
    teacher_before = {k: v.detach().clone() for k, v in teacher.named_parameters()}
    args = config(
        Path(out),
        deepspeed=recipe_deepspeed_config(mixed_precision, with_optimizer),
        bf16=mixed_precision == "bf16",
        **training,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(tokenizer, n=24, seed=5),
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    student_before = gathered(trainer.model)
    trainer.train()
    trainer.save_model(os.path.join(out, "saved"))

    engine = trainer.teacher
    teacher_after, student_after = gathered(engine.module), gathered(trainer.model)
    report = {
        "world_size": trainer.args.world_size,
        "torch_world_size": torch.distributed.get_world_size(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        # None when DeepSpeed built the optimizer from the config's `optimizer` block (the Trainer held a DummyOptim)
        "client_optimizer": type(trainer.deepspeed.client_optimizer).__name__,
        "teacher_engine": type(engine).__name__,
        "teacher_zero_stage": engine.zero_optimization_stage(),
        # A ZeRO-3 partitioned parameter holds an empty placeholder; its shard lives in ds_tensor.
        "teacher_local_numel": sum(p.numel() for p in engine.module.parameters()),
        "teacher_shard_numel": sum(p.ds_tensor.numel() for p in engine.module.parameters()),
        "teacher_full_numel": sum(v.numel() for v in teacher_before.values()),
        "teacher_requires_grad": any(p.requires_grad for p in engine.module.parameters()),
        "teacher_grads": any(p.grad is not None for p in engine.module.parameters()),
        # In the teacher's compute dtype: prepare_teacher casts it to bf16 under bf16 (it never trains).
        "teacher_unchanged": all(torch.equal(teacher_before[k].to(v.dtype), v) for k, v in teacher_after.items()),
        "teacher_dtype": str(next(iter(teacher_after.values())).dtype),
        "student_changed": any(not torch.equal(student_before[k], v) for k, v in student_after.items()),
        "steps": trainer.state.global_step,
        "logs": [log for log in trainer.state.log_history if "loss" in log],
        "hidden_state_refusal": hidden_state_refusal(args, tokenizer),
    }
    return report, student_after


def hidden_state_refusal(args: DistillationConfig, tokenizer: Any) -> str:
    """The error a hidden-state projection meets under DeepSpeed (it would be trained outside the engine)."""
    vocab = len(tokenizer)
    try:
        DistillationTrainer(
            model=tiny_gpt2(vocab), teacher_model=tiny_gpt2(vocab), processing_class=tokenizer,
            args=replace(args, hidden_state_loss_weight=0.5),
        )  # fmt: skip
    except ValueError as error:
        return str(error)
    return ""


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
