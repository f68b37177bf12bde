"""Off-policy KD, on-policy KD (GKD), SeqKD and a teacher with another tokenizer, on the quickstart's lm task (CPU).

Run from the repository root: ``python benchmarks/policy_quality.py --cache-dir DIR --teacher-dir TEACHER`` (the
quickstart's data cache, and a quickstart lm teacher with its tokenizer). Students with the same initialisation,
seed, data order and number of optimizer steps are trained on the same training blocks and scored by perplexity on
the full test blocks. Every block's first 16 tokens are a prompt (labels -100) and its other 48 the targets, since
on-policy distillation and SeqKD need prompts to continue; ``*_all_targets`` variants learn all 64 tokens.

* ``ce``: cross-entropy on the targets (transformers Trainer);
* ``kd_off_policy``: DistillationTrainer, ``--loss`` (forward KL), T 1, alpha 0, on the data's targets;
* ``kd_lmbda_0.5`` / ``kd_lmbda_1.0``: the same, with the student sampling the targets (temperature 1, 48 new
  tokens) on a share lmbda of the steps (GKD);
* ``seqkd``: the same loss on targets the teacher samples (``seq_kd=True``, lmbda 0); ``seqkd_ce``: cross-entropy
  (alpha 1) on those targets, Kim & Rush's SeqKD proper;
* ``kd_cross_tokenizer``: the same loss from a teacher of the same size and training budget whose tokenizer is a
  SentencePiece-style Unigram of 4,096 tokens (trained here; cached in ``--work-dir``), ``cross_tokenizer=True``;
* ``ce_all_targets`` / ``kd_off_policy_all_targets``: as ``ce`` / ``kd_off_policy`` with every token a target;
* ``kd_cross_tokenizer_same_teacher``: the cross-tokenizer path (text columns, offsets, alignment, bucket + ULD
  loss) with the quickstart teacher and tokenizer on both sides: a control of that machinery;
* ``*_alpha0.5``: the variant with alpha 0.5 (half cross-entropy on the targets).

Results: benchmarks/results/policy_quality.json / .md (``--name`` changes the stem), written after every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402
from hf_kd import quickstart as qs  # noqa: E402
from hf_kd.losses import IGNORE_INDEX  # noqa: E402
from hf_kd.metrics import cross_entropy_sum  # noqa: E402
from hf_kd.teachers.cross_tokenizer.inputs import CrossTokenizerAligner, CrossTokenizerCollator  # noqa: E402
from hf_kd.teachers.cross_tokenizer.vocabulary import VocabularyMap  # noqa: E402

PROMPT = 16  # tokens of each 64-token block given as the prompt; the other 48 are the targets
VARIANTS = [
    "ce", "kd_off_policy", "kd_lmbda_0.5", "kd_lmbda_1.0", "seqkd", "kd_cross_tokenizer",
    "ce_all_targets", "kd_off_policy_all_targets", "seqkd_ce",
    "kd_cross_tokenizer_same_teacher", "kd_off_policy_alpha0.5", "kd_cross_tokenizer_alpha0.5",
]  # fmt: skip
OTHER_VOCAB = 4096


def with_prompt(blocks: Dataset, prompt: int) -> Dataset:
    """The blocks with their first ``prompt`` tokens labelled -100: a prompt the targets continue."""
    return blocks.map(lambda row: {"labels": [IGNORE_INDEX] * prompt + row["input_ids"][prompt:]})


def unigram_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer: Unigram model, ``"▁"`` for spaces (no prefix space), same special tokens as
    the quickstart's byte-level BPE (<pad>=0, </s>=1) so that both models end documents with </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>"
    )


def other_teacher(settings: Any, data: Any, folder: Path) -> tuple[Any, Any, float]:
    """A teacher like the quickstart's (size, seed, steps, schedule) on another tokenizer; cached in ``folder``."""
    if (folder / "config.json").exists():
        seconds = json.loads((folder / "train_seconds.json").read_text())["train_seconds"]
        return AutoTokenizer.from_pretrained(folder), GPT2LMHeadModel.from_pretrained(folder).eval(), seconds
    start = time.perf_counter()
    tokenizer = unigram_tokenizer(qs.tokenizer_texts("lm", data["train"]), OTHER_VOCAB)
    train = qs.featurize("lm", data["train"], tokenizer, settings)
    teacher = qs.build_model(tokenizer, settings.teacher_layers, settings.teacher_width, settings, settings.seed + 1)
    args = common.training_args(folder / "run", settings, settings.teacher_steps, settings.teacher_lr)
    Trainer(model=teacher, args=args, train_dataset=train, data_collator=qs.collator(tokenizer)).train()
    seconds = time.perf_counter() - start
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "train_seconds.json").write_text(json.dumps({"train_seconds": seconds}))
    return tokenizer, teacher.eval(), seconds


def cross_rows(blocks: Dataset, tokenizer: Any, prompt: int) -> Dataset:
    """Each block as text: ``prompt`` (its first tokens) and ``text`` (the rest), </s> kept as written."""
    return Dataset.from_dict(
        {
            "prompt": [tokenizer.decode(ids[:prompt]) for ids in blocks["input_ids"]],
            "text": [tokenizer.decode(ids[prompt:]) for ids in blocks["input_ids"]],
        }
    )


def aligned_share(collate: CrossTokenizerCollator, rows: Dataset) -> float:
    """The share of the student's target tokens that the cross-tokenizer loss pairs with a teacher position."""
    pairs, targets = 0, 0
    for start in range(0, len(rows), 32):
        batch = collate([rows[i] for i in range(start, min(start + 32, len(rows)))])
        pairs += len(batch["alignment_batch_index"])
        targets += int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())
    return pairs / targets


def score(model: Any, test: Dataset, tokenizer: Any) -> dict[str, float]:
    """Test perplexity (as hf_kd.metrics.perplexity computes it) and bits per character of the scored text."""
    total, count = cross_entropy_sum(model.eval(), test, 32, qs.collator(tokenizer))
    # A causal model predicts every token of a block but its first: count the characters of those.
    chars = sum(len(tokenizer.decode(ids)) - len(tokenizer.decode(ids[:1])) for ids in test["input_ids"])
    return {"test_perplexity": math.exp(total / count), "bits_per_char": total / chars / math.log(2)}


def on_policy_steps(seed: int, steps: int, lmbda: float) -> int:
    """How many steps DistillationTrainer makes on-policy (its draw: hf_kd.trainer._target_writer)."""
    return sum(random.Random(f"{seed}-{step}").random() < lmbda for step in range(steps))


@dataclasses.dataclass
class Setup:
    """What every variant trains from: the settings, the quickstart tokenizer and teacher, and the data."""

    settings: Any
    tokenizer: Any
    teacher: Any
    blocks: Dataset  # training blocks, every token a target
    prompted: Dataset  # the same blocks, the first PROMPT tokens labelled -100
    test: Dataset
    work: Path
    loss: str
    cross: dict[str, Any] | None = None  # the other teacher, its tokenizer, rows and collator (kd_cross_tokenizer)


def cross_setup(setup: Setup, teacher_tokenizer: Any, teacher: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The text rows and the collator that pair ``teacher`` with the student, and facts about the pairing."""
    tokenizer = setup.tokenizer
    rows = cross_rows(setup.blocks, tokenizer, PROMPT)
    # The teacher reads the prompt text and then the target text, nothing between; no </s> is added after a block
    # (it ends mid-document); sequences stay within both models' 64 positions.
    aligner = CrossTokenizerAligner(
        tokenizer, teacher_tokenizer, prompt_template="{source}", max_length=64, teacher_max_length=64, append_eos=False
    )
    collate = CrossTokenizerCollator(aligner, text_column="text", prompt_column="prompt")
    info = {
        "shared_strings": len(VocabularyMap.from_tokenizers(tokenizer, teacher_tokenizer).strings),
        "rows_retokenized_exactly": sum(
            tokenizer(p)["input_ids"] + tokenizer(t)["input_ids"] == ids
            for p, t, ids in zip(rows["prompt"], rows["text"], setup.blocks["input_ids"], strict=True)
        )
        / len(rows),
        "aligned_target_share": aligned_share(collate, rows.select(range(min(len(rows), 320)))),
    }
    cross = {"tokenizer": teacher_tokenizer, "teacher": teacher, "rows": rows, "collator": collate}
    return cross, info


def run_variant(variant: str, seed: int, setup: Setup) -> dict[str, Any]:
    """Train one student (initialisation, data order and sampling from ``seed``); its scores and wall seconds."""
    settings = dataclasses.replace(setup.settings, seed=seed)
    tokenizer, collate = setup.tokenizer, qs.collator(setup.tokenizer)
    start = time.perf_counter()
    student = qs.build_model(tokenizer, settings.student_layers, settings.student_width, settings, seed)
    parts = {"model": student, "processing_class": tokenizer}
    schedule = (setup.work / f"{variant}_seed{seed}", settings, settings.student_steps, settings.student_lr)
    kd = {"loss": setup.loss, "temperature": 1.0, "alpha": 0.0, "max_new_tokens": settings.block_size - PROMPT}
    if variant.endswith("_alpha0.5"):
        kd["alpha"] = 0.5
    extra: dict[str, Any] = {}
    if variant in ("ce", "ce_all_targets"):
        train = setup.prompted if variant == "ce" else setup.blocks
        trainer = Trainer(args=common.training_args(*schedule), train_dataset=train, data_collator=collate, **parts)
    elif variant.startswith("kd_cross_tokenizer"):
        cross = {
            "cross_tokenizer": True, "cross_tokenizer_text_column": "text", "cross_tokenizer_prompt_column": "prompt",
            "teacher_prompt_template": "{source}", "teacher_max_length": 64,
        }  # fmt: skip
        trainer = DistillationTrainer(
            teacher_model=setup.cross["teacher"], teacher_processing_class=setup.cross["tokenizer"],
            args=common.training_args(*schedule, **kd, **cross), train_dataset=setup.cross["rows"],
            data_collator=setup.cross["collator"], **parts,
        )  # fmt: skip
    else:
        train = setup.blocks if variant.endswith("_all_targets") else setup.prompted
        if variant.startswith("kd_lmbda_"):
            kd["lmbda"] = float(variant.removeprefix("kd_lmbda_"))
            extra["on_policy_steps"] = on_policy_steps(seed, settings.student_steps, kd["lmbda"])
        elif variant.startswith("seqkd"):
            kd["seq_kd"] = True
            kd["alpha"] = 1.0 if variant == "seqkd_ce" else 0.0
        trainer = DistillationTrainer(
            teacher_model=setup.teacher, args=common.training_args(*schedule, **kd), train_dataset=train,
            data_collator=collate, **parts,
        )  # fmt: skip
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        **score(student, setup.test, tokenizer),
        "seconds": seconds,
        **extra,
        "last_train_log": common.last_train_log(trainer),
    }


def summarize(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Means (and the perplexity's sample standard deviation) over seeds, with each seed's run."""
    mean = {
        key: statistics.fmean(run[key] for run in runs.values())
        for key in ("test_perplexity", "bits_per_char", "seconds")
    }
    spread = statistics.stdev(run["test_perplexity"] for run in runs.values()) if len(runs) > 1 else 0.0
    return {**mean, "test_perplexity_sd": spread, "runs": {str(seed): run for seed, run in runs.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="Quickstart data cache folder (required unless --report-only).")
    parser.add_argument(
        "--teacher-dir", help="A quickstart lm teacher and its tokenizer (required unless --report-only)."
    )
    parser.add_argument("--work-dir", default="/tmp/hf_kd_policy_quality")
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Student seeds (init, data order, sampling).")
    parser.add_argument("--other-teacher-steps", type=int, help="Default: the quickstart teacher's 300 (smoke runs).")
    parser.add_argument("--loss", default="forward_kl", help="The divergence of every KD variant.")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="policy_quality", help="Results file stem in --out.")
    parser.add_argument("--merge", action="store_true", help="Add to the results already in --out.")
    parser.add_argument("--report-only", action="store_true", help="Rewrite the .md from the .json in --out.")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        common.rewrite_markdown(out / f"{args.name}.json", markdown)
        return 0
    if args.cache_dir is None or args.teacher_dir is None:
        parser.error("--cache-dir and --teacher-dir are required")
    torch.set_num_threads(args.threads)
    settings, data, tokenizer, teacher, blocks, test = common.lm_task(
        Path(args.cache_dir), args.student_steps, args.teacher_dir
    )
    setup = Setup(
        settings, tokenizer, teacher, blocks, with_prompt(blocks, PROMPT), test, Path(args.work_dir), args.loss
    )
    previous = json.loads((out / f"{args.name}.json").read_text()) if args.merge else {}
    results: dict[str, Any] = previous.get("results", {})
    results["teacher"] = score(teacher, test, tokenizer)
    report = {
        "commands": [*previous.get("commands", []), common.command_line("policy_quality.py", argv)],
        "settings": vars(settings),
        "loss": args.loss,
        "prompt_tokens": PROMPT,
        "seeds": args.seeds,
        "train_rows": len(blocks),
        "test_rows": len(test),
        "threads": args.threads,
        "results": results,
    }
    for variant in args.variants:
        info: dict[str, Any] = {}
        if variant.startswith("kd_cross_tokenizer"):
            if variant == "kd_cross_tokenizer_same_teacher":
                setup.cross, info = cross_setup(setup, tokenizer, teacher)
            else:
                steps = args.other_teacher_steps or settings.teacher_steps
                folder = setup.work / f"teacher_unigram{OTHER_VOCAB}_{steps}steps"
                other_tokenizer, other, seconds = other_teacher(
                    dataclasses.replace(settings, teacher_steps=steps), data, folder
                )
                other_test = qs.featurize("lm", data["test"], other_tokenizer, settings)
                results["teacher_unigram"] = {
                    **score(other, other_test, other_tokenizer), "vocab_size": len(other_tokenizer),
                    "teacher_steps": steps, "teacher_train_s": seconds,
                }  # fmt: skip
                setup.cross, info = cross_setup(setup, other_tokenizer, other)
        runs = {}
        for seed in args.seeds:
            runs[seed] = run_variant(variant, seed, setup)
            print(json.dumps({variant: {"seed": seed, **runs[seed]}}), flush=True)
        results[variant] = {**summarize(runs), **info}
        common.write_results(out, args.name, report, markdown(report))
    print(markdown(report))
    return 0


DESCRIPTIONS = {
    "teacher": "the quickstart teacher (byte-level BPE, 2,048 tokens)",
    "teacher_unigram": "the other teacher (Unigram, 4,096 tokens); its perplexity counts other tokens",
    "ce": "cross-entropy on the 48 target tokens",
    "kd_off_policy": "KD on the data's targets (lmbda 0)",
    "kd_lmbda_0.5": "KD, the student samples the targets on half of the steps",
    "kd_lmbda_1.0": "KD, the student samples the targets on every step",
    "seqkd": "KD on targets the teacher samples (seq_kd)",
    "seqkd_ce": "cross-entropy on targets the teacher samples (SeqKD proper)",
    "kd_cross_tokenizer": "KD on the data's targets from the Unigram teacher (cross_tokenizer)",
    "ce_all_targets": "cross-entropy, all 64 tokens targets",
    "kd_off_policy_all_targets": "KD on the data, all 64 tokens targets",
    "kd_cross_tokenizer_same_teacher": "the cross_tokenizer path with the quickstart teacher (a control)",
    "kd_off_policy_alpha0.5": "kd_off_policy with alpha 0.5",
    "kd_cross_tokenizer_alpha0.5": "kd_cross_tokenizer with alpha 0.5",
}


def paired_gap(entry: dict[str, Any], base: dict[str, Any]) -> tuple[float, int, int] | None:
    """Mean over the seeds both ran of the % perplexity change against ``base``, and in how many it was lower."""
    gaps = common.paired(
        entry.get("runs", {}),
        base.get("runs", {}),
        lambda a, b: common.percent_change(a["test_perplexity"], b["test_perplexity"]),
    )
    return (statistics.fmean(gaps), sum(g < 0 for g in gaps), len(gaps)) if gaps else None


def markdown(report: dict[str, Any]) -> str:
    """The results table, each student's perplexity against the off-policy KD student's of the same seed."""
    s, results = report["settings"], report["results"]
    base = results.get("kd_off_policy", {})
    seeds = report["seeds"]
    lines = [
        "# Off-policy, on-policy, sequence-level and cross-tokenizer KD: quickstart lm task (CPU)",
        "",
        common.lm_intro(report) + f", the first {report['prompt_tokens']} tokens of each a prompt (labels -100) "
        f"unless the variant says otherwise; teacher {s['teacher_layers']}x{s['teacher_width']}, students "
        f"{s['student_layers']}x{s['student_width']}; for each seed ({', '.join(map(str, seeds))}) every student "
        f"has the same initialisation and data order. KD students: {report['loss']}, T 1, alpha 0 unless named; "
        f"generated targets: sampled at temperature 1, {s['block_size'] - report['prompt_tokens']} new tokens at most. "
        f"Scored on all tokens of {report['test_rows']} test blocks; {report['threads']} torch thread(s). "
        "Perplexity, bits per character and seconds (per student, wall clock) are means over the seeds; "
        "*vs off-policy KD* is the mean over seeds of the change against the off-policy KD student of the same "
        "seed, and *lower in* counts the seeds where the perplexity was lower.",
        "",
        "| model | what | test perplexity | vs off-policy KD | lower in | bits/char | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        ppl = f"{entry['test_perplexity']:.1f}"
        if entry.get("test_perplexity_sd"):
            ppl += f" ± {entry['test_perplexity_sd']:.1f}"
        paired = paired_gap(entry, base) if name != "kd_off_policy" else None
        gap, lower = (f"{paired[0]:+.1f}%", f"{paired[1]}/{paired[2]}") if paired else ("", "")
        seconds = f"{entry['seconds']:.0f}" if "seconds" in entry else ""
        what = DESCRIPTIONS.get(name, "")
        lines.append(f"| {name} | {what} | {ppl} | {gap} | {lower} | {entry['bits_per_char']:.3f} | {seconds} |")
    cross, other = results.get("kd_cross_tokenizer"), results.get("teacher_unigram")
    if cross and other and "shared_strings" in cross:
        lines += [
            "",
            f"Cross-tokenizer teacher: trained like the quickstart teacher ({other.get('teacher_steps', 300)} steps, "
            f"same size, seed and schedule) on a Unigram tokenizer of {other['vocab_size']} tokens; "
            f"{cross['shared_strings']} token strings are in both vocabularies; "
            f"{100 * cross['aligned_target_share']:.0f}% of the student's target tokens have an aligned teacher "
            f"position; {100 * cross['rows_retokenized_exactly']:.0f}% of the blocks decode and re-encode to the "
            "same student tokens. Its perplexity counts its own tokens: compare bits per character.",
        ]
    same = results.get("kd_cross_tokenizer_same_teacher")
    if same and "aligned_target_share" in same:
        lines.append(
            f"With the quickstart teacher on both sides, {100 * same['aligned_target_share']:.0f}% of the target "
            "tokens are aligned."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
