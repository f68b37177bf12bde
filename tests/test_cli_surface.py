"""The `hf-kd` command surface: help, spellings, docs, `evaluate`'s one-line errors, teachers without tokenizers."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import WORDS, make_tokenizer, tiny_gpt2
from helpers import run_cli
from recipe_helpers import save_tiny_models, write_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.cli import build_parser
from hf_kd.teachers.loading import has_vocabulary, load_teacher

COMMANDS = ("distill", "evaluate", "quickstart", "make-student", "cache-teacher", "pseudo-label")
CLI_DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges*")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("lm-data"), {"text": "text"}, n_train=4, n_eval=4)


def without_tokenizer(source: str, target: Path) -> str:
    """A copy of a saved model folder with its tokenizer files left out (as save_pretrained alone writes it)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    assert not list(target.glob("tokenizer*"))
    return str(target)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def one_line_error(capsys, argv: list[str], *words: str) -> str:
    """The command fails with status 2 and one `hf-kd evaluate: error:` line holding ``words``; no traceback."""
    code, out, err = run_cli(capsys, argv)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err and "usage:" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if "error:" in line] == [lines[-1]], err
    assert lines[-1].startswith(f"hf-kd {argv[0]}: error: "), err
    assert all(word in lines[-1] for word in words), lines[-1]
    return lines[-1]


def evaluate_argv(student: str, lm_files: dict[str, str], *extra: str) -> list[str]:
    data = ["--data_files", lm_files["validation"], "--group_texts", "false", "--block_size", "16"]
    return ["evaluate", "--student", student, *data, "--no_speed", *extra]


# ---- the parser --------------------------------------------------------------------------------------------


def test_bare_command_prints_help_and_is_a_usage_error(capsys):
    code, out, err = run_cli(capsys, [])
    assert code == 2 and out == ""
    assert err.startswith("usage: hf-kd") and all(command in err for command in COMMANDS)


def test_every_command_and_option_has_help_text():
    commands = subcommands()
    assert set(commands) == set(COMMANDS)
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in commands.items()
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


def test_docs_list_every_command_and_option():
    docs = CLI_DOCS.read_text(encoding="utf-8")
    missing = []
    for name, parser in subcommands().items():
        assert f"## hf-kd {name}\n" in docs
        section = docs.split(f"## hf-kd {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            shown = action.option_strings[0] if action.option_strings else action.dest.upper()
            if not re.search(rf"`{re.escape(shown)}[` ]", section):
                missing.append(f"{name} {shown}")
    assert missing == []


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_takes_both_spellings(name):
    parser = subcommands()[name]
    for action in parser._actions:
        for option in (o for o in action.option_strings if o.startswith("--")):
            for spelling in (option.replace("_", "-"), "--" + option[2:].replace("-", "_")):
                assert parser._option_string_actions.get(spelling) is action, (name, spelling)


def test_both_spellings_parse_to_the_same_value():
    parser = build_parser()
    for spelling in ("--batch_size", "--batch-size", "--batch-size=3", "--batch"):
        argv = ["evaluate", "--student", "s", *([spelling] if "=" in spelling else [spelling, "3"])]
        assert parser.parse_args(argv).batch_size == 3, spelling
    assert parser.parse_args(["quickstart", "--output_dir", "d", "--teacher_steps", "5"]).teacher_steps == 5
    assert parser.parse_args(["cache-teacher", "--teacher", "t", "--dataset", "d", "--output", "o",
                              "--tail_samples", "4"]).tail_samples == 4  # fmt: skip


def test_distill_overrides_take_kebab_case_keys(tmp_path, lm_files):
    from hf_kd.recipe.args import parse_recipe_config

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "report_to": "none", "data_files": lm_files}))
    _, data_args, args = parse_recipe_config(str(path), ["--max-steps", "3", "--source-prefix=x: "])
    assert args.max_steps == 3 and data_args.source_prefix == "x: "


def test_a_usage_error_is_one_line(capsys):
    one_line_error(capsys, ["evaluate", "--data_files", "x.jsonl"], "required", "--student", "hf-kd evaluate --help")


# ---- hf-kd evaluate: bad inputs ----------------------------------------------------------------------------


def test_evaluate_missing_model_path(capsys, tmp_path, lm_files):
    missing = str(tmp_path / "no" / "student")
    one_line_error(capsys, evaluate_argv(missing, lm_files), f"--student={missing!r}", "no such file or folder")


def test_evaluate_missing_tokenizer_path(capsys, models, lm_files):
    argv = evaluate_argv(models["gpt2"]["student"], lm_files, "--tokenizer", "./no-such-tokenizer")
    one_line_error(capsys, argv, "--tokenizer='./no-such-tokenizer'", "no such file or folder")


def test_evaluate_truncated_safetensors(capsys, tmp_path, models, lm_files):
    student = Path(shutil.copytree(models["gpt2"]["student"], tmp_path / "truncated"))
    weights = student / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    one_line_error(capsys, evaluate_argv(str(student), lm_files), "--student=", "safetensors", "truncated or corrupt")


def test_evaluate_pickle_weights_only(capsys, tmp_path, models, lm_files):
    student = Path(shutil.copytree(models["gpt2"]["student"], tmp_path / "pickled"))
    torch.save(load_file(student / "model.safetensors"), student / "pytorch_model.bin")
    (student / "model.safetensors").unlink()
    one_line_error(capsys, evaluate_argv(str(student), lm_files), "pytorch_model.bin", "safetensors only")


def test_evaluate_refuses_a_teacher_with_another_vocabulary(capsys, tmp_path, models, lm_files):
    words = [w.upper() for w in WORDS]  # same size, no shared word
    teacher = tmp_path / "other-words"
    tiny_gpt2(len(make_tokenizer(words))).save_pretrained(teacher)
    make_tokenizer(words, name="upper-words").save_pretrained(teacher)
    argv = evaluate_argv(models["gpt2"]["student"], lm_files, "--teacher", str(teacher))
    one_line_error(capsys, argv, f"--teacher={str(teacher)!r}", "map tokens to different ids", "without --teacher")


# ---- models saved without tokenizer files ------------------------------------------------------------------


def perplexities(capsys, tmp_path, argv: list[str]) -> dict[str, float]:
    out = tmp_path / f"results-{len(list(tmp_path.glob('results-*')))}.json"
    code, _, err = run_cli(capsys, [*argv, "--output", str(out)])
    assert code == 0, err
    return {role: numbers["perplexity"] for role, numbers in json.loads(out.read_text()).items()}


def test_evaluate_a_teacher_without_tokenizer_files_uses_the_students(capsys, tmp_path, models, lm_files):
    gpt2 = models["gpt2"]
    bare_teacher = without_tokenizer(gpt2["teacher"], tmp_path / "bare-teacher")
    got = perplexities(capsys, tmp_path, evaluate_argv(gpt2["student"], lm_files, "--teacher", bare_teacher))
    # The same weights, evaluated with the tokenizer saved beside them (the students' tokenizer).
    want = perplexities(capsys, tmp_path, evaluate_argv(gpt2["teacher"], lm_files))
    assert got["teacher"] == pytest.approx(want["student"], rel=1e-6)


def test_evaluate_tokenizer_option_for_a_student_without_tokenizer_files(capsys, tmp_path, models, lm_files):
    gpt2 = models["gpt2"]
    bare_student = without_tokenizer(gpt2["student"], tmp_path / "bare-student")
    one_line_error(capsys, evaluate_argv(bare_student, lm_files), "no tokenizer files", "--tokenizer")
    got = perplexities(capsys, tmp_path, evaluate_argv(bare_student, lm_files, "--tokenizer", gpt2["student"]))
    want = perplexities(capsys, tmp_path, evaluate_argv(gpt2["student"], lm_files))
    assert got["student"] == pytest.approx(want["student"], rel=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "t5", "bart"])
def test_load_teacher_without_tokenizer_files_has_no_tokenizer(tmp_path, models, family):
    _, tokenizer = load_teacher(without_tokenizer(models[family]["teacher"], tmp_path / "bare"), None)
    assert tokenizer is None
    _, tokenizer = load_teacher(models[family]["teacher"], None)
    assert tokenizer.get_vocab() == make_tokenizer().get_vocab()


def test_trainer_distills_from_a_teacher_folder_without_tokenizer_files(tmp_path, models):
    gpt2 = models["gpt2"]
    student = AutoModelForCausalLM.from_pretrained(gpt2["student"])
    tokenizer = AutoTokenizer.from_pretrained(gpt2["student"])
    args = DistillationConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=1)
    rows = [{"input_ids": [3, 5, 6, 1], "labels": [3, 5, 6, 1]}] * 2
    trainer = DistillationTrainer(
        model=student,
        teacher_model=without_tokenizer(gpt2["teacher"], tmp_path / "bare"),
        args=args,
        processing_class=tokenizer,
        train_dataset=rows,
    )
    assert trainer.vocab_size == len(tokenizer)


def test_recipe_tokenizer_skips_a_student_folder_without_tokenizer_files(tmp_path, models):
    from hf_kd.recipe.run import load_tokenizer

    model_args = SimpleNamespace(
        tokenizer_name_or_path=None,
        student_model_name_or_path=without_tokenizer(models["gpt2"]["student"], tmp_path / "bare"),
        trust_remote_code=False,
    )
    args = SimpleNamespace(teacher_trust_remote_code=False, teacher_model_name_or_path=models["gpt2"]["teacher"])
    assert load_tokenizer(model_args, args).get_vocab() == make_tokenizer().get_vocab()


@pytest.mark.parametrize("words", [["cat", "dog"], WORDS])
def test_a_small_real_tokenizer_has_a_vocabulary(words):
    # Only special tokens (and T5's lone "▁" piece) mark the placeholder; a real vocabulary of any size counts.
    assert has_vocabulary(make_tokenizer(words))
