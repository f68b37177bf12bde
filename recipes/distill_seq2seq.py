"""Distill a encoder-decoder (BART, T5 ...) teacher into a student, as a recipe config (YAML) says.

    python recipes/distill_seq2seq.py recipes/configs/CONFIG.yaml [--key value ...]
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/distill_seq2seq.py recipes/configs/CONFIG.yaml

The command line is hf_kd.cli.distill, the recipe hf_kd.recipe.run; see docs/recipes.md.
"""

import sys

from hf_kd.cli.distill import main

if __name__ == "__main__":
    sys.exit(main(task="seq2seq"))
