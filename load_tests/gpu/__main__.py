"""``python -m load_tests.gpu``: see check.py."""

import sys

from .check import main

sys.exit(main())
