"""The overload scenario runs end to end and reports every outcome (a short run; no figures asserted)."""

from __future__ import annotations

import json
import pathlib

from load_tests.overload import OverloadRun, format_overload, run_overload


def test_an_overload_run_reports_admitted_and_refused_calls(tmp_path: pathlib.Path) -> None:
    run = run_overload("slow", limit=2, factor=10.0, duration=2.0, out=tmp_path)
    assert run.capacity_per_s > 0 and run.offered_per_s == 10.0 * run.capacity_per_s
    assert run.admitted > 0 and run.refused > 0
    saved = json.loads((tmp_path / "overload-slow.json").read_text())
    assert saved["refused"] == run.refused and saved["limit"] == 2
    assert run.send_lag_p99_ms >= 0  # the generator's own lag is measured, so a generator-bound row says so
    assert "| slow | 2 |" in format_overload([run])


def test_a_row_whose_generator_fell_behind_says_it_is_not_a_server_figure() -> None:
    behind = OverloadRun("tiny", 8, 1000.0, 10000.0, 8.0, admitted=1, send_lag_p99_ms=900.0)
    assert behind.generator_bound
    assert "generator-bound" in format_overload([behind])
    on_time = OverloadRun("tiny", 8, 1000.0, 2000.0, 8.0, admitted=1, send_lag_p99_ms=2.0)
    assert not on_time.generator_bound and "generator-bound" not in format_overload([on_time])
