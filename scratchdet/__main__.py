"""``python -m scratchdet`` (what ``torchrun ... -m scratchdet train ...`` runs on every rank)."""

import sys

from .cli import main

sys.exit(main())
