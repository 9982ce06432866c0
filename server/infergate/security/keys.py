"""Verification keys for JWT: the HMAC secret, PEM public keys and JWKS.

:class:`KeyStore` answers "which keys may verify a token with this ``alg`` and
``kid``". A key is only ever offered to the algorithm family it belongs to:
the HMAC secret to HS*, RSA keys to RS*/PS*, P-256/P-384 keys to ES256/ES384,
Ed25519/Ed448 keys to EdDSA. That is what makes key confusion (an HS256 token
"signed" with the RSA public key) impossible by construction, not by a check.

A JWKS URL is fetched on a dedicated thread, never on the event loop, and its
keys are cached. It is fetched again on a schedule — every ``refresh_seconds``,
sooner when the response's ``Cache-Control`` says it goes stale sooner — by a
task the composition root starts (:meth:`KeyStore.start`) and stops
(:meth:`KeyStore.aclose`), so a key withdrawn from the set stops verifying; and
when a token names an unknown ``kid``, at most once per ``min_refresh_seconds``.
:attr:`KeyStore.generation` moves when a fetch withdraws a key, which is how the
verifier's token cache learns to forget; :attr:`KeyStore.holds` holds one
:class:`KeyHold` per way the URL's keys verify tokens, kept across fetches while
the set still verifies that way, which is how a stream learns that no published
key verifies its token any more. Nothing here ever puts key material in a message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from infergate import threadnames
from infergate.config import ConfigError
from infergate.security.config import ALGORITHMS, HMAC_ALGORITHMS, AuthConfig, JwksConfig
from infergate.security.freshness import freshness_seconds

__all__ = [
    "MIN_SECRET_BYTES",
    "FetchedKeySet",
    "JwksUrlSource",
    "KeyHold",
    "KeyStore",
    "VerificationKey",
    "build_key_store",
    "key_fits",
]

log = logging.getLogger(__name__)

# RFC 7518 §3.2: an HMAC key at least as long as the hash.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MAX_JWKS_BYTES = 1024 * 1024

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}


@dataclass(frozen=True, eq=False)  # a key is itself: hashed by identity
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


@dataclass(frozen=True)
class FetchedKeySet:
    """One answer of the JWKS URL: its body, and for how long it is fresh (None: the response does not say)."""

    body: bytes
    fresh_seconds: float | None = None


Sleep = Callable[[float], Awaitable[None]]


class JwksUrlSource:
    """A JWKS document behind an HTTPS URL, fetched on its own thread.

    Two kinds of fetch, both counted in ``fetches``: :meth:`refresh` (a token named
    an unknown kid) runs at most once per ``min_refresh_seconds``; :meth:`refresh_if_due`
    (the schedule) runs when :meth:`seconds_until_due` is 0, that is
    ``refresh_seconds`` after the last fetch started, or sooner when that answer went
    stale sooner (``Cache-Control: max-age`` less ``Age``, but never sooner than
    ``min_refresh_seconds``). A longer max-age does not stretch ``refresh_seconds``:
    that interval is what bounds how long a withdrawn key keeps verifying. A fetch
    takes at most ``fetch_timeout_seconds``; after a failure the next one is due
    ``refresh_seconds`` after it started. ``clock`` is monotonic.
    """

    def __init__(
        self,
        config: JwksConfig,
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[], FetchedKeySet] | None = None,
    ) -> None:
        assert config.url is not None
        self._config = config
        self._clock = clock
        self._fetch = fetch or self._fetch_url
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="jwks", initializer=threadnames.name_after_python
        )
        self._lock = asyncio.Lock()
        self._last_attempt: float | None = None
        self._due: float | None = None  # None: never fetched, so due now
        self.fetches = 0

    def _fetch_url(self) -> FetchedKeySet:
        assert self._config.url is not None
        context = ssl.create_default_context(cafile=self._config.ca_file)
        timeout = self._config.fetch_timeout_seconds
        with urllib.request.urlopen(self._config.url, context=context, timeout=timeout) as response:
            body: bytes = response.read(MAX_JWKS_BYTES + 1)
            cache_control = ", ".join(response.headers.get_all("Cache-Control") or ())
            fresh = freshness_seconds(cache_control, response.headers.get("Age"))
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
        return FetchedKeySet(body, fresh)

    def seconds_until_due(self) -> float:
        """How long until the schedule should fetch again (0: now)."""
        if self._due is None:
            return 0.0
        return max(0.0, self._due - self._clock())

    async def refresh(self) -> list[VerificationKey] | None:
        """Fetch unless a fetch started within ``min_refresh_seconds``; None if none ran or it failed."""
        async with self._lock:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._config.min_refresh_seconds:
                return None
            return await self._fetch_now(now)

    async def refresh_if_due(self) -> list[VerificationKey] | None:
        """Fetch if the schedule says so; None if it does not or the fetch failed."""
        async with self._lock:
            if self.seconds_until_due() > 0:
                return None
            return await self._fetch_now(self._clock())

    async def _fetch_now(self, started: float) -> list[VerificationKey] | None:
        self._last_attempt = started
        self._due = started + self._config.refresh_seconds
        self.fetches += 1
        loop = asyncio.get_running_loop()
        try:
            # urllib's timeout bounds each socket operation; this bounds the whole fetch.
            async with asyncio.timeout(self._config.fetch_timeout_seconds):
                fetched = await loop.run_in_executor(self._executor, self._fetch)
            keys = parse_jwks(json.loads(fetched.body), "jwks.url")
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError
            log.warning("jwks.url: fetch failed: %s", str(exc) or type(exc).__name__)
            return None
        if fetched.fresh_seconds is not None:
            stale = started + max(fetched.fresh_seconds, self._config.min_refresh_seconds)
            self._due = min(self._due, stale)
        return keys

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


Fingerprint = tuple[str | None, str | None, bytes]


def _fingerprints(keys: list[VerificationKey]) -> dict[Fingerprint, VerificationKey]:
    """Each key by what makes it that key (kid, alg, public key), in order; a repeated one counts once."""
    fingerprints: dict[Fingerprint, VerificationKey] = {}
    for k in keys:
        fingerprints.setdefault((k.kid, k.alg, k.key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)), k)
    return fingerprints


@dataclass(frozen=True, eq=False)  # hashed by identity: KeyStore.holds keeps one while it stays true
class KeyHold:
    """Why a token verified by a key from the JWKS URL stays valid: the set holds a key with the same
    public key that fits ``alg`` and, for a token that names a kid, has the kid of the key that verified
    it. A token that names none (``kid_named`` False) may be verified by any such key, whatever its kid.
    """

    alg: str
    kid_named: bool
    kid: str | None = None


# A KeyHold by value: the token's alg, the public key (DER), and the key's kid, or no third item for a
# token that names no kid. Only the key store compares these, once per fetch.
_HoldValue = tuple[str, bytes] | tuple[str, bytes, str | None]

_PUBLIC_KEY_ALGORITHMS = tuple(a for a in ALGORITHMS if a not in HMAC_ALGORITHMS)


def _hold_values(fingerprints: dict[Fingerprint, VerificationKey]) -> set[_HoldValue]:
    """Every way the keys verify a token: per algorithm a key fits, with its kid and with any kid."""
    values: set[_HoldValue] = set()
    for (kid, _, der), key in fingerprints.items():
        for alg in _PUBLIC_KEY_ALGORITHMS:
            if key_fits(alg, key):
                values.update(((alg, der), (alg, der, kid)))
    return values


def _hold(value: _HoldValue) -> KeyHold:
    if len(value) == 2:
        return KeyHold(value[0], kid_named=False)
    return KeyHold(value[0], kid_named=True, kid=value[2])


class KeyStore:
    """The keys a verifier may use, found by algorithm family and ``kid``.

    With a JWKS URL, :meth:`start` fetches it and starts the task that refetches it on
    schedule; :meth:`aclose` stops that task. ``generation`` grows by one whenever a
    fetch withdraws a key (one that was there is gone or changed): anything verified
    with an older generation must be verified again. ``holds`` is the set of
    :class:`KeyHold` objects the URL's keys make true: one that stays true keeps its
    object from one fetch to the next, so a token verified from the URL whose hold
    (:meth:`hold`, ``Principal.key``) is not in ``holds`` any more has no published key
    left to verify it, which costs a stream one identity look-up to ask. A hold that
    comes true again later is a new object: a stream that lost its key stays refused.
    ``sleep`` waits between scheduled fetches (tests pass one that a manual clock
    controls).
    """

    def __init__(
        self,
        secret: bytes | None = None,
        keys: list[VerificationKey] | None = None,
        jwks_url: JwksUrlSource | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.secret = secret
        self._static = list(keys or [])
        self._fetched: dict[Fingerprint, VerificationKey] = {}
        self._fingerprint_of: dict[VerificationKey, Fingerprint] = {}
        self._holds: dict[_HoldValue, KeyHold] = {}
        self.holds: frozenset[KeyHold] = frozenset()
        self._jwks_url = jwks_url
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._fetching: asyncio.Task[bool] | None = None  # a fetch a caller started (see refresh)
        self.generation = 0

    def candidates(self, alg: str, kid: str | None) -> list[VerificationKey]:
        """Public keys that may verify ``alg``: those named ``kid`` first, then those configured without a kid.

        A token without a kid may be verified by any key that fits its algorithm.
        """
        keys = [k for k in (*self._static, *self._fetched.values()) if key_fits(alg, k)]
        if kid is None:
            return keys
        return [k for k in keys if k.kid == kid] + [k for k in keys if k.kid is None]

    def hold(self, key: VerificationKey, alg: str, kid_named: bool) -> KeyHold | None:
        """What keeps valid a token signed with ``alg`` that ``key`` verified, ``kid_named`` when it names
        a kid; None for a key that is never withdrawn (the configured ones). ``key`` is a candidate just given."""
        fingerprint = self._fingerprint_of.get(key)
        if fingerprint is None:
            return None
        kid, _, der = fingerprint
        return self._holds[(alg, der, kid) if kid_named else (alg, der)]

    async def start(self) -> None:
        """With a JWKS URL: fetch it once (a failure is logged, the schedule retries) and start refreshing it."""
        if self._jwks_url is None or self._task is not None:
            return
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_on_schedule(), name="jwks refresh")

    async def _refresh_on_schedule(self) -> None:
        assert self._jwks_url is not None
        while True:
            await self._sleep(self._jwks_url.seconds_until_due())
            try:
                self._take(await self._jwks_url.refresh_if_due())
            except Exception:  # a bug must not end the schedule: the next fetch is already due later
                log.exception("jwks.url: scheduled refresh failed")

    async def refresh(self) -> bool:
        """Refetch the JWKS URL (rate-limited); True when a fetch succeeded.

        The fetch runs in a task of its own, which callers that arrive meanwhile share: a caller
        whose call ends (its deadline, a hang-up) must not take with it the keys fetched for
        everyone, since the rate limit would then keep the next caller from fetching them again.
        """
        if self._jwks_url is None:
            return False
        fetching = self._fetching
        if fetching is None or fetching.done():
            fetching = self._fetching = asyncio.create_task(self._fetch_and_take(), name="jwks fetch")
        return await asyncio.shield(fetching)

    async def _fetch_and_take(self) -> bool:
        assert self._jwks_url is not None
        return self._take(await self._jwks_url.refresh())

    def _take(self, keys: list[VerificationKey] | None) -> bool:
        if keys is None:
            return False
        taken = _fingerprints(keys)
        withdrawn = self._fetched.keys() - taken.keys()
        self._fetched = taken
        self._fingerprint_of = {key: fingerprint for fingerprint, key in taken.items()}
        # A hold still true keeps the object it had: a stream verified while it was true holds that one.
        holds = self._holds
        self._holds = {value: holds.get(value) or _hold(value) for value in _hold_values(taken)}
        self.holds = frozenset(self._holds.values())
        if withdrawn:
            self.generation += 1
            log.info("jwks.url: %d key(s) withdrawn from the key set", len(withdrawn))
        return True

    def close(self) -> None:
        """Stop refreshing and release the fetch thread (on a running loop, prefer :meth:`aclose`)."""
        for task in (self._task, self._fetching):
            if task is not None:
                task.cancel()
        self._task = self._fetching = None
        if self._jwks_url is not None:
            self._jwks_url.close()

    async def aclose(self) -> None:
        """Stop the refresh task, wait for it to end, and release the fetch thread."""
        tasks = [t for t in (self._task, self._fetching) if t is not None]
        self._task = self._fetching = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.close()


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
