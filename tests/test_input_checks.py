"""`hf-kd cache-teacher` / `hf-kd pseudo-label`: inputs that used to be cached silently or crash half way
(another tokenizer, rows past the teacher's positions, an assembled data set, empty sources) are one line, exit 2,
before the teacher runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import WORDS, make_tokenizer, random_sentences, tiny_bart, tiny_gpt2
from datasets import Dataset
from helpers import one_line_error

from hf_kd.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    tiny_gpt2(len(tok), seed=7).save_pretrained(root / "teacher")  # 64 positions
    tok.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "same-tokenizer")
    make_tokenizer(list(reversed(WORDS)), name="reversed").save_pretrained(root / "other-tokenizer")
    tiny_bart(len(tok), seed=7).save_pretrained(root / "bart")  # 64 positions
    tok.save_pretrained(root / "bart")

    def tokenised(texts: list[str], name: str) -> None:
        rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids} for ids in tok(texts)["input_ids"]]
        Dataset.from_list(rows).save_to_disk(str(root / name))

    tokenised(random_sentences(5, seed=3, min_len=4, max_len=10), "tokenised")
    tokenised([*random_sentences(3, seed=3), " ".join(["cat"] * 70)], "long")
    text = {"source": random_sentences(4, seed=11), "target": random_sentences(4, seed=12, max_len=6)}
    Dataset.from_dict(text).save_to_disk(str(root / "text"))
    long_text = {"source": [*text["source"][:3], " ".join(["dog"] * 60)], "target": text["target"]}
    Dataset.from_dict(long_text).save_to_disk(str(root / "long-text"))
    empty = {"source": [text["source"][0], "", text["source"][2]], "target": text["target"][:3]}
    Dataset.from_dict(empty).save_to_disk(str(root / "empty-source"))
    return {p.name: p for p in root.iterdir()}


def cache(files, out: Path, *extra: str, dataset: str = "tokenised") -> list[str]:
    return ["cache-teacher", "--teacher", str(files["teacher"]), "--dataset", str(files[dataset]),
            "--output", str(out), "--k", "4", "--device", "cpu", *extra]  # fmt: skip


def label(files, out: Path, *extra: str, dataset: str = "text", teacher: str = "teacher") -> list[str]:
    return ["pseudo-label", "--teacher", str(files[teacher]), "--dataset", str(files.get(dataset, dataset)),
            "--output", str(out), "--source-column", "source", "--max-new-tokens", "3", "--device", "cpu",
            *extra]  # fmt: skip


# ---- b: --tokenizer compared with the teacher's own --------------------------------------------------------------


def test_cache_teacher_refuses_a_tokenizer_with_other_ids(capsys, tmp_path, files) -> None:
    out = tmp_path / "cache"
    one_line_error(capsys, cache(files, out, "--tokenizer", str(files["other-tokenizer"])), "other ids", "--tokenizer")
    assert not out.exists()  # refused before anything was written
    assert main(cache(files, out, "--tokenizer", str(files["same-tokenizer"]))) == 0  # the same vocabulary is fine


def test_pseudo_label_refuses_a_tokenizer_with_other_ids(capsys, tmp_path, files) -> None:
    out = tmp_path / "labels"
    one_line_error(capsys, label(files, out, "--tokenizer", str(files["other-tokenizer"])), "other ids")
    assert not out.exists()


# ---- c: rows longer than the teacher's positions ------------------------------------------------------------------


def test_cache_teacher_refuses_rows_past_the_teacher_positions(capsys, tmp_path, files) -> None:
    out = tmp_path / "cache"
    err = one_line_error(capsys, cache(files, out, dataset="long"), "1 of 4 rows", "64 positions", "max_length=64")
    assert "longest: 70" in err and not out.exists()


def test_pseudo_label_refuses_sources_past_the_teacher_positions(capsys, tmp_path, files) -> None:
    out = tmp_path / "labels"
    # 60 source tokens + 8 new ones > 64 positions; the same data with 4 new tokens fits.
    argv = [*label(files, out, dataset="long-text"), "--max-new-tokens", "8"]
    one_line_error(capsys, argv, "68 positions", "--max-source-length 56")
    assert not out.exists()
    assert main([*label(files, out, dataset="long-text"), "--max-new-tokens", "4"]) == 0
    # An encoder-decoder teacher with learned positions: the source itself must fit.
    argv = [*label(files, tmp_path / "bart", dataset="long-text", teacher="bart"), "--max-new-tokens", "70"]
    one_line_error(capsys, argv, "--max-new-tokens 63")


# ---- d: an assembled data set, empty sources ----------------------------------------------------------------------


def test_pseudo_label_refuses_a_data_set_it_assembled(capsys, tmp_path, files) -> None:
    first = tmp_path / "first"
    assert main(label(files, first)) == 0
    second = tmp_path / "second"
    one_line_error(capsys, label(files, second, dataset=str(first / "dataset")), "teacher_output", "original data set")
    assert not second.exists()  # refused before any generation


@pytest.mark.parametrize("batch_size", ["1", "8"])
def test_causal_pseudo_label_refuses_empty_sources(capsys, tmp_path, files, batch_size) -> None:
    out = tmp_path / "labels"
    one_line_error(capsys, label(files, out, "--batch-size", batch_size, dataset="empty-source"), "1 rows", "rows 1")
    assert not out.exists()
