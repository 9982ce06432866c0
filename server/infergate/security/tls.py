"""TLS and mutual TLS credentials for the gRPC port, with certificate rotation.

With ``tls.reload`` (the default) the server uses gRPC's dynamic credentials:
at each new connection gRPC asks :class:`CertificateFiles` whether the files
changed (a ``stat`` per file), and a changed, readable set replaces the old
one. Connections already open keep the certificate they shook hands with. A
half-written set (a key that does not match its certificate) is not detected
here: write the new files elsewhere and rename them into place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from infergate.config import ConfigError
from infergate.security.config import TlsConfig

__all__ = ["CertificateFiles", "server_credentials"]

log = logging.getLogger(__name__)


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.{field}: cannot read {path}: {exc.strerror}") from None


class CertificateFiles:
    """The configured PEM files and the signature (inode, mtime, size) they had when last read."""

    def __init__(self, config: TlsConfig) -> None:
        self._config = config
        self._paths = [p for p in (config.cert_file, config.key_file, config.client_ca_file) if p is not None]
        self._seen: tuple[tuple[int, int, int], ...] | None = None

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        stats = [os.stat(p) for p in self._paths]
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """Read the files now (and remember their signature, taken before reading)."""
        c = self._config
        try:
            signature = self._signature()
        except OSError as exc:
            raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
        pair = (_read(c.key_file, "key_file"), _read(c.cert_file, "cert_file"))
        roots = _read(c.client_ca_file, "client_ca_file") if c.client_ca_file is not None else None
        self._seen = signature
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None (keep the current one)."""
        try:
            if self._signature() == self._seen:
                return None
            configuration = self.configuration()
        except (OSError, ConfigError) as exc:
            log.warning("TLS files unreadable, keeping the current certificate: %s", exc)
            return None
        log.info("TLS certificate files changed; new connections use them")
        return configuration


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port``; client certificates are required when a client CA is set."""
    files = CertificateFiles(config) if config.reload else None
    mutual = config.client_ca_file is not None
    if files is not None:
        return grpc.dynamic_ssl_server_credentials(files.configuration(), files.changed, mutual)
    pair = (_read(config.key_file, "key_file"), _read(config.cert_file, "cert_file"))
    roots = _read(config.client_ca_file, "client_ca_file") if config.client_ca_file is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=mutual)
