"""``python -m infergate`` runs the ``infergate`` command."""

import sys

from .cli import main

sys.exit(main())
