"""``python -m adapterkit ...`` and ``torchrun --nproc_per_node N -m adapterkit train ...``."""

import sys

from .cli import main

sys.exit(main())
