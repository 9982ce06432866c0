"""``python -m load_tests auth-overhead`` end to end, cut short: both variants serve every slot without an error."""

from __future__ import annotations

import json
import pathlib

import jwt
import pytest

from infergate.security.auth import current_principal
from load_tests.auth import SCOPE, AuthOverheadConfig, auth_block, auth_step_costs, auth_steps, run_auth_overhead
from load_tests.cli import build_parser


def test_both_variants_answer_every_slot_and_the_ratios_are_paired(tmp_path: pathlib.Path) -> None:
    """In this process: the command line adds only the parsing tested below."""
    out = tmp_path / "auth"
    config = AuthOverheadConfig(out, concurrency=4, duration=0.3, warmup=0, rounds=1, slices=2)
    run_auth_overhead(config)
    report = json.loads((out / "auth-overhead.json").read_text())
    for variant in ("off", "jwt"):
        runs = report["runs"][variant]
        assert len(runs) == 2, variant  # one per slot
        assert all(r["requests"] > 0 and not r["errors"] for r in runs), variant  # the token was accepted
        assert report["paired_throughput_to_off"][variant]["pairs"] == 2
    assert report["paired_throughput_to_off"]["off"]["mean"] == 1.0
    assert "paired ÷ off" in (out / "auth-overhead.md").read_text()


@pytest.mark.parametrize("algorithm", ["HS256", "RS256"])
def test_the_token_carries_the_scope_the_server_needs(tmp_path: pathlib.Path, algorithm: str) -> None:
    auth, token = auth_block(tmp_path, algorithm)
    assert auth["enabled"] is True and auth["algorithms"] == [algorithm]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["scope"] == SCOPE == "infer:* metadata"


def test_the_command_parses() -> None:
    args = build_parser().parse_args(["auth-overhead", "--rounds", "2", "--algorithm", "RS256"])
    assert (args.command, args.rounds, args.slices, args.algorithm) == ("auth-overhead", 2, 6, "RS256")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["auth-overhead", "--algorithm", "none"])


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
