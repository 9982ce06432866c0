"""What a server reads or opens when it is built from its config, checked before it is built.

:func:`check_startable` raises ConfigError for what ``InferGateServer(config)``
would refuse: the key files of auth, the certificates of TLS, the trace
exporters the ``OTEL_*`` variables name. The ``--workers`` supervisor calls it
once, so that a bad file is reported once, not by every worker; ``infergate
check`` calls it so that the CI gate refuses what the server would.
"""

from __future__ import annotations

from infergate.config import ServerConfig
from infergate.security.keys import build_key_store
from infergate.security.tls import server_credentials
from infergate.telemetry import check_exporters

__all__ = ["check_startable"]


def check_startable(config: ServerConfig) -> None:
    """Raise ConfigError for what ``InferGateServer(config)`` would refuse: keys, certificates, exporters."""
    if config.auth.enabled:
        build_key_store(config.auth).close()
    if config.tls is not None:
        server_credentials(config.tls)
    check_exporters(config.telemetry)
