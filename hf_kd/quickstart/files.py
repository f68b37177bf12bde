"""What `hf-kd quickstart` may write over, and the files of its own it reads back, checked field by field.

The output folder gets a marker, ``hf_kd_quickstart.json``: which entries (``teacher/``, ``student_*/``,
``report.*``, ``eval_loss.png``) a quickstart wrote there and with which settings. A later run writes over them
only when it has the same settings (it makes the same files again); anything else already there under those names
(a model of the user's, a run with other settings, a symlink) is refused with one line unless ``--overwrite``
is given, which replaces exactly those entries (a symlink itself, never what it points to) and nothing else.
The cached teacher's ``quickstart_teacher.json`` and the cached data are read back the same careful way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

from hf_kd.errors import ConfigError, first_line

MARKER = "hf_kd_quickstart.json"
MARKER_KIND = "hf-kd-quickstart"
TEACHER_RECORD = "quickstart_teacher.json"
REPORTS = ("report.json", "report.md", "eval_loss.png")


def planned_outputs(settings: Any) -> list[str]:
    """The entries of the output folder a run with ``settings`` writes."""
    from hf_kd.quickstart.report import student_key

    students = [student_key(kind, arch, settings) for arch in settings.archs for kind in ("ce", "kd")]
    return ["teacher", *students, *REPORTS]


def _plain(settings: Any) -> dict[str, Any]:
    """``settings`` as its JSON round trip gives it back (so a marker's copy compares equal)."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def read_marker(output_dir: Path) -> dict[str, Any] | None:
    """The output folder's marker, checked field by field; None when there is none; a ConfigError naming the file
    when it is damaged."""
    path = output_dir / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    fix = "choose another --output-dir, or pass --overwrite to replace the quickstart's outputs there"
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read as JSON ({first_line(err, 120)}); {fix}.") from None
    problems = []
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
        problems.append(f"kind is not {MARKER_KIND!r}")
    else:
        if not isinstance(marker.get("settings"), dict):
            problems.append("settings is not an object")
        outputs = marker.get("outputs")
        if not isinstance(outputs, list) or not all(isinstance(o, str) and o and "/" not in o for o in outputs):
            problems.append("outputs is not a list of entry names")
    if problems:
        raise ConfigError(f"{path} is damaged ({'; '.join(problems)}); {fix}.")
    return marker


def _remove(path: Path) -> None:
    """One entry: a symlink or file unlinked, a folder removed (a symlink is never followed)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def claim_output_dir(output_dir: Path, settings: Any, overwrite: bool) -> None:
    """Make sure the run may write its entries in ``output_dir`` (see the module docstring), then record them in
    the marker before anything else is written (an interrupted run's entries stay its own)."""
    marker = read_marker(output_dir)
    names = planned_outputs(settings)
    same = marker is not None and marker["settings"] == _plain(settings)
    owned = set(marker["outputs"]) if same else set()
    for name in names:
        path = output_dir / name
        if not (path.exists() or path.is_symlink()) or (name in owned and not path.is_symlink()):
            continue
        if overwrite:
            _remove(path)
            continue
        if path.is_symlink():
            what = "is a symlink, and the quickstart does not write through links"
        elif marker is not None and name in marker["outputs"]:
            what = "holds a quickstart run with other settings"
        else:
            what = "already exists and was not written by hf-kd quickstart"
        raise ConfigError(
            f"{path} {what}; choose another --output-dir, or pass --overwrite to replace the quickstart's outputs "
            f"there ({', '.join(names)}; nothing else)."
        )
    earlier = set(marker["outputs"]) if same else set()
    record = {"kind": MARKER_KIND, "settings": _plain(settings), "outputs": sorted(earlier | set(names))}
    from hf_kd.errors import write_text_atomic

    write_text_atomic(output_dir / MARKER, json.dumps(record, indent=2) + "\n")


def check_teacher_record(path: Path, settings: Any, fields: list[str]) -> float:
    """The cached teacher's training time from ``path/quickstart_teacher.json``, whose ``fields`` (those that
    shape the teacher) must equal ``settings``'; a ConfigError naming the file when it is damaged or another's."""
    record_path = path / TEACHER_RECORD
    fix = f"delete the folder {path} (hf-kd quickstart trains the teacher again), or pass another --cache-dir"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{record_path} cannot be read ({first_line(err, 120)}); {fix}.") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{record_path} is damaged (not a JSON object); {fix}.")
    seconds = record.get("train_seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{record_path} is damaged (train_seconds={seconds!r}, not a time); {fix}.")
    expected = _plain(settings)
    differing = [f for f in fields if record.get(f) != expected[f]]
    if differing:
        raise ConfigError(
            f"{record_path} describes another teacher ({', '.join(f'{f}={record.get(f)!r}' for f in differing)}, "
            f"expected {', '.join(f'{f}={expected[f]!r}' for f in differing)}); {fix}."
        )
    return float(seconds)
