"""``host:port`` as gRPC, URLs and the "listening on" line write it."""

from __future__ import annotations

__all__ = ["host_port"]


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets (``[fd00::7]:8001``): unbracketed, gRPC cannot tell the
    port from the address (a pod's IP on an IPv6 cluster, as the Helm chart passes ``--health-host``)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
