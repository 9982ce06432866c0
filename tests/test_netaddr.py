"""``host:port`` as the server binds, announces and logs it: IPv6 literals in brackets."""

from __future__ import annotations

import pytest

from infergate.netaddr import host_port


@pytest.mark.parametrize(
    ("host", "port", "address"),
    [
        ("127.0.0.1", 8001, "127.0.0.1:8001"),
        ("0.0.0.0", 0, "0.0.0.0:0"),
        ("localhost", 8001, "localhost:8001"),
        ("fd00:10:244::7", 8003, "[fd00:10:244::7]:8003"),  # a pod IP on an IPv6 cluster (--health-host)
        ("::", 8001, "[::]:8001"),
        ("[::1]", 8001, "[::1]:8001"),  # already bracketed
    ],
)
def test_an_ipv6_literal_is_bracketed_and_nothing_else_changes(host: str, port: int, address: str) -> None:
    assert host_port(host, port) == address
