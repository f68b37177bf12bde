"""A DistilBART/GKD-style quality table for encoder-decoder students, on the quickstart's ``denoise`` task (CPU).

Run from the repository root: ``python benchmarks/seq2seq_quality.py --cache-dir DIR`` (the quickstart's data and
teacher cache: the BART 3+3 x 192 teacher of ``hf-kd quickstart`` is trained there first when absent). Every row
is a student trained on the same task with the same teacher, scored on the test split by the ROUGE-L of its greedy
outputs (first ``rouge_examples`` test rows), the perplexity of the reference targets and its training seconds.
Rows are PAIRED: for each seed, every student of the same kind starts from the same weights and sees the same data
order (``seed`` and ``data_seed`` of the Trainer).

* ``ce`` / ``kd``: the quickstart's T5 2+2 x 64 student from scratch, on the labels (CE) or by forward KL (alpha 0,
  T 1); ``kd_reverse_kl`` / ``kd_jsd`` / ``kd_skew_kl``: the same with another divergence (``--alt-divergences
  best``: all three on the first seed, then only the best of them);
* ``sft`` / ``sft_kd`` / ``sft_kd_hidden``: a copy of the teacher keeping its encoder and 1/3 of its decoder layers
  (``hf_kd.make_student``, DistilBART's shrink-and-fine-tune) trained on CE, by forward KL, and by forward KL plus
  the hidden-state term;
* ``seqkd_ce``: the scratch student on CE on the teacher's greedy outputs for the training sources
  (``hf_kd.teachers.pseudo_label``); ``seqkd_kd``: forward KL on targets the teacher samples at each step (``seq_kd``);
* ``sft_kd_more`` / ``gkd_0.5`` / ``gkd_1.0``: the ``sft_kd`` student of the same seed trained further, off-policy or
  on-policy (GKD, the student samples the targets on a share lmbda of the steps);
* ``kd_cache``: ``kd`` from a top-64 teacher cache with tail samples (``hf_kd.teachers.cache_writer``) instead of
  the live teacher;
* ``xtok_ce`` / ``xtok_kd``: the scratch student with a SentencePiece-style Unigram tokenizer, on CE or distilled
  with ``cross_tokenizer=True`` from a GPT-2 teacher with its own byte-level BPE that reads ``source <sep>`` and
  continues with the target (both trained here, cached in ``--work-dir``); ``xtok_kd_alpha0.5``: the same with
  alpha 0.5 (alpha 0 lets the student put the teacher's unshared mass on any token, docs/seq2seq-quality.md).

Results: benchmarks/results/seq2seq_quality.json / .md, written after every trained student (several processes may
share them: each merges its runs under a lock on the results folder).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import torch  # noqa: E402
from common import last_train_log, replace_fields, spread  # noqa: E402
from common import parse_names as parse_list  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer  # noqa: E402

from hf_kd import DistillationTrainer, make_student  # noqa: E402
from hf_kd import quickstart as qs  # noqa: E402
from hf_kd.losses import IGNORE_INDEX  # noqa: E402
from hf_kd.metrics import cross_entropy_sum, perplexity  # noqa: E402
from hf_kd.teachers.cache_writer import build_teacher_cache, cache_size  # noqa: E402
from hf_kd.teachers.cross_tokenizer import CrossTokenizerAligner, CrossTokenizerCollator, VocabularyMap  # noqa: E402
from hf_kd.teachers.pseudo_label import assemble, generate_pseudo_labels  # noqa: E402

TASK = "denoise"
ALT_DIVERGENCES = {"kd_reverse_kl": "reverse_kl", "kd_jsd": "jsd", "kd_skew_kl": "skew_forward_kl"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Step counts and learning rates of the rows (the teacher's design is the quickstart's)."""

    scratch_steps: int = 300  # half the quickstart's 600: the CPU budget of the whole table (docs/seq2seq-quality.md)
    scratch_lr: float = 3e-3
    sft_decoder_layers: int = 1  # 1/3 of the teacher's 3
    sft_steps: int = 150
    sft_lr: float = 1e-3
    continue_steps: int = 50  # sft_kd_more / gkd_*: further steps from the sft_kd student
    continue_lr: float = 5e-4
    hidden_weight: float = 1.0
    # DistilBART supervises the student's last decoder layer with the teacher's last; the encoder is the teacher's.
    hidden_layer_map: str = '{"encoder": [[3, 3]], "decoder": [[1, 3]]}'
    cache_k: int = 64
    cache_tail_samples: int = 16
    gpt2_steps: int = 600
    gpt2_lr: float = 2e-3
    gpt2_vocab: int = 1024
    unigram_vocab: int = 512
    # Equal-parameter starts (rows rand*, prune*): every one is trained sft_steps; those from the teacher at sft_lr,
    # the random one at scratch_lr (the from-scratch rows' rate). Sizes are matched to the sft copy's parameters.
    prune_hidden: int = 128  # width pruning: d_model 192 -> 128 (heads 3 -> 2 of 64), then the FFN that matches
    depth_decoder_layers: int = 2  # width+depth: 2 of 3 decoder layers by block importance, then the FFN that matches
    calibration_rows: int = 256


SMOKE_PLAN = Plan(
    scratch_steps=6,
    sft_steps=4,
    continue_steps=2,
    gpt2_steps=6,
    cache_k=8,
    cache_tail_samples=2,
    gpt2_vocab=300,
    unigram_vocab=200,
    hidden_layer_map='{"decoder": [[1, 1]]}',
    prune_hidden=32,  # the smoke teacher has one head of 32: only its FFN is pruned
    calibration_rows=16,
)


# ---- shared setup ------------------------------------------------------------------------------------------


def training_args(output_dir: Path, settings: Any, steps: int, lr: float, seed: int, **extra: Any) -> Any:
    """The quickstart's schedule (cosine, 5% warm-up, no weight decay) at ``seed``, no evaluation during training."""
    return common.training_args(output_dir, settings, steps, lr, seed=seed, logs=4, **extra)


class Context:
    """The data, the quickstart teacher and what several rows share (pseudo-labels, cache, GPT-2 teacher), built
    when first needed."""

    def __init__(
        self, settings: qs.Settings, plan: Plan, cache_dir: Path, work: Path, teacher_dir: Path | None = None
    ) -> None:
        self.settings, self.plan, self.work = settings, plan, work
        self.data = qs.load_data(settings, cache_dir)  # the seed-0 shuffle: every student sees the same rows
        self.tokenizer, self.teacher, self.teacher_seconds, _ = qs.train_teacher(settings, self.data, cache_dir)
        self.teacher_record: dict[str, Any] = {}
        if teacher_dir is not None:  # benchmarks/converged_teacher.py's teacher: the same tokenizer, trained longer
            from transformers import AutoModelForSeq2SeqLM

            self.teacher = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir).eval()
            self.teacher_record = json.loads((teacher_dir / "converged_teacher.json").read_text())
            self.teacher_seconds = self.teacher_record["wall_seconds"]
        self.train = qs.featurize(TASK, self.data["train"], self.tokenizer, settings)
        self.test = qs.featurize(TASK, self.data["test"], self.tokenizer, settings)
        self.references = list(self.data["test"]["target"][: settings.rouge_examples])
        self.shared: dict[str, Any] = {}  # facts about the shared artefacts, for the report
        self._memo: dict[str, Any] = {}
        self.sft_kd: dict[int, Any] = {}  # seed -> the sft_kd student, which the continuation rows start from

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def args(self, row: str, seed: int, steps: int, lr: float, **extra: Any) -> Any:
        return training_args(self.work / f"{row}_seed{seed}", self.settings, steps, lr, seed, **extra)

    def scratch_student(self, seed: int, tokenizer: Any = None) -> Any:
        s = self.settings
        return qs.build_model(tokenizer or self.tokenizer, s.student_layers, s.student_width, s, seed, "t5")


def kd_options(loss: str = "forward_kl", **extra: Any) -> dict[str, Any]:
    return {"loss": loss, "temperature": 1.0, "alpha": 0.0} | extra


# ---- rows --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trained:
    """A trained student and how to score it: its tokenizer and featurised test split."""

    model: Any
    seconds: float
    trainer: Any
    tokenizer: Any = None
    test: Any = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def fit(trainer: Any, start: float, **extra: Any) -> Trained:
    trainer.train()
    return Trained(trainer.model.eval(), time.perf_counter() - start, trainer, extra=extra)


def row_ce(ctx: Context, seed: int, row: str) -> Trained:
    start = time.perf_counter()
    student = ctx.scratch_student(seed)
    args = ctx.args(row, seed, ctx.plan.scratch_steps, ctx.plan.scratch_lr)
    return fit(
        Trainer(model=student, args=args, train_dataset=ctx.train, data_collator=qs.collator(ctx.tokenizer)), start
    )


def row_kd(ctx: Context, seed: int, row: str, loss: str = "forward_kl", train: Any = None, **extra: Any) -> Trained:
    """The scratch student distilled from the live teacher; ``train`` replaces the training rows (SeqKD)."""
    start = time.perf_counter()
    student = ctx.scratch_student(seed)
    args = ctx.args(row, seed, ctx.plan.scratch_steps, ctx.plan.scratch_lr, **kd_options(loss, **extra))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=ctx.teacher,
        args=args,
        train_dataset=train if train is not None else ctx.train,
        data_collator=qs.collator(ctx.tokenizer),
        processing_class=ctx.tokenizer,
    )
    return fit(trainer, start)


def row_kd_alt(ctx: Context, seed: int, row: str) -> Trained:
    return row_kd(ctx, seed, row, loss=ALT_DIVERGENCES[row])


def sft_student(ctx: Context) -> Any:
    """The teacher's copy with its whole encoder and ``sft_decoder_layers`` decoder layers (DistilBART)."""
    layers = ctx.teacher.config.encoder_layers
    return make_student(ctx.teacher, encoder_layers=layers, decoder_layers=ctx.plan.sft_decoder_layers)


def row_sft(ctx: Context, seed: int, row: str) -> Trained:
    before = before_training(ctx, "copy", seed)
    start = time.perf_counter()
    args = ctx.args(row, seed, ctx.plan.sft_steps, ctx.plan.sft_lr)
    trainer = Trainer(
        model=sft_student(ctx), args=args, train_dataset=ctx.train, data_collator=qs.collator(ctx.tokenizer)
    )
    return fit(trainer, start, **before)


def row_sft_kd(ctx: Context, seed: int, row: str) -> Trained:
    before = before_training(ctx, "copy", seed)
    start = time.perf_counter()
    hidden = {}
    if row == "sft_kd_hidden":
        hidden = {
            "hidden_state_loss_weight": ctx.plan.hidden_weight,
            "hidden_state_layer_map": ctx.plan.hidden_layer_map,
        }
    args = ctx.args(row, seed, ctx.plan.sft_steps, ctx.plan.sft_lr, **kd_options(**hidden))
    trainer = DistillationTrainer(
        model=sft_student(ctx),
        teacher_model=ctx.teacher,
        args=args,
        train_dataset=ctx.train,
        data_collator=qs.collator(ctx.tokenizer),
        processing_class=ctx.tokenizer,
    )
    trained = fit(trainer, start, **before)
    if row == "sft_kd":
        ctx.sft_kd[seed] = copy.deepcopy(trained.model)
    return trained


def row_continue(ctx: Context, seed: int, row: str) -> Trained:
    """The sft_kd student of this seed, ``continue_steps`` more steps: off-policy (sft_kd_more) or GKD."""
    if seed not in ctx.sft_kd:
        print(f"[seq2seq_quality] {row}: training the sft_kd student of seed {seed} first", flush=True)
        row_sft_kd(ctx, seed, "sft_kd")
    lmbda = float(row.removeprefix("gkd_")) if row.startswith("gkd_") else 0.0
    start = time.perf_counter()
    student = copy.deepcopy(ctx.sft_kd[seed])
    # Another data seed than sft_kd's, so the further steps do not replay its first batches; the same for the three.
    args = ctx.args(
        row,
        seed,
        ctx.plan.continue_steps,
        ctx.plan.continue_lr,
        **kd_options(lmbda=lmbda, max_new_tokens=ctx.settings.target_length),
    )
    args.data_seed = seed + 100
    trainer = DistillationTrainer(
        model=student,
        teacher_model=ctx.teacher,
        args=args,
        train_dataset=ctx.train,
        data_collator=qs.collator(ctx.tokenizer),
        processing_class=ctx.tokenizer,
    )
    return fit(trainer, start, lmbda=lmbda)


# ---- equal-parameter starts: layer copy (sft), width pruning, width + depth, random init ------------------------


def parameters_with(ctx: Context, **changes: Any) -> int:
    """The parameter count of the teacher's architecture with ``changes`` to its config (built on the meta device)."""
    config = copy.deepcopy(ctx.teacher.config)
    for name, value in changes.items():
        setattr(config, name, value)
    with torch.device("meta"):
        return type(ctx.teacher)(config).num_parameters()


def matched_ffn(ctx: Context, **changes: Any) -> int:
    """The FFN width that brings a student with ``changes`` closest to the sft copy's parameter count."""
    target = ctx.memo("sft_params", lambda: sft_student(ctx).num_parameters())
    counts = {
        f: parameters_with(ctx, encoder_ffn_dim=f, decoder_ffn_dim=f, **changes)
        for f in range(8, ctx.teacher.config.encoder_ffn_dim + 1, 8)
    }
    return min(counts, key=lambda f: abs(counts[f] - target))


def calibration(ctx: Context) -> list[dict[str, torch.Tensor]]:
    """The first ``calibration_rows`` training rows in batches of 32: what pruning ranks the teacher's parts on."""
    rows = [ctx.train[i] for i in range(min(ctx.plan.calibration_rows, len(ctx.train)))]
    collate = qs.collator(ctx.tokenizer)
    return [collate(rows[i : i + 32]) for i in range(0, len(rows), 32)]


def start_model(ctx: Context, start: str, seed: int) -> Any:
    """A student of about the sft copy's parameter count: ``copy`` (sft), ``prune`` (d_model, heads and the FFN:
    the FFN cannot grow back, so 9% fewer parameters), ``prune_ffn`` (MLP neurons only), ``prune_depth`` (FFN +
    decoder layers by block importance) or ``rand`` (the copy's architecture, random init)."""
    teacher = ctx.teacher.config
    if start == "copy":
        return sft_student(ctx)
    if start == "rand":
        from transformers import set_seed

        set_seed(seed)
        return type(ctx.teacher)(copy.deepcopy(sft_student(ctx).config))
    batches = ctx.memo("calibration", lambda: calibration(ctx))
    if start == "prune_ffn":
        return make_student(ctx.teacher, intermediate_size=matched_ffn(ctx), calibration=batches)
    if start == "prune":
        hidden = min(ctx.plan.prune_hidden, teacher.d_model)
        heads = teacher.encoder_attention_heads * hidden // teacher.d_model
        changes = {"d_model": hidden, "encoder_attention_heads": heads, "decoder_attention_heads": heads}
        width = {"hidden_size": hidden, "num_attention_heads": heads} if hidden < teacher.d_model else {}
        return make_student(ctx.teacher, intermediate_size=matched_ffn(ctx, **changes), calibration=batches, **width)
    if start == "prune_depth":
        layers = ctx.plan.depth_decoder_layers
        return make_student(
            ctx.teacher,
            decoder_layers=layers,
            layer_selection="importance",
            intermediate_size=matched_ffn(ctx, decoder_layers=layers),
            calibration=batches,
        )
    raise ValueError(start)


def before_training(ctx: Context, start: str, seed: int) -> dict[str, Any]:
    """ROUGE-L and perplexity of a start before any training (how much of the teacher survives the cut)."""
    key = f"before_{start}" + (f"_{seed}" if start == "rand" else "")

    def measure() -> dict[str, Any]:
        found = score(ctx, start_model(ctx, start, seed).eval(), ctx.tokenizer, ctx.test)
        return {"start_rougeL": found["rougeL"], "start_perplexity": found["perplexity"]}

    return ctx.memo(key, measure)


def row_start(ctx: Context, seed: int, row: str) -> Trained:
    """One equal-parameter start trained ``sft_steps`` on CE (``rand``, ``prune``, ``prune_depth``) or by forward
    KL (``*_kd``; ``sft_kd_frozen`` also freezes the copy's encoder, so the teacher's encoder pass is skipped)."""
    frozen = row == "sft_kd_frozen"
    start_name = "copy" if frozen else row.removesuffix("_kd")
    before = before_training(ctx, start_name, seed)
    start = time.perf_counter()
    model = start_model(ctx, start_name, seed)
    lr = ctx.plan.scratch_lr if start_name == "rand" else ctx.plan.sft_lr
    common = {"model": model, "train_dataset": ctx.train, "data_collator": qs.collator(ctx.tokenizer)}
    if row.endswith("_kd") or frozen:
        options = kd_options(freeze_encoder=True) if frozen else kd_options()
        args = ctx.args(row, seed, ctx.plan.sft_steps, lr, **options)
        trainer = DistillationTrainer(teacher_model=ctx.teacher, processing_class=ctx.tokenizer, args=args, **common)
    else:
        trainer = Trainer(args=ctx.args(row, seed, ctx.plan.sft_steps, lr), **common)
    return fit(trainer, start, **before)


def pseudo_labelled_train(ctx: Context) -> Dataset:
    """The training rows with the teacher's greedy output as the target (``hf_kd.teachers.pseudo_label``),
    featurised."""
    start = time.perf_counter()
    # The teacher was trained on source </s>; its tokenizer adds no </s> by itself, so the text carries it.
    sources = ctx.data["train"].map(lambda r: {"source": r["source"] + ctx.tokenizer.eos_token})
    folder = generate_pseudo_labels(
        ctx.teacher,
        ctx.tokenizer,
        sources,
        ctx.work / "pseudo_labels",
        source_column="source",
        target_column="target",
        max_source_length=ctx.settings.source_length,
        max_new_tokens=ctx.settings.target_length,
        batch_size=64,
    )
    rows = assemble(sources, folder, target_column="target", target_source="teacher")
    rows = rows.map(lambda r: {"source": r["source"].removesuffix(ctx.tokenizer.eos_token)})
    ctx.shared["pseudo_labels"] = {
        "seconds": time.perf_counter() - start,
        "rows": len(rows),
        "rougeL_vs_reference": 100 * statistics.fmean(rows["teacher_rouge_l"]),
    }
    return qs.featurize(TASK, rows.select_columns(["source", "target"]), ctx.tokenizer, ctx.settings)


def row_seqkd_ce(ctx: Context, seed: int, row: str) -> Trained:
    train = ctx.memo("pseudo", lambda: pseudo_labelled_train(ctx))
    start = time.perf_counter()
    args = ctx.args(row, seed, ctx.plan.scratch_steps, ctx.plan.scratch_lr)
    trainer = Trainer(
        model=ctx.scratch_student(seed), args=args, train_dataset=train, data_collator=qs.collator(ctx.tokenizer)
    )
    return fit(trainer, start)


def row_seqkd_kd(ctx: Context, seed: int, row: str) -> Trained:
    return row_kd(ctx, seed, row, seq_kd=True, max_new_tokens=ctx.settings.target_length)


def teacher_cache(ctx: Context) -> Path:
    start = time.perf_counter()
    folder = build_teacher_cache(
        ctx.teacher,
        ctx.train,
        ctx.work / "teacher_cache",
        tokenizer=ctx.tokenizer,
        k=ctx.plan.cache_k,
        tail_samples=ctx.plan.cache_tail_samples,
        batch_size=32,
    )
    ctx.shared["teacher_cache"] = {
        "seconds": time.perf_counter() - start,
        "k": ctx.plan.cache_k,
        "tail_samples": ctx.plan.cache_tail_samples,
        **cache_size(folder),
    }
    return folder


def row_kd_cache(ctx: Context, seed: int, row: str) -> Trained:
    folder = ctx.memo("cache", lambda: teacher_cache(ctx))
    start = time.perf_counter()
    args = ctx.args(row, seed, ctx.plan.scratch_steps, ctx.plan.scratch_lr, **kd_options())
    trainer = DistillationTrainer(
        model=ctx.scratch_student(seed),
        teacher_cache=str(folder),
        args=args,
        train_dataset=ctx.train,
        data_collator=qs.collator(ctx.tokenizer),
        processing_class=ctx.tokenizer,
    )
    return fit(trainer, start, tail=trainer.teacher_source.tail_treatment)


# ---- cross-tokenizer rows ------------------------------------------------------------------------------------


def unigram_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram tokenizer (``"▁"`` for spaces) with the quickstart's special ids: <pad>=0,
    </s>=1, then <unk> and the task's <mask> (as benchmarks/policy_quality.py builds it, plus <mask>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hf_kd.data import MASK_TOKEN

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>", MASK_TOKEN],
        unk_token="<unk>",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="</s>",
        unk_token="<unk>",
        mask_token=MASK_TOKEN,
    )


def causal_rows(rows: Any, tokenizer: Any, settings: qs.Settings) -> Dataset:
    """``source <sep> target </s>`` for a causal model, only the target and </s> scored."""
    sep, eos = tokenizer.sep_token_id, tokenizer.eos_token_id
    ids, labels = [], []
    for source, target in zip(rows["source"], rows["target"], strict=True):
        prompt = tokenizer(source)["input_ids"][: settings.source_length - 1] + [sep]
        answer = tokenizer(target)["input_ids"][: settings.target_length - 1] + [eos]
        ids.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": labels})


def gpt2_teacher(ctx: Context) -> dict[str, Any]:
    """A GPT-2 3 x 192 teacher (the BART teacher's width, depth of each stack, seed and schedule) with a byte-level
    BPE of its own, trained on ``source <sep> target``; cached in ``--work-dir``."""
    from transformers import AutoTokenizer

    from hf_kd.data import MASK_TOKEN

    plan, s = ctx.plan, ctx.settings
    folder = ctx.work / f"teacher_gpt2_bpe{plan.gpt2_vocab}_{plan.gpt2_steps}steps_{s.teacher_key()}"
    if (folder / "config.json").exists():
        tokenizer, model = AutoTokenizer.from_pretrained(folder), GPT2LMHeadModel.from_pretrained(folder)
        seconds = json.loads((folder / "train_seconds.json").read_text())["train_seconds"]
    else:
        start = time.perf_counter()
        tokenizer = qs.train_tokenizer(qs.tokenizer_texts(TASK, ctx.data["train"]), plan.gpt2_vocab, (MASK_TOKEN,))
        block = s.source_length + s.target_length
        causal = dataclasses.replace(s, task="lm", block_size=block)
        model = qs.build_model(tokenizer, s.teacher_layers, s.teacher_width, causal, s.seed + 1)
        args = training_args(folder.with_suffix(".run"), s, plan.gpt2_steps, plan.gpt2_lr, s.seed)
        train = causal_rows(ctx.data["train"], tokenizer, s)
        Trainer(model=model, args=args, train_dataset=train, data_collator=qs.collator(tokenizer)).train()
        seconds = time.perf_counter() - start
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "train_seconds.json").write_text(json.dumps({"train_seconds": seconds}))
    return {"tokenizer": tokenizer, "model": model.eval(), "seconds": seconds}


class EosSourceCollator:
    """The cross-tokenizer collator with </s> ending each student source, as ``qs.featurize`` (and the CE student's
    data) have it: CrossTokenizerAligner.seq2seq encodes the source with the tokenizer alone, which adds none."""

    def __init__(self, inner: CrossTokenizerCollator, eos: int, pad: int) -> None:
        self.inner, self.eos, self.pad = inner, eos, pad
        self.aligner, self.columns = inner.aligner, inner.columns

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(features)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        ends = mask.sum(1)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], self.pad)], 1)
        mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)
        rows = torch.arange(len(ids))
        ids[rows, ends], mask[rows, ends] = self.eos, 1
        return {**batch, "input_ids": ids, "attention_mask": mask}


def cross_setup(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    tokenizer = unigram_tokenizer(qs.tokenizer_texts(TASK, ctx.data["train"]), ctx.plan.unigram_vocab)
    gpt2 = ctx.memo("gpt2", lambda: gpt2_teacher(ctx))
    aligner = CrossTokenizerAligner(
        tokenizer,
        gpt2["tokenizer"],
        prompt_template="{source}" + gpt2["tokenizer"].sep_token,
        max_length=s.source_length - 1,
        teacher_max_length=s.source_length + s.target_length,
    )
    inner = CrossTokenizerCollator(aligner, source_column="source", target_column="target")
    rows = ctx.data["train"].select_columns(["source", "target"])
    probe = inner([rows[i] for i in range(min(len(rows), 256))])
    ctx.shared["cross_tokenizer"] = {
        "student_vocab": len(tokenizer),
        "teacher_vocab": len(gpt2["tokenizer"]),
        "shared_strings": len(VocabularyMap.from_tokenizers(tokenizer, gpt2["tokenizer"]).strings),
        "aligned_target_share": len(probe["alignment_batch_index"]) / int(probe["labels"].ne(IGNORE_INDEX).sum()),
    }
    return {
        "tokenizer": tokenizer,
        "train": qs.featurize(TASK, ctx.data["train"], tokenizer, s),
        "test": qs.featurize(TASK, ctx.data["test"], tokenizer, s),
        "rows": rows,
        "collator": EosSourceCollator(inner, tokenizer.eos_token_id, tokenizer.pad_token_id),
    }


def row_xtok_ce(ctx: Context, seed: int, row: str) -> Trained:
    cross = ctx.memo("cross", lambda: cross_setup(ctx))
    start = time.perf_counter()
    student = ctx.scratch_student(seed, cross["tokenizer"])
    args = ctx.args(row, seed, ctx.plan.scratch_steps, ctx.plan.scratch_lr)
    trainer = Trainer(
        model=student, args=args, train_dataset=cross["train"], data_collator=qs.collator(cross["tokenizer"])
    )
    return dataclasses.replace(fit(trainer, start), tokenizer=cross["tokenizer"], test=cross["test"])


def row_xtok_kd(ctx: Context, seed: int, row: str) -> Trained:
    cross = ctx.memo("cross", lambda: cross_setup(ctx))
    gpt2 = ctx.memo("gpt2", lambda: gpt2_teacher(ctx))
    start = time.perf_counter()
    student = ctx.scratch_student(seed, cross["tokenizer"])
    options = {
        "cross_tokenizer": True,
        "cross_tokenizer_text_column": "target",
        "cross_tokenizer_prompt_column": "source",
        "teacher_prompt_template": "{source}" + gpt2["tokenizer"].sep_token,
        "teacher_max_length": ctx.settings.source_length + ctx.settings.target_length,
    }
    # alpha 0.5: the labels' CE pins the tokens only ULD sees (no shared string) and the unaligned positions.
    alpha = 0.5 if row.endswith("_alpha0.5") else 0.0
    args = ctx.args(row, seed, ctx.plan.scratch_steps, ctx.plan.scratch_lr, **kd_options(**options, alpha=alpha))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=gpt2["model"],
        args=args,
        train_dataset=cross["rows"],
        data_collator=cross["collator"],
        processing_class=cross["tokenizer"],
        teacher_processing_class=gpt2["tokenizer"],
    )
    return dataclasses.replace(fit(trainer, start), tokenizer=cross["tokenizer"], test=cross["test"])


@dataclasses.dataclass(frozen=True)
class Row:
    what: str
    train: Callable[[Context, int, str], Trained]
    baseline: str | None  # the row of the same seed its "vs" columns compare against


ROWS: dict[str, Row] = {
    "ce": Row("T5 2+2 x 64 from scratch, CE on the labels", row_ce, None),
    "kd": Row("same init, KD from the BART teacher (forward KL, alpha 0, T 1)", row_kd, "ce"),
    "kd_reverse_kl": Row("same, reverse KL", row_kd_alt, "ce"),
    "kd_jsd": Row("same, JSD (beta 0.5)", row_kd_alt, "ce"),
    "kd_skew_kl": Row("same, skew forward KL (skew 0.1)", row_kd_alt, "ce"),
    "sft": Row("teacher copy, encoder 3 + decoder 1 layers (make_student), CE", row_sft, None),
    "sft_kd": Row("same copy, KD (forward KL)", row_sft_kd, "sft"),
    "sft_kd_hidden": Row("same copy, KD + hidden-state MSE (last layers)", row_sft_kd, "sft"),
    "sft_kd_more": Row("sft_kd student, further steps off-policy (lmbda 0)", row_continue, None),
    "gkd_0.5": Row("sft_kd student, further steps, GKD lmbda 0.5", row_continue, "sft_kd_more"),
    "gkd_1.0": Row("sft_kd student, further steps, GKD lmbda 1.0", row_continue, "sft_kd_more"),
    "seqkd_ce": Row("T5 from scratch, CE on the teacher's greedy outputs (pseudo-labels)", row_seqkd_ce, "ce"),
    "seqkd_kd": Row("T5 from scratch, KD on targets the teacher samples (seq_kd)", row_seqkd_kd, "ce"),
    "kd_cache": Row("T5 from scratch, KD from a top-64 teacher cache with tail samples", row_kd_cache, "kd"),
    "rand": Row("the sft copy's architecture from random init, CE (equal parameters)", row_start, "sft"),
    "rand_kd": Row("same init, KD (forward KL)", row_start, "sft_kd"),
    "prune": Row("width-pruned teacher (d_model 128, 2 heads, FFN 768; make_student), CE", row_start, "sft"),
    "prune_kd": Row("same pruned start, KD (forward KL)", row_start, "sft_kd"),
    "prune_ffn": Row("MLP neurons pruned to match (d_model 192 kept; make_student), CE", row_start, "sft"),
    "prune_ffn_kd": Row("same pruned start, KD (forward KL)", row_start, "sft_kd"),
    "prune_depth": Row("2 of 3 decoder layers by importance + FFN pruned to match, CE", row_start, "sft"),
    "prune_depth_kd": Row("same start, KD (forward KL)", row_start, "sft_kd"),
    "sft_kd_frozen": Row("sft copy, KD with freeze_encoder (teacher's encoder pass skipped)", row_start, "sft_kd"),
    "xtok_ce": Row("T5 from scratch with a Unigram tokenizer, CE", row_xtok_ce, None),
    "xtok_kd": Row("same, KD from the GPT-2 byte-level-BPE teacher (cross_tokenizer, alpha 0)", row_xtok_kd, "xtok_ce"),
    "xtok_kd_alpha0.5": Row("same, cross_tokenizer KD with alpha 0.5 (half CE on the labels)", row_xtok_kd, "xtok_ce"),
}


# ---- evaluation --------------------------------------------------------------------------------------------


def score(ctx: Context, model: Any, tokenizer: Any, test: Any) -> dict[str, Any]:
    """Test perplexity of the references and ROUGE-L of the greedy outputs for the first rouge_examples rows."""
    predictions = qs.greedy_outputs(model, tokenizer, test, ctx.settings)
    return {
        "rougeL": qs.rouge_l(predictions, ctx.references[: len(predictions)]),
        "perplexity": perplexity(model, test, batch_size=32, data_collator=qs.collator(tokenizer)),
        "distinct_outputs": len(set(predictions)),
        "predictions": predictions,
    }


def conditioning(ctx: Context, predictions: list[str]) -> dict[str, Any]:
    candidates = qs.constant_candidates(list(ctx.data["train"]["target"]), [predictions])
    return qs.conditioning(predictions, ctx.references[: len(predictions)], candidates)


@torch.no_grad()
def gpt2_outputs(ctx: Context, gpt2: dict[str, Any]) -> list[str]:
    """The GPT-2 teacher's greedy continuations of ``source <sep>`` for the first rouge_examples test rows."""
    tokenizer, model, s = gpt2["tokenizer"], gpt2["model"], ctx.settings
    prompts = [
        tokenizer(src)["input_ids"][: s.source_length - 1] + [tokenizer.sep_token_id]
        for src in ctx.data["test"]["source"][: s.rouge_examples]
    ]
    out = []
    for i in range(0, len(prompts), 64):
        chunk = prompts[i : i + 64]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=s.target_length,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += [t.strip() for t in tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)]
    return out


def score_teachers(ctx: Context, names: list[str]) -> dict[str, Any]:
    found = {}
    if "teacher" in names:
        result = score(ctx, ctx.teacher, ctx.tokenizer, ctx.test)
        found["teacher"] = {
            **result,
            "conditioning": conditioning(ctx, result["predictions"]),
            "train_seconds": ctx.teacher_seconds,
        }
    if "teacher_gpt2" in names:
        gpt2 = ctx.memo("gpt2", lambda: gpt2_teacher(ctx))
        predictions = gpt2_outputs(ctx, gpt2)
        total, count = cross_entropy_sum(
            gpt2["model"],
            causal_rows(ctx.data["test"], gpt2["tokenizer"], ctx.settings),
            32,
            qs.collator(gpt2["tokenizer"]),
        )
        found["teacher_gpt2"] = {
            "rougeL": qs.rouge_l(predictions, ctx.references[: len(predictions)]),
            "perplexity": math.exp(total / count),
            "distinct_outputs": len(set(predictions)),
            "predictions": predictions,
            "conditioning": conditioning(ctx, predictions),
            "train_seconds": gpt2["seconds"],
        }
    return found


def run_row(ctx: Context, name: str, seed: int) -> dict[str, Any]:
    trained = ROWS[name].train(ctx, seed, name)
    result = score(
        ctx, trained.model, trained.tokenizer or ctx.tokenizer, trained.test if trained.test is not None else ctx.test
    )
    result["predictions"] = result["predictions"][:5]  # a sample; all would bloat the JSON
    steps = trained.trainer.state.global_step
    return {
        **result,
        "train_seconds": trained.seconds,
        "steps": steps,
        "last_train_log": last_train_log(trained.trainer),
        "params": trained.model.num_parameters(),
        "architecture": qs.architecture(trained.model),
        **trained.extra,
    }


# ---- results file ------------------------------------------------------------------------------------------


def locked_results(path: Path) -> Any:
    """The results dict, read and written back under an exclusive lock (parallel processes merge their rows)."""
    return common.locked_results(path, markdown)


def record(path: Path, update: Callable[[dict[str, Any]], None]) -> None:
    with locked_results(path) as results:
        update(results)


def best_alt(results: dict[str, Any]) -> str | None:
    """The alternative divergence with the best ROUGE-L on the lowest seed that ran all three, if any did."""
    runs = results.get("runs", {})
    seeds = set.intersection(*(set(runs.get(r, {})) for r in ALT_DIVERGENCES))
    if not seeds:
        return None
    seed = min(seeds, key=int)
    return max(ALT_DIVERGENCES, key=lambda r: runs[r][seed]["rougeL"])


# ---- report ------------------------------------------------------------------------------------------------


def paired(runs: dict[str, Any], base: dict[str, Any]) -> tuple[str, str]:
    """Mean ROUGE-L points and perplexity % against the baseline row over the seeds both ran, and wins/seeds."""
    rouge = common.paired(runs, base, lambda a, b: a["rougeL"] - b["rougeL"])
    ppl = common.paired(runs, base, lambda a, b: common.percent_change(a["perplexity"], b["perplexity"]))
    if not rouge:
        return "", ""
    wins = sum(r > 0 and p < 0 for r, p in zip(rouge, ppl, strict=True))
    return f"{statistics.fmean(rouge):+.2f} / {statistics.fmean(ppl):+.1f}%", f"{wins}/{len(rouge)}"


def target_lines(results: dict[str, Any]) -> list[str]:
    runs, teachers, lines = results.get("runs", {}), results.get("teachers", {}), []

    def per_seed(row: str, base: str, test: Callable[[dict, dict], bool]) -> tuple[list[str], int, int]:
        seeds = sorted(set(runs.get(row, {})) & set(runs.get(base, {})), key=int)
        ok = [s for s in seeds if test(runs[row][s], runs[base][s])]
        return seeds, len(ok), len(seeds)

    seeds, ok, n = per_seed(
        "kd", "ce", lambda a, b: a["rougeL"] - b["rougeL"] >= 2 and a["perplexity"] <= 0.85 * b["perplexity"]
    )
    if n:
        lines.append(f"* KD from scratch beats CE by >= 2 ROUGE-L points and >= 15% perplexity: {ok}/{n} seeds.")
    small = ("sft", "sft_kd", "sft_kd_hidden", "sft_kd_more", "gkd_0.5", "gkd_1.0", *EQUAL_PARAMETER_ROWS)
    sft_rows = [r for r in small if runs.get(r)]
    if teachers.get("teacher", {}).get("rougeL") and sft_rows:
        best = max(sft_rows, key=lambda r: statistics.fmean(x["rougeL"] for x in runs[r].values()))
        ratios = [x["rougeL"] / teachers["teacher"]["rougeL"] for x in runs[best].values()]
        hits = sum(r >= 0.95 for r in ratios)
        lines.append(
            f"* Best student with 1/3 of the teacher's decoder layers or their parameter count ({best}) keeps >= 95% "
            f"of the teacher's ROUGE-L: {hits}/{len(ratios)} "
            f"seeds ({', '.join(f'{100 * r:.1f}%' for r in ratios)})."
        )
    for row in ("xtok_kd", "xtok_kd_alpha0.5"):
        seeds, ok, n = per_seed(
            row, "xtok_ce", lambda a, b: a["rougeL"] > b["rougeL"] and a["perplexity"] < b["perplexity"]
        )
        if n:
            lines.append(f"* Cross-tokenizer KD ({row}) beats its CE on ROUGE-L and perplexity: {ok}/{n} seeds.")
    return lines


EQUAL_PARAMETER_ROWS = ("sft_kd_frozen", "rand", "rand_kd", "prune", "prune_kd", "prune_ffn", "prune_ffn_kd",
                        "prune_depth", "prune_depth_kd")  # fmt: skip
STARTS = {"copy": ("sft", "sft_kd"), "prune": ("prune", "prune_kd"), "prune_ffn": ("prune_ffn", "prune_ffn_kd"),
          "prune_depth": ("prune_depth", "prune_depth_kd"), "rand": ("rand", "rand_kd")}  # fmt: skip


def equal_parameter_table(runs: dict[str, Any]) -> list[str]:
    """One line per start: parameters, quality before training, after CE and after KD (mean over seeds), KD's
    paired gain over CE, and the KD student's paired difference against the layer copy's."""
    lines = [
        "| start | params | before training ROUGE-L / ppl | CE ROUGE-L / ppl | KD ROUGE-L / ppl | KD vs CE | "
        "KD vs copy KD | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for start, (ce, kd) in STARTS.items():
        if not runs.get(ce) or not runs.get(kd):
            continue

        def mean(row: str, key: str) -> float:
            return statistics.fmean(r[key] for r in runs[row].values() if key in r)

        before = (
            f"{mean(ce, 'start_rougeL'):.2f} / {mean(ce, 'start_perplexity'):.1f}"
            if any("start_rougeL" in r for r in runs[ce].values())
            else ""
        )
        seeds = ",".join(sorted(set(runs[ce]) & set(runs[kd]), key=int))
        vs_copy = " ".join(paired(runs[kd], runs["sft_kd"])) if start != "copy" and runs.get("sft_kd") else ""
        lines.append(
            f"| {start} | {runs[kd][next(iter(runs[kd]))]['params']:,} | {before} | "
            f"{mean(ce, 'rougeL'):.2f} / {mean(ce, 'perplexity'):.2f} | {mean(kd, 'rougeL'):.2f} / "
            f"{mean(kd, 'perplexity'):.2f} | {' '.join(paired(runs[kd], runs[ce]))} | "
            f"{vs_copy} | {seeds} |"
        )
    return lines if len(lines) > 2 else []


def markdown(results: dict[str, Any]) -> str:
    runs, teachers, shared = results.get("runs", {}), results.get("teachers", {}), results.get("shared", {})
    lines = [
        "# Encoder-decoder students on the quickstart denoise task (CPU)",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in results.get("commands", [])) + ".",
        "ROUGE-L (greedy, first test rows), perplexity of the reference targets (test split; per the model's own "
        "tokens) and training seconds (wall clock, per student): mean (min..max) over the seeds; *vs* is the mean "
        "over the seeds of the paired difference against the row named (ROUGE-L points / perplexity %), *wins* the "
        "seeds better on both.",
        "",
        "| row | what | seeds | ROUGE-L | perplexity | train s | vs | ROUGE-L / ppl | wins |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, entry in teachers.items():
        what = (
            "BART 3+3 x 192, the quickstart teacher"
            if name == "teacher"
            else "GPT-2 3 x 192, byte-level BPE, source <sep> target"
        )
        if name == "teacher" and results.get("teacher_record"):
            record = results["teacher_record"]
            what = (
                f"BART 3+3 x 192 trained until validation ROUGE-L stopped improving (best step {record['best_step']} "
                f"of {record['steps_run']} run; benchmarks/converged_teacher.py)"
            )
        lines.append(
            f"| {name} | {what} | - | {entry['rougeL']:.2f} | {entry['perplexity']:.2f} | "
            f"{entry['train_seconds']:.0f} | | | |"
        )
    for name, row in ROWS.items():
        row_runs = runs.get(name)
        if not row_runs:
            continue
        values = list(row_runs.values())
        base = row.baseline if row.baseline and runs.get(row.baseline) else None
        gap, wins = paired(row_runs, runs[base]) if base else ("", "")
        seeds = ",".join(sorted(row_runs, key=int))
        lines.append(
            f"| {name} | {row.what} | {seeds} | {spread([v['rougeL'] for v in values], 2)} | "
            f"{spread([v['perplexity'] for v in values], 2)} | {spread([v['train_seconds'] for v in values], 0)} | "
            f"{base or ''} | {gap} | {wins} |"
        )
    table = equal_parameter_table(runs)
    if table:
        lines += ["", "Equal-parameter starts (each trained the same sft_steps; mean over seeds; paired *vs* as above, "
                  "with wins):", "", *table]  # fmt: skip
    lines += ["", "Targets (per seed):", *target_lines(results), ""]
    for name, entry in teachers.items():
        c = entry["conditioning"]
        lines.append(
            f"{name} conditioning: {c['distinct_outputs']}/{c['outputs']} distinct greedy outputs, ROUGE-L "
            f"{c['rougeL']:.2f} = {c['ratio']:.2f}x the best constant output ({c['best_constant']!r}, "
            f"{c['best_constant_rougeL']:.2f})."
        )
    for name, facts in shared.items():
        lines.append(
            f"Shared {name}: "
            + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items())
            + "."
        )
    if "plan" in results:
        lines.append("Plan: " + ", ".join(f"{k} {v}" for k, v in results["plan"].items()) + ".")
    return "\n".join(lines) + "\n"


# ---- main --------------------------------------------------------------------------------------------------


def fail(message: str) -> int:
    return common.fail("seq2seq_quality", message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="Data and quickstart-teacher cache (default: hf_kd's).")
    parser.add_argument(
        "--work-dir",
        default="/tmp/hf_kd_seq2seq_quality",
        help="Trainer output, GPT-2 teacher, pseudo-labels, teacher cache.",
    )
    parser.add_argument(
        "--teacher-dir",
        default=None,
        help="A teacher from benchmarks/converged_teacher.py (same tokenizer) instead of the quickstart's.",
    )
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated student seeds (default 0,1,2).")
    parser.add_argument("--rows", default="all", help=f"Comma-separated rows, or all: {', '.join(ROWS)}.")
    parser.add_argument("--teachers", default="teacher,teacher_gpt2", help="Teacher rows to score ('' for none).")
    parser.add_argument(
        "--alt-divergences",
        choices=("best", "all"),
        default="best",
        help="best: reverse KL, JSD and skew KL on the first seed, then only the best of them.",
    )
    parser.add_argument("--smoke", action="store_true", help="Tiny data, models and steps (well under a minute).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--plan", action="append", default=[], metavar="FIELD=VALUE",
        help="Change a step count or learning rate of the plan, e.g. --plan sft_steps=600 (repeatable).",
    )  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default=None, help="Results stem (default seq2seq_quality, _smoke with --smoke).")
    parser.add_argument("--fresh", action="store_true", help="Start the results file anew instead of merging.")
    parser.add_argument("--report-only", action="store_true", help="Rewrite the .md from the .json.")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    rows = list(ROWS) if args.rows == "all" else parse_list(args.rows, list(ROWS))
    teachers = parse_list(args.teachers, ["teacher", "teacher_gpt2"]) if args.teachers else []
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        return fail(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    for problem in (rows, teachers):
        if isinstance(problem, str):
            return fail(problem)
    if args.threads < 1:
        return fail(f"--threads {args.threads}: give 1 or more")
    path = Path(args.out) / f"{args.name or ('seq2seq_quality_smoke' if args.smoke else 'seq2seq_quality')}.json"
    if args.report_only:
        if not path.exists():
            return fail(f"{path} does not exist; run the benchmark first")
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return 0
    return run(args, path, rows, teachers, seeds)


def run(args: argparse.Namespace, path: Path, rows: list[str], teachers: list[str], seeds: list[int]) -> int:
    from hf_kd.data import default_cache_dir

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    settings = qs.Settings.for_task(TASK)
    plan = replace_fields(SMOKE_PLAN if args.smoke else Plan(), args.plan)
    if isinstance(plan, str):
        return fail(plan)
    if args.smoke:
        settings = dataclasses.replace(settings, **qs.SMOKE)
    settings = dataclasses.replace(settings, student_steps=plan.scratch_steps)
    work = Path(args.work_dir) / ("smoke" if args.smoke else "full")
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = Path(args.teacher_dir) if args.teacher_dir else None
    if teacher_dir is not None and not (teacher_dir / "converged_teacher.json").is_file():
        return fail(f"--teacher-dir {teacher_dir}: no converged_teacher.json there; make it with converged_teacher.py")
    ctx = Context(settings, plan, Path(args.cache_dir) if args.cache_dir else default_cache_dir(), work, teacher_dir)
    command = common.command_line("seq2seq_quality.py", args.argv)

    def begin(results: dict[str, Any]) -> None:
        if args.fresh:
            results.clear()
        results.setdefault("commands", []).append(command)
        results.update(
            settings=dataclasses.asdict(settings),
            plan=dataclasses.asdict(plan),
            threads=args.threads,
            train_rows=len(ctx.train),
            test_rows=len(ctx.test),
            rouge_rows=len(ctx.references),
        )
        if ctx.teacher_record:
            results["teacher_record"] = {k: v for k, v in ctx.teacher_record.items() if k != "settings"}

    record(path, begin)
    if teachers:
        found = score_teachers(ctx, teachers)
        record(path, lambda results: results.setdefault("teachers", {}).update(found))
    for index, seed in enumerate(seeds):
        for name in rows:
            if name in ALT_DIVERGENCES and args.alt_divergences == "best" and index > 0:
                with locked_results(path) as results:
                    best = best_alt(results)
                if best is not None and name != best:
                    continue
            done = run_row(ctx, name, seed)
            print(
                json.dumps({name: {"seed": seed, **{k: v for k, v in done.items() if k != "predictions"}}}), flush=True
            )

            def add(results: dict[str, Any], name: str = name, seed: int = seed, done: dict = done) -> None:
                results.setdefault("runs", {}).setdefault(name, {})[str(seed)] = done
                results.setdefault("shared", {}).update(ctx.shared)

            record(path, add)
    wall = time.perf_counter() - start
    record(path, lambda results: results.setdefault("process_wall_seconds", []).append(wall))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
