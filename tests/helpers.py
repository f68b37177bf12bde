"""Shared builders for trainer tests: small datasets, collators and configs (import as `helpers`)."""

from __future__ import annotations

from pathlib import Path

from conftest import make_tokenizer, random_sentences, tiny_gpt2
from datasets import Dataset
from safetensors import safe_open
from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

from hf_kd import DistillationConfig
from hf_kd.cli import main


def lm_dataset(tokenizer, n: int = 16, seed: int = 0) -> Dataset:
    return Dataset.from_dict({"input_ids": [tokenizer(s)["input_ids"] for s in random_sentences(n, seed=seed)]})


def seq2seq_dataset(tokenizer, n: int = 16, seed: int = 0) -> Dataset:
    src = random_sentences(n, seed=seed)
    tgt = random_sentences(n, seed=seed + 1000, min_len=2, max_len=8)
    return Dataset.from_dict(
        {"input_ids": [tokenizer(s)["input_ids"] for s in src], "labels": [tokenizer(t)["input_ids"] for t in tgt]}
    )


def lm_collator(tokenizer):
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def seq2seq_collator(tokenizer, model):
    return DataCollatorForSeq2Seq(tokenizer, model=model)


def config(tmp_path, **kwargs) -> DistillationConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    defaults.update(kwargs)
    return DistillationConfig(**defaults)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`hf-kd ARGV` in this process: its exit status (argparse's own exits included), stdout and stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own exits (--help, usage errors)
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, argv: list[str], *words: str) -> str:
    """Exit status 2, no traceback, and one `hf-kd <command>: error: <what>; <fix>` line holding ``words``."""
    code, out, err = run_cli(capsys, argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"hf-kd {argv[0]}: error: ") and "; " in errors[0], err
    assert all(word in errors[0] for word in words), errors[0]
    return errors[0]


def assert_saved_like_a_fresh_student(saved: Path, fresh: Path) -> None:
    """The saved model.safetensors holds the same tensor names and shapes as a fresh tiny GPT-2 student (seed 1)
    saved to ``fresh``: the student's tensors, whole, and no teacher's."""
    tiny_gpt2(len(make_tokenizer()), seed=1).save_pretrained(fresh)
    with safe_open(str(saved / "model.safetensors"), "pt") as f, safe_open(str(fresh / "model.safetensors"), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        for key in f.keys():
            assert f.get_slice(key).get_shape() == g.get_slice(key).get_shape(), key
