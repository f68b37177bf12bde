"""hf_kd.data: the standard-library docstring data set."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap

import pytest

from hf_kd import data


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_kd_cache")


@pytest.fixture(scope="module")
def summarize(cache_dir):
    return data.load_stdlib_docstrings("summarize", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def lm(cache_dir):
    return data.load_stdlib_docstrings("lm", cache_dir=cache_dir)


def test_splits_columns_and_sizes(summarize, lm):
    assert set(summarize) == set(lm) == {"train", "validation", "test"}
    assert summarize["train"].column_names == ["code", "summary", "module", "name"]
    assert lm["train"].column_names == ["text", "module", "name"]
    assert 5000 < sum(len(s) for s in summarize.values()) < 9000
    assert 7000 < sum(len(s) for s in lm.values()) < 11000
    # Roughly 80/10/10 by module, hence by rows too.
    assert 0.65 < len(lm["train"]) / sum(len(s) for s in lm.values()) < 0.9


@pytest.mark.parametrize("name", ["summarize", "lm"])
def test_no_module_in_two_splits(name, summarize, lm):
    dataset = {"summarize": summarize, "lm": lm}[name]
    modules = {split: set(dataset[split]["module"]) for split in dataset}
    assert not modules["train"] & modules["validation"]
    assert not modules["train"] & modules["test"]
    assert not modules["validation"] & modules["test"]
    for split, names in modules.items():
        assert all(data.split_of(m) == split for m in names)


def test_json_dumps_pair(summarize):
    import json as json_module

    split = summarize[data.split_of("json")]
    rows = [r for r in split if r["module"] == "json" and r["name"] == "dumps"]
    assert len(rows) == 1
    row = rows[0]
    assert row["summary"] == "Serialize ``obj`` to a JSON formatted ``str``."
    # The code is the real function without its docstring: it parses, defines `dumps`, has no docstring, and
    # has the same statements as the live function minus the docstring.
    tree = ast.parse(row["code"])
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef) and func.name == "dumps"
    assert ast.get_docstring(func) is None
    assert "Serialize" not in row["code"]
    live = ast.parse(textwrap.dedent(inspect.getsource(json_module.dumps))).body[0]
    assert [ast.dump(s) for s in func.body] == [ast.dump(s) for s in live.body[1:]]


def test_method_is_dedented_and_named_with_its_class(summarize):
    split = summarize[data.split_of("json.decoder")]
    row = next(r for r in split if r["module"] == "json.decoder" and r["name"] == "JSONDecoder.decode")
    assert row["code"].startswith("def decode(self, s")
    expected = "Return the Python representation of ``s`` (a ``str`` instance containing a JSON document)."
    assert row["summary"] == expected


def test_lm_text_is_the_full_docstring(lm):
    split = lm[data.split_of("json")]
    row = next(r for r in split if r["module"] == "json" and r["name"] == "dumps")
    assert row["text"] == inspect.getdoc(json.dumps)
    module_doc = next(r for r in split if r["module"] == "json" and r["name"] == "")
    assert module_doc["text"] == inspect.cleandoc(json.__doc__)


def test_cache_is_reused_and_deterministic(cache_dir, summarize, monkeypatch):
    # A second load must come from the cache (extraction would fail) and equal the first one.
    monkeypatch.setattr(data, "extract", lambda root=None: pytest.fail("re-extracted despite the cache"))
    again = data.load_stdlib_docstrings("summarize", cache_dir=cache_dir)
    assert again["test"][:] == summarize["test"][:]
    assert data.cache_path("lm", cache_dir).parent.name.endswith(f"-v{data.EXTRACTION_VERSION}")


def test_extraction_is_deterministic(summarize):
    # Re-extracting the json package alone gives the cached rows again (module names relative to json/).
    fresh = data.extract(data.stdlib_root() / "json")["summarize"]
    cached = [r for split in summarize.values() for r in split if r["module"].split(".")[0] == "json"]
    key = lambda r: (r["module"].removeprefix("json").lstrip(".") or "__init__", r["name"])  # noqa: E731
    assert len(fresh) == len(cached) > 5
    assert sorted(fresh, key=key) == sorted(
        ({**r, "module": r["module"].removeprefix("json").lstrip(".") or "__init__"} for r in cached), key=key
    )


def test_split_of_is_stable_and_balanced():
    assert data.split_of("json") == data.split_of("json")
    counts = {s: 0 for s in data.SPLIT_PERCENTS}
    for i in range(2000):
        counts[data.split_of(f"module_{i}")] += 1
    assert 1450 < counts["train"] < 1750 and 120 < counts["test"] < 280


@pytest.mark.parametrize(
    ("docstring", "expected"),
    [
        ("Return the sum.\n\nMore text.", "Return the sum."),
        ("Return the sum, e.g. of x. Then more.", "Return the sum, e.g. of x."),
        ("Spans\n    two lines. Second.", "Spans two lines."),
        ("No full stop\n\nParagraph.", "No full stop"),
        ("Is it? Yes.", "Is it?"),
    ],
)
def test_first_sentence(docstring, expected):
    assert data.first_sentence(docstring) == expected


def test_extract_on_a_fake_stdlib(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (tmp_path / "pkg" / "mod.py").write_text(
        'class A:\n    """An A."""\n\n    def f(self):\n        """Do f. More."""\n        return 1\n\n'
        '    def only_doc(self):\n        """Nothing else."""\n'
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text('"""Skipped."""\n')
    (tmp_path / "bad.py").write_text("print 'python 2'\n")
    rows = data.extract(tmp_path)
    assert rows["summarize"] == [
        {"code": "def f(self):\n    return 1", "summary": "Do f.", "module": "pkg.mod", "name": "A.f"}
    ]
    assert [(r["module"], r["name"], r["text"]) for r in rows["lm"]] == [
        ("pkg", "", "The package."),
        ("pkg.mod", "A", "An A."),
        ("pkg.mod", "A.f", "Do f. More."),
        ("pkg.mod", "A.only_doc", "Nothing else."),
    ]
