"""``python -m hf_kd.cli``: the `hf-kd` command."""

import sys

from hf_kd.cli import main

sys.exit(main())
