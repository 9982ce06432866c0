"""``telemetry-overhead`` and ``drift-overhead`` end to end, cut short: every variant serves every slot.

Run in this process (the command line adds only argument parsing, which
``test_drift_bench`` covers, and telemetry's in-process cost table).
"""

from __future__ import annotations

import json
import pathlib

from load_tests.cli import main
from load_tests.drift import DriftOverheadConfig, run_drift_overhead
from load_tests.telemetry import OverheadConfig, per_call_costs, per_call_steps, run_overhead


def _check(out: pathlib.Path, report: str, variants: tuple[str, ...]) -> None:
    data = json.loads((out / report).read_text())
    again = out / "again.md"
    assert main(["report", str(out / report), "--md", str(again)]) == 0
    assert again.read_text() == (out / report).with_suffix(".md").read_text()  # re-reported as the command wrote it
    for variant in variants:
        runs = data["runs"][variant]
        assert len(runs) == 2 and all(r["requests"] > 0 and not r["errors"] for r in runs), variant
        assert len(data["server_cpu_us_per_request"][variant]) == 2
        assert data["paired_ratio_to_off"][variant]["pairs"] == 2
    assert {p.name for p in out.glob("*.log")} == {f"{v}.log" for v in variants}  # one log per variant


def test_telemetry_overhead_loads_every_variant_in_every_slot(tmp_path: pathlib.Path) -> None:
    variants = ("off", "traces1+metrics")  # the traced one exports over OTLP to the sink process
    config = OverheadConfig(tmp_path, concurrency=4, duration=0.3, warmup=0, rounds=1, slices=2, variants=variants)
    run_overhead(config)
    _check(tmp_path, "overhead.json", variants)


def test_drift_overhead_loads_every_variant_in_every_slot(tmp_path: pathlib.Path) -> None:
    variants = ("off", "0.1")
    config = DriftOverheadConfig(tmp_path, concurrency=4, duration=0.3, warmup=0, rounds=1, slices=2, variants=variants)
    report = run_drift_overhead(config)
    _check(tmp_path, "drift-overhead.json", variants)
    assert report.monitor["off"] == ["-", "-"] and all("/" in m for m in report.monitor["0.1"])  # DriftStatus read


def test_the_cost_table_times_every_step_warm_and_with_cold_caches() -> None:
    steps = set(per_call_steps())
    for cold in (False, True):
        costs = per_call_costs(calls=20, cold=cold)
        assert set(costs) == steps
        assert all(micros >= 0 for micros in costs.values()), costs
