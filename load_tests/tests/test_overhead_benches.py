"""``telemetry-overhead`` and ``drift-overhead`` end to end, cut short: every variant serves every slot."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from load_tests.suite import REPO_ROOT


@pytest.mark.parametrize(
    ("command", "variants", "report"),
    [("telemetry-overhead", ("off", "traces1+metrics"), "overhead.json"),
     ("drift-overhead", ("off", "0.1"), "drift-overhead.json")],
)  # fmt: skip
def test_every_variant_answers_every_slot_and_is_paired_with_off(
    tmp_path: pathlib.Path, command: str, variants: tuple[str, str], report: str
) -> None:
    out = tmp_path / command
    argv = [sys.executable, "-m", "load_tests", command, "--variants", ",".join(variants), "--rounds", "1",
            "--slices", "2", "--concurrency", "4", "--duration", "0.3", "--warmup", "0", "--out", str(out)]  # fmt: skip
    run = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((out / report).read_text())
    for variant in variants:
        runs = data["runs"][variant]
        assert len(runs) == 2 and all(r["requests"] > 0 and not r["errors"] for r in runs), variant
        assert len(data["server_cpu_us_per_request"][variant]) == 2
        assert data["paired_ratio_to_off"][variant]["pairs"] == 2
    assert {p.name for p in out.glob("*.log")} == {f"{v}.log" for v in variants}  # one log per variant
