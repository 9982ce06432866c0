"""The overload scenario runs end to end and reports every outcome (a short run; no figures asserted)."""

from __future__ import annotations

import json
import pathlib

from load_tests.overload import format_overload, run_overload


def test_an_overload_run_reports_admitted_and_refused_calls(tmp_path: pathlib.Path) -> None:
    run = run_overload("slow", limit=2, factor=10.0, duration=2.0, out=tmp_path)
    assert run.capacity_per_s > 0 and run.offered_per_s == 10.0 * run.capacity_per_s
    assert run.admitted > 0 and run.refused > 0
    saved = json.loads((tmp_path / "overload-slow.json").read_text())
    assert saved["refused"] == run.refused and saved["limit"] == 2
    assert "| slow | 2 |" in format_overload([run])
