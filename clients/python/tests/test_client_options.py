"""Targets, retry timing and budget, tokens and the error tree: pure parts, checked by table."""

from __future__ import annotations

import json
import math
import random

import grpc
import pytest

from infergate_client import Client, errors
from infergate_client.options import (
    Keepalive,
    RefreshingToken,
    RetryBudget,
    RetryPolicy,
    Tls,
    channel_options,
    resolve_target,
)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("127.0.0.1:8001", "127.0.0.1:8001"),
        ("infergate:8001", "infergate:8001"),
        ("dns:///infergate-headless.ml.svc:8001", "dns:///infergate-headless.ml.svc:8001"),
        ("10.0.0.1:8001,10.0.0.2:8001", "ipv4:10.0.0.1:8001,10.0.0.2:8001"),
        (["10.0.0.1:8001", " 10.0.0.2:8002"], "ipv4:10.0.0.1:8001,10.0.0.2:8002"),
        (["[::1]:8001", "[fe80::1]:8001"], "ipv6:[::1]:8001,[fe80::1]:8001"),
        (["10.0.0.1:8001"], "10.0.0.1:8001"),
    ],
)
def test_urls_become_grpc_targets(url: str | list[str], target: str) -> None:
    assert resolve_target(url) == target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (["a.example:1", "b.example:1"], "dns:///"),
        (["10.0.0.1:1", "[::1]:1"], "all IPv4 or all IPv6"),
        (["10.0.0.1", "10.0.0.2:1"], "HOST:PORT"),
        ("", "no server address"),
    ],
)
def test_unusable_address_lists_are_refused_with_a_hint(url: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_target(url)


def test_channels_balance_round_robin_over_healthy_servers_and_user_options_win() -> None:
    options = dict(channel_options(Keepalive(time_s=5), [("grpc.service_config", "{}")]))
    assert options["grpc.service_config"] == "{}"
    assert options["grpc.keepalive_time_ms"] == 5000
    config = json.loads(str(dict(channel_options(Keepalive()))["grpc.service_config"]))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "inference.GRPCInferenceService"}
    unchecked = json.loads(str(dict(channel_options(Keepalive(), health_check=False))["grpc.service_config"]))
    assert unchecked == {"loadBalancingConfig": [{"round_robin": {}}]}


@pytest.mark.parametrize(("attempt", "base"), [(1, 0.1), (2, 0.2), (3, 0.4), (10, 5.0)])
def test_backoff_grows_exponentially_with_bounded_jitter(attempt: int, base: float) -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2, max_backoff_s=5.0, jitter=0.2)
    rng = random.Random(0)
    delays = [policy.backoff(attempt, rng) for _ in range(200)]
    assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
    assert len(set(delays)) > 1  # jittered, not fixed


def test_the_budget_stops_retries_when_half_is_spent_and_successes_refill_it() -> None:
    budget = RetryBudget(max_tokens=4, token_ratio=0.5)
    assert [budget.on_failure() for _ in range(3)] == [True, False, False]
    for _ in range(4):
        budget.on_success()
    assert budget.tokens == 3.0 and budget.on_failure() is False  # 2 left: not more than half
    for _ in range(4):
        budget.on_success()  # capped at max_tokens
    assert budget.tokens == 4.0 and budget.on_failure() is True


def test_a_refreshing_token_is_fetched_again_only_near_expiry() -> None:
    now = [1000.0]
    fetched: list[str] = []

    def fetch() -> tuple[str, float]:
        fetched.append(f"t{len(fetched)}")
        return fetched[-1], now[0] + 100

    token = RefreshingToken(fetch, leeway_s=10, clock=lambda: now[0])
    assert [token(), token()] == ["t0", "t0"]
    now[0] += 89
    assert token() == "t0"
    now[0] += 2  # 9 s before expiry: inside the leeway
    assert token() == "t1" and fetched == ["t0", "t1"]


def test_mtls_needs_both_key_and_chain() -> None:
    with pytest.raises(ValueError, match="both"):
        Tls(private_key=b"key")


class _FakeRpcError(grpc.RpcError):
    """A stand-in for a failed call: only code() and details() are read."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.UNIMPLEMENTED, errors.Unimplemented),
        (grpc.StatusCode.CANCELLED, errors.Cancelled),
        (grpc.StatusCode.INTERNAL, errors.ServerError),
        (grpc.StatusCode.UNKNOWN, errors.ServerError),
    ],
)
def test_each_status_code_has_its_exception(code: grpc.StatusCode, kind: type[errors.InferGateError]) -> None:
    error = errors.from_rpc_error(_FakeRpcError(code, "what happened"))
    assert type(error) is kind and isinstance(error, errors.InferGateError)
    assert (error.code, error.details) == (code, "what happened")
    assert str(error) == f"{code.name}: what happened"


@pytest.mark.parametrize("timeout", [0.0, -1.0, math.inf, math.nan])
def test_every_call_has_a_finite_deadline(timeout: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        Client("127.0.0.1:1", timeout=timeout)
    with Client("127.0.0.1:1") as client, pytest.raises(ValueError, match="finite"):
        client.is_server_live(timeout=timeout)
