"""A built-in offline data set: the docstrings of the running Python's standard library.

The standard library's ``.py`` files are read and parsed with :mod:`ast` (nothing is imported or executed) and
give two tasks of human-written English:

* ``"summarize"``: a function's source without its docstring -> the docstring's first sentence (in the manner
  of CodeXGLUE code-to-text). Columns ``code``, ``summary``, ``module``, ``name``.
* ``"lm"``: language modelling on the docstrings of modules, classes and functions. Columns ``text``,
  ``module``, ``name``.
* ``"denoise"``: BART-style text infilling of the ``lm`` docstrings (:func:`text_infilling`): a docstring's
  first words with spans replaced by one ``<mask>`` each -> those words restored. Columns ``source``, ``target``,
  ``module``, ``name``. Made from the cached ``lm`` rows on every call (fast, deterministic).

Splits are made by module file (a hash of the module name), so no file contributes to two splits, and are
cached on disk per Python version and extraction version.
"""

from __future__ import annotations

import ast
import hashlib
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset, DatasetDict, load_from_disk

# Bump when the extraction below changes what it produces, so stale caches are not reused.
EXTRACTION_VERSION = 1
TASKS = ("summarize", "lm", "denoise")
MASK_TOKEN = "<mask>"
# Percent of modules per split, by hash bucket.
SPLIT_PERCENTS = {"train": 80, "validation": 10, "test": 10}
# Test suites are mostly terse or absent docstrings about test internals, not documentation.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_SENTENCE_END = re.compile(r"^(.*?[.!?])(?=\s+[A-Z(\"'`*]|\s*$)", re.DOTALL)


def default_cache_dir() -> Path:
    """``$HF_KD_CACHE`` or ``$XDG_CACHE_HOME/hf_kd`` (``~/.cache/hf_kd`` by default)."""
    if os.environ.get("HF_KD_CACHE"):
        return Path(os.environ["HF_KD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_kd"


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    folder = Path(path)
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def split_of(module: str) -> str:
    """The split a module belongs to, from a stable hash of its name (not Python's salted ``hash``)."""
    bucket = int(hashlib.sha1(module.encode("utf-8")).hexdigest(), 16) % 100
    for split, percent in SPLIT_PERCENTS.items():
        if bucket < percent:
            return split
        bucket -= percent
    raise AssertionError("SPLIT_PERCENTS must sum to 100")


def first_sentence(docstring: str) -> str:
    """The first sentence of the first paragraph, on one line ("e.g. x" does not end it: x is lowercase)."""
    paragraph = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    match = _SENTENCE_END.match(paragraph)
    return match.group(1) if match else paragraph


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _stdlib_files(root: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if not _SKIPPED_DIRS.intersection(relative.parts[:-1]):
            yield _module_name(relative), path


def _walk_named(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """Classes and functions with their qualified names (``Class.method``, ``outer.inner``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{child.name}"
            yield name, child
            yield from _walk_named(child, f"{name}.")
        else:
            yield from _walk_named(child, prefix)


def _code_without_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source (decorators excluded) with its own docstring lines cut out, dedented."""
    doc = node.body[0]
    if len(node.body) < 2 or doc.lineno == node.lineno:
        return None  # a body that is only the docstring, or a one-line def: no code to summarise
    kept = lines[node.lineno - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    return textwrap.dedent("".join(kept)).strip("\n")


def extract(root: Path | None = None) -> dict[str, list[dict[str, str]]]:
    """Rows of both tasks from the standard library at ``root`` (the running interpreter's by default)."""
    root = root or stdlib_root()
    rows: dict[str, list[dict[str, str]]] = {"summarize": [], "lm": []}
    for module, path in _stdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # e.g. lib2to3 test data written in Python 2
            continue
        lines = source.splitlines(keepends=True)
        for name, node in [("", tree), *_walk_named(tree)]:
            docstring = ast.get_docstring(node)
            if not docstring or not docstring.strip():
                continue
            rows["lm"].append({"text": docstring.strip(), "module": module, "name": name})
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            code = _code_without_docstring(lines, node)
            summary = first_sentence(docstring)
            if code and re.search(r"[A-Za-z]{2}", summary) and len(summary.split()) <= 64:
                rows["summarize"].append({"code": code, "summary": summary, "module": module, "name": name})
    return rows


def _to_splits(rows: list[dict[str, str]]) -> DatasetDict:
    by_split: dict[str, list[dict[str, str]]] = {split: [] for split in SPLIT_PERCENTS}
    for row in rows:
        by_split[split_of(row["module"])].append(row)
    columns = list(rows[0])
    return DatasetDict(
        {split: Dataset.from_dict({c: [r[c] for r in items] for c in columns}) for split, items in by_split.items()}
    )


def cache_path(task: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a task is cached: keyed by the Python version (its stdlib) and :data:`EXTRACTION_VERSION`."""
    version = "{}.{}.{}".format(*sys.version_info[:3])
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"stdlib_docstrings-py{version}-v{EXTRACTION_VERSION}" / task


def load_stdlib_docstrings(task: str = "summarize", cache_dir: str | os.PathLike | None = None) -> DatasetDict:
    """The standard-library docstring data set for ``task`` (:data:`TASKS`), splits train/validation/test.

    The first call parses the standard library (some seconds) and saves both tasks under ``cache_dir``
    (default :func:`default_cache_dir`); later calls load them from there.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {TASKS}.")
    if task == "denoise":
        return infilling_dataset(load_stdlib_docstrings("lm", cache_dir))
    path = cache_path(task, cache_dir)
    if not path.exists():
        for name, rows in extract().items():
            target = cache_path(name, cache_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            # Save next to the target and rename, so an interrupted run never leaves a half-written cache.
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
            _to_splits(rows).save_to_disk(str(tmp / "data"))
            try:
                os.replace(tmp / "data", target)
            except OSError:  # another process got there first: its copy is as good as ours
                pass
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(path))


# ---- text infilling (the "denoise" task) -----------------------------------------------------------------


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw by inversion (Knuth): enough for the small means of span lengths."""
    limit, k, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def text_infilling(
    text: str, mask_fraction: float = 0.3, mean_span: float = 3.0, max_words: int = 48, seed: str = ""
) -> tuple[str, str]:
    """BART's text-infilling noise on words: ``(source, target)``.

    The target is the first ``max_words`` words of ``text`` on one line. Spans of Poisson(``mean_span``) words
    (at least one), separated by at least one kept word, are replaced by one :data:`MASK_TOKEN` each until
    ``mask_fraction`` of the words are masked (rounded, at least one). The random draws are seeded by ``seed``
    and the text, so a row is corrupted the same way in every run and Python version.
    """
    words = text.split()[:max_words]
    rng = random.Random(hashlib.sha1(f"{seed}\0{text}".encode()).digest())
    goal = max(1, round(mask_fraction * len(words)))
    masked = [False] * len(words)
    covered = 0
    for _ in range(100):  # a few retries when a span lands next to another
        if covered >= goal:
            break
        length = min(max(1, _poisson(rng, mean_span)), goal - covered)
        start = rng.randrange(max(1, len(words) - length + 1))
        if any(masked[max(0, start - 1) : start + length + 1]):
            continue
        masked[start : start + length] = [True] * length
        covered += length
    # A span's first word becomes the mask token, its other words go.
    source = [MASK_TOKEN if masked[i] else w for i, w in enumerate(words) if not (masked[i] and i and masked[i - 1])]
    return " ".join(source), " ".join(words)


def infilling_dataset(
    lm: DatasetDict, mask_fraction: float = 0.3, mean_span: float = 3.0, max_words: int = 48, min_words: int = 4
) -> DatasetDict:
    """The ``denoise`` task from the ``lm`` rows: ``source`` (corrupted by :func:`text_infilling`), ``target``.

    Docstrings of fewer than ``min_words`` words are dropped: there is too little left to infer a span from.
    """

    def corrupt(row: dict[str, str]) -> dict[str, str]:
        source, target = text_infilling(row["text"], mask_fraction, mean_span, max_words, seed=row["module"])
        return {"source": source, "target": target}

    kept = lm.filter(lambda row: len(row["text"].split()) >= min_words, keep_in_memory=True)
    return kept.map(corrupt, remove_columns=["text"], keep_in_memory=True)
