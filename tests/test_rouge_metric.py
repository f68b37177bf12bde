"""hf_kd's ROUGE `evaluate` module: loads offline, and scores as rouge_score computed directly does."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
from conftest import make_tokenizer, random_sentences, tiny_t5
from recipe_helpers import write_json_rows
from rouge_score import rouge_scorer
from transformers import EvalPrediction

import hf_kd.metrics
from hf_kd.cli import main
from hf_kd.metrics import ROUGE_PATH, load_metric, load_rouge, rouge
from hf_kd.recipe.run import rouge_metrics

KEYS = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
PREDICTIONS = [
    "the cat sat on the mat",
    "the sun rose over the hills.\nbirds sang in the trees",  # sentences on lines: rougeLsum is not rougeL
    "",  # an empty prediction scores 0
    "Running dogs jumped over fences",
    "a b c d",
]
REFERENCES = [
    "the cat is on the mat",
    "birds sang in the trees.\nthe sun rose over the hills",
    "a reference with words",
    "the dog runs and jumps over the fence",
    "d c b a",
]


def direct(predictions, references, use_stemmer=False, tokenizer=None, rouge_types=KEYS):
    """Per-example F-measures from rouge_score itself (references may be lists: the best one counts)."""
    scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)
    out = {key: [] for key in rouge_types}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction) if isinstance(reference, str) else scorer.score_multi(
            reference, prediction
        )
        for key in rouge_types:
            out[key].append(scores[key].fmeasure)
    return out


@pytest.fixture(scope="module")
def metric():
    return load_rouge()


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_module_matches_rouge_score(metric, use_stemmer):
    expected = direct(PREDICTIONS, REFERENCES, use_stemmer=use_stemmer)
    per_example = metric.compute(
        predictions=PREDICTIONS, references=REFERENCES, use_aggregator=False, use_stemmer=use_stemmer
    )
    assert list(per_example) == KEYS
    for key in KEYS:
        assert per_example[key] == pytest.approx(expected[key], abs=1e-12), key
    mean = metric.compute(predictions=PREDICTIONS, references=REFERENCES, use_stemmer=use_stemmer)
    assert mean == {key: pytest.approx(float(np.mean(expected[key])), abs=1e-12) for key in KEYS}
    # The cases the pairs are there for: an empty prediction, sentences on lines, and the stemmer at work.
    assert all(per_example[key][2] == 0 for key in KEYS)
    assert per_example["rougeLsum"][1] == 1.0 and per_example["rougeL"][1] == pytest.approx(6 / 11)
    stemmed = direct(PREDICTIONS[3:4], REFERENCES[3:4], use_stemmer=True)["rouge1"][0]
    plain = direct(PREDICTIONS[3:4], REFERENCES[3:4])["rouge1"][0]
    assert stemmed > plain and per_example["rouge1"][3] == pytest.approx(stemmed if use_stemmer else plain)


def test_module_options_multi_reference_and_tokenizer(metric):
    references = [[r, p] if i % 2 else [r] for i, (p, r) in enumerate(zip(PREDICTIONS, REFERENCES, strict=True))]
    got = metric.compute(predictions=PREDICTIONS, references=references, use_aggregator=False)
    assert got["rougeL"] == pytest.approx(direct(PREDICTIONS, references)["rougeL"], abs=1e-12)
    assert got["rougeL"][1] == pytest.approx(1.0)  # the prediction itself was among the references

    class Split:
        def tokenize(self, text):
            return text.split()

    got = metric.compute(
        predictions=PREDICTIONS, references=REFERENCES, rouge_types=["rouge2"], tokenizer=str.split,
        use_aggregator=False,
    )  # fmt: skip
    assert list(got) == ["rouge2"]
    expected = direct(PREDICTIONS, REFERENCES, tokenizer=Split(), rouge_types=["rouge2"])["rouge2"]
    assert got["rouge2"] == pytest.approx(expected, abs=1e-12)
    assert got["rouge2"] != pytest.approx(direct(PREDICTIONS, REFERENCES, rouge_types=["rouge2"])["rouge2"])


def test_helper_goes_through_the_module(monkeypatch):
    expected = direct(PREDICTIONS, REFERENCES)
    assert rouge(PREDICTIONS, REFERENCES) == {k: pytest.approx(float(np.mean(v)), abs=1e-12) for k, v in
                                              expected.items()}
    # Mixed reference formats are made one for evaluate; empty input is no error.
    mixed = rouge(["a b", "c d"], ["a b", ["x", "c d"]], rouge_types=["rouge1"], use_aggregator=False)
    assert mixed == {"rouge1": [1.0, 1.0]}
    assert rouge([], [], rouge_types=["rougeL"]) == {"rougeL": 0.0}

    calls = []

    class Spy:
        def compute(self, **kwargs):
            calls.append(kwargs)
            return {"rougeL": 0.5}

    monkeypatch.setattr(hf_kd.metrics, "_shared_rouge", lambda: Spy())
    assert rouge(["x"], ["y"], rouge_types=["rougeL"]) == {"rougeL": 0.5}
    assert calls and calls[0]["predictions"] == ["x"] and calls[0]["rouge_types"] == ["rougeL"]


@pytest.mark.slow  # a new interpreter importing evaluate (and with it transformers): several seconds
def test_loads_offline_in_a_fresh_process(tmp_path):
    """evaluate.load(ROUGE_PATH) with the Hub switched off, in a process that has imported nothing else."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path)}
    code = (
        "import json, sys, evaluate; m = evaluate.load(sys.argv[1]); "
        "print(json.dumps(m.compute(predictions=json.loads(sys.argv[2]), references=json.loads(sys.argv[3]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, ROUGE_PATH, json.dumps(PREDICTIONS), json.dumps(REFERENCES)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = direct(PREDICTIONS, REFERENCES)
    assert got == {key: pytest.approx(float(np.mean(expected[key])), abs=1e-12) for key in KEYS}
    assert Path(ROUGE_PATH, "rouge.py").is_file() and isinstance(load_metric("rouge"), evaluate.EvaluationModule)


def test_recipe_compute_metrics_scores_decoded_generations(metric):
    tokenizer = make_tokenizer()
    predictions = random_sentences(4, seed=3)
    references = random_sentences(4, seed=4)

    def ids(texts, width=14):
        rows = [tokenizer(t)["input_ids"] for t in texts]
        return np.array([row + [-100] * (width - len(row)) for row in rows])

    got = rouge_metrics(tokenizer)(EvalPrediction(predictions=ids(predictions), label_ids=ids(references)))
    expected = direct(predictions, references)
    assert got == {key: pytest.approx(float(np.mean(expected[key])), abs=1e-12) for key in KEYS}


# ---- hf-kd evaluate --metric -----------------------------------------------------------------------------------

TARGETS = ["one two", "one two three four", "five six seven"]
METRIC_SCRIPT = '''
import datasets
import evaluate


class WordCount(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="test", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return {"reference_words": sum(len(r.split()) for r in references) / len(references),
                "words": [len(p.split()) for p in predictions], "rows": len(predictions)}
'''


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-metric")
    tokenizer = make_tokenizer()
    tiny_t5(len(tokenizer), seed=1).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    rows = [{"src": s, "tgt": t} for s, t in zip(random_sentences(3, seed=5), TARGETS, strict=True)]
    data = write_json_rows(root / "val.jsonl", rows)
    argv = ["evaluate", "--student", str(root / "student"), "--data_files", data, "--source_column", "src"]
    argv += ["--target_column", "tgt", "--max_new_tokens", "4", "--no_speed", "--device", "cpu"]
    return root, argv


def test_evaluate_takes_a_local_metric(capsys, seq2seq_run):
    root, argv = seq2seq_run
    folder = root / "word_count"
    folder.mkdir()
    (folder / "word_count.py").write_text(METRIC_SCRIPT)
    out = root / "results.json"
    assert main([*argv, "--metric", str(folder), "--output", str(out)]) == 0
    student = json.loads(out.read_text())["student"]
    assert student["rows"] == 3 and student["reference_words"] == 3.0  # the metric's scalars; its list is left out
    assert "words" not in student and not any(k.startswith("rouge") for k in student)

    assert main([*argv, "--output", str(out)]) == 0  # the default: hf_kd's ROUGE
    assert set(KEYS) <= set(json.loads(out.read_text())["student"])
    capsys.readouterr()


@pytest.mark.parametrize("name", ["no-such-metric-xyz", "some-org/no-such-metric", "./missing/folder"])
def test_evaluate_refuses_a_metric_that_cannot_be_loaded(capsys, seq2seq_run, monkeypatch, name):
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    root, argv = seq2seq_run
    assert main([*argv, "--metric", name]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err + captured.out
    last = err.splitlines()[-1]
    assert [line for line in err.splitlines() if "error:" in line] == [last]
    assert last.startswith("hf-kd evaluate: error: --metric") and repr(name) in last and "rouge" in last
    assert "perplexity" not in captured.out  # refused before any model was evaluated


def test_metric_folder_ships_in_the_package():
    """evaluate reads the script from a folder, not a package: pyproject must ship it as package data."""
    root = Path(__file__).resolve().parents[1]
    section = (root / "pyproject.toml").read_text().split("[tool.setuptools.package-data]\n", 1)[1]
    globs = re.findall(r'"([^"]+)"', re.search(r"^hf_kd = \[(.*)\]$", section, re.MULTILINE)[1])
    script = (Path(ROUGE_PATH) / "rouge.py").relative_to(root / "hf_kd")
    assert any(fnmatch.fnmatch(str(script), pattern) for pattern in globs), (script, globs)
