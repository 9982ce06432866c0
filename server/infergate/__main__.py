"""``python -m infergate`` runs the ``infergate`` command."""

import sys

from infergate.cli import main

sys.exit(main())
