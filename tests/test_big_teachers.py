"""Teachers bigger than one device: placed by Accelerate's big-model inference (device_map, max_memory, disk offload)
they compute what the plain teacher computes, for the cache, pseudo-labels, evaluate and the live trainer; quantized
through Transformers' configs they compute what torchao's own quantization gives; bad input is one line, exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import random_sentences, tiny_bart
from datasets import Dataset
from helpers import config, one_line_error, run_cli, seq2seq_collator, seq2seq_dataset
from recipe_helpers import write_json_rows
from torch import nn
from transformers import AutoModelForSeq2SeqLM

from hf_kd import DistillationTrainer
from hf_kd.errors import ConfigError
from hf_kd.teachers import placement
from hf_kd.teachers.loading import load_teacher, prepare_teacher
from hf_kd.teachers.placement import is_placed, parse_max_memory, placement_kwargs, quantization_config

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install 'hf-kd[quant]')")
SHARD_SIZE = "3"
# The tiny BART below is about 190 KB in float32: 60 KB of CPU leaves the encoder and decoder layers for the disk.
SMALL = "60KB"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("big")
    tiny_bart(len(tok), seed=5).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    tiny_bart(len(tok), seed=6, d_model=16, layers=1).save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    sources, targets = random_sentences(7, seed=3), random_sentences(7, seed=4, min_len=2, max_len=6)
    rows = [
        {
            "input_ids": tok(s)["input_ids"],
            "attention_mask": [1] * len(tok(s)["input_ids"]),
            "labels": tok(t)["input_ids"],
        }
        for s, t in zip(sources, targets, strict=True)
    ]
    Dataset.from_list(rows).save_to_disk(str(root / "tokenised"))
    Dataset.from_dict({"source": sources, "target": targets}).save_to_disk(str(root / "text"))
    write_json_rows(root / "val.jsonl", [{"doc": s, "sum": t} for s, t in zip(sources, targets, strict=True)])
    return {"root": root, **{name: root / name for name in ("teacher", "student", "tokenised", "text", "val.jsonl")}}


def tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; of a saved data set's state.json, all but the random fingerprint `datasets` gives it."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    for name in [name for name in files if name.endswith("state.json")]:
        state = json.loads(files[name])
        state.pop("_fingerprint")
        files[name] = json.dumps(state).encode()
    return files


def batch(tok, n: int = 3) -> dict[str, torch.Tensor]:
    src = tok(random_sentences(n, seed=21), return_tensors="pt", padding=True)
    tgt = tok(random_sentences(n, seed=22, min_len=2, max_len=6), return_tensors="pt", padding=True)["input_ids"]
    return {**src, "decoder_input_ids": tgt}


def plain(files) -> nn.Module:
    return AutoModelForSeq2SeqLM.from_pretrained(files["teacher"]).eval()


def offloaded(files, tmp_path, memory: str = SMALL) -> nn.Module:
    kwargs = {"device_map": "auto", "max_memory": {"cpu": memory}, "offload_folder": str(tmp_path / "offload")}
    teacher, _ = load_teacher(str(files["teacher"]), SimpleNamespace(teacher_model_init_kwargs=kwargs))
    return teacher


# ---- the options ------------------------------------------------------------------------------------------------


def test_max_memory_in_both_spellings() -> None:
    assert parse_max_memory("cpu=60GiB") == {"cpu": 60 * 2**30}
    assert parse_max_memory('{"cpu": "500MB"}') == {"cpu": 500 * 10**6}
    assert parse_max_memory({"cpu": 1024}) == {"cpu": 1024}
    assert placement_kwargs(max_memory="cpu=1KiB") == {"device_map": "auto", "max_memory": {"cpu": 1024}}
    assert placement_kwargs(device_map="cpu") == {"device_map": {"": "cpu"}}
    assert placement_kwargs(device_map='{"model": "cpu"}') == {"device_map": {"model": "cpu"}}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("cpu:60GiB", ["DEVICE=SIZE"]),
        ("cpu=lots", ["'lots' is not a size"]),
        ('{"cpu": 0}', ["positive"]),
        ("cpu=0", ["'0' is not a size"]),
        ("npu=1GiB", ["'npu' is not a device"]),
        ('{"cpu": ', ["not valid JSON"]),
        (f"{torch.cuda.device_count()}=1GiB", ["is not on this machine"]),
    ],
)
def test_malformed_max_memory_is_refused(text, words) -> None:
    with pytest.raises(ConfigError) as info:
        parse_max_memory(text)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_quantization_backend_not_installed_is_refused(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(placement.importlib.util, "find_spec", lambda name: None if name == "torchao" else real(name))
    for spec in ("int8-weight-only", '{"quant_method": "torchao", "quant_type": "int8_weight_only"}'):
        with pytest.raises(ConfigError, match="torchao quantization backend is not installed; pip install torchao"):
            quantization_config(spec)


def test_quantization_that_is_neither_preset_nor_json_is_refused() -> None:
    with pytest.raises(ConfigError, match="neither a preset"):
        quantization_config("int3")
    with pytest.raises(ConfigError, match="quant_method"):
        quantization_config('{"bits": 8}')


# ---- placed: the same numbers ----------------------------------------------------------------------------------


def test_offloaded_teacher_gives_the_plain_teachers_logits(files, tmp_path, tok) -> None:
    teacher = offloaded(files, tmp_path)
    devices = set(teacher.hf_device_map.values())
    assert devices == {"cpu", "disk"}, teacher.hf_device_map  # both paths: some layers in memory, some read from disk
    inputs = batch(tok)
    with torch.no_grad():
        got, want = teacher(**inputs).logits, plain(files)(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_placed_teacher_is_neither_moved_nor_cast_and_keeps_its_numbers(files, tmp_path, tok) -> None:
    teacher = offloaded(files, tmp_path)
    accelerator = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)
    prepared = prepare_teacher(teacher, SimpleNamespace(bf16=True, fp16=False), accelerator)
    assert prepared is teacher and is_placed(prepared)
    assert {p.dtype for p in prepared.parameters()} == {torch.float32}  # bf16 training does not cast it
    with torch.no_grad():
        torch.testing.assert_close(
            prepared(**batch(tok)).logits, plain(files)(**batch(tok)).logits, rtol=1e-5, atol=1e-6
        )


def test_placed_teacher_with_several_processes_is_warned_about(files, tmp_path, caplog) -> None:
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=2)
    with caplog.at_level("WARNING", logger="hf_kd.teachers.loading"):
        prepare_teacher(offloaded(files, tmp_path), SimpleNamespace(bf16=False, fp16=False), accelerator)
    assert "each holds its own placement" in caplog.text


@pytest.mark.parametrize("engine", [DistributedType.DEEPSPEED, DistributedType.FSDP])
def test_placed_teacher_under_deepspeed_or_fsdp_is_refused(files, tmp_path, engine) -> None:
    accelerator = SimpleNamespace(distributed_type=engine, num_processes=2)
    with pytest.raises(ValueError, match="placed by a device map"):
        prepare_teacher(offloaded(files, tmp_path), SimpleNamespace(bf16=False, fp16=False), accelerator)


@pytest.mark.parametrize(
    ("args", "env"),
    [({"deepspeed": "ds.json"}, {}), ({"fsdp": "full_shard"}, {}), ({}, {"ACCELERATE_USE_FSDP": "true"})],
)
def test_device_map_with_deepspeed_or_fsdp_is_refused_before_loading(files, monkeypatch, args, env) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    options = SimpleNamespace(teacher_model_init_kwargs={"device_map": "auto"}, **args)
    with pytest.raises(ConfigError, match="DeepSpeed|FSDP"):
        load_teacher(str(files["teacher"]), options)


def cache_argv(files, output: Path, *extra: str) -> list[str]:
    return [
        "cache-teacher", "--teacher", str(files["teacher"]), "--dataset", str(files["tokenised"]),
        "--output", str(output), "--k", "4", "--shard-size", SHARD_SIZE, "--tail-samples", "2", *extra,
    ]  # fmt: skip


def label_argv(files, output: Path, *extra: str) -> list[str]:
    return [
        "pseudo-label", "--teacher", str(files["teacher"]), "--dataset", str(files["text"]), "--output", str(output),
        "--source-column", "source", "--max-new-tokens", "4", "--shard-size", SHARD_SIZE, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("argv", [cache_argv, label_argv], ids=["cache-teacher", "pseudo-label"])
def test_offloaded_teacher_writes_the_same_files(capsys, files, tmp_path, argv) -> None:
    """Same shards, checksums and manifest (fingerprint included) as with the teacher whole on the CPU."""
    code, _, err = run_cli(capsys, argv(files, tmp_path / "plain", "--device", "cpu"))
    assert code == 0, err
    offload = ["--max-memory", f"cpu={SMALL}", "--offload-folder", str(tmp_path / "offload")]
    code, _, err = run_cli(capsys, argv(files, tmp_path / "placed", *offload))
    assert code == 0, err
    assert tree(tmp_path / "placed") == tree(tmp_path / "plain")


def test_max_memory_that_cannot_hold_the_model_is_refused(capsys, files, tmp_path) -> None:
    one_line_error(capsys, cache_argv(files, tmp_path / "c", "--max-memory", f"cpu={SMALL}"), "--offload-folder")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--max-memory", "cpu:1GiB"], ["--max-memory", "DEVICE=SIZE"]),
        (["--device", "cpu", "--device-map", "auto"], ["--device-map", "only one"]),
        (["--device-map", "{nope"], ["--device-map", "JSON"]),
        (["--quantization", "int3"], ["--quantization", "neither a preset"]),
    ],
)
def test_bad_placement_options_are_one_line(capsys, files, tmp_path, extra, words) -> None:
    one_line_error(capsys, cache_argv(files, tmp_path / "c", *extra), *words)


def test_missing_quantization_backend_is_one_line(capsys, files, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(placement.importlib.util, "find_spec", lambda name: None)
    one_line_error(capsys, label_argv(files, tmp_path / "p", "--quantization", "bnb-8bit"), "pip install bitsandbytes")


def test_evaluate_offloaded_gives_the_plain_numbers(capsys, files, tmp_path) -> None:
    argv = ["evaluate", "--student", str(files["student"]), "--teacher", str(files["teacher"])]
    argv += ["--data_files", str(files["val.jsonl"]), "--source_column", "doc", "--target_column", "sum"]
    argv += ["--max_new_tokens", "4", "--batch_size", "3", "--no_speed", "--split", "validation"]
    results = {}
    for name, extra in (
        ("plain", ["--device", "cpu"]),
        ("placed", ["--max-memory", f"cpu={SMALL}", "--offload-folder", str(tmp_path / "off")]),
    ):
        code, _, err = run_cli(capsys, [*argv, *extra, "--output", str(tmp_path / f"{name}.json")])
        assert code == 0, err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for role in ("student", "teacher"):
        for key, value in results["plain"][role].items():
            assert results["placed"][role][key] == pytest.approx(value, rel=1e-5), (role, key)


def train_losses(files, tmp_path, tok, name: str, teacher=None, **init_kwargs) -> list[float]:
    student = AutoModelForSeq2SeqLM.from_pretrained(files["student"])
    args = config(tmp_path / name, max_steps=3, loss="forward_kl", alpha=0.5, teacher_model_init_kwargs=init_kwargs)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher if teacher is not None else str(files["teacher"]),
        args=args,
        processing_class=tok,
        train_dataset=seq2seq_dataset(tok, n=12),
        data_collator=seq2seq_collator(tok, student),
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_with_an_offloaded_teacher_trains_as_with_the_plain_one(files, tmp_path, tok) -> None:
    want = train_losses(files, tmp_path, tok, "plain")
    offload = {"device_map": "auto", "max_memory": {"cpu": SMALL}, "offload_folder": str(tmp_path / "off")}
    got = train_losses(files, tmp_path, tok, "placed", **offload)
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5)


# ---- quantized: torchao's numbers ---------------------------------------------------------------------------------


def torchao_int8(files) -> nn.Module:
    """The teacher quantized by torchao directly: its linear layers, not the output layer (as Transformers does)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = plain(files)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head")
    return model


@needs_torchao
def test_int8_teacher_is_torchaos_int8(files, tok) -> None:
    options = SimpleNamespace(teacher_model_init_kwargs={"quantization_config": "int8-weight-only"})
    teacher, _ = load_teacher(str(files["teacher"]), options)
    inputs = batch(tok)
    with torch.no_grad():
        got, want, full = teacher(**inputs).logits, torchao_int8(files)(**inputs).logits, plain(files)(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, full)  # it was quantized ...
    torch.testing.assert_close(got, full, rtol=0.05, atol=0.02)  # ... and is still the teacher


@needs_torchao
def test_int8_cache_is_told_apart_from_the_full_teachers(capsys, files, tmp_path) -> None:
    """Its fingerprint differs (config and weights hashes): a cache is never resumed with the other teacher."""
    assert run_cli(capsys, cache_argv(files, tmp_path / "c", "--device", "cpu"))[0] == 0
    one_line_error(capsys, cache_argv(files, tmp_path / "c", "--quantization", "int8-weight-only"), "--overwrite")
    code, _, err = run_cli(capsys, cache_argv(files, tmp_path / "q", "--quantization", "int8-weight-only"))
    assert code == 0, err
    full, quantized = (json.loads((tmp_path / n / "manifest.json").read_text())["fingerprint"] for n in "cq")
    assert full["teacher_weights_sha256"] != quantized["teacher_weights_sha256"]


@needs_torchao
def test_trainer_with_an_int8_teacher_trains_as_with_torchaos(files, tmp_path, tok) -> None:
    want = train_losses(files, tmp_path, tok, "torchao", teacher=torchao_int8(files))
    got = train_losses(files, tmp_path, tok, "config", quantization_config="int8-weight-only")
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5)
