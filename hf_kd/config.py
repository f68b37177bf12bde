"""DistillationConfig: the Trainer's arguments plus what token-level distillation needs."""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import Seq2SeqTrainingArguments

from hf_kd.losses import DEFAULT_CHUNK_MIB, DIVERGENCES
from hf_kd.losses.topk import TAIL_TREATMENTS
from hf_kd.student.hidden import HIDDEN_LOSSES


def _accept_old_trust_remote_code(cls: type) -> type:
    """Keep ``DistillationConfig(trust_remote_code=...)`` and ``args.trust_remote_code`` working, with a warning.

    Not a field (nor an ``InitVar`` default, which would sit on the class as a plain value): a field named
    ``trust_remote_code`` collides with the one in the ``ModelArguments`` of the Transformers example scripts when
    both are parsed by one ``HfArgumentParser``. A keyword of ``__init__`` and a property are invisible to it.
    """
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, trust_remote_code: bool | None = None, **kwargs: Any) -> None:  # noqa: N807
        if trust_remote_code is not None:
            warnings.warn(TRUST_REMOTE_CODE_RENAMED, FutureWarning, stacklevel=2)
            given = kwargs.setdefault("teacher_trust_remote_code", bool(trust_remote_code))
            if given != bool(trust_remote_code):
                raise ValueError(
                    f"trust_remote_code={trust_remote_code} and teacher_trust_remote_code={given} disagree: set "
                    "teacher_trust_remote_code only (trust_remote_code is its old name)."
                )
        init(self, *args, **kwargs)

    def read(self: Any) -> bool:
        warnings.warn(TRUST_REMOTE_CODE_RENAMED, FutureWarning, stacklevel=2)
        return self.teacher_trust_remote_code

    def write(self: Any, value: bool) -> None:
        warnings.warn(TRUST_REMOTE_CODE_RENAMED, FutureWarning, stacklevel=2)
        self.teacher_trust_remote_code = bool(value)

    cls.__init__ = __init__
    cls.trust_remote_code = property(read, write, doc="Deprecated name of teacher_trust_remote_code.")
    return cls


TRUST_REMOTE_CODE_RENAMED = (
    "DistillationConfig(trust_remote_code=...) is now teacher_trust_remote_code: it is the teacher's option, and "
    "the old name collided with the trust_remote_code of training scripts' own ModelArguments (the Transformers "
    "examples have one, for the student). The old name still works for now; set teacher_trust_remote_code instead."
)


@_accept_old_trust_remote_code
@dataclass
class DistillationConfig(Seq2SeqTrainingArguments):
    """Arguments for :class:`hf_kd.DistillationTrainer`.

    Every field of :class:`transformers.Seq2SeqTrainingArguments` works as it does there. The training loss is
    ``alpha * CE(student, labels) + (1 - alpha) * temperature**2 * D(student / T, teacher / T)``, averaged over
    target tokens, where ``D`` is the divergence named by ``loss``.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local directory of the teacher, used when no `teacher_model` object is passed to "
            "the trainer. Loaded with AutoModelForSeq2SeqLM or AutoModelForCausalLM, whichever fits its config."
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "With several teachers (`teacher_model=[t1, t2, ...]`): one positive weight per teacher; their "
            "next-token probabilities are mixed with these weights (normalised). Equal weights when unset."
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "A folder written by `hf-kd cache-teacher`, used in place of a teacher: no teacher is loaded "
            "and the loss compares the student with the cached top-k log-probabilities (docs/cache.md)."
        },
    )
    teacher_cache_tail: str = field(
        default="auto",
        metadata={
            "help": "How the loss treats the teacher's mass outside a cache's top-k: 'bucket' (one bucket for all "
            "other tokens; every loss), 'uniform' (spread evenly; forward_kl), 'sampled' (the cache's tail "
            "samples, an unbiased estimate; forward_kl, needs `hf-kd cache-teacher --tail-samples`). 'auto': "
            "'sampled' when the cache has tail samples and the loss is forward_kl, else 'bucket'.",
            "choices": ["auto", *TAIL_TREATMENTS],
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'Keyword arguments for the teacher\'s `from_pretrained` (e.g. `{"dtype": "bfloat16"}`), '
            "as a dict or a JSON string."
        },
    )
    teacher_trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Passed to `from_pretrained` for the teacher (its config, weights and tokenizer). hf_kd never "
            "turns it on by itself: only enable it for repositories whose code you have read. (Named for the "
            "teacher so that it never collides with a script's own `trust_remote_code` for the student.)"
        },
    )
    loss: str = field(
        default="forward_kl",
        metadata={
            "help": "The divergence between teacher and student token distributions.",
            "choices": sorted(DIVERGENCES),
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature applied to both teacher and student logits; must be > 0."},
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the cross-entropy loss on the labels, in [0, 1]; the divergence gets 1 - alpha. "
            "alpha = 0 is pure distillation, alpha = 1 plain fine-tuning."
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "Mixture weight of the teacher in the generalized JSD (loss='jsd'), in (0, 1); 0.5 is the "
            "symmetric Jensen-Shannon divergence."
        },
    )
    skew: float = field(
        default=0.1,
        metadata={"help": "Skew of skew_forward_kl / skew_reverse_kl (DistiLLM), in [0, 1]; 0 is the plain KL."},
    )
    loss_chunk_size: int | None = field(
        default=1024,
        metadata={
            "help": "Compute the loss over this many target tokens at a time, each chunk's gradient formed at "
            "once, so that float32 [tokens, vocab] tensors never exist for more than one chunk, backward included; "
            "None computes all at once (same result, more memory and time)."
        },
    )
    fuse_output_layer: Literal["auto", True, False] = field(
        default="auto",
        metadata={
            "help": "In training, apply the student's output layer inside the loss, one chunk of target tokens at a "
            "time, so that its [batch, seq, vocab] logits are never formed (a fused linear loss, as in Liger-Kernel). "
            "'auto': fused wherever the student allows it, else the chunked loss on its logits, said once in the log "
            "(logit soft-capping or scales, an output layer that is not a plain Linear such as an adapter's, DeepSpeed "
            "ZeRO-3 or FSDP, cross_tokenizer; loss_chunk_size None keeps the unchunked loss). True: fused, or an error "
            "where it cannot be. False: never. The same loss and gradients either way."
        },
    )
    teacher_reuses_student_encoder: bool | None = field(
        default=None,
        metadata={
            "help": "Encoder-decoder models: give the teacher the student's encoder outputs instead of running "
            "its own encoder. Only for a student whose encoder is a frozen copy of the teacher's (DistilBART, "
            "distil-whisper); the trainer checks that it is. None (default): on when freeze_encoder is and the "
            "trainer finds the student's encoder a frozen copy it can reuse exactly (said once in the log); "
            "False: never."
        },
    )

    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy share (GKD): the probability, drawn once per optimizer step, that the student "
            "writes the targets of the step's batches after their prompts and the teacher scores them."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD: on the steps that are not on-policy, the teacher writes the targets after "
            "the prompts (Kim & Rush 2016)."
        },
    )
    max_new_tokens: int = field(
        default=128,
        metadata={"help": "Most tokens generated per target, on-policy or with seq_kd."},
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of generated targets; 0 generates greedily."},
    )
    cross_tokenizer: bool = field(
        default=False,
        metadata={
            "help": "Distill across tokenizers: align teacher and student tokens by character offsets, compare "
            "shared token strings by `loss` and the rest by ULD (docs/cross-tokenizer.md). Needs both tokenizers "
            "and raw text columns (cross_tokenizer_text_column, cross_tokenizer_prompt_column)."
        },
    )
    uld_weight: float = field(
        default=1.0,
        metadata={"help": "cross_tokenizer: weight of the ULD term on tokens without a counterpart; 0 drops it."},
    )
    teacher_prompt_template: str = field(
        default="{source}\n",
        metadata={"help": "cross_tokenizer: what the teacher reads before the target; {source} is the prompt."},
    )
    teacher_max_length: int | None = field(
        default=None,
        metadata={"help": "cross_tokenizer: truncate the teacher's prompt + target to this many tokens."},
    )
    cross_tokenizer_text_column: str = field(
        default="text",
        metadata={"help": "cross_tokenizer: the dataset column with the text the student learns (the target)."},
    )
    cross_tokenizer_prompt_column: str | None = field(
        default=None,
        metadata={
            "help": "cross_tokenizer: the column with the prompt (the source of an encoder-decoder student); "
            "None for plain causal text."
        },
    )

    hidden_state_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the hidden-state loss added to the training loss (docs/students.md); 0 turns it "
            "off. Both models then return every layer's hidden states, which costs activation memory."
        },
    )
    hidden_state_loss: str = field(
        default="mse",
        metadata={
            "help": "Distance between paired hidden states: 'mse' (mean squared difference) or 'cosine' "
            "(1 - cosine similarity).",
            "choices": list(HIDDEN_LOSSES),
        },
    )
    hidden_state_layer_map: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Pairs of hidden-state indices (0 = embeddings, k = output of layer k) per stack, e.g. "
            '{"encoder": [[3, 6], [6, 12]], "decoder": [[1, 4], [2, 12]]}, as a dict or a JSON string. Default: '
            "each layer of a make_student student to the teacher layer it was copied from, else evenly spaced."
        },
    )
    hidden_state_normalize: bool = field(
        default=False,
        metadata={"help": "Layer-normalize both hidden states (no learned parameters) before comparing them."},
    )

    loss_chunk_mib: float | None = field(
        default=DEFAULT_CHUNK_MIB,
        metadata={
            "help": "Memory budget of one chunk of the loss, in MiB: a chunk holds at most loss_chunk_size target "
            "tokens, and where the vocabulary is large only as many as keep its float32 work (about four [tokens, "
            "vocab] arrays) within the budget, so that the loss's memory stays flat in the vocabulary (at 512: 1024 "
            "tokens up to a vocabulary of 32,768, 128 at 262,144). None: loss_chunk_size tokens whatever the "
            "vocabulary. The same loss and gradients either way."
        },
    )

    freeze_encoder: bool = field(
        default=False,
        metadata={
            "help": "Encoder-decoder students: freeze the whole encoder (requires_grad False before the optimizer is "
            "built), its token embedding included: BART's and T5's is shared with the decoder and the tied output "
            "layer, which are then frozen too, as DistilBART's --freeze_encoder did (Whisper's encoder has none). "
            "A causal student is refused. With a student whose encoder is a copy of the teacher's, the teacher "
            "then reuses the student's encoder outputs (see teacher_reuses_student_encoder)."
        },
    )
    freeze_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Freeze the token embeddings (the shared table, and an encoder's or decoder's own), and so a "
            "tied output layer (lm_head); an untied lm_head still trains. Position tables: "
            "freeze_positional_embeddings. DistilBART's --freeze_embeds is both switches."
        },
    )
    freeze_positional_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Freeze learned position embedding tables: embed_positions (BART, Whisper, OPT), wpe (GPT-2), "
            "position_embeddings; distil-whisper's --freeze_embed_positions. A model without one (T5's relative "
            "attention bias is part of attention, not a table; rotary models) is refused."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
        if isinstance(self.hidden_state_layer_map, str):
            self.hidden_state_layer_map = json.loads(self.hidden_state_layer_map)
        self._check_numbers()
        if self.hidden_state_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_state_loss={self.hidden_state_loss!r}: use one of {list(HIDDEN_LOSSES)}.")
        if self.teacher_cache_tail not in ("auto", *TAIL_TREATMENTS):
            raise ValueError(f"teacher_cache_tail={self.teacher_cache_tail!r}: use 'auto' or one of {TAIL_TREATMENTS}.")
        if self.loss not in DIVERGENCES:
            raise ValueError(f"loss={self.loss!r} is not a known divergence: use one of {sorted(DIVERGENCES)}.")
        if self.label_smoothing_factor:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} is not applied by DistillationTrainer: the "
                "teacher's distribution already softens the targets. Set it to 0 and lower alpha instead."
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1.")
        if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} must be a positive number of tokens or None.")
        if self.loss_chunk_mib is not None and not 0 < self.loss_chunk_mib < math.inf:
            raise ValueError(f"loss_chunk_mib={self.loss_chunk_mib} must be a positive number of MiB or None.")
        if isinstance(self.fuse_output_layer, str) and self.fuse_output_layer.lower() in ("true", "false"):
            self.fuse_output_layer = self.fuse_output_layer.lower() == "true"
        if self.fuse_output_layer not in ("auto", True, False):
            raise ValueError(f"fuse_output_layer={self.fuse_output_layer!r}: use 'auto', True or False.")

    def _check_numbers(self) -> None:
        """Refuse NaN, infinite and out-of-range float settings: they would reach the loss or the optimizer and
        train (and save) a student of NaN weights."""
        _check_range("temperature", self.temperature, 0.0, low_open=True, why="1.0 leaves the logits unchanged")
        _check_range("alpha", self.alpha, 0.0, 1.0, why="0 is pure distillation, 1 plain CE")
        _check_range(
            "beta", self.beta, 0.0, 1.0, low_open=True, high_open=True,
            why="0.5 is the symmetric JSD; for beta 0 or 1 use loss='forward_kl' or loss='reverse_kl'",
        )  # fmt: skip
        _check_range("skew", self.skew, 0.0, 1.0, why="0 is the plain KL, 0.1 DistiLLM's default")
        _check_range("lmbda", self.lmbda, 0.0, 1.0, why="the probability of an on-policy step")
        _check_range("generation_temperature", self.generation_temperature, 0.0, why="0 is greedy")
        _check_range("uld_weight", self.uld_weight, 0.0, why="0 drops the ULD term")
        _check_range("hidden_state_loss_weight", self.hidden_state_loss_weight, 0.0, why="0 turns it off")
        for name in _FINITE_TRAINING_ARGUMENTS:
            _check_range(name, getattr(self, name), -math.inf, why="it would make every weight NaN")


# Inherited settings that transformers and torch accept when infinite (a learning rate of inf passes AdamW's check).
_FINITE_TRAINING_ARGUMENTS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")


def _check_range(
    name: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str,
) -> None:
    """Raise a ValueError naming ``name`` and its valid range unless ``value`` is a finite number in it."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if math.isfinite(value) and above and below:
        return
    if high == math.inf:
        where = "" if low == -math.inf else f" {'>' if low_open else '>='} {low:g}"
    else:
        where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{name}={value} must be a finite number{where} ({why}).")
