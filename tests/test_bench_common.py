"""benchmarks/common.py: the seed statistics the tables print, --plan changes, and results merged under the lock."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import common  # noqa: E402


def test_spread_is_mean_min_max():
    assert common.spread([2.0, 4.5, 3.25], 2) == "3.25 (2.00..4.50)"  # (2 + 4.5 + 3.25) / 3 = 3.25
    assert common.spread([7.0], 1) == "7.0"  # one seed: no range


def test_paired_keeps_the_seeds_both_ran_in_seed_order():
    runs = {"10": {"p": 11.0}, "2": {"p": 9.0}, "3": {"p": 5.0}}
    base = {"2": {"p": 10.0}, "10": {"p": 10.0}, "7": {"p": 1.0}}
    gaps = common.paired(runs, base, lambda run, b: common.percent_change(run["p"], b["p"]))
    assert gaps == pytest.approx([-10.0, 10.0])  # seed 2: 9 vs 10, seed 10: 11 vs 10; seeds 3 and 7 unpaired
    assert common.paired(runs, {"7": {}}, lambda run, b: 0.0) == []


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: int = 3
    lr: float = 1e-3
    layer_map: str = "{}"


def test_replace_fields_casts_to_the_field_type():
    plan = common.replace_fields(Plan(), ["steps=600", "lr=5e-4", 'layer_map={"a": 1}'])
    assert plan == Plan(steps=600, lr=5e-4, layer_map='{"a": 1}')


@pytest.mark.parametrize("change", ["stepz=3", "steps=", "steps=many", "steps"])
def test_replace_fields_names_a_bad_change(change):
    problem = common.replace_fields(Plan(), [change])
    assert problem == f"--plan {change!r}: give FIELD=VALUE, FIELD one of steps, lr, layer_map"


def test_locked_results_merge_and_rewrite_the_table(tmp_path):
    path = tmp_path / "results" / "x.json"

    def table(results: dict) -> str:
        return ",".join(sorted(results))

    with common.locked_results(path, table) as results:
        results["a"] = 1
    with common.locked_results(path, table) as results:
        results["b"] = 2  # a second process adds its rows to the first one's
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}
    assert path.with_suffix(".md").read_text() == "a,b"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json", "x.md"]  # the folder is the lock


def test_seq2seq_plan_error_is_one_line(tmp_path, capsys):
    import seq2seq_quality
    import torch

    threads = torch.get_num_threads()  # the script sets its own; the rest of the test run keeps ours
    try:
        assert seq2seq_quality.main(["--plan", "sft_steps=many", "--out", str(tmp_path)]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert (
        err
        == "seq2seq_quality: --plan 'sft_steps=many': give FIELD=VALUE, FIELD one of "
        + ", ".join(f.name for f in dataclasses.fields(seq2seq_quality.Plan))
        + "\n"
    )
