"""The server's ``auth:``, ``tls:`` and ``limits:`` configuration blocks.

They are nested in :class:`infergate.config.ServerConfig` and validated with it,
once, at load; an error names the file and the field path (``auth: ...``).
Every default is safe: auth off (the CLI warns when that is exposed beyond
loopback), no TLS, and limits that stop one request from hurting the others.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

from infergate.configfile import FilePath, Strict

__all__ = [
    "ALGORITHMS",
    "DEFAULT_EXEMPT_METHODS",
    "HMAC_ALGORITHMS",
    "AuthConfig",
    "JwksConfig",
    "LimitsConfig",
    "PublicKeyConfig",
    "TlsConfig",
    "exposure_warning",
    "is_loopback",
]

Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})

# Probes and discovery must work without a token (load balancers, grpcurl list).
DEFAULT_EXEMPT_METHODS: tuple[str, ...] = (
    "/grpc.health.v1.Health/*",
    "/grpc.reflection.v1alpha.ServerReflection/*",
    "/grpc.reflection.v1.ServerReflection/*",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


_DEFAULT_ALGORITHMS: list[Algorithm] = ["RS256", "ES256", "EdDSA"]


class PublicKeyConfig(Strict):
    """A PEM public key file; ``kid`` matches the token header's ``kid`` (optional)."""

    file: FilePath
    kid: str | None = None


class JwksConfig(Strict):
    """A JSON Web Key Set, from a file or an HTTPS URL (fetched off the event loop)."""

    file: FilePath | None = None
    url: Annotated[str, Field(pattern=r"^https://")] | None = None
    # Trust anchors for the URL (PEM); default: the system's.
    ca_file: FilePath | None = None
    # The URL is fetched again this often, sooner when its Cache-Control max-age runs out first, so
    # a key withdrawn from the set stops verifying within refresh_seconds + fetch_timeout_seconds.
    refresh_seconds: Annotated[float, Field(gt=0, le=86400)] = 60.0
    # An unknown kid refetches the URL at most this often; nor does a short max-age fetch more often.
    min_refresh_seconds: Annotated[float, Field(ge=0, le=86400)] = 60.0
    fetch_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0

    @model_validator(mode="after")
    def _one_source(self) -> JwksConfig:
        if (self.file is None) == (self.url is None):
            raise ValueError("set exactly one of file or url")
        return self


class AuthConfig(Strict):
    """JWT bearer-token authentication and per-model permissions."""

    enabled: bool = False
    # Explicit allow-list; "none" cannot be listed.
    algorithms: list[Algorithm] = Field(default_factory=lambda: _DEFAULT_ALGORITHMS[:], min_length=1)
    # The HMAC secret comes from the environment or a file, never from this file itself.
    secret_env: str | None = None
    secret_file: FilePath | None = None
    public_keys: list[PublicKeyConfig] = []
    jwks: JwksConfig | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # "scope": a space-separated string; "scopes"/"roles" (or any name): a list of strings.
    permissions_claim: str = "scope"
    # Full method names, fnmatch patterns, answered without a token.
    exempt_methods: list[str] = Field(default_factory=lambda: list(DEFAULT_EXEMPT_METHODS))

    @model_validator(mode="after")
    def _keys_for_algorithms(self) -> AuthConfig:
        if not self.enabled:
            return self
        if self.secret_env is not None and self.secret_file is not None:
            raise ValueError("set one of secret_env or secret_file, not both")
        has_secret = self.secret_env is not None or self.secret_file is not None
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        asymmetric = [a for a in self.algorithms if a not in HMAC_ALGORITHMS]
        if hmac and not has_secret:
            raise ValueError(f"algorithms {hmac} need secret_env or secret_file")
        if asymmetric and not self.public_keys and self.jwks is None:
            raise ValueError(f"algorithms {asymmetric} need public_keys or jwks")
        if has_secret and not hmac:
            raise ValueError("a secret is set but no HS* algorithm is allowed")
        return self


class TlsConfig(Strict):
    """TLS on the gRPC port; with ``client_ca_file``, mutual TLS (client certificates required)."""

    cert_file: FilePath
    key_file: FilePath
    client_ca_file: FilePath | None = None
    # Re-read the files when they change (checked at each new connection), so rotation needs no restart.
    reload: bool = True


class LimitsConfig(Strict):
    """Bounds on what one request or one connection may ask for.

    The largest message is ``max_receive_message_bytes`` on the server block.
    """

    max_elements_per_tensor: Annotated[int, Field(ge=1)] = 64 * 1024 * 1024
    # Rows of one request, on top of each model's max_batch_size.
    max_batch_rows: Annotated[int, Field(ge=1)] = 1024
    max_inputs_per_request: Annotated[int, Field(ge=1)] = 128
    # HTTP/2 streams one connection may have open at once (grpc.max_concurrent_streams).
    max_concurrent_streams: Annotated[int, Field(ge=1)] = 1024
    # Inference calls (a stream counts as one) the whole server takes on at once; beyond it, calls are
    # refused at once with UNAVAILABLE (serving/admission.py; the default is sized in docs/deploy.md).
    max_inference_calls: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    # Calls gRPC's core holds for the server before its event loop takes them
    # (grpc.server.max_pending_requests). Beyond it gRPC refuses new calls, more of them the closer the
    # backlog gets to twice this (its hard limit), before any Python runs. Sized in docs/deploy.md.
    max_pending_calls: Annotated[int, Field(ge=1, le=1_000_000)] = 512


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``; any other name may reach the network."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, auth: AuthConfig) -> str | None:
    """The warning ``infergate serve`` prints when it listens beyond loopback with no authentication."""
    if auth.enabled or is_loopback(host):
        return None
    return (
        f"WARNING: listening on {host} WITHOUT AUTHENTICATION: anyone who can reach this port can run and "
        "inspect every model. Enable the auth: block (docs/security.md) or listen on 127.0.0.1."
    )
