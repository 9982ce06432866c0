"""Targets, retry timing and budget, tokens and the error tree: pure parts, checked by table."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from fractions import Fraction

import grpc
import numpy as np
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
        ("localhost:8001", "localhost:8001"),
        (
            "infergate-0.infergate-headless.ml.svc.cluster.local.:8001",
            "infergate-0.infergate-headless.ml.svc.cluster.local.:8001",
        ),
        ("[::1]:8001", "[::1]:8001"),
        ("dns:///localhost", "dns:///localhost"),  # gRPC's dns scheme has a default port
        ("dns://8.8.8.8:53/infergate.example:8001", "dns://8.8.8.8:53/infergate.example:8001"),
        ("unix:/run/infergate.sock", "unix:/run/infergate.sock"),
        ("unix:///run/infergate.sock", "unix:///run/infergate.sock"),
        ("unix-abstract:infergate", "unix-abstract:infergate"),
        ("ipv4:10.0.0.1:8001,10.0.0.2:8001", "ipv4:10.0.0.1:8001,10.0.0.2:8001"),
        ("ipv6:[::1]:8001", "ipv6:[::1]:8001"),
        ("vsock:3:8001", "vsock:3:8001"),
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


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "http://127.0.0.1:50301",
            "'http://127.0.0.1:50301': drop the scheme: give HOST:PORT, as in '127.0.0.1:50301'",
        ),
        ("grpc://infergate:8001/", "'grpc://infergate:8001/': drop the scheme: give HOST:PORT, as in 'infergate:8001'"),
        (
            "https://infergate.example",
            "'https://infergate.example': drop the scheme: give HOST:PORT, as in 'infergate.example:443'",
        ),
        ("not a url", "'not a url': expected HOST:PORT"),
        ("127.0.0.1", "'127.0.0.1': expected HOST:PORT"),
        (":8001", "':8001': expected HOST:PORT"),
        ("host:notaport", "'host:notaport': port 'notaport' is not a number from 1 to 65535"),
        ("127.0.0.1:0", "'127.0.0.1:0': port '0' is not a number from 1 to 65535"),
        ("127.0.0.1:70000", "'127.0.0.1:70000': port '70000' is not a number from 1 to 65535"),
        (":::", "':::': expected HOST:PORT, an IPv6 address in brackets"),
        ("::1:8001", "'::1:8001': expected HOST:PORT, an IPv6 address in brackets"),
        ("[::g]:8001", "'\\[::g\\]:8001': '::g' is not an IPv6 address"),
        ("[::1:8001", "'\\[::1:8001': expected HOST:PORT"),
        ("999.0.0.1:8001", "'999.0.0.1:8001': '999.0.0.1' is not an IPv4 address"),
        ("-bad-.example:8001", "'-bad-.example:8001': '-bad-.example' is not a host name"),
        ("dns:///", "'dns:///': expected HOST:PORT"),
        ("dns://8.8.8.8", "'dns://8.8.8.8': expected dns://AUTHORITY/HOST:PORT"),
        ("unix:", "'unix:': no socket path"),
        ("ipv4:10.0.0.1", "'ipv4:10.0.0.1': expected HOST:PORT"),
        ("ipv4:[::1]:8001", "'ipv4:\\[::1\\]:8001': '\\[::1\\]' is not an IPv4 address"),
        ("vsock:3", "'vsock:3': expected vsock:CID:PORT"),
        (["10.0.0.1:8001", "http://10.0.0.2:8001"], "'http://10.0.0.2:8001': drop the scheme"),
        (["10.0.0.1:99999", "10.0.0.2:8001"], "'10.0.0.1:99999': port '99999'"),
    ],
)
def test_a_malformed_address_is_refused_when_the_client_is_built_naming_it(url: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=f"^server address {message}"):
        Client(url)


@pytest.mark.parametrize("url", [None, 8001, [b"10.0.0.1:8001", b"10.0.0.2:8001"]])
def test_an_address_that_is_not_text_is_a_type_error(url: object) -> None:
    with pytest.raises(TypeError, match="server address"):
        Client(url)  # type: ignore[arg-type]


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


@pytest.mark.parametrize("timeout", ["5", b"5", True, None, [5]])
def test_a_client_timeout_that_is_not_a_number_is_a_type_error(timeout: object) -> None:
    with pytest.raises(TypeError, match=f"^{re.escape(f'timeout={timeout!r}')}: expected a number of seconds"):
        Client("127.0.0.1:1", timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", ["5", True])
def test_a_call_timeout_that_is_not_a_number_is_a_type_error(timeout: object) -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(TypeError, match=f"^timeout={timeout!r}: expected"):
        client.is_server_live(timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [5, 0.25, np.float32(2.5), Fraction(1, 2)])
def test_any_real_number_of_seconds_is_a_timeout(timeout: object) -> None:
    Client("127.0.0.1:1", timeout=timeout).close()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: RetryPolicy(max_attempts="5"), TypeError, "^max_attempts='5': expected an int"),
        (lambda: RetryPolicy(max_attempts=2.5), TypeError, "^max_attempts=2.5: expected an int"),
        (lambda: RetryPolicy(initial_backoff_s=None), TypeError, "^initial_backoff_s=None: expected a number"),
        (lambda: RetryPolicy(jitter=math.nan), ValueError, "jitter"),
        (lambda: RetryPolicy(max_backoff_s=-1), ValueError, "max_backoff_s"),
        (lambda: RetryBudget(max_tokens="10"), TypeError, "^max_tokens='10': expected a number"),
        (lambda: RetryBudget(token_ratio=math.nan), ValueError, "token_ratio"),
        (lambda: Keepalive(time_s="60"), TypeError, "^time_s='60': expected a number"),
        (lambda: Keepalive(timeout_s=0), ValueError, "timeout_s"),
        (lambda: Keepalive(time_s=math.inf), ValueError, "time_s"),
    ],
)
def test_options_refuse_a_wrong_type_with_type_error_and_a_wrong_value_with_value_error(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build()
