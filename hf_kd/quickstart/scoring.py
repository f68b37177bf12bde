"""Scoring on the test split: perplexity, greedy outputs and their ROUGE-L, generation speed, and the check that a
model conditions on its input."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from hf_kd.quickstart.dataset import collator, head
from hf_kd.quickstart.models import architecture
from hf_kd.quickstart.settings import Settings


@torch.no_grad()
def greedy_outputs(model: Any, tokenizer: Any, test: Any, settings: Settings) -> list[str]:
    """Greedy outputs for the first ``rouge_examples`` featurised test rows (encoder-decoder tasks)."""
    rows = head(test, settings.rouge_examples)
    out = []
    for i in range(0, len(rows), 64):
        batch = tokenizer.pad({"input_ids": rows[i : i + 64]["input_ids"]}, return_tensors="pt")
        generated = model.generate(**batch, max_new_tokens=settings.target_length, do_sample=False, num_beams=1)
        out += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return out


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure, in percent."""
    from hf_kd.metrics import rouge

    return 100 * rouge(predictions, references, ["rougeL"])["rougeL"]


def constant_candidates(train_targets: list[str], outputs: list[list[str]], k: int = 20) -> list[str]:
    """Single outputs that a model ignoring its input might settle on, to find the best constant output.

    The ``k`` most frequent training targets, each model's most frequent output, and the most frequent training
    words in order of frequency, 1 to ``k`` of them ("the", "the of", ...: ROUGE-L rewards common words).
    """
    frequent = [text for text, _ in Counter(train_targets).most_common(k)]
    modes = [Counter(o).most_common(1)[0][0] for o in outputs if o]
    words = [w for w, _ in Counter(w for t in train_targets for w in t.lower().split()).most_common(k)]
    return list(dict.fromkeys([*frequent, *modes, *(" ".join(words[:n]) for n in range(1, len(words) + 1))]))


def conditioning(predictions: list[str], references: list[str], candidates: list[str]) -> dict[str, Any]:
    """Does a model condition on its input? Distinct greedy outputs, and ROUGE-L against the best constant output.

    Passes when at least half of the outputs are distinct and the ROUGE-L is at least 1.5 times that of the best
    single output among ``candidates`` repeated for every example.
    """
    scores = {c: rouge_l([c] * len(references), references) for c in candidates}
    best = max(scores, key=scores.get)
    score = rouge_l(predictions, references)
    distinct = len(set(predictions))
    ratio = score / scores[best] if scores[best] > 0 else float("inf")
    return {
        "distinct_outputs": distinct,
        "outputs": len(predictions),
        "rougeL": score,
        "best_constant": best,
        "best_constant_rougeL": scores[best],
        "ratio": ratio,
        "passes": 2 * distinct >= len(predictions) and ratio >= 1.5,
    }


def evaluate_model(
    model: Any, tokenizer: Any, test: Any, references: list[str], prompts: list[str], settings: Settings
) -> dict[str, Any]:
    """Parameters, test perplexity of the references, generation speed and (encoder-decoder) greedy outputs,
    their ROUGE-L and how many are distinct."""
    from hf_kd.metrics import count_parameters, generation_speed, perplexity

    result: dict[str, Any] = {
        "architecture": architecture(model),
        "params": count_parameters(model),
        "test_perplexity": perplexity(model, test, batch_size=32, data_collator=collator(tokenizer)),
    }
    if settings.is_seq2seq:
        predictions = greedy_outputs(model, tokenizer, test, settings)
        result["test_rougeL"] = rouge_l(predictions, references[: len(predictions)])
        result["distinct_outputs"] = len(set(predictions))
        result["predictions"] = predictions
    # Best of three timings: on a shared CPU the fastest run is the one least disturbed by other processes.
    speed = max(
        generation_speed(model, tokenizer, prompts, max_new_tokens=settings.speed_new_tokens, batch_size=len(prompts))[
            "tokens_per_second"
        ]
        for _ in range(3)
    )
    result["tokens_per_second"] = speed
    return result
