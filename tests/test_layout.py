"""The package's layers: no module imports from a layer above its own (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_kd"
# Lowest first; a module may import from its own layer and the layers below it.
LAYERS = [
    {"version", "errors", "locking", "paths", "losses", "saving"},
    {"data", "metrics", "generation", "student", "teachers", "evaluate_metrics"},
    {"config", "card"},
    {"trainer"},
    {"recipe", "evaluation", "quickstart"},
    {"cli"},
]


def _layer(dotted: str) -> int:
    top = dotted.split(".")[1] if dotted.startswith("hf_kd.") else dotted
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"hf_kd.{top} is in no layer: add it to LAYERS in tests/test_layout.py")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hf_kd"):
            if node.module == "hf_kd":
                found |= {f"hf_kd.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hf_kd.")}
    return found


def test_no_import_runs_back_up_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if relative.name == "__init__" and len(relative.parts) == 2:
            continue  # hf_kd/__init__.py re-exports the public API from every layer
        module = ".".join(relative.parts)
        for imported in _imports(path):
            if imported in {"hf_kd", "hf_kd.__version__"}:
                upward.append(f"{module} imports the package itself")
            elif _layer(imported) > _layer(module):
                upward.append(f"{module} -> {imported}")
    assert not upward, upward


def test_about_a_dozen_top_level_modules():
    modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    packages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]
    assert len(modules) + len(packages) <= 17, sorted(modules + packages)


def test_quickstart_is_one_package_of_short_files():
    """hf_kd/quickstart/: one idea per file, each readable top to bottom."""
    files = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in (PACKAGE / "quickstart").glob("*.py")}
    assert not (PACKAGE / "quickstart.py").exists() and not (PACKAGE / "quickstart_files.py").exists()
    assert {"settings.py", "dataset.py", "models.py", "training.py", "cache.py", "scoring.py", "report.py"} < set(files)
    assert max(files.values()) <= 250, files
