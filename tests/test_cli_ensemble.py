"""`hf-kd cache-teacher` with several teachers: the cached rows are those of the weighted mixture of their
probabilities, checked against a float64 computation in plain torch; bad ensembles are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_tokenizer, random_sentences, tiny_gpt2
from datasets import Dataset

from hf_kd.cli import build_parser, main
from hf_kd.teachers.shards import load_sharded

K = 8
WEIGHTS = (0.7, 0.3)


def sharp_gpt2(vocab_size: int, seed: int):
    """A tiny GPT-2 whose next-token distributions are far from uniform (logits of std ~5, not ~0.1), so that
    mixtures with other weights differ by far more than the float16 storage error."""
    model = tiny_gpt2(vocab_size, seed=seed)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(50.0)  # tied with the output layer
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two teachers saved with one tokenizer, a third with another, and a tokenised data set."""
    root = tmp_path_factory.mktemp("ensemble")
    tok = make_tokenizer()
    for name, seed in (("a", 1), ("b", 2)):
        sharp_gpt2(len(tok), seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    other = make_tokenizer(list(reversed(WORDS)), name="reversed-words")  # same size, other ids
    sharp_gpt2(len(other), 3).save_pretrained(root / "other")
    other.save_pretrained(root / "other")
    rows = []
    for text in random_sentences(5, seed=4, min_len=4, max_len=12):
        ids = tok(text)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    Dataset.from_list(rows).save_to_disk(str(root / "data"))
    return {name: root / name for name in ("a", "b", "other", "data")} | {"root": root}


def cache_argv(files: dict[str, Path], output: Path, *teachers: str) -> list[str]:
    return [
        "cache-teacher", *teachers, "--dataset", str(files["data"]), "--output", str(output), "--k", str(K),
        "--device", "cpu", "--dtype", "float32", "--batch-size", "2",
    ]  # fmt: skip


def one_line_error(capsys, argv: list[str], *words: str) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]  # progress bars of model loading may come first
    assert [line for line in lines if "error:" in line] == lines[-1:], err
    assert lines[-1].startswith("hf-kd cache-teacher: error: "), err
    assert all(word in lines[-1] for word in words), lines[-1]
    return lines[-1]


@torch.no_grad()
def mixture_logprobs(paths: list[Path], weights: tuple[float, ...], input_ids: list[int]) -> torch.Tensor:
    """log(sum_i w_i softmax(z_i)) in float64 at every position that predicts a next token: [len - 1, vocab]."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([input_ids])
    mixed = 0
    for path, weight in zip(paths, weights, strict=True):
        logits = AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits[0, :-1].double()
        mixed = mixed + weight / sum(weights) * torch.softmax(logits, dim=-1)
    return mixed.log()


def test_both_spellings_name_several_teachers():
    parser = build_parser()
    base = ["cache-teacher", "--dataset", "d", "--output", "o"]
    repeated = parser.parse_args([*base, "--teacher", "A", "--teacher", "B", "--teacher-weights", "0.7,0.3"])
    listed = parser.parse_args([*base, "--teacher", "A", "B", "--teacher_weights", "0.7, 0.3"])
    assert repeated.teacher == listed.teacher == ["A", "B"]
    assert repeated.teacher_weights == listed.teacher_weights == [0.7, 0.3]
    assert parser.parse_args([*base, "--teacher", "A"]).teacher == ["A"]


def test_ensemble_cache_holds_the_weighted_mixture(capsys, tmp_path, files):
    out = tmp_path / "cache"
    argv = cache_argv(files, out, "--teacher", str(files["a"]), "--teacher", str(files["b"]))
    assert main([*argv, "--teacher-weights", ",".join(map(str, WEIGHTS))]) == 0, capsys.readouterr().err
    data, manifest = load_sharded(out)
    fingerprint = manifest["fingerprint"]
    assert fingerprint["teacher_names"] == [str(files["a"]), str(files["b"])]
    assert fingerprint["teacher_name"] == f"{files['a']} + {files['b']}"
    assert fingerprint["teacher_weights"] == pytest.approx(WEIGHTS)

    source = Dataset.load_from_disk(str(files["data"]))
    largest_gap = 0.0
    for row, cached in zip(source, data, strict=True):
        reference = mixture_logprobs([files["a"], files["b"]], WEIGHTS, row["input_ids"])
        assert cached["target_ids"] == row["labels"][1:]
        ids = torch.tensor(cached["topk_ids"]).view(-1, K)
        stored = torch.tensor(cached["topk_logprobs"], dtype=torch.float64).view(-1, K)
        # float16 keeps ~3 significant digits: a relative error of at most 2^-11.
        torch.testing.assert_close(stored, reference.gather(-1, ids), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(stored, reference.topk(K, dim=-1).values, rtol=1e-3, atol=1e-4)
        tail = reference.scatter(-1, ids, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(
            torch.tensor(cached["tail_logmass"], dtype=torch.float64), tail, rtol=1e-4, atol=1e-5
        )
        equal = mixture_logprobs([files["a"], files["b"]], (1.0, 1.0), row["input_ids"]).gather(-1, ids)
        largest_gap = max(largest_gap, (equal - stored).abs().max().item())
    assert largest_gap > 0.05, "the weights must matter by far more than the tolerance, or this test proves nothing"


def test_fingerprint_changes_with_the_weights(capsys, tmp_path, files):
    out = tmp_path / "cache"
    teachers = ("--teacher", str(files["a"]), str(files["b"]))
    assert main([*cache_argv(files, out, *teachers), "--teacher-weights", "0.7,0.3"]) == 0
    one_line_error(capsys, [*cache_argv(files, out, *teachers), "--teacher-weights", "0.5,0.5"], "teacher_weights")
    assert json.loads((out / "manifest.json").read_text())["fingerprint"]["teacher_weights"] == pytest.approx(WEIGHTS)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--teacher-weights", "0.7,0.2,0.1"], ["--teacher-weights has 3 values for 2 teachers", "one weight per"]),
        (["--teacher-weights", "0.7"], ["--teacher-weights has 1 values for 2 teachers", "one weight per"]),
    ],
)
def test_weights_that_do_not_fit_the_teachers_are_one_line(capsys, tmp_path, files, extra, words):
    argv = cache_argv(files, tmp_path / "out", "--teacher", str(files["a"]), str(files["b"]), *extra)
    one_line_error(capsys, argv, *words)
    assert not (tmp_path / "out").exists()


def test_weights_for_one_teacher_are_one_line(capsys, tmp_path, files):
    argv = cache_argv(files, tmp_path / "out", "--teacher", str(files["a"]), "--teacher-weights", "1")
    one_line_error(capsys, argv, "--teacher-weights", "two or more")
    assert not (tmp_path / "out").exists()


def test_bad_weight_values_are_usage_errors(capsys, tmp_path, files):
    for weights in ("0.7,-0.3", "a,b", "0.7,nan"):
        argv = cache_argv(files, tmp_path / "out", "--teacher", str(files["a"]), str(files["b"]))
        one_line_error(capsys, [*argv, "--teacher-weights", weights], "--teacher-weights", weights)
    assert not (tmp_path / "out").exists()


def test_teachers_with_other_tokenizers_are_one_line(capsys, tmp_path, files):
    argv = cache_argv(files, tmp_path / "out", "--teacher", str(files["a"]), str(files["other"]))
    one_line_error(capsys, argv, f"--teacher={str(files['other'])!r}", "share one tokenizer")
    assert not (tmp_path / "out").exists()
