"""ROUGE as a local `evaluate` metric: ``evaluate.load(hf_kd.metrics.ROUGE_PATH)`` needs no Hub.

Same inputs, arguments, defaults and result keys as the Hub's ``evaluate.load("rouge")`` (its
metrics/rouge/rouge.py), on the same ``rouge_score`` package: ``rougeLsum`` splits sentences on newlines. One
difference: with ``use_aggregator`` each key is the exact mean F-measure over the examples, where the Hub's
metric reports the median of 1000 bootstrap resamples of that mean (random, and only an estimate of it).
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    address = "Barcelona, Spain",
    publisher = "Association for Computational Linguistics",
    url = "https://www.aclweb.org/anthology/W04-1013",
    pages = "74--81",
}
"""

_DESCRIPTION = """\
ROUGE (Recall-Oriented Understudy for Gisting Evaluation) compares generated texts with references by
n-gram overlap (rouge1, rouge2) and longest common subsequence (rougeL; rougeLsum over newline-separated
sentences). Case-insensitive. hf_kd's offline copy of the Hub's `rouge` metric, on Google Research's
`rouge_score`; aggregated scores are exact means rather than bootstrap medians.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: one reference text per prediction, or a list of references per prediction (the best counts).
    rouge_types: the scores to compute (default rouge1, rouge2, rougeL, rougeLsum); also rouge{n} for any n.
    use_aggregator: return the mean F-measure of each type (True, default) or the list of per-example ones.
    use_stemmer: strip word suffixes with the Porter stemmer before matching (default False).
    tokenizer: a callable from text to a list of tokens, replacing rouge_score's default tokenizer.
Returns:
    rouge1, rouge2, rougeL, rougeLsum: F-measures in [0, 1] (floats, or lists without the aggregator).
Examples:
    >>> rouge = evaluate.load(hf_kd.metrics.ROUGE_PATH)
    >>> rouge.compute(predictions=["hello there"], references=["hello there"])
    {'rouge1': 1.0, 'rouge2': 1.0, 'rougeL': 1.0, 'rougeLsum': 1.0}
"""

DEFAULT_ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


class Tokenizer:
    """rouge_score wants an object with ``tokenize``; the metric takes a plain callable, as the Hub's does."""

    def __init__(self, tokenizer_func):
        self.tokenizer_func = tokenizer_func

    def tokenize(self, text):
        return self.tokenizer_func(text)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://en.wikipedia.org/wiki/ROUGE_(metric)"],
        )

    def _compute(
        self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False, tokenizer=None
    ):
        rouge_types = list(rouge_types or DEFAULT_ROUGE_TYPES)
        scorer = rouge_scorer.RougeScorer(
            rouge_types=rouge_types, use_stemmer=use_stemmer, tokenizer=Tokenizer(tokenizer) if tokenizer else None
        )
        per_example = {key: [] for key in rouge_types}
        for reference, prediction in zip(references, predictions, strict=True):
            if isinstance(reference, str):
                scores = scorer.score(reference, prediction)
            else:
                scores = scorer.score_multi(list(reference), prediction)
            for key in rouge_types:
                per_example[key].append(scores[key].fmeasure)
        if not use_aggregator:
            return per_example
        return {key: (sum(values) / len(values) if values else 0.0) for key, values in per_example.items()}
