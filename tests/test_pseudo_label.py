"""Sequence-level KD data: teacher outputs against a manual generate loop, the filter, the mix, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_sentences, tiny_gpt2, tiny_t5
from datasets import Dataset, load_from_disk
from rouge_score import rouge_scorer

from hf_kd.teachers.pseudo_label import assemble, generate_pseudo_labels, word_error_rate


def _data(n: int = 10) -> Dataset:
    return Dataset.from_dict(
        {
            "source": random_sentences(n, seed=11),
            "target": random_sentences(n, seed=12, max_len=6),
            "id": list(range(n)),
        }
    )


def _manual(model, tok, sources: list[str], max_new_tokens: int, num_beams: int = 1) -> list[str]:
    """One example at a time, no padding at all; an encoder reads ``source </s>``, as it was trained."""
    outputs = []
    for source in sources:
        ids = tok(source, return_tensors="pt")["input_ids"]
        if model.config.is_encoder_decoder:  # this tokenizer adds no </s> itself
            ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], dim=1)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                pad_token_id=0,
            )
        if not model.config.is_encoder_decoder:
            out = out[:, ids.shape[1] :]
        outputs.append(tok.decode(out[0], skip_special_tokens=True).strip())
    return outputs


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_t5], ids=["causal", "seq2seq"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_outputs_equal_manual_generate(tmp_path: Path, tok, make, num_beams: int) -> None:
    model = make(len(tok), seed=3).eval()
    data = _data(7)
    kwargs = {"source_column": "source", "target_column": "target", "max_new_tokens": 6, "num_beams": num_beams}
    generate_pseudo_labels(model, tok, data, tmp_path / "p", batch_size=4, shard_size=5, **kwargs)
    result = assemble(data, tmp_path / "p", target_column="target")
    assert result["target"] == _manual(model, tok, data["source"], 6, num_beams)
    assert result["reference_target"] == data["target"] and set(result["target_source"]) == {"teacher"}
    assert any(result["target"])  # the tiny model does say something


def test_filter_drops_exactly_rows_past_threshold(tmp_path: Path, tok) -> None:
    model = tiny_gpt2(len(tok), seed=3).eval()
    data = _data(12)
    generate_pseudo_labels(
        model, tok, data, tmp_path / "p", source_column="source", target_column="target", max_new_tokens=8
    )
    outputs = assemble(data, tmp_path / "p", target_column="target")["target"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(ref, out)["rougeL"].fmeasure for ref, out in zip(data["target"], outputs, strict=True)]
    threshold = min(s for s in scores if s > 0)  # a random teacher mostly misses: keep only the overlapping rows
    kept = assemble(data, tmp_path / "p", target_column="target", min_rouge_l=threshold)
    assert kept["id"] == [i for i, s in enumerate(scores) if s >= threshold]
    assert 0 < len(kept) < len(data)

    wers = [word_error_rate(out, ref) for ref, out in zip(data["target"], outputs, strict=True)]
    limit = sorted(wers)[len(wers) // 2]
    kept = assemble(data, tmp_path / "p", target_column="target", max_wer=limit)
    assert kept["id"] == [i for i, w in enumerate(wers) if w <= limit]

    both = assemble(data, tmp_path / "p", target_column="target", target_source="both", min_rouge_l=threshold)
    reference_rows = [r for r in both if r["target_source"] == "reference"]
    teacher_rows = [r for r in both if r["target_source"] == "teacher"]
    assert [r["target"] for r in reference_rows] == data["target"]
    assert [r["id"] for r in teacher_rows] == [i for i, s in enumerate(scores) if s >= threshold]
    assert all(r["target"] == outputs[r["id"]] for r in teacher_rows)


def test_word_error_rate_known_values() -> None:
    assert word_error_rate("the cat sat", "the cat sat") == 0.0
    assert word_error_rate("the dog sat", "the cat sat") == pytest.approx(1 / 3)
    assert word_error_rate("cat", "the cat sat down") == pytest.approx(3 / 4)
    assert word_error_rate("a b c d e", "a") == 4.0


def test_resume_equals_uninterrupted_and_cli(tmp_path: Path, tok) -> None:
    model = tiny_t5(len(tok), seed=3).eval()
    data = _data(9)
    kwargs = {"source_column": "source", "target_column": "target", "max_new_tokens": 5, "shard_size": 2}
    generate_pseudo_labels(model, tok, data, tmp_path / "clean", **kwargs)

    def kill(index: int) -> None:
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_pseudo_labels(model, tok, data, tmp_path / "resumed", on_shard=kill, **kwargs)
    done = []
    generate_pseudo_labels(model, tok, data, tmp_path / "resumed", on_shard=done.append, **kwargs)
    assert done == [3, 4]
    clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert json.loads((tmp_path / "resumed" / "manifest.json").read_text()) == clean
    expected = assemble(data, tmp_path / "clean", target_column="target", target_source="both").to_dict()
    assert assemble(data, tmp_path / "resumed", target_column="target", target_source="both").to_dict() == expected

    from hf_kd.cli import main

    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    data.save_to_disk(str(tmp_path / "data"))
    argv = ["pseudo-label", "--teacher", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data")]
    argv += ["--output", str(tmp_path / "cli"), "--source-column", "source", "--max-new-tokens", "5"]
    assert main([*argv, "--target-source", "both", "--device", "cpu"]) == 0
    written = load_from_disk(str(tmp_path / "cli" / "dataset"))
    assert written.to_dict() == expected
