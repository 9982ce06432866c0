"""``python -m load_tests auth-overhead`` end to end, cut short: every variant serves every slot without an error."""

from __future__ import annotations

import json
import pathlib

import jwt
import pytest

from infergate.security.auth import current_principal
from load_tests.auth import (
    SCOPE,
    VARIANTS,
    AuthOverheadConfig,
    auth_block,
    auth_step_costs,
    auth_steps,
    run_auth_overhead,
)
from load_tests.cli import build_parser, main


def test_every_variant_answers_every_slot_and_the_ratios_are_paired(tmp_path: pathlib.Path) -> None:
    """In this process: the command line adds only the parsing tested below."""
    out = tmp_path / "auth"
    config = AuthOverheadConfig(out, concurrency=4, duration=0.3, warmup=0, rounds=1, slices=2)
    run_auth_overhead(config)
    report = json.loads((out / "auth-overhead.json").read_text())
    assert list(report["runs"]) == list(VARIANTS) == ["off", "header", "jwt"]
    for variant in VARIANTS:
        runs = report["runs"][variant]
        assert len(runs) == 2, variant  # one per slot
        assert all(r["requests"] > 0 and not r["errors"] for r in runs), variant  # the token was accepted
        assert report["paired_throughput_to_off"][variant]["pairs"] == 2
        assert report["paired_client_cpu_to_off"][variant]["pairs"] == 2
        assert all(us > 0 for us in report["client_cpu_us_per_request"][variant]), variant  # the client's CPU
    assert report["paired_throughput_to_off"]["off"]["mean"] == 1.0
    table = (out / "auth-overhead.md").read_text()
    assert "paired ÷ off" in table and "client CPU µs/req" in table
    assert main(["report", str(out / "auth-overhead.json"), "--md", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == table  # re-reported as the command wrote it


def test_a_run_of_some_variants_runs_only_those(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "auth"
    config = AuthOverheadConfig(out, concurrency=2, duration=0.2, warmup=0, rounds=1, slices=1, variants=("off", "jwt"))
    run_auth_overhead(config)
    assert list(json.loads((out / "auth-overhead.json").read_text())["runs"]) == ["off", "jwt"]


@pytest.mark.parametrize("algorithm", ["HS256", "RS256"])
def test_the_token_carries_the_scope_the_server_needs(tmp_path: pathlib.Path, algorithm: str) -> None:
    auth, token = auth_block(tmp_path, algorithm)
    assert auth["enabled"] is True and auth["algorithms"] == [algorithm]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["scope"] == SCOPE == "infer:* metadata"


def test_the_command_parses() -> None:
    args = build_parser().parse_args(["auth-overhead", "--rounds", "2", "--algorithm", "RS256"])
    assert (args.command, args.rounds, args.slices, args.algorithm) == ("auth-overhead", 2, 6, "RS256")
    assert args.variants == VARIANTS
    assert build_parser().parse_args(["auth-overhead", "--variants", "off,jwt"]).variants == ("off", "jwt")
    assert args.server_cpus is None  # not pinned unless asked
    assert build_parser().parse_args(["auth-overhead", "--server-cpus", "1,0"]).server_cpus == (0, 1)
    wrong_ones = (["--algorithm", "none"], ["--server-cpus", "3-1"], ["--variants", "off,rbac"])
    for wrong in (*wrong_ones, ["--variants", "header,jwt"]):
        with pytest.raises(SystemExit):  # the last: no off, the base of every ratio
            build_parser().parse_args(["auth-overhead", *wrong])


def test_the_cost_table_runs_auth_s_real_steps_warm_and_with_cold_caches() -> None:
    """The steps verify a real token once and then check each call (a refused call would raise here)."""
    for cold in (False, True):
        costs = auth_step_costs(calls=20, cold=cold)
        assert set(costs) == set(auth_steps())
        assert all(micros >= 0 for micros in costs.values()), costs


def test_the_cost_table_leaves_no_caller_behind_in_this_process() -> None:
    """Auth sets the verified caller in the current context: the steps must keep it in their own."""
    auth_step_costs(calls=5)
    assert current_principal() is None
