"""Teachers bigger than one device: Accelerate's big-model placement (``device_map``, ``max_memory``,
``offload_folder``) and Transformers' quantization configs, as ``from_pretrained`` keyword arguments.

Nothing here places or quantizes a model itself: Transformers and Accelerate do, from the keyword arguments this
module builds and checks (the command-line options of :func:`hf_kd.cli.common.add_placement_options` and the
``teacher_model_init_kwargs`` of a :class:`~hf_kd.DistillationConfig`). What it adds is what hf_kd needs around a
model placed that way: where its inputs go, reading its offloaded weights back (the cache fingerprint hashes them),
and refusing what cannot work with one line naming the fix.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import convert_file_size_to_int, parse_flag_from_env
from torch import nn

from hf_kd.errors import ConfigError

# device_map strategies Transformers computes with Accelerate (anything else is one device or a {module: device}).
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# from_pretrained keyword arguments that place or quantize a model.
PLACEMENT_KEYS = ("device_map", "max_memory", "offload_folder", "quantization_config")
# The packages each Transformers quant_method runs on: checked before loading, for a one-line fix.
BACKENDS = {
    "torchao": "torchao",
    "bitsandbytes": "bitsandbytes",
    "quanto": "optimum.quanto",
    "hqq": "hqq",
    "awq": "awq",
    "gptq": "gptqmodel",
}
# --quantization NAME: (quant_method, how to build its config). Others: a JSON config with "quant_method".
PRESETS = ("int8-weight-only", "int8-dynamic", "int4-weight-only", "bnb-8bit", "bnb-4bit", "quanto-int8")


def _preset(name: str) -> Any:
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    if name.startswith("bnb-"):
        return BitsAndBytesConfig(**{f"load_in_{name[4:]}": True})
    if name == "quanto-int8":
        return QuantoConfig(weights="int8")
    from torchao import quantization as ao

    kinds = {
        "int8-weight-only": ao.Int8WeightOnlyConfig,
        "int8-dynamic": ao.Int8DynamicActivationInt8WeightConfig,
        "int4-weight-only": ao.Int4WeightOnlyConfig,
    }
    return TorchAoConfig(kinds[name]())


def _method_of(name: str) -> str:
    return "bitsandbytes" if name.startswith("bnb-") else "quanto" if name.startswith("quanto") else "torchao"


def check_backend(method: str, option: str) -> None:
    """A one-line ConfigError when the package ``method`` (a Transformers ``quant_method``) runs on is missing."""
    package = BACKENDS.get(str(method))
    if package is None:
        return  # another method: Transformers checks its own requirements when loading
    try:
        found = importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # "optimum.quanto" without optimum
        found = False
    if not found:
        pip = {"optimum.quanto": "optimum-quanto", "gptqmodel": "gptqmodel"}.get(package, package)
        extra = " (or pip install 'hf-kd[quant]')" if package == "torchao" else ""
        raise ConfigError(
            f"{option}: the {method} quantization backend is not installed; pip install {pip}{extra}, or choose "
            "another quantization."
        )


def quantization_config(spec: Any, option: str = "--quantization") -> Any:
    """A Transformers quantization config from ``spec``: one already built, a preset name (:data:`PRESETS`), a
    dict or JSON text with ``quant_method`` (as a saved model's ``quantization_config``), or a JSON file of one."""
    if spec is None or not isinstance(spec, str | dict):
        method = getattr(spec, "quant_method", None)
        if method is not None:
            check_backend(getattr(method, "value", method), option)
        return spec
    if isinstance(spec, str) and spec in PRESETS:
        check_backend(_method_of(spec), option)
        return _preset(spec)
    if isinstance(spec, str):
        text = Path(spec).read_text(encoding="utf-8") if spec.endswith(".json") and Path(spec).is_file() else spec
        try:
            spec = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(
                f"{option} {text!r} is neither a preset ({', '.join(PRESETS)}) nor JSON; pass one of those, or a "
                'JSON config such as {"quant_method": "bitsandbytes", "load_in_8bit": true}.'
            ) from None
    if not isinstance(spec, dict) or "quant_method" not in spec:
        raise ConfigError(f'{option}: a quantization config needs "quant_method"; or use a preset: int8-weight-only.')
    check_backend(spec["quant_method"], option)
    from transformers.quantizers import AutoQuantizationConfig

    try:
        return AutoQuantizationConfig.from_dict(dict(spec))
    except (ValueError, TypeError, KeyError) as err:
        message = " ".join(str(err).split())[:300]
        raise ConfigError(f"{option}: {message}; see Transformers' quantization docs.") from None


def parse_max_memory(text: str | dict[Any, Any], option: str = "--max-memory") -> dict[int | str, int]:
    """``0=20GiB,cpu=60GiB`` (or the same as JSON, or a dict) as Accelerate's ``max_memory``: GPU indices and
    ``cpu`` to bytes. A GPU this machine does not have is refused (Accelerate would drop it with a warning)."""
    if isinstance(text, dict):
        pairs = list(text.items())
    elif text.lstrip().startswith("{"):
        try:
            pairs = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f'{option} {text!r} is not valid JSON; e.g. {{"0": "20GiB", "cpu": "9GiB"}}.') from None
    else:
        pairs = [part.split("=", 1) for part in text.replace(" ", "").split(",") if part]
        if not pairs or any(len(pair) != 2 for pair in pairs):
            raise ConfigError(f"{option} {text!r} is not DEVICE=SIZE pairs; give e.g. {option} 0=20GiB,cpu=60GiB.")
    limits: dict[int | str, int] = {}
    for key, size in pairs:
        device = _memory_device(str(key), option)
        try:
            limits[device] = convert_file_size_to_int(size) if isinstance(size, str) else int(size)
        except (ValueError, TypeError):
            raise ConfigError(f"{option}: {size!r} is not a size; use e.g. 20GiB, 500MB or bytes.") from None
        if limits[device] <= 0:
            raise ConfigError(f"{option}: {key}={size!r} leaves no memory; give a positive size such as 20GiB.")
    return limits


def _memory_device(key: str, option: str) -> int | str:
    key = key.removeprefix("cuda:")
    if key in ("cpu", "mps"):
        return key
    if not key.isdigit():
        raise ConfigError(f"{option}: {key!r} is not a device; name GPUs by index (0, 1 ...) and the CPU as cpu.")
    if int(key) >= torch.cuda.device_count():
        raise ConfigError(
            f"{option}: GPU {key} is not on this machine ({torch.cuda.device_count()} CUDA GPUs); list only the GPUs "
            "it has, and cpu."
        )
    return int(key)


def resolve_init_kwargs(kwargs: dict[str, Any], option: str = "teacher_model_init_kwargs") -> dict[str, Any]:
    """``from_pretrained`` keyword arguments with the text forms of a config file made real: ``max_memory`` with
    string keys ("0", "cpu"), ``quantization_config`` as a preset name or a dict. A quantization config without a
    ``device_map`` is loaded on the CPU (Transformers' default); the caller moves it."""
    kwargs = dict(kwargs)
    if kwargs.get("max_memory") is not None:
        kwargs["max_memory"] = parse_max_memory(kwargs["max_memory"], f"{option}['max_memory']")
        kwargs.setdefault("device_map", "auto")  # max_memory means nothing without a device map
    if kwargs.get("quantization_config") is not None:
        kwargs["quantization_config"] = quantization_config(
            kwargs["quantization_config"], f"{option}['quantization_config']"
        )
    return kwargs


def device_map_of(text: str | None, option: str = "--device-map") -> Any:
    """``--device-map``: a strategy (:data:`STRATEGIES`), one device (cpu, cuda:1, 0 ...) or JSON ``{module:
    device}``."""
    if text is None or text in STRATEGIES:
        return text
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError:
            mapping = None
        if not isinstance(mapping, dict):
            raise ConfigError(f'{option} {text!r} is not a JSON object; give e.g. {{"model.encoder": 0, "": "cpu"}}.')
        return mapping
    device = int(text) if text.isdigit() else text
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"{option} {text!r} is neither a strategy nor a device; pass {', '.join(STRATEGIES)}, or cpu, cuda:1, 0 ..."
        ) from None
    return {"": device}


def placement_kwargs(
    device_map: str | None = None,
    max_memory: str | None = None,
    offload_folder: str | None = None,
    quantization: str | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the command-line options ``--device-map``, ``--max-memory``,
    ``--offload-folder`` and ``--quantization`` (checked: a ConfigError names the option). ``--max-memory`` or
    ``--offload-folder`` alone mean ``--device-map auto``; a quantized model alone is loaded on ``device``, as
    quantization backends place their weights while loading."""
    kwargs: dict[str, Any] = {}
    if device_map is not None:
        kwargs["device_map"] = device_map_of(device_map)
    if max_memory is not None:
        kwargs["max_memory"] = parse_max_memory(max_memory)
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
    if (max_memory is not None or offload_folder is not None) and device_map is None:
        kwargs["device_map"] = "auto"
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization)
        if "device_map" not in kwargs and device is not None:
            kwargs["device_map"] = {"": str(device)}
    return kwargs


def placement_options(args: Any, device: torch.device | None = None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the placement options of a command (``args``, any object with
    those attributes); a ConfigError names a bad one."""
    if getattr(args, "device", None) and getattr(args, "device_map", None):
        raise ConfigError("--device and --device-map both say where the model goes; pass only one of them.")
    names = ("device_map", "max_memory", "offload_folder", "quantization")
    return placement_kwargs(**{name: getattr(args, name, None) for name in names}, device=device)


def check_offload(model: nn.Module, offload_folder: str | None) -> None:
    """Refuse a placement that left modules for the disk when no offload folder said that was wanted: every
    forward pass would read them from disk, silently many times slower."""
    disk = offloaded_modules(model)
    if disk and not offload_folder:
        raise ConfigError(
            f"the memory given (--max-memory / max_memory) cannot hold the model: {len(disk)} module(s) "
            f"({', '.join(disk[:3])}{' ...' if len(disk) > 3 else ''}) would be read from disk at every forward "
            "pass; give the devices more memory, or pass an offload folder (--offload-folder / offload_folder) to "
            "allow it."
        )


def engine_refusing_placement(args: Any) -> str | None:
    """ "DeepSpeed" or "FSDP" when ``args`` (TrainingArguments) or the launcher's environment turn one on."""
    if getattr(args, "deepspeed", None) or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def check_engine(args: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a placed or quantized teacher under DeepSpeed or FSDP: both place (and shard) every parameter
    themselves, across processes, which a model already spread by a device map or holding quantized tensors
    cannot take."""
    asked = [key for key in PLACEMENT_KEYS if kwargs.get(key) is not None]
    engine = engine_refusing_placement(args) if asked else None
    if engine:
        raise ConfigError(
            f"teacher_model_init_kwargs {asked} with {engine}: {engine} places and shards the teacher itself, so a "
            "device map, offload or quantization cannot be used with it; drop those keys (ZeRO-3 / FSDP shard the "
            "teacher across the processes instead), or train without DeepSpeed/FSDP."
        )


# ---- a placed model ----------------------------------------------------------------------------------------


def is_placed(model: nn.Module) -> bool:
    """Whether Accelerate's big-model inference placed ``model`` (or a member of an ensemble): a device map with
    several entries, or hooks that move weights and inputs, or one device named by the user. Such a model must not
    be moved with ``.to``."""
    marks = ("hf_device_map", "_hf_hook", "hf_kd_placed")  # hf_kd_placed: load_teacher's, for a {"": device} map
    return any(hasattr(module, mark) for module in model.modules() for mark in marks)


def is_quantized(model: nn.Module) -> bool:
    """Whether Transformers quantized ``model`` (or a member) when loading it: it keeps the dtype it was loaded in."""
    return any(getattr(module, "hf_quantizer", None) is not None for module in model.modules())


def offloaded_modules(model: nn.Module) -> list[str]:
    """The modules of ``model``'s device map placed on "disk"."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return [name or "(the whole model)" for name, device in device_map.items() if device == "disk"]


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs go: the execution device of the hook Accelerate put on a placed model (its first
    parameter may be an empty "meta" tensor, its weights on disk), else the device of its first parameter."""
    hook = getattr(model, "_hf_hook", None)
    for part in getattr(hook, "hooks", None) or [hook]:
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return next(model.parameters()).device


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()`` in name order, as plain tensors: a weight offloaded to disk (an empty "meta" tensor in
    the model) read back from where Accelerate keeps it, a quantized tensor as its inner tensors (``name.qdata``,
    ``name.scale`` ...). The same model placed or not gives the same tensors; quantized, other ones."""
    from transformers.integrations.accelerate import load_offloaded_parameter

    for name, tensor in sorted(model.state_dict().items()):
        if tensor.device.type == "meta":
            tensor = load_offloaded_parameter(model, name)
        yield from _plain(name, tensor)


def _plain(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        yield name, tensor
        return
    inner, _ = tensor.__tensor_flatten__()  # torchao's tensor subclasses: qdata, scale ...
    for part in inner:
        yield from _plain(f"{name}.{part}", getattr(tensor, part))
