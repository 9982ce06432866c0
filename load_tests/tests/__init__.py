"""Tests of the load harness itself: ``pytest load_tests/tests``."""
