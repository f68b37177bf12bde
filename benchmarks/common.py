"""What the benchmark scripts share: one-line errors and option parsing, the quickstart's training schedule and lm
task, results files (merged under a lock where several processes write one), seed spreads and paired differences,
and the tiny models of the timing scripts.

The scripts ``import common`` (``python benchmarks/x.py`` puts benchmarks/ first on the path). Nothing here imports
torch, transformers or hf_kd when the module loads: the timing scripts set their environment before those load.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_LOG_KEYS = ("loss", "kd_loss", "ce_loss", "teacher_agreement", "hidden_loss")

# ---- command line ----------------------------------------------------------------------------------------------


def fail(prog: str, message: str) -> int:
    """Say ``message`` (the problem and its fix) on one stderr line; returns the exit status, 2."""
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that ran ``benchmarks/<script>`` with ``argv`` (default: this process's), as one line to copy."""
    return shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def parse_names(text: str, known: list[str]) -> list[str] | str:
    """The names of a comma-separated list, or a sentence naming the problem when one is not in ``known``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    return f"unknown row(s) {unknown}; use a comma-separated list of {known}" if unknown or not names else names


def replace_fields(plan: Any, changes: list[str]) -> Any:
    """The dataclass ``plan`` with each ``FIELD=VALUE`` of ``changes`` set (cast to the field's type), or a sentence
    naming the first change that is not one (``--plan`` options)."""
    kinds = {f.name: f.type for f in dataclasses.fields(plan)}
    for change in changes:
        field, _, value = change.partition("=")
        cast = {"int": int, "float": float, int: int, float: float}.get(kinds.get(field), str)
        try:
            if field not in kinds or not value:
                raise ValueError
            plan = dataclasses.replace(plan, **{field: cast(value)})
        except ValueError:
            return f"--plan {change!r}: give FIELD=VALUE, FIELD one of {', '.join(kinds)}"
    return plan


# ---- training --------------------------------------------------------------------------------------------------


def training_args(
    output_dir: Path, settings: Any, steps: int, lr: float, *, seed: int | None = None, logs: int = 8, **extra: Any
) -> Any:
    """The quickstart's schedule (``hf_kd.quickstart.training_args``: cosine, 5% warm-up, no weight decay) with
    ``logs`` log lines, no progress bar and no evaluation; ``seed`` (default the settings') also sets the data
    order, so that students of one seed are paired."""
    from hf_kd import quickstart as qs

    if seed is not None:
        extra = {"seed": seed, "data_seed": seed, **extra}
    return qs.training_args(
        output_dir, settings, steps, lr, logging_steps=max(1, steps // logs), disable_tqdm=True, **extra
    )


def last_train_log(trainer: Any) -> dict[str, float]:
    """The losses of the trainer's last training log line (empty when it logged none)."""
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {k: v for k, v in logs[-1].items() if k in TRAIN_LOG_KEYS} if logs else {}


def lm_task(cache_dir: Path, student_steps: int, teacher_dir: str | None = None) -> tuple[Any, ...]:
    """The quickstart's lm task at the size cache_quality and policy_quality train on (64-token blocks, 128-wide
    models, 300 test documents): settings, data, tokenizer, teacher (from ``teacher_dir`` or the quickstart's
    cache), one epoch of training blocks for ``student_steps`` steps and the test blocks. The settings name the
    teacher's shape, which a ``teacher_dir`` one may not share with today's defaults."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from hf_kd import quickstart as qs

    settings = qs.Settings(task="lm", block_size=64, teacher_width=128, teacher_steps=300, student_width=128,
                           student_steps=student_steps, max_test_docs=300)  # fmt: skip
    data = qs.load_data(settings, cache_dir)  # the seed-0 shuffle for every student: the same blocks
    if teacher_dir:
        tokenizer, teacher = AutoTokenizer.from_pretrained(teacher_dir), GPT2LMHeadModel.from_pretrained(teacher_dir)
    else:
        tokenizer, teacher, _, _ = qs.train_teacher(settings, data, cache_dir)
    teacher.eval()
    settings = dataclasses.replace(settings, teacher_layers=teacher.config.n_layer, teacher_width=teacher.config.n_embd)
    train = qs.featurize("lm", data["train"], tokenizer, settings)
    train = train.select(range(min(len(train), settings.student_steps * settings.batch_size)))  # one epoch
    return settings, data, tokenizer, teacher, train, qs.featurize("lm", data["test"], tokenizer, settings)


def tiny_gpt2(vocab: int, positions: int, seed: int, **shape: Any) -> Any:
    """A GPT-2 built from its config (initialised from ``seed``), dropout off: no Hub access, same weights each run."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        **shape)  # fmt: skip
    return GPT2LMHeadModel(config)


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over ``vocab`` made-up tokens (<pad>=0, </s>=1, <unk>=2); only its ids matter."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


# ---- results files ---------------------------------------------------------------------------------------------


def results_folder(out: str | None, smoke: bool, prefix: str) -> Path:
    """``--out``; else a new temporary folder for a smoke run (its figures are no results), else results/."""
    if out:
        return Path(out)
    return Path(tempfile.mkdtemp(prefix=prefix)) if smoke else RESULTS


def write_results(folder: Path, stem: str, report: dict[str, Any], markdown: str) -> Path:
    """``<stem>.json`` (the report) and ``<stem>.md`` (its table) in ``folder``; returns the .json path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown)
    return path


def rewrite_markdown(path: Path, markdown: Callable[[dict[str, Any]], str]) -> None:
    """The .md beside the results ``path`` made again from it (``--report-only``)."""
    path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))


@contextmanager
def locked_results(path: Path, markdown: Callable[[dict[str, Any]], str]) -> Iterator[dict[str, Any]]:
    """The results dict at ``path``, written back with its .md under an exclusive lock (processes merge rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)  # the folder itself is the lock: no lock file is left behind
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {}
        yield results
        write_results(path.parent, path.stem, results, markdown(results))
    finally:
        os.close(folder)  # closing releases the lock


def lm_intro(report: dict[str, Any]) -> str:
    """The commands and the lm task's training blocks, as a results table's first sentences begin."""
    s = report["settings"]
    return (
        "Commands: " + ", ".join(f"`{c}`" for c in report["commands"]) + ". "
        f"{report['train_rows']} training blocks of {s['block_size']} tokens (one epoch, {s['student_steps']} "
        f"steps of {s['batch_size']})"
    )


# ---- seeds -----------------------------------------------------------------------------------------------------


def spread(values: list[float], digits: int) -> str:
    """``mean (min..max)`` to ``digits`` decimals; the value alone when there is one."""
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ({min(values):.{digits}f}..{max(values):.{digits}f})" if len(values) > 1 else "")


def percent_change(value: float, base: float) -> float:
    return 100 * (value / base - 1)


def paired(runs: dict[str, Any], base: dict[str, Any], difference: Callable[[Any, Any], float]) -> list[float]:
    """``difference(run, base run)`` for every seed (a key of both dicts) that both ran, in seed order."""
    return [difference(runs[seed], base[seed]) for seed in sorted(set(runs) & set(base), key=int)]
