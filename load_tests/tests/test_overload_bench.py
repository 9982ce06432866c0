"""The overload scenario runs end to end and reports every outcome (a short run; no figures asserted)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys

import pytest
from pytest import CaptureFixture

from load_tests.cli import main
from load_tests.overload import OverloadPlan, OverloadRun, format_overload, run_overload
from load_tests.procfs import parse_cpu_list
from load_tests.servers import free_port, running_server
from load_tests.suite import REPO_ROOT


def test_an_overload_run_reports_admitted_and_refused_calls(tmp_path: pathlib.Path) -> None:
    """Also pinned: the server to one core (read back from the running server), the generator to the rest."""
    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, "pinning the server apart from the generator needs two cores"
    before = os.sched_getaffinity(0)
    plan = OverloadPlan("slow", limit=2, factor=10.0, duration=2.0)
    run = run_overload(plan, tmp_path, server_cpus=frozenset(cores[:1]))
    assert run.capacity_per_s > 0 and run.offered_per_s == 10.0 * run.capacity_per_s
    assert run.admitted > 0 and run.refused > 0
    assert run.server_cpus == cores[:1] and run.generator_cpus == cores[1:]
    assert os.sched_getaffinity(0) == before, "the generator's pinning ends with the run"
    saved = json.loads((tmp_path / "overload-slow.json").read_text())
    assert saved["refused"] == run.refused and saved["limit"] == 2 and saved["server_cpus"] == cores[:1]
    assert run.send_lag_p99_ms >= 0  # the generator's own lag is measured, so a generator-bound row says so
    assert "| slow | 2 |" in format_overload([run])


def test_cpu_lists_are_read_as_taskset_writes_them() -> None:
    assert parse_cpu_list("0,1") == {0, 1}
    assert parse_cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    for bad in ("", "3-1", "a", "-1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_server_cpus_apply_only_to_a_server_the_command_starts() -> None:
    with pytest.raises(SystemExit, match="with --url, pin yours with taskset"):
        main(["overload", "--url", "127.0.0.1:1", "--server-cpus", "0"])


def test_a_row_whose_generator_fell_behind_says_it_is_not_a_server_figure() -> None:
    behind = OverloadRun("tiny", 8, 1000.0, 10000.0, 8.0, admitted=1, send_lag_p99_ms=900.0)
    assert behind.generator_bound
    assert "generator-bound" in format_overload([behind])
    on_time = OverloadRun("tiny", 8, 1000.0, 2000.0, 8.0, admitted=1, send_lag_p99_ms=2.0)
    assert not on_time.generator_bound and "generator-bound" not in format_overload([on_time])


def test_a_server_started_elsewhere_is_measured_at_its_url(tmp_path: pathlib.Path, capsys: CaptureFixture[str]) -> None:
    """``--write-repository`` then ``--url``: the generator can run apart from the server it measures."""
    assert main(["overload", "--write-repository", str(tmp_path / "repo"), "--limit", "2"]) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    assert command[:2] == ["infergate", "serve"]
    assert (tmp_path / "repo" / "models" / "slow" / "1" / "model.onnx").exists()
    port = free_port()
    target = f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", *command[: command.index("--host")], "--host", "127.0.0.1", "--port", str(port)]
    out = tmp_path / "out"
    measure = ["--url", target, "--limit", "2", "--models", "slow", "--duration", "2", "--processes", "2"]
    with running_server("infergate", argv, target, tmp_path / "server.log", REPO_ROOT):
        assert main(["overload", *measure, "--out", str(out)]) == 0
    run = OverloadRun(**json.loads((out / "overload-slow.json").read_text()))
    assert run.processes == 2 and run.admitted > 0 and run.refused > 0, "two generator processes, outcomes merged"
    assert run.server_cpu_share > 0, "a server on this machine is found by its port"
    assert "| slow | 2 |" in (out / "overload.md").read_text()
