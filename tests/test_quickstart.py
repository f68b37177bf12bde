"""`hf-kd quickstart --smoke`: the whole pipeline on tiny settings, outputs checked against recomputation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd import quickstart
from hf_kd.metrics import count_parameters, perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(output_dir, cache_dir, *extra):
    argv = ["--smoke", "--threads", "1", "--output-dir", str(output_dir), "--cache-dir", str(cache_dir), *extra]
    assert quickstart.main(argv) == 0
    return json.loads((output_dir / "report.json").read_text())


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("lm")
    return out, _run(out, cache_dir, "--task", "lm")


@pytest.fixture(scope="module")
def summarize_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("summarize")
    return out, _run(out, cache_dir, "--task", "summarize")


@pytest.mark.parametrize("task", ["lm", "summarize"])
def test_smoke_run_outputs_agree_with_recomputation(request, cache_dir, task):
    out, report = request.getfixturevalue(f"{task}_run")
    models = report["models"]
    assert set(models) == {"teacher", "student_ce", "student_kd"}
    assert report["task"] == task and report["teacher_cached"] is False
    assert models["teacher"]["params"] > models["student_kd"]["params"] == models["student_ce"]["params"]

    # report.md shows the numbers of report.json.
    rows = _table_rows((out / "report.md").read_text())
    for key, name in quickstart.MODEL_NAMES.items():
        m = models[key]
        assert rows[name][0] == f"{m['params'] / 1e6:.2f}M"
        assert rows[name][2] == f"{m['tokens_per_second']:.0f}"
        assert rows[name][3] == f"{m['test_perplexity']:.2f}"
        if task == "summarize":
            assert rows[name][4] == f"{m['test_rougeL']:.2f}"
    speed_up = models["student_kd"]["tokens_per_second"] / models["teacher"]["tokens_per_second"]
    assert rows[quickstart.MODEL_NAMES["student_kd"]][1] == f"{speed_up:.2f}x"
    assert report["kd_beats_ce"] == (
        models["student_kd"]["test_perplexity"] < models["student_ce"]["test_perplexity"]
        if task == "lm"
        else models["student_kd"]["test_rougeL"] > models["student_ce"]["test_rougeL"]
    )

    # The plot is a PNG; the curves start at the same point (same initialisation) and cover the steps.
    assert (out / "eval_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ce, kd = report["eval_loss_curves"]["student_ce"], report["eval_loss_curves"]["student_kd"]
    assert ce[0][0] == kd[0][0] == 0 and ce[0][1] == pytest.approx(kd[0][1], rel=1e-5)
    assert ce[-1][0] == kd[-1][0] == report["settings"]["student_steps"]

    # The saved distilled student reloads and gives the reported test metrics again.
    student = AutoModelForCausalLM.from_pretrained(out / "student_kd")
    tokenizer = AutoTokenizer.from_pretrained(out / "student_kd")
    settings = quickstart.Settings(**report["settings"])
    data = quickstart.load_data(settings, cache_dir)
    test = quickstart.featurize(task, data["test"], tokenizer, settings)
    ppl = perplexity(student, test, batch_size=7, data_collator=quickstart.collator(tokenizer))
    assert ppl == pytest.approx(models["student_kd"]["test_perplexity"], rel=1e-4)
    assert count_parameters(student) == models["student_kd"]["params"]
    if task == "summarize":
        predictions = quickstart.summaries(student, tokenizer, test, settings)
        references = list(data["test"]["summary"][: len(predictions)])
        from hf_kd.metrics import rouge

        assert 100 * rouge(predictions, references, ["rougeL"])["rougeL"] == pytest.approx(
            models["student_kd"]["test_rougeL"]
        )
    # So does the saved teacher (with its own tokenizer): the teacher of recipes/configs/quickstart_lm.yaml.
    assert (out / "teacher" / "model.safetensors").is_file()
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher")
    teacher_test = quickstart.featurize(task, data["test"], AutoTokenizer.from_pretrained(out / "teacher"), settings)
    teacher_ppl = perplexity(teacher, teacher_test, batch_size=7, data_collator=quickstart.collator(tokenizer))
    assert teacher_ppl == pytest.approx(models["teacher"]["test_perplexity"], rel=1e-4)
    assert count_parameters(teacher) == models["teacher"]["params"]
    card = (out / "student_kd" / "README.md").read_text()  # the model card, with the distillation section
    assert "distill" in card.lower() and "stdlib docstrings" in card


def test_second_run_reuses_the_cached_teacher(tmp_path, cache_dir, lm_run):
    first = lm_run[1]
    second = _run(tmp_path, cache_dir, "--student-steps", "2")
    assert first["teacher_cached"] is False and second["teacher_cached"] is True
    assert second["models"]["teacher"]["test_perplexity"] == first["models"]["teacher"]["test_perplexity"]
    # The students' first validation point is the same: same initialisation in both runs.
    assert second["eval_loss_curves"]["student_kd"][0] == first["eval_loss_curves"]["student_kd"][0]
    assert re.search(r"--student-steps 2\b", second["command"])
    assert (tmp_path / "teacher" / "model.safetensors").is_file()  # a cached teacher is saved too


def test_students_start_from_the_same_weights(tokenizer):
    settings = quickstart.Settings(**quickstart.SMOKE)
    a = quickstart.build_model(tokenizer, 1, 16, settings, seed=3)
    b = quickstart.build_model(tokenizer, 1, 16, settings, seed=3)
    c = quickstart.build_model(tokenizer, 1, 16, settings, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)


def test_help_describes_the_command(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="hf-kd")
    quickstart.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["quickstart", "--help"])
    text = capsys.readouterr().out
    for option in ("--task", "--output-dir", "--cache-dir", "--seed", "--smoke", "--teacher-steps", "--student-steps"):
        assert option in text


def test_recipe_config_distills_from_the_saved_teacher(lm_run, cache_dir, tmp_path):
    """`hf-kd quickstart` then `hf-kd distill --config recipes/configs/quickstart_lm.yaml`, offline."""
    from pathlib import Path

    from hf_kd.data import load_stdlib_docstrings
    from hf_kd.recipe import run_recipe
    from hf_kd.recipe_args import parse_recipe_config

    out, _ = lm_run
    config = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "quickstart_lm.yaml"
    overrides = {
        "teacher_model_name_or_path": str(out / "teacher"),
        "cache_dir": str(cache_dir),
        "output_dir": str(tmp_path),
        "max_steps": 2,
        "max_eval_samples": 20,
        "use_cpu": True,
        "disable_tqdm": True,
    }
    metrics = run_recipe(*parse_recipe_config(config, overrides))

    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher")
    student = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (student.config.n_layer, student.config.n_embd) == (2, 64)
    assert student.config.vocab_size == teacher.config.vocab_size
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 2
    # Training blocks: the whole lm train split, concatenated 1000 texts at a time (datasets.map batches) and cut
    # into blocks of the smoke teacher's 32 positions (the config's 128 capped), tails dropped.
    tokenizer = AutoTokenizer.from_pretrained(out / "teacher")
    texts = [t for t in load_stdlib_docstrings("lm", cache_dir=cache_dir)["train"]["text"] if t.strip()]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    blocks = sum(sum(lengths[i : i + 1000]) // teacher.config.n_positions for i in range(0, len(lengths), 1000))
    assert metrics["train_samples"] == blocks
    assert "eval_kd_loss" in metrics
