"""The report: the models' names, the DistilBART-style table, the plot of the validation curves and report.md."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from hf_kd.quickstart.settings import Settings

MODEL_NAMES = {"teacher": "Teacher", "student_ce": "Student, CE only", "student_kd": "Student, distilled (KD)"}


ARCH_NAMES = {"t5": "T5", "bart": "BART", "gpt2": "GPT-2"}


def student_key(kind: str, arch: str, settings: Settings) -> str:
    """``student_ce``/``student_kd`` for the main (first) architecture, ``student_ce_bart`` ... for the others."""
    return f"student_{kind}" if arch == settings.archs[0] else f"student_{kind}_{arch}"


def model_name(key: str, settings: Settings) -> str:
    """The table's name for a result key: "Teacher", "Student, CE only", "Student (BART), distilled (KD)" ..."""
    if key == "teacher":
        return MODEL_NAMES[key]
    kind = key.split("_")[1]
    arch = key.split("_")[2] if key.count("_") == 2 else settings.archs[0]
    name = MODEL_NAMES[f"student_{kind}"]
    return name.replace("Student", f"Student ({ARCH_NAMES[arch]})") if settings.is_seq2seq else name


def markdown_table(models: dict[str, dict[str, Any]], settings: Settings) -> str:
    """A DistilBART-style table: size, speed-up over the teacher, test metrics."""
    seq2seq = settings.is_seq2seq
    header = ["Model", "Architecture", "Params", "Speed-up", "Tokens/s", "Test perplexity"]
    header += ["Test ROUGE-L", "Distinct outputs"] if seq2seq else []
    header += ["Train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    teacher_speed = models["teacher"]["tokens_per_second"]
    for key, m in models.items():
        cells = [
            model_name(key, settings),
            m["architecture"],
            f"{m['params'] / 1e6:.2f}M",
            f"{m['tokens_per_second'] / teacher_speed:.2f}x",
            f"{m['tokens_per_second']:.0f}",
            f"{m['test_perplexity']:.2f}",
        ]
        if seq2seq:
            cells += [f"{m['test_rougeL']:.2f}", f"{m['distinct_outputs']} / {len(m['predictions'])}"]
        cells += [f"{m['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    curves: dict[str, list[tuple[int, float]]], teacher_loss: float, path: Path, settings: Settings
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for key, points in curves.items():
        steps, losses = zip(*points, strict=True) if points else ((), ())
        style = ("o" if "_ce" in key else "s") + ("-" if key.count("_") == 1 else ":")
        ax.plot(steps, losses, style, label=model_name(key, settings), markersize=4)
    ax.axhline(teacher_loss, color="gray", linestyle="--", label="Teacher (final)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title(f"hf-kd quickstart ({settings.task}): same steps, data and init")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def versions() -> dict[str, str]:
    import transformers

    from hf_kd.version import __version__

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_kd": __version__,
    }


def conditioning_sentence(check: dict[str, Any]) -> str:
    verdict = "conditions" if check["passes"] else "does NOT condition"
    return (
        f"the teacher {verdict} on its input: {check['distinct_outputs']} of {check['outputs']} greedy outputs are "
        f"distinct (need half), ROUGE-L {check['rougeL']:.2f} vs {check['best_constant_rougeL']:.2f} for the best "
        f"constant output {check['best_constant']!r}: {check['ratio']:.2f}x (need 1.5x)"
    )


def markdown_report(report: dict[str, Any], table: str) -> str:
    s = report["settings"]
    teacher_note = " (loaded from the cache)" if report["teacher_cached"] else ""
    # The recipe config reads the lm data; the other tasks' teachers are saved all the same.
    recipe = "; distill it again with `hf-kd distill --config recipes/configs/quickstart_lm.yaml`"
    recipe = recipe if report["task"] == "lm" else ""
    models = report["models"]
    teacher = models["teacher"]["architecture"]
    student = " and ".join(m["architecture"] for key, m in models.items() if key.startswith("student_kd"))
    check = report["teacher_conditioning"]
    seq2seq = f"\nROUGE-L: greedy outputs for the first {s['rouge_examples']} test examples.\n" if check else ""
    seq2seq += f"Conditioning check: {conditioning_sentence(check)}.\n" if check else ""
    if report["copy_input_rougeL"] is not None:
        seq2seq += (
            f"For scale: the input itself with its <mask> tokens dropped scores ROUGE-L "
            f"{report['copy_input_rougeL']:.2f} (most of each target is in its input).\n"
        )
    cache = report["teacher_cache"]
    source = "from the live teacher at every step"
    if cache:
        source = (
            f"from the teacher's top-{cache['k']} cache with {cache['tail_samples']} tail samples per target token, "
            f"computed once over the training set ({cache['bytes'] / 1e6:.0f} MB, `hf_kd.teachers.cache_writer`)"
        )
    wins = "; ".join(
        f"{ARCH_NAMES[arch]}: " + ", ".join(f"{m} {won}" for m, won in arch_wins.items())
        for arch, arch_wins in report["kd_beats_ce_on"].items()
    )
    return f"""# hf-kd quickstart report

Task: `{report["task"]}` on the Python {report["versions"]["python"]} standard-library docstrings.
Teacher: {teacher}, {s["teacher_steps"]} steps{teacher_note}.
Students: {student}, {s["student_steps"]} steps each; of each architecture one on the labels only and one by
distillation (forward KL, T = {s["temperature"]}, alpha = {s["alpha"]}; {source}), with the same initialisation
and data order. Batch {s["batch_size"]},
one byte-level BPE tokenizer of {s["vocab_size"]} tokens for all three.

{table}
{seq2seq}
Speed: greedy generation of {s["speed_new_tokens"]} new tokens for {s["speed_prompts"]} prompts, on this CPU.
Distilled student beats CE-only student ({wins}).
Saved here: `student_kd/` (with its model card), `student_ce/` and `teacher/` (model and tokenizer{recipe}).
Wall time: {report["wall_seconds"]:.0f} s; CPU time {report["cpu_seconds"]:.0f} s. Command: `{report["command"]}`

![evaluation loss](eval_loss.png)
"""
