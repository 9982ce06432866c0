"""Connection options: TLS, keepalive, retries and their budget, tokens, targets.

Everything here is plain data or a pure function, shared by ``Client`` and
``AsyncClient``; neither client has options of its own.
"""

from __future__ import annotations

import json
import math
import numbers
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from ._targets import resolve_target

__all__ = [
    "Keepalive",
    "RefreshingToken",
    "RetryBudget",
    "RetryPolicy",
    "Tls",
    "channel_options",
    "resolve_target",
]


def real_number(name: str, value: object, expected: str = "a number") -> float:
    """``value`` as a float; TypeError naming ``name`` when it is not a real number.

    Every number the SDK takes goes through here or ``whole_number``: a wrong type
    is a TypeError (text and bool are not numbers: ``timeout="5"`` is a mistake to
    report, not to convert), a number out of range is then a ValueError.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: expected {expected}, not {type(value).__name__}")
    return float(value)


def whole_number(name: str, value: object) -> int:
    """``value`` as an int; TypeError naming ``name`` when it is not an integer (2.0 is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r}: expected an int, not {type(value).__name__}")
    return int(value)


def _require(valid: bool, name: str, value: object, rule: str) -> None:
    if not valid:
        raise ValueError(f"{name}={value!r}: must be {rule}")


def _read(value: bytes | str | Path | None) -> bytes | None:
    """PEM given as bytes, or as a path to a file."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class Tls:
    """TLS settings. ``root_certificates`` None trusts the system roots; key and chain together enable mTLS.

    Each PEM may be bytes or a path. ``server_name`` overrides the name checked in
    the server's certificate (a test CA, or an address that is not in the certificate).
    """

    root_certificates: bytes | str | Path | None = None
    private_key: bytes | str | Path | None = None
    certificate_chain: bytes | str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("mTLS needs both private_key and certificate_chain")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            _read(self.root_certificates), _read(self.private_key), _read(self.certificate_chain)
        )


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive pings: every ``time_s`` while calls are open, dropped after ``timeout_s`` unanswered.

    Pings without open calls are off by default: servers refuse frequent idle pings.
    """

    time_s: float = 60.0
    timeout_s: float = 20.0
    permit_without_calls: bool = False

    def __post_init__(self) -> None:
        for name in ("time_s", "timeout_s"):
            value = getattr(self, name)
            seconds = real_number(name, value, "a number of seconds")
            _require(0 < seconds < math.inf, name, value, "a finite number of seconds > 0")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that failed with UNAVAILABLE, and only those.

    Attempt ``n`` (from 1) is followed by a pause of
    ``min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1))``, scaled by a
    random factor in ``[1 - jitter, 1 + jitter]``; no pause runs past the call's
    deadline. ``on_retry(attempt, error)`` is told of each retry (for logs or tests).
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    on_retry: Callable[[int, grpc.RpcError], None] | None = None

    def __post_init__(self) -> None:
        _require(whole_number("max_attempts", self.max_attempts) >= 1, "max_attempts", self.max_attempts, ">= 1")
        for name in ("initial_backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            seconds = real_number(name, value, "a number of seconds")
            _require(0 <= seconds < math.inf, name, value, "a finite number of seconds >= 0")
        multiplier = real_number("multiplier", self.multiplier)
        _require(1 <= multiplier < math.inf, "multiplier", self.multiplier, "finite and >= 1")
        _require(0 <= real_number("jitter", self.jitter) <= 1, "jitter", self.jitter, "from 0 to 1")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The pause after failed attempt ``attempt`` (1-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)


class RetryBudget:
    """A client-wide token bucket that stops retry storms (gRPC's retry throttling rule).

    It starts full at ``max_tokens``. Each UNAVAILABLE costs one token, each
    success gives back ``token_ratio``; retries are allowed only while more than
    half the tokens are left. Safe to share between threads.
    """

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        _require(0 < real_number("max_tokens", max_tokens) < math.inf, "max_tokens", max_tokens, "finite and > 0")
        _require(0 <= real_number("token_ratio", token_ratio) < math.inf, "token_ratio", token_ratio, "finite and >= 0")
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self._tokens = max_tokens
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        return self._tokens

    def on_success(self) -> None:
        with self._lock:
            self._tokens = min(self.max_tokens, self._tokens + self.token_ratio)

    def on_failure(self) -> bool:
        """Spend a token for a failure; True when a retry is still allowed."""
        with self._lock:
            self._tokens = max(0.0, self._tokens - 1.0)
            return self._tokens > self.max_tokens / 2


class RefreshingToken:
    """A bearer token fetched by ``fetch() -> (token, expires_at_unix_s)`` and re-fetched ``leeway_s`` early.

    Pass an instance as ``token=``. Calls use the cached token; ``fetch`` runs on
    the first call and again once the token is within ``leeway_s`` of expiry.
    ``AsyncClient`` runs ``fetch`` in a worker thread, so it may block.
    """

    def __init__(
        self, fetch: Callable[[], tuple[str, float]], leeway_s: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._fetch = fetch
        self._leeway_s = leeway_s
        self._clock = clock
        self._token = ""
        self._expires_at = -float("inf")
        self._lock = threading.Lock()

    def needs_refresh(self) -> bool:
        return self._clock() >= self._expires_at - self._leeway_s

    def refresh(self) -> str:
        with self._lock:
            if self.needs_refresh():  # another thread may have refreshed meanwhile
                self._token, self._expires_at = self._fetch()
            return self._token

    def __call__(self) -> str:
        return self.refresh() if self.needs_refresh() else self._token


_ROUND_ROBIN: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
_HEALTH_CHECK: dict[str, object] = {"healthCheckConfig": {"serviceName": "inference.GRPCInferenceService"}}


def channel_options(
    keepalive: Keepalive, extra: Sequence[tuple[str, str | int]] = (), *, health_check: bool = True
) -> list[tuple[str, str | int]]:
    """The channel arguments every client channel gets; ``extra`` entries win over the defaults.

    ``health_check``: skip servers whose ``inference.GRPCInferenceService`` health is not
    SERVING. infergate reports it SERVING once its start-up loading is over, even when
    some model failed (those calls fail on their own), and NOT_SERVING while it drains.
    Turn it off only to talk to a server whatever its state (``infergate-client health``).
    """
    service_config = _ROUND_ROBIN | (_HEALTH_CHECK if health_check else {})
    defaults: dict[str, str | int] = {
        # Round robin over every address, skipping servers whose health is not SERVING: a server that
        # is draining (SIGTERM) or still loading gets no new calls. A server without the health service
        # counts as healthy (gRPC's client-side health checking treats UNIMPLEMENTED so).
        "grpc.service_config": json.dumps(service_config),
        "grpc.max_receive_message_length": -1,
        "grpc.max_send_message_length": -1,
        "grpc.keepalive_time_ms": int(keepalive.time_s * 1000),
        "grpc.keepalive_timeout_ms": int(keepalive.timeout_s * 1000),
        "grpc.keepalive_permit_without_calls": int(keepalive.permit_without_calls),
        # Reconnect soon after a refused connection, so retries can find a server that just came up.
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.min_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 2000,
        # This package retries UNAVAILABLE itself, with a budget; gRPC's own retries would multiply them.
        "grpc.enable_retries": 0,
    }
    defaults.update(dict(extra))
    return list(defaults.items())
