"""Every recipe config runs (2 steps, tiny local models and data substituted) and every Accelerate config is valid."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from recipe_helpers import save_tiny_models, tiny_overrides
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from hf_kd.cli.distill import main
from hf_kd.recipe.args import DataArguments, parse_recipe_config
from hf_kd.recipe.data import load_raw_datasets
from hf_kd.recipe.run import run_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _load(path: str):
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_pretrained(path)


def test_the_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"bart_large_cnn_to_12_3", "t5_large_to_t5_small_xsum", "gpt2_large_to_distilgpt2_wikitext103"} <= names
    assert any("quickstart" in n for n in names)


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_config_distills_two_steps(config_path, models, tmp_path):
    config = yaml.safe_load(config_path.read_text())
    output_dir = tmp_path / "out"
    model_args, data_args, args = parse_recipe_config(config_path, tiny_overrides(config, models, tmp_path, output_dir))
    # The config's own distillation settings are what runs, not defaults.
    for key in ("loss", "temperature", "alpha", "learning_rate"):
        assert getattr(args, key) == pytest.approx(float(config[key]) if key == "learning_rate" else config[key])

    metrics = run_recipe(model_args, data_args, args)

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert {"kd_loss", "ce_loss", "teacher_agreement"} <= set(state["log_history"][0])
    assert "eval_kd_loss" in metrics and metrics["eval_samples"] > 0
    if config.get("predict_with_generate"):
        assert 0.0 <= metrics["eval_rougeL"] <= 1.0
    assert (output_dir / "README.md").is_file()

    student = _load(str(output_dir))
    if config.get("student_model_name_or_path"):
        initial = _load(model_args.student_model_name_or_path)
        assert type(student) is type(initial) and student.num_parameters() == initial.num_parameters()
        assert student.config.use_cache == initial.config.use_cache  # not left off by activation checkpointing
        changed = [
            not torch.equal(a, b)
            for a, b in zip(student.state_dict().values(), initial.state_dict().values(), strict=True)
        ]
        assert any(changed), "two optimizer steps left the student unchanged"
    else:  # built from the teacher's config with the config's overrides
        teacher = AutoConfig.from_pretrained(args.teacher_model_name_or_path)
        overrides = config.get("student_config_overrides", {})
        assert all(getattr(student.config, key) == value for key, value in overrides.items())
        assert any(getattr(teacher, key) != value for key, value in overrides.items())


def test_quickstart_config_distills_what_the_quickstart_does():
    """quickstart_lm.yaml names the teacher `hf-kd quickstart` saves and repeats its KD student's design."""
    import argparse

    from hf_kd import quickstart
    from hf_kd.cli import quickstart as quickstart_cli

    config = yaml.safe_load((ROOT / "recipes" / "configs" / "quickstart_lm.yaml").read_text())
    parser = quickstart_cli.add_parser(argparse.ArgumentParser().add_subparsers())
    assert config["teacher_model_name_or_path"] == f"{parser.parse_args([]).output_dir}/teacher"
    s = quickstart.Settings()
    width = s.student_width
    assert config["student_config_overrides"] == {"n_layer": s.student_layers, "n_embd": width, "n_head": width // 64}
    assert config["dataset_name"] == "hf_kd/stdlib_docstrings" and s.task == "lm"
    assert (config["loss"], config["alpha"], config["temperature"]) == ("forward_kl", s.alpha, s.temperature)
    assert (config["max_steps"], config["per_device_train_batch_size"], config["block_size"]) == (
        s.student_steps,
        s.batch_size,
        s.block_size,
    )
    assert float(config["learning_rate"]) == s.student_lr


def test_stdlib_docstrings_routes_to_hf_kd_data(monkeypatch):
    import hf_kd.data

    calls = []

    def fake(task="summarize", cache_dir=None):
        calls.append((task, cache_dir))
        return DatasetDict({"train": Dataset.from_dict({"code": ["x"], "summary": ["y"], "module": ["m"]})})

    monkeypatch.setattr(hf_kd.data, "load_stdlib_docstrings", fake)
    for task, expected in (("seq2seq", "summarize"), ("causal", "lm")):
        raw = load_raw_datasets(DataArguments(dataset_name="hf_kd/stdlib_docstrings", cache_dir="/c"), task)
        assert raw["train"]["summary"] == ["y"]
        assert calls[-1] == (expected, "/c")


def test_script_refuses_the_wrong_kind_of_model(models, tmp_path, capsys):
    config_path = ROOT / "recipes" / "configs" / "t5_large_to_t5_small_xsum.yaml"
    overrides = tiny_overrides(yaml.safe_load(config_path.read_text()), models, tmp_path, tmp_path / "out")
    argv = [str(config_path)] + [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]
    assert main("causal", argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill_causal.py: error: student_model_name_or_path=")
    assert "\n" not in err and "use recipes/distill_seq2seq.py" in err
    assert not (tmp_path / "out").exists()


def test_script_help_lists_every_key(capsys):
    assert main("seq2seq", ["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("student_model_name_or_path", "source_column", "temperature", "learning_rate"):
        assert f"--{key}" in out


# ---- Accelerate configs --------------------------------------------------------------------------------------

EXPECTED_SETUP = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}


def accelerate_setup(path: Path):
    """What `accelerate launch --config_file path` would set up: the launch args, the env, and the plugin.

    Raises on unknown keys (top level or in fsdp_config / deepspeed_config) and on invalid values.
    """
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import (
        DeepSpeedPlugin,
        FullyShardedDataParallelPlugin,
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
    )

    cluster = load_config_from_file(str(path))  # unknown top-level keys / distributed_type raise here
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(getattr(cluster, section)) - known
        if unknown:
            raise ValueError(f"{path.name}: {section} keys accelerate launch does not know: {sorted(unknown)}")
    args = parser.parse_args(["--config_file", str(path), "recipes/distill_seq2seq.py", "config.yaml"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    plugin = None
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env):
        if args.use_deepspeed:
            plugin = DeepSpeedPlugin()
        elif args.use_fsdp:
            plugin = FullyShardedDataParallelPlugin()
    return cluster, env, plugin


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_is_a_valid_setup(path):
    cluster, env, plugin = accelerate_setup(path)
    assert cluster.distributed_type.name == EXPECTED_SETUP[path.stem]
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"  # the recipe configs train with bf16: true
    if path.stem == "deepspeed_zero3":
        assert plugin.zero_stage == 3  # teacher.py shards the teacher only under stage 3
        assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    if path.stem == "fsdp":
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
        # Ram-efficient loading gives real weights to rank 0 only, counting on FSDP to broadcast them; the
        # teacher is not wrapped by FSDP, so every other rank would distill from uninitialised weights.
        assert not plugin.cpu_ram_efficient_loading and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"


def test_accelerate_setup_check_rejects_bad_configs(tmp_path):
    fsdp = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text())
    bad_cases = [
        {**fsdp, "distributed_type": "MULTI_GPUS"},
        {**fsdp, "fsdp_config": {**fsdp["fsdp_config"], "fsdp_state_dict_typ": "FULL_STATE_DICT"}},
        {**fsdp, "fsdp_config": {**fsdp["fsdp_config"], "fsdp_state_dict_type": "WHOLE"}},
        {**fsdp, "num_gpus": 8},
    ]
    assert len(ACCELERATE_CONFIGS) == 3
    for i, bad in enumerate(bad_cases):
        path = tmp_path / f"fsdp_bad{i}.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises((ValueError, TypeError, KeyError)):
            accelerate_setup(path)


@pytest.mark.parametrize("script", ["distill_causal.py", "distill_seq2seq.py"])
def test_script_file_runs_as_main(models, tmp_path, monkeypatch, script):
    """What `python recipes/SCRIPT CONFIG --key value` (or accelerate launch of it) executes, in this process."""
    import runpy

    name = "gpt2_large_to_distilgpt2_wikitext103" if "causal" in script else "t5_large_to_t5_small_xsum"
    config_path = ROOT / "recipes" / "configs" / f"{name}.yaml"
    overrides = tiny_overrides(yaml.safe_load(config_path.read_text()), models, tmp_path, tmp_path / "out")
    if "seq2seq" in script:
        overrides["predict_with_generate"] = False  # generation is covered above; keep this one short
    argv = [script, str(config_path)] + [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "recipes" / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["bart_large_cnn_to_12_3", "gpt2_large_to_distilgpt2_wikitext103"])
def test_recipe_saves_its_tokenised_split_then_trains_from_a_cache_of_it(name, models, tmp_path):
    """save_tokenized_train -> hf_kd.teachers.cache_writer.build_teacher_cache -> the same config with
    teacher_cache: the cache is accepted (its content hash is the re-tokenised split's) and the student trains
    without a teacher."""
    from hf_kd.teachers.cache import CachedTeacher
    from hf_kd.teachers.cache_writer import build_teacher_cache

    path = ROOT / "recipes" / "configs" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    overrides = tiny_overrides(config, models, tmp_path, tmp_path / "first")
    tokenised = tmp_path / "train_tokenised"
    metrics = run_recipe(*parse_recipe_config(path, {**overrides, "save_tokenized_train": str(tokenised)}))
    assert not (tmp_path / "first" / "trainer_state.json").exists()  # it stopped before training
    rows = Dataset.load_from_disk(str(tokenised))
    assert metrics["train_samples"] == len(rows) > 0
    teacher = _load(overrides["teacher_model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(overrides["teacher_model_name_or_path"])
    temperature = float(config.get("temperature", 1.0))
    build_teacher_cache(teacher, rows, tmp_path / "cache", tokenizer=tokenizer, k=8, temperature=temperature)

    teacher_dir = overrides["teacher_model_name_or_path"]
    cached = {
        **overrides,
        "output_dir": str(tmp_path / "second"),
        "teacher_model_name_or_path": None,
        "teacher_cache": str(tmp_path / "cache"),
        "tokenizer_name_or_path": teacher_dir,
    }
    if not overrides.get("student_model_name_or_path", config.get("student_model_name_or_path")):
        cached["student_config"] = teacher_dir  # the student was built from the teacher's config
    run_recipe(*parse_recipe_config(path, cached))
    state = json.loads((tmp_path / "second" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["log_history"][0]["kd_loss"] > 0
    assert CachedTeacher(tmp_path / "cache").k == 8
