"""`hf-kd distill` and `hf-kd evaluate`: one-line errors, an end-to-end run, and numbers checked by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import random_sentences
from recipe_helpers import save_tiny_models, write_data, write_json_rows
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from hf_kd.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("lm-data"), {"text": "text"}, n_train=16, n_eval=4)


def tiny_causal_config(models, data_files, output_dir, **extra) -> dict:
    config = {
        "teacher_model_name_or_path": models["gpt2"]["teacher"],
        "student_model_name_or_path": models["gpt2"]["student"],
        "data_files": data_files,
        "group_texts": False,
        "block_size": 16,
        "loss": "forward_kl",
        "temperature": 2.0,
        "alpha": 0.3,
        "output_dir": str(output_dir),
        "max_steps": 2,
        "learning_rate": 0.01,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    config.update(extra)
    return config


def write_config(path, config) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def one_line_error(capsys, argv) -> str:
    """The message after a failed command: one line, the last on stderr (progress bars may come before it)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert [line for line in err.splitlines() if "error:" in line] == [last] and " error: " in last, err
    return last


# ---- errors --------------------------------------------------------------------------------------------------


def test_missing_config_file(capsys, tmp_path):
    err = one_line_error(capsys, ["distill", "--config", str(tmp_path / "nope.yaml")])
    assert err.startswith("hf-kd distill: error:") and "nope.yaml" in err


def test_invalid_yaml(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("loss: forward_kl\n  alpha: [0.5\n")
    err = one_line_error(capsys, ["distill", "--config", str(path)])
    assert "broken.yaml" in err and "YAML" in err


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"learning_rat": 0.1}, ["'learning_rat'", "did you mean 'learning_rate'"]),
        ({"max_steps": "ten"}, ["'max_steps'", "integer", "'ten'"]),
        ({"alpha": [0.5]}, ["'alpha'", "number", "[0.5]"]),
        ({"eval_strategy": "sometimes"}, ["'eval_strategy'", "'steps'", "'sometimes'"]),
        ({"group_texts": "maybe"}, ["'group_texts'", "boolean"]),
        ({"loss": "kl"}, ["'loss'", "'kl'", "forward_kl"]),
        ({"train_sampling_strategy": "shuffled"}, ["'train_sampling_strategy'", "'shuffled'", "group_by_length"]),
        ({"temperature": 0}, ["temperature=0", "> 0"]),
    ],
)
def test_bad_key_or_value_in_the_yaml(capsys, tmp_path, models, lm_files, bad, named):
    path = write_config(tmp_path / "c.yaml", tiny_causal_config(models, lm_files, tmp_path / "out", **bad))
    err = one_line_error(capsys, ["distill", "--config", path])
    assert all(part in err for part in named), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, named",
    [
        (["--per_device_train_batch_size", "two"], ["'per_device_train_batch_size'", "integer", "'two'"]),
        (["--temprature", "2"], ["'temprature'", "did you mean 'temperature'"]),
        (["--student_model_name_or_path", "/no/such/student"], ["student_model_name_or_path", "/no/such/student"]),
        (["--teacher_model_name_or_path", "/no/such/teacher"], ["teacher_model_name_or_path", "/no/such/teacher"]),
        (["--data_files", '{"train": "/no/such/file.jsonl"}'], ["data_files", "/no/such/file.jsonl"]),
        (["--text_column", "body"], ["text_column='body'", "['text']"]),
        (["--train_split", "training"], ["train_split='training'"]),
        (["oops"], ["'oops'", "--key value"]),
    ],
)
def test_bad_override(capsys, tmp_path, models, lm_files, override, named):
    path = write_config(tmp_path / "c.yaml", tiny_causal_config(models, lm_files, tmp_path / "out"))
    err = one_line_error(capsys, ["distill", "--config", path, *override])
    assert all(part in err for part in named), err


def test_evaluate_errors_name_the_path(capsys, tmp_path, models, lm_files):
    err = one_line_error(capsys, ["evaluate", "--student", "/no/such/student", "--data_files", lm_files["validation"]])
    assert err.startswith("hf-kd evaluate: error:") and "/no/such/student" in err
    err = one_line_error(
        capsys, ["evaluate", "--student", models["gpt2"]["student"], "--data_files", str(tmp_path / "none.jsonl")]
    )
    assert "none.jsonl" in err
    student, data = models["gpt2"]["student"], lm_files["validation"]
    err = one_line_error(capsys, ["evaluate", "--student", student, "--teacher", "/no/teacher", "--data_files", data])
    assert "--teacher='/no/teacher'" in err
    err = one_line_error(
        capsys, ["evaluate", "--student", student, "--teacher", models["t5"]["teacher"], "--data_files", data]
    )
    assert "--teacher=" in err and "seq2seq but the student is causal" in err


def test_help_describes_the_subcommands(capsys):
    for command, words in (("distill", ["--config", "--key value"]), ("evaluate", ["--student", "--teacher"])):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words) and "example" in out


# ---- distill end to end --------------------------------------------------------------------------------------


def reference_kd_loss(student, teacher, tokenizer, texts, temperature, alpha) -> float:
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) over all target tokens, in plain torch."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"].eq(0), -100)[:, 1:]
    with torch.no_grad():
        s = student(**batch).logits[:, :-1].float()
        t = teacher(**batch).logits[:, :-1].float()
    mask = labels.ne(-100)
    s_log = F.log_softmax(s / temperature, -1)[mask]
    t_log = F.log_softmax(t / temperature, -1)[mask]
    kl = (t_log.exp() * (t_log - s_log)).sum(-1).mean()
    ce = F.cross_entropy(s[mask], labels[mask])
    return float(alpha * ce + (1 - alpha) * temperature**2 * kl)


def test_distill_end_to_end_saves_a_trained_student(capsys, tmp_path, models, lm_files):
    output_dir = tmp_path / "student-out"
    path = write_config(tmp_path / "c.yaml", tiny_causal_config(models, lm_files, output_dir, learning_rate=1))
    # An override wins over the YAML value.
    assert main(["distill", "--config", path, "--learning_rate", "5e-2", "--seed", "3"]) == 0
    assert "Saved the student" in capsys.readouterr().out

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["log_history"][0]["learning_rate"] == pytest.approx(5e-2)
    student = AutoModelForCausalLM.from_pretrained(output_dir)
    initial = AutoModelForCausalLM.from_pretrained(models["gpt2"]["student"])
    teacher = AutoModelForCausalLM.from_pretrained(models["gpt2"]["teacher"])
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert not torch.equal(student.transformer.wte.weight, initial.transformer.wte.weight)

    # The reported objective (one batch of 4 rows) is the distillation loss of the saved student, recomputed; the
    # eval loss is its CE on the labels (alpha = 1).
    texts = [json.loads(line)["text"] for line in open(lm_files["validation"])]
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    expected = reference_kd_loss(student.eval(), teacher.eval(), tokenizer, texts, temperature=2.0, alpha=0.3)
    assert eval_results["eval_distillation_loss"] == pytest.approx(expected, rel=1e-4)
    assert eval_results["eval_distillation_loss"] != pytest.approx(
        reference_kd_loss(initial.eval(), teacher.eval(), tokenizer, texts, 2.0, 0.3), rel=1e-4
    )
    ce = reference_kd_loss(student.eval(), teacher.eval(), tokenizer, texts, temperature=2.0, alpha=1.0)
    assert eval_results["eval_loss"] == pytest.approx(ce, rel=1e-4)


# ---- evaluate ------------------------------------------------------------------------------------------------


def manual_perplexity(model, pairs) -> float:
    """exp(mean CE over all target tokens), one row at a time, with the model's own loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in pairs:
            n = int((labels[:, 1:] if not model.config.is_encoder_decoder else labels).ne(-100).sum())
            total += float(model(**inputs, labels=labels).loss) * n
            count += n
    return math.exp(total / count)


def test_evaluate_seq2seq_matches_a_direct_computation(capsys, tmp_path, models):
    sources = random_sentences(5, seed=7)
    targets = random_sentences(5, seed=8, min_len=2, max_len=6)
    rows = [{"doc": s, "sum": t} for s, t in zip(sources, targets, strict=True)]
    data = write_json_rows(tmp_path / "val.jsonl", rows)
    config = write_config(
        tmp_path / "r.yaml", {"teacher_model_name_or_path": models["t5"]["teacher"], "data_files": data}
    )
    out = tmp_path / "results.json"
    argv = ["evaluate", "--student", models["t5"]["student"], "--config", config, "--data_files", data]
    argv += ["--source_column", "doc", "--target_column", "sum", "--max_source_length", "16"]
    argv += ["--max_target_length", "8", "--max_new_tokens", "5", "--batch_size", "3", "--speed_samples", "2"]
    assert main([*argv, "--output", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results) == {"student", "teacher"} and "rougeL" in table

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for role in ("student", "teacher"):
        model = AutoModelForSeq2SeqLM.from_pretrained(models["t5"][role]).eval()
        tok = AutoTokenizer.from_pretrained(models["t5"][role])
        pairs, predictions = [], []
        for source, target in zip(sources, targets, strict=True):
            inputs = tok(source, max_length=16, truncation=True, return_tensors="pt")
            labels = tok(text_target=target, max_length=8, truncation=True, return_tensors="pt")["input_ids"]
            pairs.append((inputs, labels))
            generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=1)
            predictions.append(tok.decode(generated[0], skip_special_tokens=True).strip())
        rouge_l = sum(scorer.score(t, p)["rougeL"].fmeasure for t, p in zip(targets, predictions, strict=True)) / len(
            targets
        )
        got = results[role]
        assert got["parameters"] == sum(p.numel() for p in model.parameters())
        assert got["perplexity"] == pytest.approx(manual_perplexity(model, pairs), rel=1e-4)
        assert got["rougeL"] == pytest.approx(rouge_l, abs=1e-6)
        assert got["generation_tokens_per_second"] > 0
    assert results["student"]["parameters"] < results["teacher"]["parameters"]


def test_evaluate_causal_perplexity_matches_a_direct_computation(capsys, tmp_path, models, lm_files):
    argv = ["evaluate", "--student", models["gpt2"]["student"], "--data_files", lm_files["validation"]]
    argv += ["--group_texts", "false", "--block_size", "16", "--batch_size", "3", "--no_speed"]
    out = tmp_path / "r.json"
    assert main([*argv, "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"student"} and set(results["student"]) == {"parameters", "perplexity"}

    model = AutoModelForCausalLM.from_pretrained(models["gpt2"]["student"]).eval()
    tok = AutoTokenizer.from_pretrained(models["gpt2"]["student"])
    texts = [json.loads(line)["text"] for line in open(lm_files["validation"])]
    pairs = []
    for text in texts:
        inputs = tok(text, max_length=16, truncation=True, return_tensors="pt")
        pairs.append((inputs, inputs["input_ids"]))
    assert results["student"]["perplexity"] == pytest.approx(manual_perplexity(model, pairs), rel=1e-4)


def test_teacher_with_another_tokenizer_is_a_one_line_error(capsys, tmp_path, models, lm_files):
    from conftest import WORDS, make_tokenizer, tiny_gpt2

    words = list(reversed(WORDS))  # same size, other ids
    teacher_dir = tmp_path / "other-teacher"
    tiny_gpt2(len(make_tokenizer(words))).save_pretrained(teacher_dir)
    make_tokenizer(words, name="reversed-words").save_pretrained(teacher_dir)
    path = write_config(tmp_path / "c.yaml", tiny_causal_config(models, lm_files, tmp_path / "out"))
    err = one_line_error(capsys, ["distill", "--config", path, "--teacher_model_name_or_path", str(teacher_dir)])
    assert "map tokens to different ids" in err


def test_override_values_are_read_as_yaml_then_as_text(models, lm_files, tmp_path):
    from hf_kd.recipe.args import parse_recipe_config

    path = write_config(tmp_path / "c.yaml", tiny_causal_config(models, lm_files, tmp_path / "out"))
    tokens = ["--learning_rate", "5e-5", "--max_steps=7", "--eval_split", "null", "--source_prefix", "summarize: "]
    tokens += ["--teacher_model_init_kwargs", '{"dtype": "float32"}', "--group_texts", "--loss", "jsd"]
    model_args, data_args, args = parse_recipe_config(path, tokens)
    assert args.learning_rate == 5e-5 and args.max_steps == 7 and args.loss == "jsd"
    assert data_args.eval_split is None and data_args.source_prefix == "summarize: " and data_args.group_texts
    assert args.teacher_model_init_kwargs == {"dtype": "float32"}
    assert args.alpha == 0.3  # untouched keys keep the YAML's value
