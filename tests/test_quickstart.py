"""`hf-kd quickstart --smoke`: the whole pipeline on tiny settings, outputs checked against recomputation."""

from __future__ import annotations

import json
import re
from itertools import pairwise

import pytest
import torch
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from hf_kd import quickstart
from hf_kd.cli import quickstart as quickstart_cli
from hf_kd.data import MASK_TOKEN, text_infilling
from hf_kd.metrics import count_parameters, perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(output_dir, cache_dir, *extra):
    argv = ["--smoke", "--threads", "1", "--output-dir", str(output_dir), "--cache-dir", str(cache_dir), *extra]
    assert quickstart_cli.main(argv) == 0
    return json.loads((output_dir / "report.json").read_text())


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("lm")
    return out, _run(out, cache_dir, "--task", "lm")


@pytest.fixture(scope="module")
def denoise_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("denoise")
    return out, _run(out, cache_dir)  # the default task


def _rouge_l(predictions, references):
    """Mean ROUGE-L F-measure in percent, straight from rouge_score (not through hf_kd.metrics)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return 100 * sum(scores) / len(scores)


@pytest.mark.parametrize("task", ["lm", "denoise"])
def test_smoke_run_outputs_agree_with_recomputation(request, cache_dir, task):
    out, report = request.getfixturevalue(f"{task}_run")
    models = report["models"]
    seq2seq = task == "denoise"
    settings = quickstart.Settings(**report["settings"])
    assert report["task"] == task and report["teacher_cached"] is False
    if seq2seq:  # a BART teacher; a CE and a KD student of T5 architecture (the main pair) and of BART's
        assert set(models) == {"teacher", "student_ce", "student_kd", "student_ce_bart", "student_kd_bart"}
        assert models["teacher"]["architecture"] == "BART 1+1 x 32"
        assert models["student_kd"]["architecture"] == models["student_ce"]["architecture"] == "T5 1+1 x 16"
        assert models["student_kd_bart"]["architecture"] == "BART 1+1 x 16"
    else:
        assert set(models) == {"teacher", "student_ce", "student_kd"}
    assert models["teacher"]["params"] > models["student_kd"]["params"] == models["student_ce"]["params"]

    # report.md shows the numbers of report.json.
    rows = _table_rows((out / "report.md").read_text())
    assert len(rows) == len(models)
    for key, m in models.items():
        row = rows[quickstart.model_name(key, settings)]
        assert row[0] == m["architecture"]
        assert row[1] == f"{m['params'] / 1e6:.2f}M"
        assert row[2] == f"{m['tokens_per_second'] / models['teacher']['tokens_per_second']:.2f}x"
        assert row[3] == f"{m['tokens_per_second']:.0f}"
        assert row[4] == f"{m['test_perplexity']:.2f}"
        if seq2seq:
            assert row[5] == f"{m['test_rougeL']:.2f}"
            assert row[6] == f"{len(set(m['predictions']))} / {len(m['predictions'])}"
    assert "Student (T5), distilled (KD)" in rows if seq2seq else "Student, distilled (KD)" in rows
    expected = {}
    for arch, suffix in (("t5", ""), ("bart", "_bart")) if seq2seq else (("gpt2", ""),):
        kd, ce = models[f"student_kd{suffix}"], models[f"student_ce{suffix}"]
        expected[arch] = {"test_perplexity": kd["test_perplexity"] < ce["test_perplexity"]}
        if seq2seq:
            expected[arch]["test_rougeL"] = kd["test_rougeL"] > ce["test_rougeL"]
    assert report["kd_beats_ce_on"] == expected
    assert report["kd_beats_ce"] == all(expected["t5" if seq2seq else "gpt2"].values())

    # The plot is a PNG; the curves start at the same point (same initialisation) and cover the steps.
    assert (out / "eval_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ce_curve, kd_curve = report["eval_loss_curves"]["student_ce"], report["eval_loss_curves"]["student_kd"]
    assert ce_curve[0][0] == kd_curve[0][0] == 0 and ce_curve[0][1] == pytest.approx(kd_curve[0][1], rel=1e-5)
    assert ce_curve[-1][0] == kd_curve[-1][0] == report["settings"]["student_steps"]
    if seq2seq:
        ce_bart, kd_bart = report["eval_loss_curves"]["student_ce_bart"], report["eval_loss_curves"]["student_kd_bart"]
        assert ce_bart[0][1] == pytest.approx(kd_bart[0][1], rel=1e-5) != pytest.approx(ce_curve[0][1], rel=1e-5)

    # The saved distilled student reloads and gives the reported test metrics again.
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    student = auto.from_pretrained(out / "student_kd")
    tokenizer = AutoTokenizer.from_pretrained(out / "student_kd")
    kd = models["student_kd"]
    data = quickstart.load_data(settings, cache_dir)
    test = quickstart.featurize(task, data["test"], tokenizer, settings)
    ppl = perplexity(student, test, batch_size=7, data_collator=quickstart.collator(tokenizer))
    assert ppl == pytest.approx(kd["test_perplexity"], rel=1e-4)
    assert count_parameters(student) == kd["params"]
    if seq2seq:
        predictions = quickstart.greedy_outputs(student, tokenizer, test, settings)
        assert predictions == kd["predictions"]
        references = list(data["test"]["target"][: len(predictions)])
        assert _rouge_l(predictions, references) == pytest.approx(kd["test_rougeL"])
        # The teacher's conditioning check, recomputed from its outputs.
        check = report["teacher_conditioning"]
        teacher_outputs = models["teacher"]["predictions"]
        assert check["distinct_outputs"] == len(set(teacher_outputs)) and check["outputs"] == len(references)
        constant = check["best_constant"]
        assert _rouge_l([constant] * len(references), references) == pytest.approx(check["best_constant_rougeL"])
        assert check["passes"] == (2 * len(set(teacher_outputs)) >= len(references) and check["ratio"] >= 1.5)
    # So does the saved teacher (with its own tokenizer).
    assert (out / "teacher" / "model.safetensors").is_file()
    teacher = auto.from_pretrained(out / "teacher")
    teacher_test = quickstart.featurize(task, data["test"], AutoTokenizer.from_pretrained(out / "teacher"), settings)
    teacher_ppl = perplexity(teacher, teacher_test, batch_size=7, data_collator=quickstart.collator(tokenizer))
    assert teacher_ppl == pytest.approx(models["teacher"]["test_perplexity"], rel=1e-4)
    assert count_parameters(teacher) == models["teacher"]["params"]
    card = (out / "student_kd" / "README.md").read_text()  # the model card, with the distillation section
    assert "distill" in card.lower() and "stdlib docstrings" in card
    # A card a person would publish: the teacher beside it by name, no local path, the test metrics measured.
    assert "`teacher` (a local folder)" in card
    assert str(out) not in card and str(cache_dir) not in card and "/tmp" not in card
    for metric in ("test_perplexity", "test_rougeL") if seq2seq else ("test_perplexity",):
        assert f"| {metric} | {kd[metric]:.4g} |" in card


def test_second_run_reuses_the_cached_teacher(tmp_path, cache_dir, lm_run):
    first = lm_run[1]
    second = _run(tmp_path, cache_dir, "--task", "lm", "--student-steps", "2")
    assert first["teacher_cached"] is False and second["teacher_cached"] is True
    assert second["models"]["teacher"]["test_perplexity"] == first["models"]["teacher"]["test_perplexity"]
    # The students' first validation point is the same: same initialisation in both runs.
    assert second["eval_loss_curves"]["student_kd"][0] == first["eval_loss_curves"]["student_kd"][0]
    assert re.search(r"--student-steps 2\b", second["command"])
    assert (tmp_path / "teacher" / "model.safetensors").is_file()  # a cached teacher is saved too


def test_kd_students_learn_from_the_teacher_cache(tmp_path, cache_dir, denoise_run):
    """The denoise KD students train from a top-k cache of the teacher, computed once: its rows are the saved
    teacher's own top-k over the training set, and a second run reads the same cache again."""
    from hf_kd.teachers.cache import CachedTeacher

    out, report = denoise_run
    cache = report["teacher_cache"]
    assert (cache["k"], cache["tail_samples"], cache["reused"]) == (64, 64, False)
    settings = quickstart.Settings(**report["settings"])
    tokenizer = AutoTokenizer.from_pretrained(out / "teacher")
    teacher = AutoModelForSeq2SeqLM.from_pretrained(out / "teacher").eval()
    train = quickstart.featurize("denoise", quickstart.load_data(settings, cache_dir)["train"], tokenizer, settings)
    stored = CachedTeacher(cache["path"]).data
    assert len(stored) == len(train)
    for i in (0, len(train) - 1):  # the teacher's log-probabilities, recomputed row by row (no padding)
        row = train[i]
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).logits
        top = torch.log_softmax(logits[0, :, : len(tokenizer)].double(), -1).topk(64)
        cached = torch.tensor(stored[i]["topk_logprobs"], dtype=torch.float64).view(len(row["labels"]), 64)
        assert stored[i]["target_ids"] == row["labels"]
        torch.testing.assert_close(cached, top.values, atol=2e-2, rtol=1e-2)  # stored as float16
        assert torch.tensor(stored[i]["topk_ids"]).view(-1, 64)[:, 0].tolist() == top.indices[:, 0].tolist()
    assert "top-64 cache with 64 tail samples" in (out / "report.md").read_text()
    again = _run(tmp_path, cache_dir, "--student-steps", "2")
    assert again["teacher_cache"]["path"] == cache["path"] and again["teacher_cache"]["reused"] is True


def test_lm_students_learn_from_the_live_teacher(lm_run):
    assert lm_run[1]["teacher_cache"] is None and lm_run[1]["settings"]["cache_k"] == 0


def test_one_thread_unless_asked(tmp_path, monkeypatch):
    """A second thread costs more CPU time than it saves on these models (docs/quickstart.md): one by default."""
    seen = []
    monkeypatch.setattr(quickstart_cli, "run_quickstart", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert quickstart_cli.main(["--smoke", "--output-dir", str(tmp_path)]) == 0
        assert quickstart_cli.main(["--smoke", "--output-dir", str(tmp_path), "--threads", "2"]) == 0
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rerun_on_its_own_output_folder(tmp_path, cache_dir, lm_run, capsys):
    """Same settings: the run writes its own outputs again (the same numbers); other settings: refused, nothing
    touched (they would mix two runs' files)."""
    import shutil

    out, first = lm_run
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    argv = ["--smoke", "--threads", "1", "--output-dir", str(out), "--cache-dir", str(cache_dir), "--task", "lm"]
    assert quickstart_cli.main([*argv, "--student-steps", "2"]) == 2
    assert "holds a quickstart run with other settings" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = _run(copy, cache_dir, "--task", "lm")
    assert again["teacher_cached"] is True
    assert again["models"]["student_kd"]["test_perplexity"] == first["models"]["student_kd"]["test_perplexity"]


@pytest.mark.parametrize("task", ["lm", "denoise"])
def test_students_start_from_the_same_weights(tokenizer, task):
    settings = quickstart.Settings.for_task(task, **quickstart.SMOKE)
    a = quickstart.build_model(tokenizer, 1, 16, settings, seed=3, arch="t5")
    b = quickstart.build_model(tokenizer, 1, 16, settings, seed=3, arch="t5")
    c = quickstart.build_model(tokenizer, 1, 16, settings, seed=4, arch="t5")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    embeddings = a.get_input_embeddings().weight, c.get_input_embeddings().weight
    assert not torch.equal(*embeddings)


def test_bart_teacher_and_t5_student_start_the_decoder_alike(tokenizer):
    """The distillation trainer hands the student's decoder inputs to the teacher: they must be the same."""
    settings = quickstart.Settings.for_task("denoise", **quickstart.SMOKE)
    bart = quickstart.build_model(tokenizer, 1, 32, settings, seed=0)
    t5 = quickstart.build_model(tokenizer, 1, 16, settings, seed=0, arch="t5")
    assert (bart.config.model_type, t5.config.model_type) == ("bart", "t5")
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, -100, -100]])
    expected = torch.tensor([[0, 5, 6, 7], [0, 8, 1, 0]])  # <pad> first, -100 as <pad>
    assert torch.equal(bart.prepare_decoder_input_ids_from_labels(labels=labels), expected)
    assert torch.equal(t5.prepare_decoder_input_ids_from_labels(labels=labels), expected)


def test_conditioning_check_on_known_outputs():
    references = ["return the sum", "open a file", "close the file", "return the sum"]
    candidates = ["return the sum", "the", "open a file"]
    # rouge_score's tokenizer: "return the sum" against the four references, F1 = 1, 0, 1/3, 1.
    constant = quickstart.conditioning(["return the sum"] * 4, references, candidates)
    assert constant["best_constant"] == "return the sum"
    assert constant["best_constant_rougeL"] == pytest.approx(100 * (1 + 0 + 1 / 3 + 1) / 4)
    assert constant["distinct_outputs"] == 1 and constant["ratio"] == pytest.approx(1.0)
    assert not constant["passes"]
    perfect = quickstart.conditioning(references, references, candidates)
    assert perfect["distinct_outputs"] == 3 and perfect["rougeL"] == pytest.approx(100.0)
    assert perfect["ratio"] == pytest.approx(100 / constant["best_constant_rougeL"]) and perfect["passes"]
    # Distinct but no better than a constant: fails on the ratio alone.
    shuffled = quickstart.conditioning(["close the file", "return the sum", "open a file", "x"], references, candidates)
    assert shuffled["distinct_outputs"] == 4 and shuffled["ratio"] < 1.5 and not shuffled["passes"]


def test_constant_candidates():
    targets = ["Return the sum.", "Open a file.", "Return the sum.", "Return the file."]
    candidates = quickstart.constant_candidates(targets, [["x", "y", "y"]], k=3)
    assert candidates[0] == "Return the sum."  # most frequent target first
    assert "y" in candidates  # a model's most frequent output
    assert "the return" in candidates or "return the" in candidates  # frequent words, in frequency order
    assert len(candidates) == len(set(candidates))


def test_text_infilling_masks_spans_of_the_target():
    text = " ".join(f"w{i}" for i in range(60))
    source, target = text_infilling(text, mask_fraction=0.3, max_words=40, seed="m")
    assert target == " ".join(f"w{i}" for i in range(40))
    assert text_infilling(text, mask_fraction=0.3, max_words=40, seed="m") == (source, target)  # deterministic
    assert text_infilling(text, mask_fraction=0.3, max_words=40, seed="other")[0] != source
    kept = source.split()
    assert MASK_TOKEN in kept and all(a != b for a, b in pairwise(kept))  # no two masks in a row
    # Each mask stands for a gap of >= 1 word; the kept words are in order and the masked share is 30% of 40.
    positions = [-1, *(int(w[1:]) for w in kept if w != MASK_TOKEN), 40]
    gaps = [b - a - 1 for a, b in pairwise(positions)]
    assert sum(gaps) == 12 and sum(g > 0 for g in gaps) == kept.count(MASK_TOKEN)


def test_summarize_rows_are_source_and_target(cache_dir, tokenizer):
    settings = quickstart.Settings.for_task("summarize", **quickstart.SMOKE)
    data = quickstart.load_data(settings, cache_dir)
    rows = quickstart.featurize("summarize", data["test"].select(range(3)), tokenizer, settings)
    for row, raw in zip(rows, data["test"].select(range(3)), strict=True):
        assert row["input_ids"] == tokenizer(raw["code"])["input_ids"][: settings.source_length - 1] + [1]
        assert row["labels"] == tokenizer(raw["summary"])["input_ids"][: settings.target_length - 1] + [1]


def test_help_describes_the_command(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="hf-kd")
    quickstart_cli.add_parser(parser.add_subparsers())
    assert parser.parse_args(["quickstart"]).task == "denoise"
    with pytest.raises(SystemExit):
        parser.parse_args(["quickstart", "--help"])
    text = capsys.readouterr().out
    for option in ("--task", "--output-dir", "--cache-dir", "--seed", "--smoke", "--teacher-steps", "--student-archs"):
        assert option in text
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["quickstart", "--student-archs", "t5,gpt2"])
    assert exit_info.value.code == 2 and "use t5, bart or t5,bart" in capsys.readouterr().err


def test_recipe_config_distills_from_the_saved_teacher(lm_run, cache_dir, tmp_path):
    """`hf-kd quickstart --task lm` then `hf-kd distill --config recipes/configs/quickstart_lm.yaml`, offline."""
    from pathlib import Path

    from hf_kd.data import load_stdlib_docstrings
    from hf_kd.recipe.args import parse_recipe_config
    from hf_kd.recipe.run import run_recipe

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
