"""FSDP: the teacher sharded over the processes as the student is (and never trained); the student saved once.

Accelerate's FSDP preparation takes exactly one model, the trained one, and ``prepare_model(...,
evaluation_mode=True)`` neither wraps nor moves a model under FSDP, so without this the teacher would stay whole,
on the device it was loaded on (the CPU: a device mismatch with the student on GPUs). Under FSDP2 each of the
teacher's blocks (its ``_no_split_modules``) is one ``fully_shard`` unit, gathered for its forward pass and freed
after it; under FSDP1 the teacher is moved whole to each process's device.

The full state dict FSDP gathers for ``save_model`` holds one copy per name of tied weights (GPT-2's ``lm_head``
and ``wte``): ``save_pretrained`` finds ties by shared storage, so it would write the embedding twice.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedModel


def shard_teacher(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    """The frozen ``teacher`` sharded with FSDP2 over the processes (FSDP1: moved whole to the device)."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        return teacher.to(accelerator.device)
    from torch.distributed.fsdp import fully_shard

    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:  # the student's data-sharding dimensions, as Accelerate shards the student
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    # Resharded after every forward, the root included: no backward pass comes to free the gathered weights.
    # No mixed-precision policy: the teacher is already in the compute dtype (prepare_teacher casts it).
    kwargs = {"reshard_after_forward": True, "offload_policy": plugin.cpu_offload, "mesh": mesh}
    models = outermost_models(teacher) or [teacher]  # an ensemble's members; one teacher itself
    blocks = {name for model in models for name in getattr(model, "_no_split_modules", None) or ()}
    for module in reversed(list(teacher.modules())):  # children before their parents, as fully_shard needs
        if type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    for model in models:
        fully_shard(model, **kwargs)
    return teacher


def outermost_models(module: nn.Module) -> list[PreTrainedModel]:
    """The PreTrainedModels in ``module`` that no other one contains (T5's stacks belong to their T5)."""
    if isinstance(module, PreTrainedModel):
        return [module]
    return [model for child in module.children() for model in outermost_models(child)]


def drop_tied_copies(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` without the names under which ``model`` holds a parameter it already holds under another:
    the tied weights that an ordinary ``save_pretrained`` writes once (it keeps the first name, the embedding's)."""
    first: dict[int, str] = {}
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            copies.add(name)
    return {name: tensor for name, tensor in state_dict.items() if name not in copies}
