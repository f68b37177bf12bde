"""One distillation run, launched by tests/test_ddp.py with torchrun (2 processes) or plain python (1 process).

Writes the logged losses and the final student weights of this rank to OUT/rank{RANK}.json / .safetensors.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from conftest import make_tokenizer, tiny_gpt2  # noqa: E402
from helpers import config, lm_collator, lm_dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402


def main(out: str, per_device_batch: int, ensemble: bool = False) -> None:
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    student, teacher = tiny_gpt2(vocab, seed=1), tiny_gpt2(vocab, seed=2, n_layer=3)
    if ensemble:
        teacher = [teacher, tiny_gpt2(vocab, seed=4)]
    args = config(
        __import__("pathlib").Path(out),
        per_device_train_batch_size=per_device_batch,
        max_steps=3,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        alpha=0.5,
        temperature=2.0,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        teacher_weights=[0.7, 0.3] if ensemble else None,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(tokenizer, n=24, seed=5),
        processing_class=tokenizer, data_collator=lm_collator(tokenizer),
    )  # fmt: skip
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    logs = [log for log in trainer.state.log_history if "loss" in log]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size, "logs": logs}, f)
    weights = {k: v.detach().clone() for k, v in student.named_parameters()}
    save_file(weights, os.path.join(out, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), ensemble=sys.argv[3:] == ["ensemble"])
