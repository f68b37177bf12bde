"""Two quickstart teachers of different seeds, each alone and as an ensemble, distilled into the same student.

Run from the repository root: ``python benchmarks/ensemble_quality.py`` (CPU, about 15 minutes from an empty cache;
the teachers are cached where ``hf-kd quickstart`` caches its teacher, so the seed-0 teacher is shared with it).
On the quickstart's default task (``denoise``: BART-style infilling of stdlib docstrings), the BART teacher is
trained with seeds 0 and 1 (same data, tokenizer and steps); T5 students with one initialisation, data order and
number of steps are distilled (forward KL, T 1, alpha 0, as the quickstart) from teacher 0, teacher 1 and their
equal-weight ensemble (``teacher_model=[t0, t1]``). Every model is scored on the test split: ROUGE-L of greedy
outputs and perplexity of the references (the ensemble's own greedy outputs come from a plain greedy loop over
its mixture). Results: ``benchmarks/results/ensemble_quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import torch  # noqa: E402

from hf_kd import quickstart as qs  # noqa: E402
from hf_kd.data import default_cache_dir  # noqa: E402
from hf_kd.losses import IGNORE_INDEX  # noqa: E402
from hf_kd.teachers import TeacherEnsemble  # noqa: E402


def head(dataset: Any, n: int | None) -> Any:
    return dataset.select(range(min(n, len(dataset)))) if n is not None else dataset


@torch.no_grad()
def ensemble_perplexity(ensemble: TeacherEnsemble, tokenizer: Any, test: Any) -> float:
    """exp of the mean negative log-likelihood of the references under the mixture."""
    collate, total, count = qs.collator(tokenizer), 0.0, 0
    for i in range(0, len(test), 32):
        batch = collate([test[j] for j in range(i, min(i + 32, len(test)))])
        labels = batch.pop("labels")
        decoder_input_ids = ensemble.members[0].prepare_decoder_input_ids_from_labels(labels=labels)
        log_p = ensemble(**batch, decoder_input_ids=decoder_input_ids).logits
        mask = labels.ne(IGNORE_INDEX)
        total -= log_p[mask].gather(-1, labels[mask][:, None]).sum().item()
        count += int(mask.sum())
    return math.exp(total / count)


@torch.no_grad()
def ensemble_greedy(ensemble: TeacherEnsemble, tokenizer: Any, test: Any, settings: qs.Settings) -> list[str]:
    """Greedy decoding from the mixture (a TeacherEnsemble does not generate): argmax, stop at </s>."""
    config = ensemble.members[0].config
    rows, outputs = head(test, settings.rouge_examples), []
    for i in range(0, len(rows), 64):
        batch = tokenizer.pad({"input_ids": rows[i : i + 64]["input_ids"]}, return_tensors="pt")
        decoded = torch.full((batch["input_ids"].shape[0], 1), config.decoder_start_token_id)
        done = torch.zeros(decoded.shape[0], dtype=torch.bool)
        for _ in range(settings.target_length):
            logits = ensemble(**batch, decoder_input_ids=decoded).logits[:, -1]
            token = logits.argmax(-1).masked_fill(done, config.pad_token_id)
            decoded = torch.cat([decoded, token[:, None]], dim=1)
            done |= token.eq(config.eos_token_id)
            if done.all():
                break
        outputs += [t.strip() for t in tokenizer.batch_decode(decoded, skip_special_tokens=True)]
    return outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="the quickstart's cache (default: hf_kd's cache folder)")
    parser.add_argument("--work-dir", default="/tmp/hf_kd_ensemble", help="where the students are written")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs (not results)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    work = Path(args.work_dir)
    overrides = {**qs.SMOKE, "student_archs": "t5"} if args.smoke else {"student_archs": "t5"}
    settings = [qs.Settings.for_task("denoise", seed=seed, **overrides) for seed in (0, 1)]
    start = time.perf_counter()
    data = qs.load_data(settings[0], cache_dir)
    teachers, tokenizer, seconds = [], None, []
    for s in settings:
        tok, teacher, secs, cached = qs.train_teacher(s, data, cache_dir)
        print(f"teacher seed {s.seed}: {'cached' if cached else 'trained'} ({secs:.0f} s)", flush=True)
        if tokenizer is not None and tok.get_vocab() != tokenizer.get_vocab():
            raise SystemExit("the two teachers' tokenizers differ: an ensemble needs one tokenizer")
        tokenizer = tokenizer or tok
        teachers.append(teacher)
        seconds.append(secs)
    main_settings = settings[0]
    train = qs.featurize("denoise", data["train"], tokenizer, main_settings)
    valid = head(qs.featurize("denoise", data["validation"], tokenizer, main_settings), main_settings.eval_blocks)
    test = qs.featurize("denoise", data["test"], tokenizer, main_settings)
    references = list(head(data["test"], main_settings.rouge_examples)["target"])
    prompts = [tokenizer.decode(ids[:16]) for ids in test[: main_settings.speed_prompts]["input_ids"]]
    ensemble = TeacherEnsemble(teachers)

    results: dict[str, dict[str, Any]] = {}
    for name, model in (("teacher seed 0", teachers[0]), ("teacher seed 1", teachers[1])):
        scores = qs.evaluate_model(model, tokenizer, test, references, prompts, main_settings)
        results[name] = {k: scores[k] for k in ("test_rougeL", "test_perplexity")}
    ensemble_outputs = ensemble_greedy(ensemble, tokenizer, test, main_settings)
    results["ensemble of both"] = {
        "test_rougeL": qs.rouge_l(ensemble_outputs, references[: len(ensemble_outputs)]),
        "test_perplexity": ensemble_perplexity(ensemble, tokenizer, test),
    }
    for name, teacher in (("student <- seed 0", teachers[0]), ("student <- seed 1", teachers[1]),
                          ("student <- ensemble", list(teachers))):  # fmt: skip
        print(f"training {name}", flush=True)
        student, _, secs, _ = qs.train_student(
            main_settings, "kd", teacher, tokenizer, train, valid, work / name.replace(" ", "_"), "t5"
        )
        scores = qs.evaluate_model(student, tokenizer, test, references, prompts, main_settings)
        results[name] = {k: scores[k] for k in ("test_rougeL", "test_perplexity")} | {"train_seconds": secs}

    lines = [
        "# Teacher ensemble on the quickstart task (denoise)",
        "",
        f"Command: `python benchmarks/ensemble_quality.py{' --smoke' if args.smoke else ''}`  ",
        f"BART teachers {main_settings.teacher_layers}+{main_settings.teacher_layers} x {main_settings.teacher_width}, "
        f"{main_settings.teacher_steps} steps, seeds 0 and 1 ({seconds[0]:.0f} s and {seconds[1]:.0f} s); T5 students "
        f"{main_settings.student_layers}+{main_settings.student_layers} x {main_settings.student_width}, "
        f"{main_settings.student_steps} steps, forward KL, T {main_settings.temperature}, alpha {main_settings.alpha}, "
        f"one initialisation and data order; {len(references)} test examples; {args.threads} threads; "
        f"{time.perf_counter() - start:.0f} s in all.",
        "",
        "| model | test ROUGE-L | test perplexity |",
        "|---|---:|---:|",
        *(f"| {k} | {v['test_rougeL']:.2f} | {v['test_perplexity']:.2f} |" for k, v in results.items()),
        "",
    ]
    stem = "ensemble_quality_smoke" if args.smoke else "ensemble_quality"
    report = {"settings": vars(main_settings), "results": results}
    common.write_results(Path(args.out), stem, report, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
