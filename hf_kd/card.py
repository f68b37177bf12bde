"""The model card section that says how a student was distilled."""

from __future__ import annotations

from typing import Any

from hf_kd import __version__
from hf_kd.losses import DIVERGENCES

_LOSS_NAMES = {
    "forward_kl": "forward KL, KL(teacher || student)",
    "reverse_kl": "reverse KL, KL(student || teacher)",
    "jsd": "generalized Jensen-Shannon divergence (beta = {beta})",
    "skew_forward_kl": "skew forward KL (skew = {skew})",
    "skew_reverse_kl": "skew reverse KL (skew = {skew})",
    "tvd": "total variation distance",
}
assert set(_LOSS_NAMES) == set(DIVERGENCES)


def distillation_section(
    *, teacher: str, args: Any, dataset: str | None = None, metrics: dict[str, float] | None = None
) -> str:
    """Markdown that records the teacher, the loss and its settings, the data, the metrics and the hf_kd version."""
    loss = _LOSS_NAMES[args.loss].format(beta=args.beta, skew=args.skew)
    lines = [
        "## Distillation",
        "",
        f"This model is a student distilled from `{teacher}` with hf_kd {__version__}: token-level knowledge "
        "distillation, loss = alpha * CE(labels) + (1 - alpha) * T^2 * D(student / T, teacher / T), averaged "
        "over target tokens.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| teacher | `{teacher}` |",
        f"| divergence D (`loss`) | {loss} |",
        f"| temperature T | {args.temperature} |",
        f"| alpha (CE weight) | {args.alpha} |",
        f"| data set | {dataset or 'not recorded'} |",
        f"| hf_kd version | {__version__} |",
    ]
    if metrics:
        lines += ["", "Evaluation of the student:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def insert_section(card: str, section: str) -> str:
    """Put ``section`` right after the card's YAML front matter and first heading, or at the top."""
    head, body = "", card
    if card.startswith("---\n"):
        end = card.index("\n---\n", 4) + len("\n---\n")
        head, body = card[:end], card[end:]
    return f"{head}\n{section}\n{body.lstrip()}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
