"""The ``auth:``, ``tls:`` and ``limits:`` blocks of the server config, and the permission rules.

A bad block is refused at load with the file and the field path; keys and
secrets are read when the server is built, and a problem there names the field
too. Permissions are pure functions, tested as tables.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from security import SECRET, ec_key, private_pem, public_pem

from infergate.config import ConfigError, ServerConfig, load_server_config
from infergate.security.auth import PermissionDenied, Principal, permissions_from_claims, require
from infergate.security.config import AuthConfig, exposure_warning, is_loopback
from infergate.security.keys import build_key_store


def load(tmp_path: Path, text: str) -> ServerConfig:
    path = tmp_path / "server.yaml"
    path.write_text(text, encoding="utf-8")
    return load_server_config(path, {})


def test_the_defaults_are_safe() -> None:
    config = ServerConfig()
    assert not config.auth.enabled and config.tls is None
    assert "none" not in config.auth.algorithms
    assert config.limits.max_batch_rows >= 1 and config.limits.max_concurrent_streams >= 1
    assert "/grpc.health.v1.Health/*" in config.auth.exempt_methods


def test_a_full_security_config_is_read(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
auth:
  enabled: true
  algorithms: [HS256, RS256]
  secret_env: JWT_SECRET
  public_keys: [{file: keys/rsa.pem, kid: k1}]
  issuer: https://issuer.test
  audience: infergate
  leeway_seconds: 5
  permissions_claim: roles
tls: {cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt}
limits: {max_batch_rows: 64, max_inputs_per_request: 8, max_concurrent_streams: 100}
""",
    )
    assert config.auth.public_keys[0].kid == "k1"
    assert config.tls is not None and config.tls.client_ca_file == Path("ca.crt")
    assert config.limits.max_inputs_per_request == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("auth: {enabled: true, algorithms: [none]}", "auth.algorithms.0: Input should be"),
        ("auth: {enabled: true, algorithms: [HS256]}", "auth: Value error, algorithms ['HS256'] need secret_env"),
        ("auth: {enabled: true, algorithms: [RS256]}", "auth: Value error, algorithms ['RS256'] need public_keys"),
        ("auth: {enabled: true, algorithms: [HS256], secret: abc}", "auth.secret: Extra inputs are not permitted"),
        ("auth: {enabled: true, jwks: {url: 'http://keys.test/jwks'}}", "auth.jwks.url: String should match"),
        ("auth: {enabled: true, jwks: {}}", "auth.jwks: Value error, set exactly one of file or url"),
        ("tls: {cert_file: a.crt}", "tls.key_file: Field required"),
        ("limits: {max_batch_rows: 0}", "limits.max_batch_rows: Input should be greater than or equal to 1"),
    ],
)
def test_a_bad_block_names_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert f"{tmp_path / 'server.yaml'}: {message}" in str(caught.value)


def auth_config(**fields: Any) -> AuthConfig:
    return AuthConfig.model_validate({"enabled": True, **fields})


def test_keys_and_secrets_are_read_when_the_server_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pem = tmp_path / "ec.pem"
    pem.write_bytes(public_pem(ec_key()))
    monkeypatch.setenv("JWT_SECRET", SECRET.decode())
    store = build_key_store(
        auth_config(algorithms=["HS256", "ES256"], secret_env="JWT_SECRET", public_keys=[{"file": str(pem)}])
    )
    assert store.secret == SECRET
    assert len(store.candidates("ES256", None)) == 1
    assert len(store.candidates("ES256", "any-kid")) == 1  # a key configured without a kid serves every kid
    assert store.candidates("RS256", None) == []


KeySource = Callable[[Path, Path], dict[str, Any]]  # (a private key file, a bad JWKS file) -> auth fields


@pytest.mark.parametrize(
    ("fields", "env", "message"),
    [
        (lambda p, j: {"algorithms": ["HS256"], "secret_env": "NOT_SET_ANYWHERE"}, {}, "environment variable"),
        (lambda p, j: {"algorithms": ["HS256"], "secret_env": "S"}, {"S": "short"}, "at least 32 bytes"),
        (lambda p, j: {"algorithms": ["HS512"], "secret_env": "S"}, {"S": "x" * 40}, "at least 64 bytes"),
        (lambda p, j: {"algorithms": ["HS256"], "secret_file": "/nonexistent"}, {}, "auth.secret_file: cannot read"),
        (lambda p, j: {"public_keys": [{"file": str(p)}]}, {}, "auth.public_keys.0.file: .* not a PEM public key"),
        (lambda p, j: {"jwks": {"file": str(j)}}, {}, "auth.jwks.file: .* not a JWKS document"),
    ],
)
def test_a_bad_key_source_is_refused_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: KeySource, env: dict[str, str], message: str
) -> None:
    private = tmp_path / "private.pem"
    private.write_bytes(private_pem(ec_key()))  # a private key is not a public key
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"not": "a key set"}')
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        build_key_store(auth_config(**fields(private, jwks)))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("infer.example.com", False)],
)  # fmt: skip
def test_listening_beyond_loopback_without_auth_warns(host: str, loopback: bool) -> None:
    assert is_loopback(host) == loopback
    warning = exposure_warning(host, AuthConfig())
    assert (warning is None) == loopback
    if warning is not None:
        assert "WITHOUT AUTHENTICATION" in warning
    assert exposure_warning(host, AuthConfig(enabled=True, algorithms=["HS256"], secret_env="S")) is None


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize(
    ("claims", "name", "permissions"),
    [
        ({"scope": "infer:a* metadata"}, "scope", {"infer:a*", "metadata"}),
        ({"scope": "  admin  "}, "scope", {"admin"}),
        ({"scopes": ["infer:*", "admin"]}, "scopes", {"infer:*", "admin"}),
        ({"roles": ["metadata", 7, None]}, "roles", {"metadata"}),
        ({"scope": "admin"}, "roles", set()),
        ({"roles": {"admin": True}}, "roles", set()),
    ],
)
def test_permissions_come_from_the_configured_claim(claims: dict[str, Any], name: str, permissions: set[str]) -> None:
    assert permissions_from_claims(claims, name) == permissions


@pytest.mark.parametrize(
    ("permissions", "needed", "model", "missing"),
    [
        ({"infer:fraud-*"}, "infer", "fraud-eu", None),
        ({"infer:fraud-*"}, "infer", "mlp", "infer:mlp"),
        ({"infer:*"}, "metadata", "mlp", "metadata"),
        ({"metadata"}, "metadata", "mlp", None),
        ({"admin"}, "infer", "mlp", "infer:mlp"),  # admin is for control, not for inference
        ({"infer:*", "metadata"}, "admin", "mlp", "admin"),
        ({"admin"}, "admin", None, None),
    ],
)
def test_require_names_the_missing_permission(
    permissions: set[str], needed: str, model: str | None, missing: str | None
) -> None:
    principal = Principal("alice", permissions=frozenset(permissions))
    if missing is None:
        require(principal, needed, model, "Call")
        return
    with pytest.raises(PermissionDenied) as caught:
        require(principal, needed, model, "Call")
    assert caught.value.permission == missing
    assert f"needs permission {missing!r}" in caught.value.message
