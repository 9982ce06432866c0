"""Authentication and authorization, free of any transport.

:class:`TokenVerifier` turns a bearer token into a :class:`Principal` or raises
one :class:`AuthError` subclass per reason, each with a short stable
``reason`` (for metrics and logs) and a message that says what was wrong
without any key material::

    AuthError (infergate.errors.InferGateError)   UNAUTHENTICATED   invalid_token (catch-all)
    ├── MissingToken          missing_token
    ├── MalformedToken        malformed           (includes a claim of the wrong type)
    ├── AlgorithmNotAllowed   alg_not_allowed
    ├── UnknownKey            unknown_kid
    ├── BadSignature          bad_signature
    ├── Expired               expired
    ├── KeyWithdrawn          key_withdrawn       (a stream's token, once its key leaves the JWKS)
    ├── NotYetValid           not_yet_valid
    ├── WrongIssuer           wrong_issuer
    ├── WrongAudience         wrong_audience
    ├── MissingClaim          missing_claim
    └── PermissionDenied      permission_denied    PERMISSION_DENIED

Permissions come from one claim: ``infer:<pattern>`` (fnmatch on the model
name), ``metadata`` and ``admin``; each is independent of the others. The
principal of the current request is in a context variable
(:func:`current_principal`), set by the interceptor for the handler.
"""

from __future__ import annotations

import contextvars
import fnmatch
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError  # not exported by jwt itself

from infergate.errors import InferGateError, Status
from infergate.security.config import HMAC_ALGORITHMS, AuthConfig
from infergate.security.keys import KeyHold, KeyStore, VerificationKey

__all__ = [
    "AlgorithmNotAllowed",
    "AuthError",
    "BadSignature",
    "Expired",
    "KeyWithdrawn",
    "MalformedToken",
    "MissingClaim",
    "MissingToken",
    "NotYetValid",
    "PermissionDenied",
    "Principal",
    "TokenVerifier",
    "UnknownKey",
    "WrongAudience",
    "WrongIssuer",
    "authorization",
    "current_principal",
    "may_infer",
    "permissions_from_claims",
    "require",
    "reset_principal",
    "token_of",
    "use_principal",
    "visible_models",
]

ADMIN = "admin"
METADATA = "metadata"
INFER_PREFIX = "infer:"


class AuthError(InferGateError):
    """The caller could not be authenticated (or, for PermissionDenied, may not do this)."""

    status = Status.UNAUTHENTICATED
    reason: ClassVar[str] = "invalid_token"


class MissingToken(AuthError):
    reason = "missing_token"


class MalformedToken(AuthError):
    reason = "malformed"


class AlgorithmNotAllowed(AuthError):
    reason = "alg_not_allowed"


class UnknownKey(AuthError):
    reason = "unknown_kid"


class BadSignature(AuthError):
    reason = "bad_signature"


class Expired(AuthError):
    reason = "expired"


class KeyWithdrawn(AuthError):
    """The key a stream's token was verified with has been withdrawn from the JWKS since the stream opened."""

    reason = "key_withdrawn"


class NotYetValid(AuthError):
    reason = "not_yet_valid"


class WrongIssuer(AuthError):
    reason = "wrong_issuer"


class WrongAudience(AuthError):
    reason = "wrong_audience"


class MissingClaim(AuthError):
    reason = "missing_claim"


class PermissionDenied(AuthError):
    """An authenticated caller lacks ``permission``."""

    status = Status.PERMISSION_DENIED
    reason = "permission_denied"

    def __init__(self, message: str, permission: str) -> None:
        super().__init__(message)
        self.permission = permission


@dataclass(frozen=True)
class Principal:
    """Who is calling, as a verified token says."""

    subject: str
    client_id: str | None = None
    permissions: frozenset[str] = field(default_factory=frozenset)
    # When the token stops being valid (its exp plus the leeway; wall clock, as exp is): a stream
    # opened with it is refused its next request from then on (interceptor.py).
    valid_until: float = field(default=math.inf, compare=False)
    # What keeps the token valid when a key from the JWKS URL verified it (None: the secret or a
    # configured key, which are never withdrawn): a stream opened with it is refused its next request
    # once the key store's `holds` no longer has it, that is once no published key verifies the token
    # as it was verified (for a token that names a kid, a key with that kid) (interceptor.py).
    key: KeyHold | None = field(default=None, compare=False, repr=False)


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("infergate_principal", default=None)


# current_principal(): the verified caller of the request being handled; None when auth is off or
# the method is exempt. use_principal(principal): make it current (the interceptor does this); undo
# with reset_principal. The context variable's own methods rather than functions around them: both
# run on every call, and each Python frame a served request enters costs it microseconds with cold
# caches (BENCHMARKS.md, "cold caches").
current_principal: Callable[[], Principal | None] = _current.get
use_principal: Callable[[Principal | None], contextvars.Token[Principal | None]] = _current.set


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    _current.reset(token)


# --- permissions --------------------------------------------------------------------------


def permissions_from_claims(claims: dict[str, Any], claim: str) -> frozenset[str]:
    """A space-separated string (OAuth ``scope``) or a list of strings (``scopes``, ``roles``)."""
    value = claims.get(claim)
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


def may_infer(principal: Principal, model: str) -> bool:
    """Does an ``infer:<pattern>`` permission match ``model``?"""
    return _may_infer(principal.permissions, model)


@functools.lru_cache(maxsize=4096)
def _may_infer(permissions: frozenset[str], model: str) -> bool:
    # Asked on every inference request, by callers whose permissions repeat: a cached answer
    # costs one look-up instead of matching each pattern (a frozenset keeps its hash).
    return any(p.startswith(INFER_PREFIX) and fnmatch.fnmatchcase(model, p[len(INFER_PREFIX) :]) for p in permissions)


def visible_models(principal: Principal, names: Iterable[str]) -> list[str]:
    """The models this caller may use (admin: all), in the order given; for RepositoryIndex."""
    if ADMIN in principal.permissions:
        return list(names)
    return [name for name in names if may_infer(principal, name)]


def require(principal: Principal, permission: str, model: str | None, action: str) -> None:
    """Raise PermissionDenied naming the missing permission. ``permission``: infer, metadata or admin."""
    if permission == "infer":
        model = model or ""
        if _may_infer(principal.permissions, model):  # may_infer's look-up, a frame fewer on every request
            return
        needed = f"{INFER_PREFIX}{model}"
    elif permission in principal.permissions:
        return
    else:
        needed = permission
    target = f" on model {model!r}" if model else ""
    raise PermissionDenied(f"{action}{target} needs permission {needed!r}", needed)


# --- tokens -------------------------------------------------------------------------------


def authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | bytes:
    """The value of the one ``authorization`` header, as received; MissingToken, or MalformedToken
    when there are two."""
    value: str | bytes | None = None
    for key, item in metadata or ():
        if key == "authorization" or (len(key) == 13 and key.lower() == "authorization"):
            if value is not None:
                raise MalformedToken("more than one authorization header")
            value = item
    if value is None:
        raise MissingToken("missing authorization metadata (expected 'Bearer <JWT>')")
    return value


def token_of(value: str | bytes) -> str:
    """The token of an ``authorization`` header's value, ``Bearer <token>``; MalformedToken otherwise."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MalformedToken("authorization metadata must be 'Bearer <JWT>'")
    return token.strip()


# PyJWT's own exception for each refusal, with the AuthError and message it becomes: the first row
# whose class the exception is an instance of (subclasses come before their bases) and whose
# fragment is in PyJWT's message ("" for any). The fragments only choose between messages for one
# PyJWT class (a claim of the wrong type, or a wrong value); they never decide a reason. PyJWT's
# own message is never shown: it may quote the token. Every class PyJWT 2.x raises while decoding
# has a row; MissingRequiredClaimError is translated in _translate, as its message names the claim.
_PYJWT_ERRORS: tuple[tuple[type[Exception], str, type[AuthError], str], ...] = (
    (jwt.ExpiredSignatureError, "", Expired, "token expired"),
    (jwt.ImmatureSignatureError, "", NotYetValid, "token not yet valid (nbf or iat in the future)"),
    (jwt.InvalidIssuedAtError, "", MalformedToken, "claim 'iat' must be a number"),
    (InvalidSubjectError, "", MalformedToken, "claim 'sub' must be a string"),  # no subject= is passed: a type check
    (InvalidJTIError, "", MalformedToken, "claim 'jti' must be a string"),
    (jwt.InvalidIssuerError, "must be a string", WrongIssuer, "claim 'iss' must be a string"),
    (jwt.InvalidIssuerError, "", WrongIssuer, "wrong issuer"),
    (jwt.InvalidAudienceError, "format", WrongAudience, "claim 'aud' must be a string or a list of strings"),
    (jwt.InvalidAudienceError, "", WrongAudience, "wrong audience"),
    (jwt.InvalidSignatureError, "", BadSignature, "signature verification failed"),  # a DecodeError
    (jwt.InvalidAlgorithmError, "", AlgorithmNotAllowed, "algorithm not allowed"),
    (jwt.InvalidKeyError, "", BadSignature, "signature verification failed"),
    (jwt.DecodeError, "(exp)", MalformedToken, "claim 'exp' must be a number"),
    (jwt.DecodeError, "(nbf)", MalformedToken, "claim 'nbf' must be a number"),
    (jwt.DecodeError, "payload string", MalformedToken, "malformed token (the payload is not a JSON object)"),
    (jwt.InvalidTokenError, "b64", MalformedToken, "malformed token (header 'b64' is not supported)"),
    (jwt.InvalidTokenError, "", MalformedToken, "malformed token"),  # any other refusal of the token
)


# Clients reuse one token for many calls; verifying it again each time costs more than the
# rest of a small request. A verified token string is remembered until it expires, but at
# most this long, and never past a JWKS fetch that withdraws a key (KeyStore.generation).
CACHE_SECONDS = 60.0
CACHE_SIZE = 4096


class TokenVerifier:
    """Verifies bearer JWTs against an explicit algorithm allow-list and the configured keys.

    Successful verifications are cached by the exact token string (signature
    included) until ``exp`` plus the leeway, at most ``CACHE_SECONDS``, and only
    while the key store's ``generation`` is the one they were verified in: once a
    JWKS fetch withdraws a key, every cached token is verified again, so a token
    signed with the withdrawn key is refused from that moment. Refusals are never
    cached. ``clock`` is wall-clock time, as ``exp`` is.
    """

    def __init__(self, config: AuthConfig, keys: KeyStore, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._keys = keys
        self._allowed = frozenset(config.algorithms)
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Principal, float, int]] = OrderedDict()
        self.verified = 0  # full verifications (cache misses that succeeded)

    @property
    def keys(self) -> KeyStore:
        """The key store it verifies with (a stream asks it whether its token's key is still held)."""
        return self._keys

    def cached(self, token: str) -> Principal | None:
        """The principal of a token verified before, while that verification holds; else None."""
        cached = self._cache.get(token)
        if cached is None:
            return None
        principal, until, verified_in = cached
        if self._clock() < until and verified_in == self._keys.generation:
            return principal
        del self._cache[token]
        return None

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token; raise an AuthError subclass otherwise."""
        cached = self.cached(token)
        if cached is not None:
            return cached
        now, generation = self._clock(), self._keys.generation
        principal, expires = await self._verify(token)
        self.verified += 1
        until = min(expires + self._config.leeway_seconds, now + CACHE_SECONDS)
        self._cache[token] = (principal, until, generation)  # the generation it started in: a fetch may intervene
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)  # the oldest entry
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise MalformedToken("malformed token (not a JWS compact serialisation)") from None
        except jwt.PyJWTError:  # InvalidTokenError: a kid that is not a string, or a crit PyJWT refuses
            raise MalformedToken("malformed token header ('kid' or 'crit')") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise AlgorithmNotAllowed(f"algorithm {str(alg)[:16]!r} is not allowed")
        if kid is not None and not isinstance(kid, str):
            raise MalformedToken("kid must be a string")
        # No await between finding the keys and asking for the hold: both see the same fetch.
        claims, key = self._decode(token, alg, await self._keys_for(alg, kid))
        hold = None if key is None else self._keys.hold(key, alg, kid_named=kid is not None)
        expires = _expiry(claims)
        return self._principal(claims, expires + self._config.leeway_seconds, hold), expires

    async def _keys_for(self, alg: str, kid: str | None) -> list[tuple[Any, VerificationKey | None]]:
        """The keys to try, each with the public key it is (None: the secret)."""
        if alg in HMAC_ALGORITHMS:
            assert self._keys.secret is not None  # config validation ties HS* to a secret
            return [(self._keys.secret, None)]
        keys = self._keys.candidates(alg, kid)
        if not keys and await self._keys.refresh():  # a rotated JWKS may hold it now
            keys = self._keys.candidates(alg, kid)
        if not keys:
            raise UnknownKey(f"no key with kid {kid[:64]!r} for {alg}" if kid else f"no key for {alg}")
        return [(k.key, k) for k in keys]

    def _decode(
        self, token: str, alg: str, keys: list[tuple[Any, VerificationKey | None]]
    ) -> tuple[dict[str, Any], VerificationKey | None]:
        config = self._config
        # Short keys are refused outright (InvalidKeyError), never merely warned about.
        options: dict[str, Any] = {
            "require": ["exp"],
            "verify_aud": config.audience is not None,
            "enforce_minimum_key_length": True,
        }
        error: AuthError | None = None
        for key, source in keys:  # several only when the token names no kid
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    issuer=config.issuer,
                    audience=config.audience,
                    leeway=config.leeway_seconds,
                    options=options,  # type: ignore[arg-type]
                )
                return claims, source
            except jwt.PyJWTError as exc:
                error = _translate(exc)
                if not isinstance(error, BadSignature):
                    raise error from None
        assert error is not None
        raise error

    def _principal(self, claims: dict[str, Any], valid_until: float, key: KeyHold | None) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise MissingClaim("token has no 'sub' claim")
        client = claims.get("client_id", claims.get("azp"))
        return Principal(
            subject=subject,
            client_id=client if isinstance(client, str) else None,
            permissions=permissions_from_claims(claims, self._config.permissions_claim),
            valid_until=valid_until,
            key=key,
        )


def _expiry(claims: dict[str, Any]) -> float:
    """The token's ``exp`` as a time (PyJWT has checked that it converts to an integer and is not past).

    PyJWT also takes a string of digits, which RFC 7519's NumericDate is not; a long one would be an
    infinite time here.
    """
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise MalformedToken("claim 'exp' must be a number")
    try:
        return float(exp)
    except OverflowError:  # an integer of hundreds of digits: no clock reaches it
        raise MalformedToken("'exp' is too large to be a time") from None


def _translate(exc: jwt.PyJWTError) -> AuthError:
    """The AuthError for what PyJWT raised; always UNAUTHENTICATED (never PermissionDenied)."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return MissingClaim(f"token has no {exc.claim!r} claim")
    said = str(exc)
    for kind, fragment, error, message in _PYJWT_ERRORS:
        if isinstance(exc, kind) and fragment in said:
            return error(message)
    # Not a refusal of the token PyJWT 2.x raises while decoding (a PyJWK error, or a class a later
    # PyJWT adds outside InvalidTokenError): still a refusal, with the catch-all reason 'invalid_token'.
    return AuthError("invalid token")
