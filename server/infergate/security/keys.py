"""Verification keys for JWT: the HMAC secret, PEM public keys and JWKS.

:class:`KeyStore` answers "which keys may verify a token with this ``alg`` and
``kid``". A key is only ever offered to the algorithm family it belongs to:
the HMAC secret to HS*, RSA keys to RS*/PS*, P-256/P-384 keys to ES256/ES384,
Ed25519/Ed448 keys to EdDSA. That is what makes key confusion (an HS256 token
"signed" with the RSA public key) impossible by construction, not by a check.

A JWKS URL is fetched on a dedicated thread, never on the event loop; the keys
are cached, and a token with an unknown ``kid`` triggers a refetch at most once
per ``min_refresh_seconds``. Nothing here ever puts key material in a message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from infergate.config import ConfigError
from infergate.security.config import HMAC_ALGORITHMS, AuthConfig, JwksConfig

__all__ = ["MIN_SECRET_BYTES", "JwksUrlSource", "KeyStore", "VerificationKey", "build_key_store", "key_fits"]

log = logging.getLogger(__name__)

# RFC 7518 §3.2: an HMAC key at least as long as the hash.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MAX_JWKS_BYTES = 1024 * 1024

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}


@dataclass(frozen=True)
class VerificationKey:
    key: PublicKey
    kid: str | None = None
    alg: str | None = None  # a JWK's own "alg": the key is for that algorithm only


def key_fits(alg: str, key: VerificationKey) -> bool:
    """May ``key`` verify a token signed with ``alg``? (Never true for HS*.)"""
    if key.alg is not None and key.alg != alg:
        return False
    k = key.key
    if alg.startswith(("RS", "PS")):
        return isinstance(k, rsa.RSAPublicKey)
    if alg in _CURVES:
        return isinstance(k, ec.EllipticCurvePublicKey) and k.curve.name == _CURVES[alg]
    if alg == "EdDSA":
        return isinstance(k, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def parse_jwks(data: Any, origin: str) -> list[VerificationKey]:
    """The usable public keys of a JWKS document; symmetric and unusable keys are skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{origin}: not a JWKS document (no 'keys' list)")
    keys = []
    for index, item in enumerate(data["keys"]):
        if not isinstance(item, dict) or item.get("kty") == "oct" or item.get("use", "sig") != "sig":
            continue  # shared secrets do not belong in a published key set
        try:
            jwk = jwt.PyJWK(item)
        except jwt.PyJWTError as exc:
            log.warning("%s: key %d skipped: %s", origin, index, type(exc).__name__)
            continue
        if isinstance(jwk.key, PublicKey):
            keys.append(VerificationKey(jwk.key, item.get("kid"), item.get("alg")))
    return keys


class JwksUrlSource:
    """A JWKS document behind an HTTPS URL, fetched on its own thread, rate-limited."""

    def __init__(
        self,
        config: JwksConfig,
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[], bytes] | None = None,
    ) -> None:
        assert config.url is not None
        self._config = config
        self._clock = clock
        self._fetch = fetch or self._fetch_url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jwks")
        self._lock = asyncio.Lock()
        self._last_attempt: float | None = None
        self.fetches = 0

    def _fetch_url(self) -> bytes:
        assert self._config.url is not None
        context = ssl.create_default_context(cafile=self._config.ca_file)
        timeout = self._config.fetch_timeout_seconds
        with urllib.request.urlopen(self._config.url, context=context, timeout=timeout) as response:
            body: bytes = response.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
        return body

    async def refresh(self) -> list[VerificationKey] | None:
        """Fetch the keys unless a fetch happened within ``min_refresh_seconds``; None if none ran or it failed."""
        async with self._lock:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._config.min_refresh_seconds:
                return None
            self._last_attempt = now
            self.fetches += 1
            loop = asyncio.get_running_loop()
            try:
                body = await loop.run_in_executor(self._executor, self._fetch)
                return parse_jwks(json.loads(body), "jwks.url")
            except (OSError, ValueError) as exc:
                log.warning("jwks.url: fetch failed: %s", exc)
                return None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class KeyStore:
    """The keys a verifier may use, found by algorithm family and ``kid``."""

    def __init__(
        self,
        secret: bytes | None = None,
        keys: list[VerificationKey] | None = None,
        jwks_url: JwksUrlSource | None = None,
    ) -> None:
        self.secret = secret
        self._static = list(keys or [])
        self._fetched: list[VerificationKey] = []
        self._jwks_url = jwks_url

    def candidates(self, alg: str, kid: str | None) -> list[VerificationKey]:
        """Public keys that may verify ``alg``: those named ``kid`` first, then those configured without a kid.

        A token without a kid may be verified by any key that fits its algorithm.
        """
        keys = [k for k in (*self._static, *self._fetched) if key_fits(alg, k)]
        if kid is None:
            return keys
        return [k for k in keys if k.kid == kid] + [k for k in keys if k.kid is None]

    async def refresh(self) -> bool:
        """Refetch the JWKS URL (rate-limited); True when new keys arrived."""
        if self._jwks_url is None:
            return False
        keys = await self._jwks_url.refresh()
        if keys is None:
            return False
        self._fetched = keys
        return True

    def close(self) -> None:
        if self._jwks_url is not None:
            self._jwks_url.close()


def _read_secret(config: AuthConfig) -> bytes | None:
    if config.secret_env is not None:
        value = os.environ.get(config.secret_env)
        if not value:
            raise ConfigError(f"auth.secret_env: environment variable {config.secret_env} is not set")
        secret, where = value.encode(), f"auth.secret_env ({config.secret_env})"
    elif config.secret_file is not None:
        secret, where = _read_bytes(config.secret_file, "auth.secret_file").strip(), "auth.secret_file"
    else:
        return None
    needed = max(MIN_SECRET_BYTES[a] for a in config.algorithms if a in HMAC_ALGORITHMS)
    if len(secret) < needed:
        raise ConfigError(f"{where}: the secret must be at least {needed} bytes for {config.algorithms}")
    return secret


def _read_bytes(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from None


def _read_public_keys(config: AuthConfig) -> list[VerificationKey]:
    keys = []
    for index, entry in enumerate(config.public_keys):
        field = f"auth.public_keys.{index}.file"
        try:
            key = load_pem_public_key(_read_bytes(entry.file, field))
        except ValueError:
            raise ConfigError(f"{field}: {entry.file} is not a PEM public key") from None
        if not isinstance(key, PublicKey):
            raise ConfigError(f"{field}: {entry.file}: unsupported key type {type(key).__name__}")
        keys.append(VerificationKey(key, entry.kid))
    return keys


def build_key_store(config: AuthConfig) -> KeyStore:
    """Read the configured keys (files and environment, at startup); the JWKS URL is fetched later."""
    keys = _read_public_keys(config)
    url_source = None
    if config.jwks is not None and config.jwks.file is not None:
        try:
            keys += parse_jwks(json.loads(_read_bytes(config.jwks.file, "auth.jwks.file")), str(config.jwks.file))
        except ValueError as exc:
            raise ConfigError(f"auth.jwks.file: {exc}") from None
    elif config.jwks is not None:
        url_source = JwksUrlSource(config.jwks)
    if any(a not in HMAC_ALGORITHMS for a in config.algorithms) and not keys and url_source is None:
        raise ConfigError("auth.public_keys: no usable public key")
    return KeyStore(_read_secret(config), keys, url_source)
