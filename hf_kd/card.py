"""The model card section that says how a student was distilled."""

from __future__ import annotations

import os
import re
from typing import Any

from hf_kd.losses import DIVERGENCES
from hf_kd.student.freeze import switches_on
from hf_kd.version import __version__

_LOSS_NAMES = {
    "forward_kl": "forward KL, KL(teacher || student)",
    "reverse_kl": "reverse KL, KL(student || teacher)",
    "jsd": "generalized Jensen-Shannon divergence (beta = {beta})",
    "skew_forward_kl": "skew forward KL (skew = {skew})",
    "skew_reverse_kl": "skew reverse KL (skew = {skew})",
    "tvd": "total variation distance",
}
assert set(_LOSS_NAMES) == set(DIVERGENCES)


# A snapshot in the Hugging Face cache (.../hub/models--org--name/snapshots/<commit>) is a Hub repository.
_CACHED_SNAPSHOT = re.compile(r"(?:models|datasets)--(?P<repo>[^/\\]+)[/\\]snapshots(?:[/\\]|$)")


def is_local_path(name: str) -> bool:
    """Whether ``name`` names a folder or file on this machine rather than a Hub repository.

    Hub ids are ``name`` or ``org/name``: anything absolute, relative (``./``, ``~``), deeper, or present on
    disk is local, as ``from_pretrained`` and ``load_dataset`` would read it.
    """
    name = str(name)
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.rstrip("/").count("/") > 1
        or os.path.exists(name)
    )


def hub_id(name: str) -> str | None:
    """The Hub repository ``name`` stands for (an ``org/name`` id, or a snapshot in the HF cache), else None."""
    name = str(name)
    cached = _CACHED_SNAPSHOT.search(name)
    if cached:
        return cached["repo"].replace("--", "/")
    return name if "/" in name and not is_local_path(name) else None


def public_name(name: str) -> str:
    """How a card names a model or data set: its Hub id, else a local folder's last component, never a path.

    A card is published: the absolute paths of the machine that wrote it (home, caches, temporary folders)
    mean nothing to its readers and expose the author's file system.
    """
    name = str(name)
    repo = hub_id(name)
    if repo:
        return repo
    if is_local_path(name):
        return os.path.basename(os.path.normpath(os.path.expanduser(name))) or "local folder"
    return name


def markdown_name(name: str) -> str:
    """Markdown for a model or data set: `org/name`, or `folder` (a local folder)."""
    local = hub_id(name) is None and is_local_path(name)
    return f"`{public_name(name)}`" + (" (a local folder)" if local else "")


def distillation_section(
    *,
    teacher: str,
    args: Any,
    dataset: str | list[str] | None = None,
    metrics: dict[str, float] | None = None,
    reused_encoder: bool = False,
) -> str:
    """Markdown that records the teacher, the loss and its settings, the data, the metrics and the hf_kd version.

    The teacher and the data set are named by Hub id, or by folder name when local (:func:`public_name`).
    """
    loss = _LOSS_NAMES[args.loss].format(beta=args.beta, skew=args.skew)
    teacher = markdown_name(teacher)
    datasets = [dataset] if isinstance(dataset, str) else list(dataset or [])
    data = ", ".join(markdown_name(d) if is_local_path(d) else d for d in datasets) or "not recorded"
    lines = [
        "## Distillation",
        "",
        f"This model is a student distilled from {teacher} with hf_kd {__version__}: token-level knowledge "
        "distillation, loss = alpha * CE(labels) + (1 - alpha) * T^2 * D(student / T, teacher / T), averaged "
        "over target tokens.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| teacher | {teacher} |",
        f"| divergence D (`loss`) | {loss} |",
        f"| temperature T | {args.temperature} |",
        f"| alpha (CE weight) | {args.alpha} |",
        f"| data set | {data} |",
        f"| hf_kd version | {__version__} |",
    ]
    frozen = switches_on(args)
    if frozen:  # after alpha, before the data set
        lines.insert(-2, f"| frozen in training | {', '.join(f'`{name}`' for name in frozen)} |")
    if reused_encoder:
        lines.insert(-2, "| teacher's encoder | not run: the teacher read the student's, a frozen copy of its own |")
    if metrics:
        lines += ["", "Evaluation of the student:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def card_metrics(log_history: list[dict[str, Any]], extra: dict[str, float] | None = None) -> dict[str, float]:
    """Every metric the run's evaluations and predictions measured, then ``extra`` (which wins).

    An evaluation's log is known by its ``<prefix>_runtime`` key, so any ``metric_key_prefix`` counts (``eval_``,
    ``eval_<name>_`` for several eval sets, ``test_``, ``predict_`` ...); a log without one counts by the prefixes
    ``eval_``, ``test_`` and ``predict_``. Per prefix, the last log's metrics. Timings (runtime, per-second rates,
    preparation and compilation times) are left out: they describe the machine, not the model.
    """
    by_prefix: dict[str, dict[str, float]] = {}
    for log in log_history:
        prefixes = [key[: -len("runtime")] for key in log if key.endswith("_runtime") and key != "train_runtime"]
        prefixes = prefixes or [p for p in _KNOWN_PREFIXES if any(key.startswith(p) for key in log)]
        for prefix in prefixes:
            by_prefix.pop(prefix, None)  # re-inserted: a prefix measured again moves to the end, in run order
            by_prefix[prefix] = {k: v for k, v in log.items() if k.startswith(prefix)}
    metrics = {k: v for measured in by_prefix.values() for k, v in measured.items()}
    metrics.update(extra or {})
    return {k: v for k, v in metrics.items() if not k.endswith(_TIMINGS)}


_KNOWN_PREFIXES = ("eval_", "test_", "predict_")
_TIMINGS = ("_runtime", "_per_second", "_model_preparation_time", "_jit_compilation_time")


def insert_section(card: str, section: str) -> str:
    """Put ``section`` right after the card's YAML front matter and first heading, or at the top."""
    head, body = "", card
    if card.startswith("---\n"):
        end = card.index("\n---\n", 4) + len("\n---\n")
        head, body = card[:end], card[end:]
    return f"{head}\n{section}\n{body.lstrip()}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
