"""`hf-kd quickstart`: distillation end to end on a laptop CPU, offline, in a few minutes.

On the built-in standard-library docstring data (:mod:`hf_kd.data`) it trains a small teacher from scratch
(cached), then, with the same step budget, data order and initialisation, one student on the labels alone and
one by distillation from the teacher (:class:`hf_kd.DistillationTrainer`). It evaluates the three on the test
split and writes a DistilBART-style table (``report.md``, ``report.json``), a plot of the students' evaluation
loss, the distilled student with its model card, and the teacher (``teacher/``).

Tasks: ``denoise`` (the default) and ``summarize`` are encoder-decoder tasks, a BART teacher and T5-architecture
and BART students (``--student-archs t5,bart``) sharing one tokenizer; ``lm`` is language modelling with GPT-2
teacher and students (its teacher is the one ``recipes/configs/quickstart_lm.yaml`` distills from).

One idea per module, in the order a run uses them: :mod:`~hf_kd.quickstart.settings` (tasks, designs, checks),
:mod:`~hf_kd.quickstart.dataset` (data, tokenizer, rows), :mod:`~hf_kd.quickstart.models`,
:mod:`~hf_kd.quickstart.training` (teacher and students), :mod:`~hf_kd.quickstart.cache` (the teacher's top-k
cache), :mod:`~hf_kd.quickstart.scoring`, :mod:`~hf_kd.quickstart.report`, :mod:`~hf_kd.quickstart.files` (what
the run may write over) and :mod:`~hf_kd.quickstart.run`. The command line is :mod:`hf_kd.cli.quickstart`.
"""

from hf_kd.quickstart.cache import teacher_cache
from hf_kd.quickstart.dataset import collator, featurize, head, load_data, tokenizer_texts, train_tokenizer
from hf_kd.quickstart.models import architecture, build_model, build_seq2seq
from hf_kd.quickstart.report import markdown_table, model_name, student_key
from hf_kd.quickstart.run import run_quickstart
from hf_kd.quickstart.scoring import conditioning, constant_candidates, evaluate_model, greedy_outputs, rouge_l
from hf_kd.quickstart.settings import (
    COLUMNS,
    DEFAULT_TASK,
    SEQ2SEQ_TASKS,
    SMOKE,
    TASK_DESIGNS,
    TASKS,
    TEACHER_FIELDS,
    Settings,
    check_settings,
    settings_from_args,
)
from hf_kd.quickstart.training import ValidationCurve, train_student, train_teacher, training_args

__all__ = [
    "COLUMNS",
    "DEFAULT_TASK",
    "SEQ2SEQ_TASKS",
    "SMOKE",
    "TASKS",
    "TASK_DESIGNS",
    "TEACHER_FIELDS",
    "Settings",
    "ValidationCurve",
    "architecture",
    "build_model",
    "build_seq2seq",
    "check_settings",
    "collator",
    "conditioning",
    "constant_candidates",
    "evaluate_model",
    "featurize",
    "greedy_outputs",
    "head",
    "load_data",
    "markdown_table",
    "model_name",
    "rouge_l",
    "run_quickstart",
    "settings_from_args",
    "student_key",
    "teacher_cache",
    "tokenizer_texts",
    "train_student",
    "train_teacher",
    "train_tokenizer",
    "training_args",
]
