"""The options and messages `hf-kd cache-teacher` and `hf-kd pseudo-label` share to run as many workers: processes
of one ``torchrun`` / ``accelerate launch`` job, or independent jobs (``--num-workers N --worker-index I``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from hf_kd.teachers.shards import Workers, read_manifest


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        metavar="N",
        help="Independent jobs sharing the work (a SLURM array, machines sharing the output's filesystem); each "
        "also needs --worker-index. Under torchrun / accelerate launch every process is a worker already.",
    )
    parser.add_argument(
        "--worker-index",
        type=int,
        default=None,
        metavar="I",
        help="This job's index, 0 to N-1: it computes the shards s with s %% N == I. The last worker to finish writes "
        "the finished manifest; a run without --worker-index computes whatever is still missing and finishes it.",
    )


def workers_from_args(args: argparse.Namespace) -> Workers:
    """This process's share (a ConfigError for an index out of range); under a launcher with GPUs and no
    ``--device``, each process runs on its own GPU (``LOCAL_RANK``)."""
    workers = Workers.from_options(args.num_workers, args.worker_index)
    if args.device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        args.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return workers


def launched_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 without a launcher)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def worker_done(output: Any, workers: Workers, written: list[int]) -> tuple[str | None, bool]:
    """What this process prints when its share is done: a line on its work and the overall progress (None for a
    single process), and whether it reports the finished output (it is complete, and this is not a rank above 0
    of a launch). ``written``: the shards this process computed."""
    manifest = read_manifest(output)
    done, total = len(manifest["shards"]), manifest["num_shards"]
    report = bool(manifest["complete"]) and launched_rank() == 0
    if workers.count == 1:
        return None, report
    rest = (
        "complete"
        if manifest["complete"]
        else "the last worker to finish completes it (or run the command again without --worker-index)"
    )
    wrote = f"wrote shards {', '.join(map(str, sorted(written)))}" if written else "wrote no shard"
    return f"{output}: {workers.name} {wrote}; {done} of {total} shards are recorded; {rest}.", report
