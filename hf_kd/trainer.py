"""DistillationTrainer: a Seq2SeqTrainer whose loss is token-level distillation from a frozen teacher.

One seam: a teacher source (:mod:`hf_kd.teachers`) gives the rows of each batch's targets, and one scoring
function (:func:`hf_kd.losses.score`) turns the student's output and those rows into the loss. Which settings
cannot be combined is one table, :data:`REFUSALS`, checked once when the trainer is built.
"""

from __future__ import annotations

import logging
import math
import os
import random
from functools import partial
from typing import Any

import torch
from accelerate.utils import DistributedType, parse_flag_from_env
from safetensors.torch import load_file
from torch import nn
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, Seq2SeqTrainer
from transformers.integrations import is_deepspeed_zero3_enabled

from hf_kd.card import (
    card_metrics,
    distillation_section,
    hub_id,
    insert_section,
    is_local_path,
    markdown_name,
    public_name,
)
from hf_kd.config import DistillationConfig
from hf_kd.generation import generate_causal_targets, generate_seq2seq_targets
from hf_kd.losses import (
    IGNORE_INDEX,
    DistillationLossOutput,
    LossSettings,
    StudentOutput,
    forward_without_logits,
    output_layer,
    resolve_fusion,
    score,
)
from hf_kd.saving import save_atomically
from hf_kd.student.freeze import plan_freezing
from hf_kd.student.hidden import PROJECTION_FILE, HiddenStateDistiller
from hf_kd.teachers import (
    CachedTeacher,
    CrossTokenizerTeacher,
    LiveTeacher,
    RowRequest,
    TeacherEnsemble,
    TeacherSource,
)
from hf_kd.teachers.cache import CACHE_COLUMNS
from hf_kd.teachers.cross_tokenizer.source import check_cross_tokenizer, make_collator, realign
from hf_kd.teachers.cross_tokenizer.vocabulary import VocabularyMap
from hf_kd.teachers.fsdp import drop_tied_copies
from hf_kd.teachers.live import check_shared_encoder, encoder_dropout, shared_encoder_problem
from hf_kd.teachers.loading import (
    check_compatible,
    check_same_tokenizer,
    load_teacher,
    prepare_teacher,
    shared_vocab_size,
)

# What _accumulate sums between two logs, per mode: divergence, cross-entropy and top-1 agreement over target
# tokens, the target tokens, the hidden-state loss over the batches that had one, the target tokens that had
# a teacher (all of them, but for a cache-trained student's evaluation rows without a cache), and (evaluation only)
# the distillation objective over those tokens.
_SUMS = ("kd", "ce", "tokens", "agreement", "hidden", "hidden_batches", "teacher_tokens", "objective")

_LIVE = "needs a live teacher: it cannot be used with teacher_cache."
_OTHER_TOKENS = "is not supported with cross_tokenizer (the models read different tokens)."
_ONE_TEACHER = "needs a single teacher; a teacher ensemble has several (cache the ensemble's rows or use one teacher)."
REFUSALS: tuple[tuple[str, str, str], ...] = (
    # (a setting, a setting it cannot be combined with, why): checked once, in DistillationTrainer.__init__.
    ("teacher_cache", "lmbda > 0", f"lmbda > 0 {_LIVE}"),
    ("teacher_cache", "seq_kd", f"seq_kd {_LIVE}"),
    ("teacher_cache", "cross_tokenizer", f"cross_tokenizer {_LIVE}"),
    ("teacher_cache", "hidden_state_loss_weight > 0", f"hidden_state_loss_weight > 0 {_LIVE}"),
    ("teacher_cache", "teacher_reuses_student_encoder", f"teacher_reuses_student_encoder {_LIVE}"),
    ("cross_tokenizer", "seq_kd", "seq_kd (the teacher writes targets) is not supported with cross_tokenizer."),
    ("cross_tokenizer", "fuse_output_layer", f"fuse_output_layer {_OTHER_TOKENS}"),
    ("cross_tokenizer", "teacher_reuses_student_encoder", f"teacher_reuses_student_encoder {_OTHER_TOKENS}"),
    ("cross_tokenizer", "hidden_state_loss_weight > 0",
     "hidden_state_loss_weight > 0 needs shared positions: it cannot be used with cross_tokenizer."),
    ("teacher_reuses_student_encoder", "hidden_state_loss_weight > 0",
     "teacher_reuses_student_encoder skips the teacher's encoder, so its hidden states are not there for "
     "hidden_state_loss_weight > 0 (a frozen copy would match them exactly anyway). Use one or the other."),
    ("hidden_state_loss_weight > 0", "DeepSpeed or FSDP",
     "hidden_state_loss_weight > 0 is not supported with DeepSpeed or FSDP yet: its projection is trained outside "
     "the wrapped model. Use DDP or a single device, or set it to 0."),
    ("teacher ensemble", "seq_kd", f"seq_kd (the teacher writes targets) {_ONE_TEACHER}"),
    ("teacher ensemble", "hidden_state_loss_weight > 0", f"hidden_state_loss_weight > 0 {_ONE_TEACHER}"),
    ("teacher ensemble", "teacher_reuses_student_encoder", f"teacher_reuses_student_encoder {_ONE_TEACHER}"),
)  # fmt: skip


# How the warnings name what Accelerate runs: words, not the enum's raw value ("NO", "MULTI_CPU"). By name, so
# that an Accelerate without one of these members still imports.
_ENGINES = {
    "MULTI_CPU": "DDP over gloo between CPU processes",
    "MULTI_GPU": "DDP on GPUs",
    "MULTI_NPU": "DDP on Ascend NPUs",
    "MULTI_MLU": "DDP on Cambricon MLUs",
    "MULTI_SDAA": "DDP on SDAA devices",
    "MULTI_MUSA": "DDP on Moore Threads GPUs (MUSA)",
    "MULTI_XPU": "DDP on Intel XPUs",
    "MULTI_HPU": "DDP on Intel Gaudi HPUs",
    "MULTI_NEURON": "DDP on AWS Neuron cores",
    "DEEPSPEED": "DeepSpeed",
    "FSDP": "FSDP",
    "XLA": "XLA (TPU)",
    "MEGATRON_LM": "Megatron-LM",
}


def engine_in_words(distributed_type: DistributedType, processes: int) -> str:
    """What Accelerate runs, for a warning: "one process, without distributed training", "DDP on GPUs with 4
    processes"."""
    if distributed_type == DistributedType.NO:
        return "one process, without distributed training"
    name = _ENGINES.get(distributed_type.name) or distributed_type.name.replace("_", " ").lower()
    return f"{name} with {processes} process{'es' if processes != 1 else ''}"


def check_refusals(in_use: set[str]) -> None:
    """Raise the first :data:`REFUSALS` entry whose two settings are both in use."""
    message = first_refusal(in_use)
    if message is not None:
        raise ValueError(message)


def first_refusal(in_use: set[str]) -> str | None:
    """The message of the first :data:`REFUSALS` entry whose two settings are both in use, else None."""
    for first, second, message in REFUSALS:
        if first in in_use and second in in_use:
            return message
    return None


def settings_in_use(args: DistillationConfig, **facts: bool) -> set[str]:
    """The names :data:`REFUSALS` speaks of that this run uses: the config's, and ``facts`` known at construction
    (``teacher_cache``, ``teacher ensemble``, ``DeepSpeed or FSDP``)."""
    flags = {
        "cross_tokenizer": args.cross_tokenizer,
        "lmbda > 0": args.lmbda > 0,
        "seq_kd": args.seq_kd,
        "hidden_state_loss_weight > 0": args.hidden_state_loss_weight > 0,
        "teacher_reuses_student_encoder": args.teacher_reuses_student_encoder,
        "fuse_output_layer": args.fuse_output_layer is True,  # "auto" falls back where fusing cannot be done
        **facts,
    }
    return {name for name, on in flags.items() if on}


logger = logging.getLogger(__name__)


class DistillationTrainer(Seq2SeqTrainer):
    """A :class:`transformers.Seq2SeqTrainer` that distills a teacher into the student ``model``.

    The teacher is frozen, kept in eval mode, run once per step under ``no_grad`` and never saved or
    optimized. The loss is ``alpha * CE + (1 - alpha) * T**2 * D(student / T, teacher / T)`` over the target
    tokens (labels != -100), see :func:`hf_kd.losses.distillation_loss`. Besides ``loss``, the logs carry
    ``kd_loss`` (the mean divergence at temperature ``T``), ``ce_loss`` (the mean cross-entropy on the labels)
    and ``teacher_agreement`` (how often the student's top-1 token is the teacher's).

    Args:
        model: the student, a causal LM or an encoder-decoder model.
        teacher_model: the teacher, a model object or a Hub id / local path, or a list of them (a teacher
            ensemble, mixed in probability space with ``args.teacher_weights``, see
            :class:`hf_kd.teachers.TeacherEnsemble`); when ``None``, ``args.teacher_model_name_or_path`` is loaded.
        args: a :class:`hf_kd.DistillationConfig`.
        processing_class: the student's tokenizer.
        teacher_processing_class: the teacher's tokenizer, when it may differ from the student's; the
            trainer then checks that both map the same tokens to the same ids.
        teacher_cache: a :class:`hf_kd.teachers.cache.CachedTeacher` or the folder written by ``hf-kd
            cache-teacher``, in place of a teacher: no teacher is loaded, the loss uses its top-k rows.
        **kwargs: everything else :class:`transformers.Seq2SeqTrainer` takes (datasets, collator, callbacks,
            ``compute_metrics`` ...).
    """

    # The loss is divided by the target-token count of the whole accumulated batch (see get_batch_samples),
    # so the Trainer must not divide it again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | list[PreTrainedModel | nn.Module | str] | None = None,
        args: DistillationConfig | None = None,
        processing_class: Any = None,
        teacher_processing_class: Any = None,
        teacher_cache: CachedTeacher | str | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = DistillationConfig(output_dir="hf_kd_output")
        if not isinstance(args, DistillationConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; DistillationTrainer needs a hf_kd.DistillationConfig, which "
                "takes the same fields plus loss, temperature, alpha, beta and skew."
            )
        if model is None:
            raise ValueError("DistillationTrainer needs the student as `model`.")
        is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        # Checked now, before a teacher is loaded; applied once the settings are checked (the student is left as it
        # was when they are refused), before the optimizer is built (at train()): it then holds only what trains.
        self.frozen = plan_freezing(model, args)
        self.teacher_cache = self._open_teacher_cache(
            teacher_cache, teacher_model, model, args, processing_class, kwargs
        )
        if self.teacher_cache is None:
            teacher_model, teacher_processing_class = self._resolve_teacher(
                teacher_model, model, args, processing_class, teacher_processing_class, kwargs
            )

        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        self._warn_engine_fallback()
        in_use = settings_in_use(
            args,
            teacher_cache=self.teacher_cache is not None,
            **{
                "teacher ensemble": isinstance(teacher_model, TeacherEnsemble),
                "DeepSpeed or FSDP": self.is_deepspeed_enabled or self.is_fsdp_enabled,
            },
        )  # fmt: skip
        check_refusals(in_use)
        self.frozen.apply()
        if self.frozen.by_switch and self.is_local_process_zero():
            logger.info("Froze part of the student (requires_grad False): %s.", self.frozen.describe())
        self.is_encoder_decoder = is_encoder_decoder
        # Have the Trainer count target tokens over accumulated micro-batches and pass num_items_in_batch.
        self.model_accepts_loss_kwargs = True
        self._kd_sums = {mode: torch.zeros(len(_SUMS), dtype=self._sum_dtype) for mode in ("train", "eval")}
        self._step_target_counts: list[tuple[int, torch.Tensor]] = []  # (step, its target tokens) since the last log
        self._empty_steps: list[int] = []  # optimizer steps without a target token, and how many were warned of
        self._empty_steps_said = 0
        self._prediction_metrics: dict[str, float] = {}  # what predict() measured: the Trainer does not log it
        self._batch_ce: torch.Tensor | None = None  # the student's mean CE on the batch compute_loss last evaluated
        # True raises UnfusableModelError for a model whose logits it cannot reproduce; "auto" falls back, once said.
        fuse = resolve_fusion(
            args.fuse_output_layer, model, chunked=args.loss_chunk_size is not None,
            cross_tokenizer=args.cross_tokenizer, sharded=self.is_fsdp_enabled or is_deepspeed_zero3_enabled(),
            say=self.is_local_process_zero(),
        )  # fmt: skip
        self.loss_settings = LossSettings.from_config(args, fuse_output_layer=fuse)
        self.teacher_source: TeacherSource
        self.reuses_student_encoder = False  # whether the teacher takes the student's encoder outputs
        if self.teacher_cache is not None:
            self.teacher, self.hidden_distiller = None, None
            self.vocab_size = self.teacher_cache.vocab_size
            self.teacher_name = self.teacher_cache.fingerprint.get("teacher_name") or self.teacher_cache.path
            # Resolved (and refused when the cache or loss cannot serve it) once, here, not at every step.
            self.teacher_source = self.teacher_cache.source(
                self.teacher_cache.tail_treatment(args.teacher_cache_tail, args.loss)
            )
        else:
            self.hidden_distiller = self._make_hidden_distiller(model, teacher_model)
            self.reuses_student_encoder = self._reuse_student_encoder(model, teacher_model, in_use)
            if args.cross_tokenizer:
                self.vocab_size = None
                vocab_map = VocabularyMap.from_tokenizers(processing_class, teacher_processing_class)
            else:  # before the teacher is prepared: ZeRO-3 leaves its output layer empty
                self.vocab_size = shared_vocab_size(model, teacher_model, processing_class, teacher_processing_class)
            self.teacher = prepare_teacher(teacher_model, args, self.accelerator)
            if args.cross_tokenizer:
                self.teacher_source = CrossTokenizerTeacher(self.teacher, vocab_map)
            else:
                self.teacher_source = LiveTeacher(self.teacher, self.vocab_size, self.reuses_student_encoder)
        self._check_labels_present()

    def _resolve_teacher(
        self,
        teacher_model: nn.Module | str | list[nn.Module | str] | None,
        model: nn.Module,
        args: DistillationConfig,
        processing_class: Any,
        teacher_processing_class: Any,
        kwargs: dict[str, Any],
    ) -> tuple[nn.Module, Any]:
        """The teacher model (loaded when named; an ensemble when several) and its tokenizer, checked against
        the student."""
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "No teacher: pass `teacher_model=` (a model or a path), set `teacher_model_name_or_path` in the "
                "DistillationConfig, or train from a cache with `teacher_cache=` (see `hf-kd cache-teacher`)."
            )
        members = list(teacher_model) if isinstance(teacher_model, list | tuple) else [teacher_model]
        if args.teacher_weights is not None and len(members) < 2:
            raise ValueError("teacher_weights weighs the teachers of an ensemble: pass teacher_model=[t1, t2, ...].")
        names, loaded = [], []
        for member in members:
            names.append(member if isinstance(member, str) else _model_name(member))
            if isinstance(member, str):
                member, member_tokenizer = load_teacher(member, args)
                if teacher_processing_class is None:
                    teacher_processing_class = member_tokenizer
                elif member_tokenizer is not None and len(members) > 1:
                    check_same_tokenizer(teacher_processing_class, member_tokenizer, fix=_ENSEMBLE_FIX)
            if member is model:
                raise ValueError(
                    "The teacher is the student object itself: distilling a model into itself teaches nothing. "
                    "Pass a separate teacher (e.g. a larger model, or a frozen copy made with copy.deepcopy)."
                )
            loaded.append(member)
        self.teacher_name = " + ".join(names)
        teacher_model = loaded[0] if len(loaded) == 1 else TeacherEnsemble(loaded, args.teacher_weights)
        if args.cross_tokenizer:
            # A causal teacher may teach an encoder-decoder student: it reads the source as its prompt.
            check_cross_tokenizer(model, teacher_model, processing_class, teacher_processing_class)
            if kwargs.get("data_collator") is None:
                is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
                # Learned positions (BART, GPT-2) end somewhere: never give the student longer sequences.
                limit = getattr(model.config, "max_position_embeddings", None)
                kwargs["data_collator"] = make_collator(
                    args, is_encoder_decoder, processing_class, teacher_processing_class, max_length=limit
                )
        else:
            for member in loaded:
                check_compatible(model, member)
        return teacher_model, teacher_processing_class

    @staticmethod
    def _open_teacher_cache(
        teacher_cache: CachedTeacher | str | None,
        teacher_model: Any,
        model: nn.Module,
        args: DistillationConfig,
        processing_class: Any,
        kwargs: dict[str, Any],
    ) -> CachedTeacher | None:
        """A checked teacher cache joined to the training set, with a collator that batches it; None without one."""
        teacher_cache = teacher_cache if teacher_cache is not None else args.teacher_cache
        if teacher_cache is None:
            return None
        if teacher_model is not None or args.teacher_model_name_or_path is not None:
            raise ValueError(
                "Pass a teacher (teacher_model / teacher_model_name_or_path) or a teacher_cache, not both."
            )
        check_refusals(settings_in_use(args, teacher_cache=True))  # before the cache is read and joined
        cache = teacher_cache if isinstance(teacher_cache, CachedTeacher) else CachedTeacher(teacher_cache)
        cache.check_temperature(args.temperature)  # the cached log-probabilities are at the cache's temperature
        cache.check_student(model)
        if kwargs.get("train_dataset") is not None:
            kwargs["train_dataset"] = cache.attach(kwargs["train_dataset"], tokenizer=processing_class)
        base = kwargs.get("data_collator") or DataCollatorForSeq2Seq(processing_class, label_pad_token_id=IGNORE_INDEX)
        kwargs["data_collator"] = cache.collator(base)
        return cache

    # ---- construction checks --------------------------------------------------------------------------

    def _warn_engine_fallback(self) -> None:
        """Say what runs when it is less than the launch asked for: Accelerate falls back without a word.

        Before the teacher is prepared, so that the warning comes before anything DeepSpeed raises about it.
        """
        if not self.is_local_process_zero():  # once per machine; processes that run alone are each their own zero
            return
        engine = engine_in_words(self.accelerator.distributed_type, self.accelerator.num_processes)
        self._warn_processes_not_joined(engine)
        self._warn_fsdp_off(engine)

    def _warn_processes_not_joined(self, engine: str) -> None:
        """WORLD_SIZE processes launched, fewer in Accelerate's process group (on CPUs without use_cpu: none)."""
        launched, running = int(os.environ.get("WORLD_SIZE") or 1), self.accelerator.num_processes
        if launched <= running:
            return
        alone = "each process trains alone, on all the data, and writes to the same output_dir"
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed joins them all regardless
            alone = f"DeepSpeed still counts {launched} and refuses the batch size computed for {running}"
        why = ""
        if self.args.device.type == "cpu" and not self.args.use_cpu:
            why = " On a machine without GPUs, Accelerate forms a process group (gloo) only with use_cpu=True."
        message = "%d processes were launched (WORLD_SIZE=%d), but Accelerate runs %s: %s.%s"
        logger.warning(message, launched, launched, engine, alone, why)

    def _warn_fsdp_off(self, engine: str) -> None:
        """FSDP asked for (args or the launcher's environment) but not what Accelerate set up."""
        asked = [f"fsdp={self.args.fsdp!r}"] if self.args.fsdp else []
        asked += ["ACCELERATE_USE_FSDP=true"] if parse_flag_from_env("ACCELERATE_USE_FSDP") else []
        if not asked or self.accelerator.distributed_type == DistributedType.FSDP:
            return
        several = self.accelerator.num_processes > 1
        copies = "every process holds all of it, as in DDP" if several else "it is held whole"
        logger.warning(
            "FSDP was asked for (%s), but Accelerate runs %s: the student is not sharded, %s. Accelerate turns FSDP on "
            "only for GPUs (and other accelerators), not for a CPU process group (use_cpu=True), whose processes run "
            "plain DDP over gloo.", ", ".join(asked), engine, copies,
        )  # fmt: skip

    def _check_labels_present(self) -> None:
        """With alpha > 0 the batches need labels; find out now from one collated row, not after an hour."""
        if self.args.alpha == 0.0 or self.train_dataset is None:
            return
        try:
            batch = self.data_collator([self.train_dataset[0]])
        except Exception:  # a row the collator can only take after column removal: checked per batch instead
            return
        if "labels" not in batch:
            raise ValueError(_missing_labels_message(self.args.alpha))

    def _reuse_student_encoder(self, student: nn.Module, teacher: nn.Module, in_use: set[str]) -> bool:
        """teacher_reuses_student_encoder resolved: True is checked (an error where it cannot be), False is False,
        None is on with freeze_encoder where the student's encoder is a frozen copy the teacher can reuse exactly;
        which it chose and why, said once."""
        setting = self.args.teacher_reuses_student_encoder
        if setting:
            check_shared_encoder(student, teacher)
            return True
        if setting is False or not self.args.freeze_encoder:
            return False
        why = first_refusal(in_use | {"teacher_reuses_student_encoder"})
        if why is None and (self.is_fsdp_enabled or is_deepspeed_zero3_enabled()):
            why = "the weights are sharded (DeepSpeed ZeRO-3 or FSDP), so they cannot be compared here"
        dropout = encoder_dropout(student)
        if why is None and dropout is not None:
            why = (
                f"the student's encoder applies dropout in training ({dropout}), so its outputs "
                "are not the teacher's; set it to 0 (for a frozen encoder it only adds noise) to reuse them"
            )
        why = why or shared_encoder_problem(student, teacher)
        if self.is_local_process_zero():
            if why is None:
                logger.info(
                    "freeze_encoder: the teacher reuses the student's encoder outputs, since the student's encoder is "
                    "a frozen copy of its own (the same loss, one encoder pass less per step); "
                    "teacher_reuses_student_encoder=False runs the teacher's encoder instead."
                )
            else:
                logger.info("freeze_encoder: the teacher runs its own encoder: %s", why)
        return why is None

    def _make_hidden_distiller(self, student: nn.Module, teacher: nn.Module) -> HiddenStateDistiller | None:
        """The hidden-state term's layer pairs and projections, when hidden_state_loss_weight > 0."""
        if self.args.hidden_state_loss_weight == 0.0:
            return None
        distiller = HiddenStateDistiller(
            student.config,
            teacher.config,
            layer_map=self.args.hidden_state_layer_map,
            loss=self.args.hidden_state_loss,
            normalize=self.args.hidden_state_normalize,
        )
        return distiller.to(self.args.device)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the columns the collator reads that the model's forward does not take: the cross-tokenizer
        collator's raw text, the teacher cache's rows."""
        super()._set_signature_columns_if_needed()
        columns = getattr(self.data_collator, "columns", None) if self.args.cross_tokenizer else None
        if self.teacher_cache is not None:
            columns = list(CACHE_COLUMNS)
        if columns:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *columns]))

    # ---- the loss -------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not model.training:
            num_items_in_batch = None  # evaluation reports the per-batch mean
        labels = self._targets(inputs)
        # Training only: in evaluation the Trainer would collect the hidden-state tuples as predictions.
        with_hidden = self.hidden_distiller is not None and model.training
        student_inputs = self._student_inputs(model, inputs, with_hidden)
        student, outputs = self._run_student(model, student_inputs)
        teacher = self.teacher_source.rows(RowRequest(inputs, student_inputs, labels, outputs, with_hidden))
        result = score(student, teacher.rows, labels, self.loss_settings, self.vocab_size, num_items_in_batch)
        loss = result.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # DDP averages gradients over processes, but the normalizer already counts every process's tokens.
            loss = loss * self.accelerator.num_processes
        hidden = None
        if with_hidden:
            # `inputs`, not the student's: a seq2seq batch's decoder mask comes from its labels. A per-micro-batch
            # mean: averaged over accumulation here and over processes by DDP.
            hidden = self.hidden_distiller.loss_from_outputs(outputs, teacher.outputs, inputs, self.is_encoder_decoder)
            scale = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.args.hidden_state_loss_weight * hidden / scale
        self._accumulate("train" if model.training else "eval", result, hidden)
        if not model.training:  # what prediction_step reports as the eval loss (nan without targets, as a Trainer's)
            tokens = result.num_tokens or math.nan
            self._batch_ce = result.ce_sum / tokens
        return (loss, outputs) if return_outputs else loss

    def _targets(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Labels aligned with the student's output positions (a causal LM's shifted left, -100 at the end);
        the attention-masked input ids of a causal batch without labels."""
        labels = inputs.get("labels")
        if labels is None:
            if self.args.alpha > 0.0:
                raise ValueError(_missing_labels_message(self.args.alpha))
            if self.is_encoder_decoder:
                raise ValueError("An encoder-decoder student needs `labels` (the decoder targets) in each batch.")
            labels = _text_labels(inputs)
        if self.is_encoder_decoder:
            return labels
        return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)

    def _student_inputs(self, model: nn.Module, inputs: dict[str, Any], with_hidden: bool) -> dict[str, Any]:
        """What the student's forward takes: the source's part of the batch, without labels (the loss is ours)."""
        student_inputs = dict(self.teacher_source.student_inputs(inputs))
        labels = student_inputs.pop("labels", None)
        if self.is_encoder_decoder and "decoder_input_ids" not in student_inputs:
            student = self.accelerator.unwrap_model(model)
            student_inputs["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(labels=labels)
        student_inputs["use_cache"] = False
        if with_hidden:
            student_inputs["output_hidden_states"] = True
        return student_inputs

    def _run_student(self, model: nn.Module, student_inputs: dict[str, Any]) -> tuple[StudentOutput, Any]:
        """The student's forward pass. Fused: it stops before its output layer, which the loss applies chunk by
        chunk. Training only: evaluation may hand the logits to compute_metrics, and needs no gradient memory."""
        if self.loss_settings.fuse_output_layer and model.training:
            hidden_states, outputs = forward_without_logits(model, student_inputs)
            return StudentOutput(None, hidden_states, output_layer(model)), outputs
        outputs = model(**student_inputs)
        return StudentOutput(outputs.logits), outputs

    def get_batch_samples(self, epoch_iterator, num_batches, device):  # noqa: ANN001, ANN201
        """The micro-batches of one optimizer step, with generated targets on on-policy or seq_kd steps, and
        the count of their target tokens on all processes."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        generator = self._target_writer()
        if generator is not None:
            batch_samples = [self._generate_targets(generator, batch) for batch in batch_samples]
            if self.args.cross_tokenizer:  # the student wrote new targets: tokenize them for the teacher too
                aligner = self.data_collator.aligner
                batch_samples = [realign(batch, aligner, self.is_encoder_decoder) for batch in batch_samples]
        count = sum(self._targets(batch).ne(IGNORE_INDEX).sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        # Checked at the next log, which syncs with the device anyway: no host sync per step here.
        self._step_target_counts.append((self.state.global_step + 1, count.detach()))
        return batch_samples, count

    def _target_writer(self) -> nn.Module | None:
        """The model that writes this step's targets: the student with probability lmbda, else the teacher when
        seq_kd is on, else none. The draw depends on the seed and step only, so every process makes the same."""
        on_policy = random.Random(f"{self.args.seed}-{self.state.global_step}").random() < self.args.lmbda
        if on_policy:
            return self.accelerator.unwrap_model(self.model)
        if self.args.seq_kd:
            return self.accelerator.unwrap_model(self.teacher)
        return None

    def _generate_targets(self, generator: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        batch = self._prepare_inputs(batch)
        if self.args.generation_temperature > 0:
            sampling = {"do_sample": True, "temperature": self.args.generation_temperature, "top_k": 0, "top_p": 1.0}
        else:
            sampling = {"do_sample": False}
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        if pad_id is None:
            pad_id = generator.config.pad_token_id if generator.config.pad_token_id is not None else 0
        write = generate_seq2seq_targets if self.is_encoder_decoder else generate_causal_targets
        was_training = generator.training
        generator.eval()
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                return write(
                    generator,
                    batch,
                    pad_id,
                    max_new_tokens=self.args.max_new_tokens,
                    synced_gpus=is_deepspeed_zero3_enabled(),
                    **sampling,
                )
        finally:
            generator.train(was_training)

    # ---- the hidden-state projection: optimized, synchronized and saved beside the student -------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        passed_in = self.optimizer is not None
        optimizer = super().create_optimizer() if model is None else super().create_optimizer(model)
        if self.hidden_distiller is None:
            # Nothing to add. Under DeepSpeed with an `optimizer` block this is Accelerate's DummyOptim, which has
            # no param_groups (DeepSpeed builds the real one); a projection is refused there in __init__.
            return optimizer
        params = list(self.hidden_distiller.parameters())
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not all(id(p) in known for p in params):
            if passed_in:
                raise ValueError(
                    "hidden_state_loss_weight > 0 learns a projection, but the optimizer passed in optimizers= does "
                    "not hold its parameters: add trainer.hidden_distiller.parameters() to it, or let the trainer "
                    "create the optimizer."
                )
            # No weight decay: decaying a width adapter only shrinks the student's matched states.
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.hidden_distiller is not None and self.args.world_size > 1:
            # The projection lives outside the DDP-wrapped student, so its gradients are averaged here.
            for param in self.hidden_distiller.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= self.args.world_size
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is not None and self.is_fsdp_enabled:  # FSDP's full state dict unties tied weights
            state_dict = drop_tied_copies(state_dict, self.model)
        # Written into a temporary folder, then renamed into place: a failed save leaves the previous files intact.
        save = partial(self._save_files, state_dict=state_dict)
        save_atomically(save, output_dir or self.args.output_dir, enabled=self.args.should_save)

    def _save_files(self, output_dir: str, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.hidden_distiller is not None:
            self.hidden_distiller.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJECTION_FILE)
        if self.hidden_distiller is not None and os.path.isfile(path):
            self.hidden_distiller.load_state_dict(load_file(path))

    # ---- evaluation -----------------------------------------------------------------------------------

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if inputs.get("labels") is None and not self.is_encoder_decoder and "input_ids" in inputs:
            # A causal batch without labels (alpha = 0) is distilled on its next tokens: score those, as a Trainer
            # with DataCollatorForLanguageModeling would, rather than report no loss. compute_metrics gets no labels.
            loss, predictions, _ = self.prediction_step(
                model, {**inputs, "labels": _text_labels(inputs)}, prediction_loss_only, ignore_keys, **gen_kwargs
            )
            return loss, predictions, None
        self._batch_ce = None  # set by compute_loss, when this batch is scored
        if not self.args.predict_with_generate or prediction_loss_only or "labels" not in inputs:
            loss, predictions, labels = super().prediction_step(
                model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
            )
        else:  # compute_loss, which counts the objective for its metric; then the student generates
            with torch.no_grad(), self.compute_loss_context_manager():
                self.compute_loss(model, self._prepare_inputs(inputs))
            plain = self.teacher_source.student_inputs(inputs)
            loss, predictions, labels = super().prediction_step(
                model, plain, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
            )
        # eval_loss is the student's mean CE on the batch's labels, what a Trainer reports for this student; the
        # objective compute_loss returned is reported as eval_distillation_loss (docs/losses.md, "eval_loss").
        return (loss if self._batch_ce is None else self._batch_ce), predictions, labels

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        self._kd_sums["eval"].zero_()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(self._drain_metrics("eval", prefix=f"{metric_key_prefix}_"))
        return output

    def predict(
        self,
        test_dataset: Any,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "test",
        **gen_kwargs: Any,
    ) -> Any:
        output = super().predict(test_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)
        self._prediction_metrics.update(output.metrics)  # for the model card
        return output

    # ---- logging --------------------------------------------------------------------------------------

    @property
    def _sum_dtype(self) -> torch.dtype:
        return torch.float32 if self.args.device.type == "mps" else torch.float64  # MPS has no float64

    def _accumulate(self, mode: str, result: DistillationLossOutput, hidden: torch.Tensor | None = None) -> None:
        """Add a batch's sums (see _SUMS) on its device: no host sync per step."""
        sums = self._kd_sums[mode]
        if sums.device != result.ce_sum.device:
            sums = self._kd_sums[mode] = sums.to(result.ce_sum.device)
        zero, tokens = result.ce_sum.new_zeros(()), result.ce_sum.new_tensor(result.num_tokens)
        has_teacher = result.kd_sum is not None
        batch = [result.kd_sum if has_teacher else zero, result.ce_sum, tokens]
        batch += [result.agreement if has_teacher else zero]
        batch += [hidden.detach(), zero + 1] if hidden is not None else [zero, zero]
        batch += [tokens if has_teacher else zero]
        # In evaluation result.loss is the batch's mean objective over its tokens (training divides by the step's).
        batch += [result.loss.detach() * tokens if has_teacher and mode == "eval" and result.num_tokens else zero]
        sums += torch.stack([value.to(sums.dtype) for value in batch])

    def _drain_metrics(self, mode: str, prefix: str = "") -> dict[str, float]:
        """Token-weighted means since the last call, summed over processes, then reset."""
        sums = self._kd_sums[mode].clone()
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum")
        self._kd_sums[mode].zero_()
        kd, ce, tokens, agree, hidden, hidden_batches, teacher_tokens, objective = sums.tolist()
        if tokens == 0:
            return {}
        metrics = {"ce_loss": ce / tokens}
        if teacher_tokens:
            metrics.update(kd_loss=kd / teacher_tokens, teacher_agreement=agree / teacher_tokens)
            if mode == "eval":  # training logs the objective as `loss`
                metrics["distillation_loss"] = objective / teacher_tokens
        if hidden_batches:
            metrics["hidden_loss"] = hidden / hidden_batches
        return {f"{prefix}{k}": round(v, 6) for k, v in metrics.items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log; evaluation metrics are added in evaluation_loop
            logs = {**logs, **self._drain_metrics("train")}
        self._warn_steps_without_targets(finished="train_runtime" in logs)
        super().log(logs, start_time)

    def _warn_steps_without_targets(self, finished: bool) -> None:
        """Say which optimizer steps had no target token at all (every label -100, on every process): they learn
        nothing, and nothing else would say so. Once when first seen, and once more at the end if more came.

        Per step, not per micro-batch: an all-ignored micro-batch in a step whose others have targets is fine.
        """
        if self._step_target_counts:
            steps, counts = zip(*self._step_target_counts, strict=True)
            self._step_target_counts.clear()
            empty = torch.stack([c.reshape(()) for c in counts]).eq(0).tolist()
            self._empty_steps += [step for step, none in zip(steps, empty, strict=True) if none]
        counted_everywhere = self.args.average_tokens_across_devices or self.args.world_size == 1
        if counted_everywhere and not self.is_world_process_zero():
            return
        where = "" if counted_everywhere else f" on process {self.args.process_index}"
        found, said = self._empty_steps, self._empty_steps_said
        if not found or said and not (finished and len(found) > said):
            return
        self._empty_steps_said = len(found)
        if not said:
            logger.warning(
                "Optimizer %s had no target token%s: every label of its batches is -100, so its loss is 0 and "
                "nothing is learned from it (zero gradient). Check that targets survive truncation (a source or "
                "prompt longer than the maximum length leaves no target; max_target_length / block_size) and that "
                "the collator does not mask every label.", _steps_text(found), where,
            )  # fmt: skip
        else:
            logger.warning(
                "In all, %d optimizer steps had no target token%s (see the warning above): %s.",
                len(found), where, _steps_text(found),
            )  # fmt: skip

    # ---- model card -----------------------------------------------------------------------------------

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """The Trainer's model card (called by ``push_to_hub`` too), plus how the student was distilled.

        ``base_model`` is the Hub checkpoint the student started from, or else the teacher when it is on the Hub;
        a local teacher folder is named in the card's text only, by its folder name: no card holds a local path.
        The card lists every metric the run's evaluations and predictions measured (under any
        ``metric_key_prefix``: ``eval_``, ``test_``, ``predict_`` ...), the last value of each, and ``metrics``
        (e.g. test metrics measured outside the Trainer).
        """
        if not self.is_world_process_zero():
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags = ["hf-kd", "distillation"] + [t for t in tags if t not in ("hf-kd", "distillation")]
        student = str(getattr(getattr(self.model, "config", None), "_name_or_path", "") or "")
        if finetuned_from is None:  # a Hub id, else the student's name as the Trainer takes it (e.g. "gpt2")
            finetuned_from = next(filter(None, map(hub_id, (student, self.teacher_name))), None) or student
        # "" rather than None, or the Trainer falls back to the student's _name_or_path, which may be a path.
        finetuned_from = "" if is_local_path(finetuned_from) else finetuned_from
        datasets = [dataset] if isinstance(dataset, str) else list(dataset or [])
        tag_list = [dataset_tags] if isinstance(dataset_tags, str) else list(dataset_tags or [])
        if any(is_local_path(t) for t in tag_list):  # the front matter links tags to Hub data sets
            dataset_tags = dataset_args = None
        super().create_model_card(
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=[public_name(d) for d in datasets] or None,
            dataset_args=dataset_args,
        )
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            card = f.read()
        metrics = card_metrics(self.state.log_history, {**self._prediction_metrics, **(metrics or {})})
        section = distillation_section(
            teacher=self.teacher_name, args=self.args, dataset=datasets, metrics=metrics,
            reused_encoder=self.reuses_student_encoder,
        )  # fmt: skip
        if finetuned_from and finetuned_from == public_name(self.teacher_name):
            card = card.replace("is a fine-tuned version of", "was distilled from")
        # The Trainer links an empty name when the student has no Hub origin; say what happened instead.
        origin = f"was initialised from {markdown_name(student)} and trained" if is_local_path(student) else None
        no_origin = "is a fine-tuned version of [](https://huggingface.co/)"
        card = card.replace(no_origin, origin or "was trained from scratch")
        with open(path, "w", encoding="utf-8") as f:
            f.write(insert_section(card, section))


def _model_name(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


_ENSEMBLE_FIX = "The teachers of an ensemble must share one tokenizer (and the student's)."


def _steps_text(steps: list[int], shown: int = 10) -> str:
    """E.g. "step 3", "steps 3, 7 and 2 more"."""
    listed = ", ".join(map(str, steps[:shown])) + (f" and {len(steps) - shown} more" if len(steps) > shown else "")
    return f"step{'s' if len(steps) > 1 else ''} {listed}"


def _text_labels(inputs: dict[str, Any]) -> torch.Tensor:
    """A causal batch's own tokens as its labels (unshifted), padding ignored: what DataCollatorForLanguageModeling
    makes."""
    mask = inputs.get("attention_mask")
    return inputs["input_ids"] if mask is None else inputs["input_ids"].masked_fill(mask.eq(0), IGNORE_INDEX)


def _missing_labels_message(alpha: float) -> str:
    return (
        f"alpha={alpha} weighs a cross-entropy on `labels`, but the batches have none. Add a `labels` column "
        "(or use DataCollatorForLanguageModeling(tokenizer, mlm=False) / DataCollatorForSeq2Seq), or set "
        "alpha=0 for pure distillation."
    )
