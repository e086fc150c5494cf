"""``python -m cimlic`` (also what ``torchrun -m cimlic`` runs)."""

import sys

from cimlic.cli import main

sys.exit(main())
