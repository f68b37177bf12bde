"""Block importance of a denoise BART teacher's layers, and which layers it keeps vs DistilBART's map.

For each stack and each number of kept layers, every copied student (``make_student(layer_map=...)``, the other
stack whole, no training) is scored by its token-mean cross-entropy on the same validation rows, so the choice that
importance makes can be compared with all the others. No timings.

    python benchmarks/depth_importance.py                                 # the quickstart's cached teacher
    python benchmarks/depth_importance.py --teacher /work/bench/teacher_converged --out results/x.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from hf_kd import quickstart as qs
from hf_kd.data import default_cache_dir
from hf_kd.student.depth import block_importance, layers_by_importance
from hf_kd.student.make import default_layers, make_student


def batches_of(rows, collate, size: int = 32) -> list[dict]:
    return [collate([rows[j] for j in range(i, min(i + size, len(rows)))]) for i in range(0, len(rows), size)]


def mean_loss(model, batches) -> float:
    """Token-mean cross-entropy over the labels that are not -100."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch, use_cache=False).logits
            mask = batch["labels"].ne(-100)
            total += float(torch.nn.functional.cross_entropy(logits[mask], batch["labels"][mask], reduction="sum"))
            tokens += int(mask.sum())
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="a saved BART denoise teacher (default: the quickstart's cached one)")
    parser.add_argument("--rows", type=int, default=256, help="validation rows (a second set follows them)")
    parser.add_argument("--out", type=Path, help="write the JSON here as well as to stdout")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = qs.Settings.for_task("denoise")
    cache = default_cache_dir()
    data = qs.load_data(settings, cache)
    if args.teacher:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        teacher = AutoModelForSeq2SeqLM.from_pretrained(args.teacher).eval()
    else:
        tokenizer, teacher, _, _ = qs.train_teacher(settings, data, cache)
    collate = qs.collator(tokenizer)
    validation = data["validation"]
    rows = qs.featurize("denoise", validation.select(range(args.rows)), tokenizer, settings)
    second = qs.featurize("denoise", validation.select(range(args.rows, 2 * args.rows)), tokenizer, settings)
    batches = batches_of(rows, collate)
    result = {
        "teacher": str(args.teacher or teacher.config._name_or_path),
        "validation_rows": [0, args.rows],
        "block_importance": block_importance(teacher, batches),
        "block_importance_next_rows": block_importance(teacher, batches_of(second, collate)),
        "teacher_loss": mean_loss(teacher, batches),
        "students": [],
    }
    depths = {"encoder": teacher.config.encoder_layers, "decoder": teacher.config.decoder_layers}
    for stack, n in depths.items():
        for kept in range(1, n):
            picked = layers_by_importance(teacher, batches, {stack: kept})[stack]
            for layers in map(list, itertools.combinations(range(n), kept)):
                student = make_student(teacher, layer_map={stack: layers})
                result["students"].append(
                    {
                        "stack": stack,
                        "layers": layers,
                        "loss": mean_loss(student, batches),
                        "importance_picks": layers == picked,
                        "distilbart_map": layers == default_layers(n, kept),
                    }
                )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
