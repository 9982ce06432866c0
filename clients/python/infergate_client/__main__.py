"""Entry point: ``python -m infergate_client``."""

from .cli import main

raise SystemExit(main())
