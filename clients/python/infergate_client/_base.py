"""What ``Client`` and ``AsyncClient`` share: settings, per-call metadata, the retry decision.

The two clients differ only in how they wait (``time.sleep`` or ``asyncio.sleep``)
and which channel they open; every decision is made here.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from ._calls import Call
from .errors import ServerError
from .options import (
    Keepalive,
    RefreshingToken,
    RetryBudget,
    RetryPolicy,
    Tls,
    channel_options,
    real_number,
    resolve_target,
)

__all__ = ["DEFAULT_TIMEOUT_S", "ClientBase", "Metadata", "Token"]

DEFAULT_TIMEOUT_S = 30.0
Token = str | Callable[[], str]
Metadata = Mapping[str, str] | Iterable[tuple[str, str]]


def _check_timeout(timeout: object) -> float:
    """``timeout`` in seconds: TypeError when it is not a number, ValueError unless finite and > 0."""
    seconds = real_number("timeout", timeout, "a number of seconds")
    if not 0 < seconds < math.inf:
        raise ValueError(f"timeout={timeout!r}: must be a finite number of seconds > 0 (every call has a deadline)")
    return seconds


def _pairs(metadata: Metadata | None) -> list[tuple[str, str]]:
    if metadata is None:
        return []
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return [(str(key).lower(), str(value)) for key, value in items]


# An infergate server's UNAVAILABLE for a model that is not loaded, by name (its state is UNAVAILABLE:
# it failed to load, or was unloaded; not LOADING) or by version (it failed to load). Waiting a few
# seconds does not mend a broken model file, so such a call is not retried and costs the budget nothing.
_NOT_LOADED = re.compile(r"has no available versions \(UNAVAILABLE\)|is not ready: it failed to load: ")


def model_not_loaded(error: grpc.RpcError) -> bool:
    """Whether ``error`` (an UNAVAILABLE) is an infergate server saying the model is not loaded."""
    details = error.details() if callable(getattr(error, "details", None)) else None
    return bool(details) and _NOT_LOADED.search(str(details)) is not None


class ClientBase:
    """Settings and decisions shared by both clients.

    ``url``: ``HOST:PORT``, a gRPC URI such as ``dns:///infergate-headless:8001``, or
    several ``IP:PORT`` addresses (a list or comma-separated) to balance round-robin;
    a malformed one raises ValueError naming it (see ``options.resolve_target``).
    ``timeout``: the default deadline of each call in seconds, retries included; a
    call's ``timeout=None`` keeps it. Not a number: TypeError; not finite and > 0: ValueError.
    ``token``: a bearer token, or a callable returning one (see ``RefreshingToken``).
    ``metadata``: headers sent with every call (``x-user-id``, ``traceparent``...); a key
    that a call's own ``metadata=`` sends replaces the client's for that call.
    ``health_check``: send calls only to servers whose inference service reports SERVING
    (see ``options.channel_options``); off, calls reach a server that is loading or draining.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        tls: Tls | None = None,
        token: Token | None = None,
        metadata: Metadata | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        retry_budget: RetryBudget | None = None,
        keepalive: Keepalive | None = None,
        channel_options: Sequence[tuple[str, str | int]] = (),
        health_check: bool = True,
    ) -> None:
        self._timeout = _check_timeout(timeout)
        self.target = resolve_target(url)
        self._tls = tls
        self._token = token
        self._metadata = _pairs(metadata)
        self._retry = retry or RetryPolicy()
        self._budget = retry_budget or RetryBudget()
        self._options = _channel_options_for(keepalive or Keepalive(), channel_options, tls, health_check)
        self._rng = random.Random()
        self._open_channel()

    def _open_channel(self) -> None:
        """Open the channel and stub (blocking or asyncio): the one thing each client does its own way."""
        raise NotImplementedError

    def _credentials(self) -> grpc.ChannelCredentials | None:
        return self._tls.credentials() if self._tls is not None else None

    def _token_needs_thread(self) -> bool:
        """True when fetching the token may block (a RefreshingToken about to refresh)."""
        return isinstance(self._token, RefreshingToken) and self._token.needs_refresh()

    def _call_metadata(self, extra: Metadata | None) -> list[tuple[str, str]]:
        """The client's metadata, then the call's, then ``authorization`` from the token.

        A key the call sends replaces the client's values for it (servers read one
        ``x-user-id``, and refuse two ``authorization`` headers); a call that sends
        ``authorization`` itself gets no token added.
        """
        call = _pairs(extra)
        replaced = {key for key, _ in call}
        pairs = [(key, value) for key, value in self._metadata if key not in replaced] + call
        if self._token is not None and "authorization" not in replaced:
            token = self._token() if callable(self._token) else self._token
            pairs.append(("authorization", f"Bearer {token}"))
        return pairs

    def _deadline(self, timeout: float | None) -> float:
        """When a call must be over: ``timeout`` seconds from now, or the client's timeout for None."""
        return time.monotonic() + (self._timeout if timeout is None else _check_timeout(timeout))

    def _retry_delay(self, error: grpc.RpcError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise.

        Only UNAVAILABLE is retried (never INVALID_ARGUMENT, DEADLINE_EXCEEDED...),
        within ``max_attempts``, the client's budget and the call's deadline; and
        not when the server says the model is not loaded (see ``model_not_loaded``).
        """
        code = error.code() if callable(getattr(error, "code", None)) else None
        if code != grpc.StatusCode.UNAVAILABLE or model_not_loaded(error):
            return None
        if not self._budget.on_failure() or attempt >= self._retry.max_attempts:
            return None
        delay = self._retry.backoff(attempt, self._rng)
        if time.monotonic() + delay >= deadline:
            return None
        if self._retry.on_retry is not None:
            self._retry.on_retry(attempt, error)
        return delay

    def _succeeded(self, call: Call[Any], reply: Any) -> Any:
        self._budget.on_success()
        return _decode(call, reply)


def _decode(call: Call[Any], reply: Any) -> Any:
    try:
        return call.decode(reply)
    except ValueError as exc:
        raise ServerError(f"{call.method} reply cannot be read: {exc}") from exc


def _channel_options_for(
    keepalive: Keepalive, extra: Sequence[tuple[str, str | int]], tls: Tls | None, health_check: bool
) -> list[tuple[str, str | int]]:
    options = channel_options(keepalive, extra, health_check=health_check)
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options
