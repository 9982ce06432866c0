"""``python -m load_tests report``: a saved A/B run reported again with today's statistics.

Runs saved by the commands themselves are re-reported in their own tests
(test_alternate, test_auth_bench, test_overhead_benches: the table comes out
as the command wrote it). Here: files as older versions of the commands wrote
them, and files that are no A/B run.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from load_tests.cli import main
from load_tests.ratios import paired
from load_tests.report import summarize_load
from load_tests.saved import read_saved_run


def _run(rps: int, p50_s: float = 0.001) -> dict[str, object]:
    result = summarize_load(
        target="t", model="matmul16", client="raw", batch=1, concurrency=64, processes=1, warmup_s=0,
        duration_s=1.0, latencies_s=[p50_s] * rps, errors={}, cpu_s=0.0, cpu_span_s=1.0, response="",
    )  # fmt: skip
    return vars(result)


def test_an_alternate_run_saved_before_slices_and_server_cpu_pairs_one_slot_per_round(tmp_path: pathlib.Path) -> None:
    base, variant = [1000, 1100, 900], [1050, 1100, 960]
    saved = {
        "config": {"variants": {"a": [], "b": ["--event-loop", "uvloop"]}, "scenarios": ["matmul16_b1_c64"],
                   "duration": 6.0, "warmup": 1.0, "rounds": 3},
        "runs": {"matmul16_b1_c64": {"a": [_run(r) for r in base], "b": [_run(r) for r in variant]}},
    }  # fmt: skip
    path = tmp_path / "alternate.json"
    path.write_text(json.dumps(saved))
    run = read_saved_run(path)
    assert run.kind == "alternate"
    (rate, p99) = run.comparisons  # no server CPU in the file: no CPU rows
    assert (rate.scenario, rate.figure, rate.base, p99.figure) == ("matmul16_b1_c64", "samples_per_s", "a", "p99_ms")
    expected = paired({"a": [float(r) for r in base], "b": [float(r) for r in variant]}, "a", slices=1)["b"]
    assert rate.ratios["b"] == expected and expected.rounds == 3
    assert rate.recorded == {}  # this version of the command kept no ratios
    assert str(expected) in run.report.table()


def test_the_command_prints_the_table_and_every_ratio_with_its_rounds(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    off, metrics = [2000, 2100, 1900, 2050], [1900, 2050, 1850, 1900]
    saved = {
        "config": {"out": "results/x", "model": "matmul16", "concurrency": "64", "rounds": "2", "slices": "2",
                   "variants": "('off', 'metrics')"},
        "runs": {"off": [_run(r) for r in off], "metrics": [_run(r) for r in metrics]},
        "server_cpu_us_per_request": {"off": [500.0, 510.0, 490.0, 505.0], "metrics": [540.0, 530.0, 520.0, 545.0]},
        "mean_rps": {},
        "paired_ratio_to_off": {"off": {"mean": 1.0, "margin": 0.0, "pairs": 4},
                                "metrics": {"mean": 0.951, "margin": 0.02, "pairs": 4}},
    }  # fmt: skip
    path = tmp_path / "overhead.json"
    path.write_text(json.dumps(saved))
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    rate = paired({"off": [float(r) for r in off], "metrics": [float(r) for r in metrics]}, "off", slices=2)
    line = next(row for row in out.splitlines() if row.startswith("-") and "requests_per_s" in row)
    assert line.split()[5:] == ["4", "2", *str(rate["metrics"]).split(), f"{rate['metrics'].low:.3f}", "to",
                                f"{rate['metrics'].high:.3f}", "0.951", "±", "0.020"]  # fmt: skip
    assert "server_cpu_us" in out and "(telemetry-overhead)" in out


def test_a_file_that_is_no_a_b_run_is_refused(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": [_run(100)]}))  # what closed and open write
    assert main(["report", str(path)]) == 2
    assert "not the JSON of an A/B run" in capsys.readouterr().err
