"""The documentation site: it builds strictly, its code runs or at least parses, and it lists what the code has."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Seq2SeqTrainingArguments

from hf_kd import DistillationConfig
from hf_kd.losses import DIVERGENCES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# A fenced Python block, and the marker on the line before it: "runnable" blocks run as they are; blocks "runnable
# with tiny models" run with every from_pretrained call answered by a tiny random model and a local tokenizer.
BLOCK = re.compile(r"(?:<!-- (runnable|runnable with tiny models) -->\n)?```python\n(.*?)```", re.DOTALL)


def python_blocks() -> list[tuple[str, int, str | None, str]]:
    """(file, line, marker, code) of every ```python block under docs/."""
    blocks = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start(2))
            blocks.append((path.name, line, match.group(1), match.group(2)))
    return blocks


def test_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "api" / "index.html").read_text()
    for name in ("hf_kd.DistillationConfig", "hf_kd.DistillationTrainer", "hf_kd.losses.distillation_loss"):
        assert f'id="{name}"' in api, f"{name} is missing from the API reference"
    assert ":func:" not in api and ":class:" not in api, "Sphinx roles must not reach the page (docs/hooks.py)"


BLOCKS = python_blocks()


@pytest.fixture
def tiny_hub(monkeypatch, tmp_path):
    """from_pretrained of any name gives a tiny random model of the asked kind, or the local word tokenizer."""
    from conftest import make_tokenizer, tiny_gpt2, tiny_t5
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    vocab = len(make_tokenizer())
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: make_tokenizer())
    seeds = itertools.count()  # teacher and student get different weights
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_gpt2(vocab, seed=next(seeds)))
    monkeypatch.setattr(AutoModelForSeq2SeqLM, "from_pretrained", lambda *a, **k: tiny_t5(vocab, seed=next(seeds)))
    monkeypatch.chdir(tmp_path)  # the examples write to output_dir="out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add handoffs on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # CPU-only machines
@pytest.mark.parametrize("name,line,marker,code", BLOCKS, ids=[f"{name}:{line}" for name, line, _, _ in BLOCKS])
def test_python_blocks(name, line, marker, code, request):
    """Every block parses; marked blocks also run (offline, in seconds)."""
    tree = ast.parse(code, filename=f"docs/{name}:{line}")
    if marker is None:
        return
    if marker == "runnable with tiny models":
        request.getfixturevalue("tiny_hub")
    exec(compile(tree, f"docs/{name}:{line}", "exec"), {"__name__": "docs_block"})


def test_getting_started_examples_are_run():
    markers = [marker for name, _, marker, _ in BLOCKS if name == "getting-started.md"]
    assert markers.count("runnable with tiny models") >= 2, "the causal and the seq2seq examples must be run"
    assert any(marker == "runnable" for _, _, marker, _ in BLOCKS)


def test_config_table_lists_every_added_field_with_its_default():
    inherited = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    added = {f.name: f.default for f in dataclasses.fields(DistillationConfig) if f.name not in inherited}
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", (DOCS / "api.md").read_text(), re.MULTILINE))
    assert set(rows) == set(added)
    for field, default in added.items():
        assert rows[field] == (json.dumps(default) if isinstance(default, str) else repr(default)), field


def test_every_divergence_is_documented():
    text = (DOCS / "losses.md").read_text()
    for name in DIVERGENCES:
        assert re.search(rf"^\| `{name}`", text, re.MULTILINE), f"{name} is not in the table of docs/losses.md"
        assert f"`{name}`" in "".join(re.findall(r"^### .*$", text, re.MULTILINE)), f"{name} has no section"
