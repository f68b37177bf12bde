"""hf_kd.metrics against values computed by hand or by a plain per-example loop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tokenizer, random_sentences, tiny_gpt2, tiny_t5
from torch import nn

from hf_kd.metrics import (
    Rouge,
    _new_token_counts,
    count_parameters,
    cross_entropy_sum,
    generation_speed,
    perplexity,
    rouge,
)

PREDICTIONS = ["the cat sat on the mat", "a b c d"]
REFERENCES = ["the cat is on the mat", "d c b a"]


def test_rouge_matches_hand_computed_values():
    # Example 1: LCS "the cat on the mat" = 5 of 6 tokens each side; 5 clipped unigram matches; bigrams
    # shared: "the cat", "on the", "the mat" = 3 of 5. Example 2: every unigram matches, no bigram, LCS 1 of 4.
    scores = rouge(PREDICTIONS, REFERENCES, use_aggregator=False)
    assert scores["rougeL"] == pytest.approx([5 / 6, 1 / 4])
    assert scores["rouge1"] == pytest.approx([5 / 6, 1.0])
    assert scores["rouge2"] == pytest.approx([3 / 5, 0.0])
    mean = rouge(PREDICTIONS, REFERENCES)
    assert mean["rougeL"] == pytest.approx((5 / 6 + 1 / 4) / 2)
    assert mean["rouge2"] == pytest.approx(3 / 10)
    assert set(mean) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_rouge_precision_recall_asymmetry_and_options():
    # Prediction "the cat" vs reference "the cat sat down": P = 1, R = 1/2, F = 2/3.
    assert rouge(["the cat"], ["the cat sat down"], rouge_types=["rougeL"]) == {"rougeL": pytest.approx(2 / 3)}
    # Multi-reference: the best reference counts.
    assert rouge(["a b"], [["x y", "a b"]], rouge_types=["rouge1"])["rouge1"] == pytest.approx(1.0)
    # A custom tokenizer (whitespace, case kept) changes the result: "The" no longer matches "the".
    assert rouge(["The cat"], ["the cat"], rouge_types=["rouge1"], tokenizer=str.split)["rouge1"] == 0.5
    assert Rouge().compute(predictions=["The cat"], references=["the cat"], rouge_types=["rouge1"])["rouge1"] == 1.0
    with pytest.raises(ValueError, match="predictions"):
        rouge(["a"], ["a", "b"])


def _causal_rows(tokenizer, n=7, mask_prompt=False):
    rows = []
    for text in random_sentences(n, seed=3):
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
        if mask_prompt:
            labels[:2] = [-100, -100]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def _manual_causal_ce(model, rows):
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(ids).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            for pos, target in enumerate(labels.tolist()):
                if target != -100:
                    total -= torch.log_softmax(logits[pos], -1)[target].item()
                    count += 1
    return total, count


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_perplexity_causal_matches_unbatched_loop(tokenizer, mask_prompt):
    model = tiny_gpt2(len(tokenizer), seed=1)
    rows = _causal_rows(tokenizer, mask_prompt=mask_prompt)
    total, count = _manual_causal_ce(model, rows)
    got_total, got_count = cross_entropy_sum(model, rows, batch_size=3)  # 7 rows: a short last batch
    assert got_count == count
    assert got_total == pytest.approx(total, rel=1e-5)
    assert perplexity(model, rows, batch_size=3) == pytest.approx(math.exp(total / count), rel=1e-5)
    assert model.training  # the train/eval mode is restored


def test_perplexity_causal_without_labels_scores_input_ids(tokenizer):
    model = tiny_gpt2(len(tokenizer), seed=2)
    rows = _causal_rows(tokenizer)
    unlabeled = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    assert perplexity(model, unlabeled, batch_size=4) == pytest.approx(perplexity(model, rows, batch_size=1))


def test_perplexity_seq2seq_matches_unbatched_loop(tokenizer):
    model = tiny_t5(len(tokenizer), seed=1).eval()
    sources, targets = random_sentences(5, seed=4), random_sentences(5, seed=5)
    rows = [
        {
            "input_ids": tokenizer(s)["input_ids"],
            "attention_mask": [1] * len(tokenizer(s)["input_ids"]),
            "labels": tokenizer(t)["input_ids"] + [tokenizer.eos_token_id],
        }
        for s, t in zip(sources, targets, strict=True)
    ]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
            n = len(row["labels"])
            total += out.loss.item() * n  # the model's own mean CE over the row's targets
            count += n
    assert perplexity(model, rows, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_of_uniform_model_is_vocab_size():
    class Uniform(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 37) + self.dummy})()

    rows = [{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6]}]
    assert perplexity(Uniform(), rows) == pytest.approx(37.0)


def test_count_parameters_counts_tied_weights_once(tokenizer):
    model = tiny_gpt2(len(tokenizer))
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert count_parameters(model) == sum(unique.values())
    assert count_parameters(nn.Linear(3, 4)) == 16
    frozen = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    frozen[0].requires_grad_(False)
    assert count_parameters(frozen, trainable_only=True) == 5


def test_new_token_counts_stop_at_first_eos():
    new = torch.tensor([[5, 6, 1, 0, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]])
    assert _new_token_counts(new, eos_token_id=1).tolist() == [3, 5, 1]
    assert _new_token_counts(new, eos_token_id=None).tolist() == [5, 5, 5]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_t5])
def test_generation_speed_counts_fixed_length_tokens(make):
    tok = make_tokenizer()
    model = make(len(tok), seed=0)
    texts = random_sentences(5, seed=6)
    padding_side = tok.padding_side
    speed = generation_speed(model, tok, texts, max_new_tokens=4, batch_size=2, warmup=False)
    assert speed["new_tokens"] == 5 * 4
    assert speed["seconds"] > 0
    assert speed["tokens_per_second"] == pytest.approx(speed["new_tokens"] / speed["seconds"])
    assert tok.padding_side == padding_side
