"""The teacher: loading it, checking it fits the student, and preparing it frozen on the student's devices."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import DistributedType
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from hf_kd.errors import ConfigError, TokenizerMismatchError, check_source_path, first_line
from hf_kd.teachers.fsdp import shard_teacher
from hf_kd.teachers.placement import (
    check_engine,
    check_offload,
    input_device,
    is_placed,
    is_quantized,
    resolve_init_kwargs,
)

logger = logging.getLogger(__name__)


def load_teacher(name_or_path: str, args: Any) -> tuple[nn.Module, Any]:
    """Load a teacher (and its tokenizer, when it has one) with the Auto class that fits its config.

    Weights are read from safetensors only; ``teacher_trust_remote_code`` is whatever the config says (default off).
    ``teacher_model_init_kwargs`` may place the teacher (``device_map``, ``max_memory``, ``offload_folder``) and
    quantize it (``quantization_config``: a config, a dict, or a preset name of
    :data:`hf_kd.teachers.placement.PRESETS`); see docs/big-teachers.md.
    """
    trust = bool(getattr(args, "teacher_trust_remote_code", False))
    kwargs = resolve_init_kwargs(getattr(args, "teacher_model_init_kwargs", None) or {})
    check_engine(args, kwargs)  # before the (possibly long) load
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust)
    auto_class = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    kwargs.setdefault("use_safetensors", True)
    teacher = auto_class.from_pretrained(name_or_path, trust_remote_code=trust, **kwargs)
    if kwargs.get("device_map") is not None:
        check_offload(teacher, kwargs.get("offload_folder"))
        teacher.hf_kd_placed = True  # also {"": device}, which leaves no device map: prepare_teacher keeps it there
    return teacher, load_saved_tokenizer(name_or_path, trust_remote_code=trust)


def load_saved_tokenizer(name_or_path: str, **kwargs: Any) -> Any | None:
    """The tokenizer saved with a model, or None when the folder (or repository) has none.

    transformers 5 does not raise for a folder without tokenizer files: it builds the model type's tokenizer
    with an empty vocabulary (GPT-2: 1 token; T5: its 100 sentinels and 3 specials). Compared with the student's,
    it would refuse a teacher that simply has no tokenizer of its own, so it counts as none. ``kwargs`` go to
    ``AutoTokenizer.from_pretrained``.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError):  # e.g. a Llama folder without tokenizer files: nothing to build from
        return None
    if has_vocabulary(tokenizer):
        return tokenizer
    logger.info("%s has no tokenizer files: the tokenizer of the model it is paired with is used for it.", name_or_path)
    return None


def load_named_tokenizer(key: str, name: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer the user named (``key`` is the option or config key that names it); a one-line
    :class:`ConfigError` when the path is not there, cannot be loaded or holds no tokenizer files."""
    check_source_path(key, name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{key}={name!r}: its tokenizer cannot be loaded ({first_line(err)}); pass a folder written by "
            "tokenizer.save_pretrained, or a Hub id, with --tokenizer."
        ) from None
    if not has_vocabulary(tokenizer):  # transformers 5 builds an empty tokenizer for a folder without its files
        raise ConfigError(f"{key}={name!r} holds no tokenizer files; pass the folder the tokenizer was saved to.")
    return tokenizer


def has_vocabulary(tokenizer: Any) -> bool:
    """False for a tokenizer with nothing but special tokens: what transformers 5 builds from no files.

    Its size is no guide: a real tokenizer may be far smaller than the output layer (padded to a multiple of
    64 or 128, or by thousands of rows), and must still be compared with the student's.
    """
    if not hasattr(tokenizer, "get_vocab"):
        return True  # not a text tokenizer (a processor): nothing to judge it by
    special = set(tokenizer.get_added_vocab()) | set(getattr(tokenizer, "all_special_tokens", ()))
    # An empty SentencePiece model still holds its word-boundary piece, hence more than 1 and not 0.
    return len(set(tokenizer.get_vocab()) - special) > 1


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher whose outputs cannot be lined up with the student's token by token."""
    student_ed = bool(getattr(getattr(student, "config", None), "is_encoder_decoder", False))
    teacher_ed = bool(getattr(getattr(teacher, "config", None), "is_encoder_decoder", False))
    if student_ed != teacher_ed:
        kinds = {True: "encoder-decoder", False: "causal (decoder-only)"}
        raise ValueError(
            f"The student is {kinds[student_ed]} but the teacher is {kinds[teacher_ed]}: token-level "
            "distillation needs both to predict the same target positions. Use a teacher of the same kind "
            "(e.g. BART -> BART, T5 -> T5, GPT-2 -> GPT-2)."
        )


def encoder_ids(ids: list[int], eos: int | None, limit: int | None = None) -> list[int]:
    """An encoder's source ids ending with ``</s>`` once, as T5's and BART's tokenizers end them, also when the
    tokenizer adds none itself (one trained locally without a post-processor); cut to ``limit`` with the ``</s>``
    kept."""
    if eos is None:
        return ids[:limit]
    ids = ids[:-1] if ids and ids[-1] == eos else ids
    return ids[: limit - 1 if limit else None] + [eos]


def output_width(model: nn.Module) -> int:
    """How many logit columns ``model`` produces: its output layer's rows, else ``config.vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _tokenizer_name(tokenizer: Any) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or '<unnamed>'!r})"


CROSS_TOKENIZER_FIX = (
    "Set cross_tokenizer=True in the DistillationConfig (with cross_tokenizer_text_column / "
    "cross_tokenizer_prompt_column) to align them by text, or use a student that shares the teacher's tokenizer."
)


def check_same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any, fix: str = CROSS_TOKENIZER_FIX) -> None:
    """Raise :class:`TokenizerMismatchError` (ending with ``fix``) unless both map the same tokens to the same ids."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise TokenizerMismatchError(
            f"The student's tokenizer {_tokenizer_name(student_tokenizer)} ({len(student_tokenizer)} tokens) and "
            f"the teacher's {_tokenizer_name(teacher_tokenizer)} ({len(teacher_tokenizer)} tokens) map tokens to "
            f"different ids, so their token distributions cannot be compared id by id. {fix}"
        )


def shared_vocab_size(
    student: nn.Module, teacher: nn.Module, student_tokenizer: Any = None, teacher_tokenizer: Any = None
) -> int:
    """How many leading logit columns both models give to the same real tokens.

    Output layers are often wider than the vocabulary (T5: 32128 columns for 32100 tokens; widths padded to
    a multiple of 64); the padding columns are never targets, so the divergence ignores them. With both
    tokenizers, they must map the same tokens to the same ids; with the student's alone, the teacher is
    taken to share it; with none, the narrower output layer decides.
    """
    widths = (output_width(student), output_width(teacher))
    tokenizer = student_tokenizer if hasattr(student_tokenizer, "get_vocab") else None
    teacher_tok = teacher_tokenizer if hasattr(teacher_tokenizer, "get_vocab") else None
    if tokenizer is not None and teacher_tok is not None:
        check_same_tokenizer(tokenizer, teacher_tok)
    if tokenizer is None:
        tokenizer = teacher_tok
    if tokenizer is None:
        if widths[0] != widths[1]:
            logger.warning(
                "Student and teacher output widths differ (%d vs %d) and no tokenizer was given: the "
                "divergence uses the first %d columns. Pass processing_class to be exact.",
                *widths,
                min(widths),
            )
        return min(widths)
    vocab = len(tokenizer)
    if vocab > min(widths):
        raise TokenizerMismatchError(
            f"The tokenizer {_tokenizer_name(tokenizer)} has {vocab} tokens but the output layers are "
            f"{widths[0]} (student) and {widths[1]} (teacher) wide: a model does not cover the vocabulary. "
            "Resize it with model.resize_token_embeddings(len(tokenizer)), or pass the right tokenizer."
        )
    return vocab


def prepare_teacher(teacher: nn.Module, args: Any, accelerator: Accelerator) -> nn.Module:
    """Freeze the teacher, cast it to the compute dtype and place it as Accelerate places eval models.

    A teacher placed by a device map (Accelerate's big-model inference) stays where it is, in the dtype it was
    loaded in; a quantized one keeps its dtype (see :func:`keep_placement`).
    """
    teacher.eval()
    teacher.requires_grad_(False)
    placed = is_placed(teacher)
    if placed or is_quantized(teacher):
        engines = {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.FSDP: "FSDP"}
        engine = engines.get(accelerator.distributed_type)
        if engine:
            raise ValueError(
                f"The teacher is {'placed by a device map' if placed else 'quantized'}, and {engine} places and "
                "shards every model itself; load the teacher without device_map / quantization_config, or train "
                f"without {engine}."
            )
    if placed:
        return keep_placement(teacher, accelerator)
    compute_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    if compute_dtype is not None and not is_quantized(teacher) and next(teacher.parameters()).dtype == torch.float32:
        teacher.to(compute_dtype)  # it never trains, so float32 master weights buy nothing
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _prepare_deepspeed(teacher, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        check_fsdp_loading(accelerator)
        teacher = shard_teacher(teacher, accelerator)  # prepare_model neither moves nor shards it under FSDP
    # evaluation_mode: moved to the device and under autocast, but not wrapped in DDP.
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def keep_placement(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    """A teacher as its device map placed it: not moved, not cast, not under the training's autocast (load it in
    the dtype it should run in). Its outputs come back to the device of its inputs (the student's): Accelerate's
    hook on the whole model does that for a model spread over devices; one on a single device gets such a hook."""
    hook = getattr(teacher, "_hf_hook", None)
    if hook is None:
        add_hook_to_module(teacher, AlignDevicesHook(execution_device=input_device(teacher), io_same_device=True))
    elif hasattr(hook, "io_same_device"):
        hook.io_same_device = True  # a model wholly offloaded has a root hook that returns on its execution device
    if accelerator.num_processes > 1:
        logger.warning(
            "The teacher was placed by a device map, and %d processes train: each holds its own placement of it "
            "(device_map 'auto' spreads every copy over all the GPUs it sees). Give each process its own devices "
            "(CUDA_VISIBLE_DEVICES or max_memory) or a teacher cache (hf-kd cache-teacher).",
            accelerator.num_processes,
        )
    return teacher


def check_fsdp_loading(accelerator: Accelerator) -> None:
    """Refuse FSDP's ``cpu_ram_efficient_loading``: it loads weights on rank 0 only and relies on Accelerate to
    broadcast them to the model it prepares, the student. Nothing broadcasts the teacher's, so every other rank
    would distill from a teacher with random (or empty) weights, silently."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "cpu_ram_efficient_loading", False):
        raise ValueError(
            "FSDP with cpu_ram_efficient_loading=True loads weights on rank 0 only, and only the student's are "
            "broadcast, so the other ranks would get no teacher weights. Set `fsdp_cpu_ram_efficient_loading: "
            "false` in the Accelerate config (recipes/accelerate/fsdp.yaml does), or the environment variable "
            "FSDP_CPU_RAM_EFFICIENT_LOADING=false."
        )


def _prepare_deepspeed(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    """An inference engine for the teacher: sharded under ZeRO-3, replicated (stage 0) otherwise."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config["zero_optimization"]["stage"]
    hidden = getattr(teacher.config, "hidden_size", None) or getattr(teacher.config, "d_model", None)
    if stage == 3 and hidden:
        config["zero_optimization"].update(
            {
                "reduce_bucket_size": hidden * hidden,
                "stage3_param_persistence_threshold": 10 * hidden,
                "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            }
        )
    # No optimizer is given to the engine: drop the training-only blocks.
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["zero_optimization"].pop("offload_optimizer", None)
    if stage != 3:
        config["zero_optimization"]["stage"] = 0
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
