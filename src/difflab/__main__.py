"""``python -m difflab ...``: the same command, for ``torchrun --nproc-per-node N -m difflab train ...``."""

import sys

from difflab.cli import main

sys.exit(main())
