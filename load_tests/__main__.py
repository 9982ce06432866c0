"""Entry point: ``python -m load_tests``."""

from load_tests.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
