"""``python -m load_tests alternate`` end to end, cut short: two variants that differ in one serve flag."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from load_tests.alternate import AlternateConfig, Scenario, parse_checkout, parse_scenario, parse_variant
from load_tests.cli import main
from load_tests.suite import REPO_ROOT


def test_each_variant_serves_every_scenario_in_every_round(tmp_path: pathlib.Path) -> None:
    """The second variant also serves from another checkout: a copy of this one that announces itself."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT / "server", checkout / "server", ignore=shutil.ignore_patterns("__pycache__"))
    with (checkout / "server" / "infergate" / "__init__.py").open("a") as package:
        package.write('\nimport sys\n\nprint("infergate from the other checkout", file=sys.stderr)\n')
    out = tmp_path / "ab"
    scenarios = [Scenario("matmul16", 1, 64), Scenario("matmul16", 1, 1)]  # --scenario: two loads, not the three
    argv = [sys.executable, "-m", "load_tests", "alternate", "--variant", "asyncio=--event-loop asyncio",
            "--variant", "uvloop=--event-loop uvloop", "--checkout", f"uvloop={checkout}", "--rounds", "1",
            "--scenario", "matmul16:1:64", "--scenario", "matmul16:1:1",
            "--duration", "0.5", "--warmup", "0", "--out", str(out)]  # fmt: skip
    run = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "alternate.json").read_text())
    variants = report["config"]["variants"]
    assert variants == {"asyncio": ["--event-loop", "asyncio"], "uvloop": ["--event-loop", "uvloop"]}
    assert report["config"]["scenarios"] == [s.name for s in scenarios]
    for scenario in scenarios:
        for variant in ("asyncio", "uvloop"):
            (result,) = report["runs"][scenario.name][variant]
            assert result["requests"] > 0 and not result["errors"], (scenario.name, variant)
    assert "event loop: asyncio" in (out / "asyncio.log").read_text()  # each variant really ran its flags
    assert "event loop: uvloop" in (out / "uvloop.log").read_text()
    assert "from the other checkout" in (out / "uvloop.log").read_text()  # and its code
    assert "from the other checkout" not in (out / "asyncio.log").read_text()
    assert report["config"]["checkouts"]["uvloop"]["path"] == str(checkout.resolve())
    table = (out / "alternate.md").read_text()
    assert "matmul16_b1_c1" in table and "p50 ms" in table and "samples/s" in table
    assert "max ms" in table and "p99 ms" in table  # the tail is reported too
    assert set(report["paired"]["matmul16_b1_c1"]) == {"p50_ms", "p99_ms", "max_ms", "server_cpu_us"}
    assert "server CPU µs/req" in table  # what each request cost the server, read around every slot
    for scenario in scenarios:
        for variant in ("asyncio", "uvloop"):
            (cpu,) = report["server_cpu_us_per_request"][scenario.name][variant]
            assert cpu > 0, (scenario.name, variant)
    assert report["paired"]["matmul16_b1_c64"]["samples_per_s"]["asyncio"]["mean"] == 1.0  # the first is the base
    assert main(["report", str(out / "alternate.json"), "--md", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == table  # re-reported as the command wrote it


def test_a_scenario_is_model_batch_and_concurrency() -> None:
    """Without --scenario, the three loads the batching targets name."""
    assert [s.name for s in AlternateConfig(pathlib.Path("."), ()).scenarios] == [
        "matmul16_b1_c64", "matmul16_b1_c1", "mlp_b8_c32"
    ]  # fmt: skip
    assert parse_scenario("mlp:8:32") == Scenario("mlp", 8, 32)
    for bad in ("mlp:8", "mlp:0:1", "mlp:x:1", ":1:1", "mlp:1:1:1"):
        with pytest.raises(ValueError, match="MODEL:BATCH:CONCURRENCY"):
            parse_scenario(bad)


def test_a_variant_is_a_name_and_shell_words() -> None:
    assert parse_variant('slow=--config "a b.yaml" --workers 2') == ("slow", ("--config", "a b.yaml", "--workers", "2"))
    assert parse_variant("plain=") == ("plain", ())
    with pytest.raises(ValueError, match="NAME=FLAGS"):
        parse_variant("--event-loop asyncio")


def test_a_checkout_must_be_one_of_infergate(tmp_path: pathlib.Path) -> None:
    assert parse_checkout(f"now={REPO_ROOT}") == ("now", REPO_ROOT.resolve())
    with pytest.raises(ValueError, match="not a checkout of infergate"):
        parse_checkout(f"old={tmp_path}")
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_checkout(str(REPO_ROOT))
    argv = [sys.executable, "-m", "load_tests", "alternate", "--variant", "a=", "--variant", "b=",
            "--checkout", f"c={REPO_ROOT}", "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--checkout names no --variant: c" in run.stderr


def test_one_variant_is_refused(tmp_path: pathlib.Path) -> None:
    argv = [sys.executable, "-m", "load_tests", "alternate", "--variant", "a=", "--out", str(tmp_path)]
    run = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "at least two --variant" in run.stderr
