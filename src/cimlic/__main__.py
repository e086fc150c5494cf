"""``python -m cimlic`` (also what ``torchrun -m cimlic`` runs)."""

import sys

from cimlic.apps.cli import main

sys.exit(main())
