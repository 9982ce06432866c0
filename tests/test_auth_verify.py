"""Token verification (auth.py), through its public API, as tables.

Every token is built with real keys generated here (RSA, EC P-256 and P-384,
Ed25519) and a real HMAC secret. A refused token raises the AuthError subclass
for its reason; its message never contains key material.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from security import AUDIENCE, ISSUER, SECRET, claims, ec_key, ed25519_key, public_pem, rsa_key, token

from infergate.security import auth
from infergate.security.config import AuthConfig
from infergate.security.keys import KeyStore, VerificationKey


@dataclass
class Keys:
    rsa: Any
    other_rsa: Any
    ec256: Any
    ec384: Any
    ed: Any


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(rsa_key(), rsa_key(), ec_key(), ec_key(ec.SECP384R1()), ed25519_key())


def verifier(keys: Keys, algorithms: list[str] | None = None, **overrides: Any) -> auth.TokenVerifier:
    algorithms = algorithms or ["HS256", "RS256", "PS256", "ES256", "ES384", "EdDSA"]
    hs = any(a.startswith("HS") for a in algorithms)
    config = AuthConfig.model_validate(
        {
            "enabled": True,
            "algorithms": algorithms,
            "secret_env": "UNUSED" if hs else None,
            "public_keys": [{"file": "unused.pem"}],
            "issuer": ISSUER,
            "audience": AUDIENCE,
            **overrides,
        }
    )
    store = KeyStore(
        SECRET if hs else None,
        [
            VerificationKey(keys.rsa.public_key(), "rsa"),
            VerificationKey(keys.ec256.public_key(), "ec256"),
            VerificationKey(keys.ec384.public_key(), "ec384"),
            VerificationKey(keys.ed.public_key(), "ed"),
        ],
    )
    return auth.TokenVerifier(config, store)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(alg: str, body: dict[str, Any]) -> str:
    """A token signed by nobody: header.payload. (``alg: none``)."""
    return f"{b64(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{b64(json.dumps(body).encode())}."


def hs256_with(secret: bytes, body: dict[str, Any], kid: str | None = None) -> str:
    """HS256 by hand: PyJWT itself refuses to use a PEM public key as an HMAC secret."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def relabel(signed: str, alg: str) -> str:
    """The same token with another ``alg`` in its header (PyJWT will not sign such a thing)."""
    header, rest = signed.split(".", 1)
    data = json.loads(base64.urlsafe_b64decode(header + "=="))
    return f"{b64(json.dumps({**data, 'alg': alg}).encode())}.{rest}"


def signed(key: Any, alg: str, payload: bytes, kid: str) -> str:
    """A token whose payload is these bytes, signed: PyJWT's encode refuses some claims we must test."""
    return jwt.PyJWS().encode(payload, key, algorithm=alg, headers={"kid": kid})


def compact(header: dict[str, Any], body: dict[str, Any] | None) -> str:
    """header.payload.signature as given (no payload segment when ``body`` is None); the signature is
    not one: what these tokens test is refused before it is checked."""
    payload = b64(json.dumps(body).encode()) if body is not None else ""
    return f"{b64(json.dumps(header).encode())}.{payload}.{b64(b'not a signature')}"


def without(name: str) -> dict[str, Any]:
    return {key: value for key, value in claims().items() if key != name}


NOT_JWS = "malformed token (not a JWS compact serialisation)"
BAD_HEADER = "malformed token header ('kid' or 'crit')"
NO_B64 = "malformed token (header 'b64' is not supported)"
NOT_YET = "token not yet valid (nbf or iat in the future)"


# --------------------------------------------------------------------------- accepted


ACCEPTED: dict[str, Callable[[Keys], str]] = {
    "HS256 with the secret": lambda k: token(SECRET, "HS256"),
    "RS256 by kid": lambda k: token(k.rsa, "RS256", kid="rsa"),
    "PS256 by kid": lambda k: token(k.rsa, "PS256", kid="rsa"),
    "ES256 by kid": lambda k: token(k.ec256, "ES256", kid="ec256"),
    "ES384 by kid": lambda k: token(k.ec384, "ES384", kid="ec384"),
    "EdDSA (Ed25519) by kid": lambda k: token(k.ed, "EdDSA", kid="ed"),
    "RS256 without kid: the one RSA key": lambda k: token(k.rsa, "RS256"),
    "expired within the leeway": lambda k: token(k.ed, "EdDSA", claims(exp=int(time.time()) - 5), kid="ed"),
}


@pytest.mark.parametrize("make", ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_a_valid_token_gives_its_principal(keys: Keys, make: Callable[[Keys], str]) -> None:
    principal = await verifier(keys).verify(make(keys))
    assert principal == auth.Principal("alice", "svc-a", frozenset({"infer:*", "metadata"}))


# --------------------------------------------------------------------------- refused


def _now() -> int:
    return int(time.time())


REFUSED: dict[str, tuple[Callable[[Keys], str], type[auth.AuthError], str, str]] = {
    "not a JWT": (lambda k: "not-a-jwt", auth.MalformedToken, "malformed", NOT_JWS),
    "garbage header": (lambda k: "e30x.e30.", auth.MalformedToken, "malformed", NOT_JWS),
    "bad signature (another RSA key, same kid)": (
        lambda k: token(k.other_rsa, "RS256", kid="rsa"),
        auth.BadSignature,
        "bad_signature",
        "signature verification failed",
    ),
    "HS256 with a wrong secret": (
        lambda k: token(b"x" * 40, "HS256"),
        auth.BadSignature,
        "bad_signature",
        "signature verification failed",
    ),
    "alg none": (
        lambda k: unsigned("none", claims()),
        auth.AlgorithmNotAllowed,
        "alg_not_allowed",
        "algorithm 'none' is not allowed",
    ),
    "alg NONE": (
        lambda k: unsigned("NONE", claims()),
        auth.AlgorithmNotAllowed,
        "alg_not_allowed",
        "algorithm 'NONE' is not allowed",
    ),
    "key confusion: HS256 signed with the RSA public key": (
        lambda k: hs256_with(public_pem(k.rsa), claims(), kid="rsa"),
        auth.BadSignature,
        "bad_signature",
        "signature verification failed",
    ),
    "algorithm outside the allow-list (RS384)": (
        lambda k: token(k.rsa, "RS384", kid="rsa"),
        auth.AlgorithmNotAllowed,
        "alg_not_allowed",
        "algorithm 'RS384' is not allowed",
    ),
    "algorithm outside the allow-list (HS512)": (
        lambda k: token(SECRET, "HS512"),
        auth.AlgorithmNotAllowed,
        "alg_not_allowed",
        "algorithm 'HS512' is not allowed",
    ),
    "expired": (
        lambda k: token(k.rsa, "RS256", claims(exp=_now() - 3600), kid="rsa"),
        auth.Expired,
        "expired",
        "token expired",
    ),
    "not yet valid (nbf)": (
        lambda k: token(k.rsa, "RS256", claims(nbf=_now() + 3600), kid="rsa"),
        auth.NotYetValid,
        "not_yet_valid",
        NOT_YET,
    ),
    "issued in the future (iat)": (
        lambda k: token(k.rsa, "RS256", claims(iat=_now() + 3600), kid="rsa"),
        auth.NotYetValid,
        "not_yet_valid",
        NOT_YET,
    ),
    "wrong issuer": (
        lambda k: token(k.rsa, "RS256", claims(iss="https://evil.test"), kid="rsa"),
        auth.WrongIssuer,
        "wrong_issuer",
        "wrong issuer",
    ),
    "wrong audience": (
        lambda k: token(k.rsa, "RS256", claims(aud="someone-else"), kid="rsa"),
        auth.WrongAudience,
        "wrong_audience",
        "wrong audience",
    ),
    "no audience": (
        lambda k: token(k.rsa, "RS256", {**claims(), "aud": None}, kid="rsa"),
        auth.MissingClaim,
        "missing_claim",
        "token has no 'aud' claim",
    ),
    "unknown kid": (
        lambda k: token(k.rsa, "RS256", kid="nobody"),
        auth.UnknownKey,
        "unknown_kid",
        "no key with kid 'nobody' for RS256",
    ),
    "kid of a key of another type": (
        lambda k: token(k.rsa, "RS256", kid="ec256"),
        auth.UnknownKey,
        "unknown_kid",
        "no key with kid 'ec256' for RS256",
    ),
    "ES256 key under ES384": (
        lambda k: relabel(token(k.ec256, "ES256", kid="ec256"), "ES384"),
        auth.UnknownKey,
        "unknown_kid",
        "no key with kid 'ec256' for ES384",
    ),
    "no exp": (
        lambda k: token(k.rsa, "RS256", without("exp"), kid="rsa"),
        auth.MissingClaim,
        "missing_claim",
        "token has no 'exp' claim",
    ),
    "exp too large to be a time": (
        lambda k: token(k.rsa, "RS256", claims(exp=10**400), kid="rsa"),  # a valid integer to PyJWT
        auth.MalformedToken,
        "malformed",
        "'exp' is too large to be a time",
    ),
    "exp a string of digits (PyJWT takes it; RFC 7519 wants a number)": (
        lambda k: token(k.rsa, "RS256", claims(exp="9" * 400), kid="rsa"),  # as a float: infinity
        auth.MalformedToken,
        "malformed",
        "claim 'exp' must be a number",
    ),
    "no sub": (
        lambda k: token(k.rsa, "RS256", without("sub"), kid="rsa"),
        auth.MissingClaim,
        "missing_claim",
        "token has no 'sub' claim",
    ),
    "no iss (an issuer is configured)": (
        lambda k: token(k.rsa, "RS256", without("iss"), kid="rsa"),
        auth.MissingClaim,
        "missing_claim",
        "token has no 'iss' claim",
    ),
    # Claims of the wrong type, each named: PyJWT refuses them with an exception of its own.
    "iat not a number": (
        lambda k: token(k.rsa, "RS256", claims(iat="yesterday"), kid="rsa"),
        auth.MalformedToken,
        "malformed",
        "claim 'iat' must be a number",
    ),
    "exp not a number": (
        lambda k: token(k.rsa, "RS256", claims(exp="tomorrow"), kid="rsa"),
        auth.MalformedToken,
        "malformed",
        "claim 'exp' must be a number",
    ),
    "nbf not a number": (
        lambda k: token(k.rsa, "RS256", claims(nbf="yesterday"), kid="rsa"),
        auth.MalformedToken,
        "malformed",
        "claim 'nbf' must be a number",
    ),
    "sub not a string": (
        lambda k: token(k.rsa, "RS256", claims(sub=123), kid="rsa"),
        auth.MalformedToken,
        "malformed",
        "claim 'sub' must be a string",
    ),
    "jti not a string": (
        lambda k: token(k.rsa, "RS256", claims(jti=5), kid="rsa"),
        auth.MalformedToken,
        "malformed",
        "claim 'jti' must be a string",
    ),
    "iss not a string": (
        lambda k: signed(k.rsa, "RS256", json.dumps(claims(iss=5)).encode(), kid="rsa"),
        auth.WrongIssuer,
        "wrong_issuer",
        "claim 'iss' must be a string",
    ),
    "aud not a string": (
        lambda k: token(k.rsa, "RS256", claims(aud=5), kid="rsa"),
        auth.WrongAudience,
        "wrong_audience",
        "claim 'aud' must be a string or a list of strings",
    ),
    "aud a list with a non-string": (
        lambda k: token(k.rsa, "RS256", claims(aud=[AUDIENCE, 5]), kid="rsa"),
        auth.WrongAudience,
        "wrong_audience",
        "claim 'aud' must be a string or a list of strings",
    ),
    "payload not a JSON object": (
        lambda k: signed(k.rsa, "RS256", b"[1, 2]", kid="rsa"),
        auth.MalformedToken,
        "malformed",
        "malformed token (the payload is not a JSON object)",
    ),
    # Header parameters PyJWT refuses.
    "kid not a string": (
        lambda k: compact({"alg": "RS256", "kid": 7}, claims()),
        auth.MalformedToken,
        "malformed",
        BAD_HEADER,
    ),
    "crit names an unsupported extension": (
        lambda k: compact({"alg": "RS256", "kid": "rsa", "crit": ["x-ext"], "x-ext": 1}, claims()),
        auth.MalformedToken,
        "malformed",
        BAD_HEADER,
    ),
    "b64 false without crit": (
        lambda k: compact({"alg": "RS256", "kid": "rsa", "b64": False}, None),
        auth.MalformedToken,
        "malformed",
        NO_B64,
    ),
    "b64 false (a detached payload)": (
        lambda k: compact({"alg": "RS256", "kid": "rsa", "b64": False, "crit": ["b64"]}, None),
        auth.MalformedToken,
        "malformed",
        NO_B64,
    ),
}


@pytest.mark.parametrize(("make", "error", "reason", "message"), REFUSED.values(), ids=REFUSED.keys())
async def test_a_refused_token_raises_its_reason(
    keys: Keys, make: Callable[[Keys], str], error: type[auth.AuthError], reason: str, message: str
) -> None:
    refused = make(keys)
    with pytest.raises(error) as caught:
        await verifier(keys).verify(refused)
    assert type(caught.value) is error
    assert caught.value.reason == reason
    assert caught.value.status.name == "UNAUTHENTICATED"
    assert caught.value.message == message
    assert reason in documented_reasons()
    assert not any(len(part) > 8 and part in message for part in refused.split("."))  # nothing of the token


def documented_reasons() -> set[str]:
    """The reasons docs/security.md's table of refusals promises."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    table = text.split("### Refusals", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    return {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])}


def _pyjwt_errors() -> list[type[jwt.PyJWTError]]:
    found = [e for e in vars(jwt.exceptions).values() if isinstance(e, type) and issubclass(e, jwt.PyJWTError)]
    return sorted(found, key=lambda e: e.__name__)


class NewInPyJWT(jwt.InvalidTokenError):
    """A refusal a later PyJWT might add."""


class NewBaseInPyJWT(jwt.PyJWTError):
    """An error a later PyJWT might add outside InvalidTokenError."""


@pytest.mark.parametrize("kind", [*_pyjwt_errors(), NewInPyJWT, NewBaseInPyJWT], ids=lambda kind: kind.__name__)
async def test_every_pyjwt_error_is_refused_with_a_documented_reason(
    keys: Keys, kind: type[jwt.PyJWTError], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever PyJWT raises while decoding, even a class this PyJWT does not have: UNAUTHENTICATED, a
    reason from the docs' table, a message of our own (never PyJWT's, which may quote the token)."""
    canary = "CANARY-from-the-token"
    raised = kind(canary) if kind is not jwt.MissingRequiredClaimError else kind("exp")

    def decode(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise raised

    monkeypatch.setattr(jwt, "decode", decode)
    with pytest.raises(auth.AuthError) as caught:
        await verifier(keys).verify(token(keys.rsa, "RS256", kid="rsa"))
    assert not isinstance(caught.value, auth.PermissionDenied)
    assert caught.value.status.name == "UNAUTHENTICATED"
    assert caught.value.reason in documented_reasons()
    assert canary not in caught.value.message
    if issubclass(kind, jwt.InvalidTokenError):  # a refusal of the token: never the catch-all
        assert caught.value.reason != "invalid_token"


async def test_key_confusion_is_refused_when_only_rsa_is_allowed(keys: Keys) -> None:
    confused = hs256_with(public_pem(keys.rsa), claims(), kid="rsa")
    with pytest.raises(auth.AlgorithmNotAllowed):
        await verifier(keys, ["RS256"]).verify(confused)


async def test_issuer_and_audience_are_only_checked_when_configured(keys: Keys) -> None:
    anything = token(keys.ed, "EdDSA", claims(iss="https://other.test", aud="other"), kid="ed")
    principal = await verifier(keys, issuer=None, audience=None).verify(anything)
    assert principal.subject == "alice"


async def test_the_leeway_is_configurable(keys: Keys) -> None:
    just_expired = token(keys.ed, "EdDSA", claims(exp=_now() - 5), kid="ed")
    with pytest.raises(auth.Expired):
        await verifier(keys, leeway_seconds=0).verify(just_expired)


# --------------------------------------------------------------------------- the bearer header


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([("authorization", "Bearer abc.def.ghi")], "abc.def.ghi"),
        ([("authorization", "bearer   abc.def.ghi  ")], "abc.def.ghi"),
        ([("Authorization", b"Bearer abc.def.ghi")], "abc.def.ghi"),
        ([("x-other", "1"), ("authorization", "Bearer t")], "t"),
    ],
)
def test_the_bearer_token_is_read_from_metadata(metadata: list[tuple[str, Any]], expected: str) -> None:
    assert auth.token_of(auth.authorization(metadata)) == expected


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        (None, auth.MissingToken),
        ([], auth.MissingToken),
        ([("x-other", "Bearer t")], auth.MissingToken),
        ([("authorization", "Basic dXNlcjpwYXNz")], auth.MalformedToken),
        ([("authorization", "Bearer")], auth.MalformedToken),
        ([("authorization", "Bearer ")], auth.MalformedToken),
        ([("authorization", "abc.def.ghi")], auth.MalformedToken),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], auth.MalformedToken),
    ],
)
def test_a_missing_or_malformed_header_is_refused(metadata: Any, error: type[auth.AuthError]) -> None:
    with pytest.raises(error):
        auth.token_of(auth.authorization(metadata))


# --------------------------------------------------------------------------- the cache of verified tokens


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_verified_token_is_remembered_until_the_cache_interval_ends(keys: Keys) -> None:
    clock = Clock()
    config = AuthConfig(enabled=True, algorithms=["EdDSA"], public_keys=[{"file": "unused.pem"}])
    v = auth.TokenVerifier(config, KeyStore(None, [VerificationKey(keys.ed.public_key(), "ed")]), clock=clock)
    signed = token(keys.ed, "EdDSA", kid="ed")
    for _ in range(10):
        assert (await v.verify(signed)).subject == "alice"
    assert v.verified == 1
    clock.now += auth.CACHE_SECONDS + 1
    await v.verify(signed)
    assert v.verified == 2


async def test_the_cache_never_outlives_the_token(keys: Keys) -> None:
    clock = Clock()
    config = AuthConfig(enabled=True, algorithms=["EdDSA"], public_keys=[{"file": "unused.pem"}], leeway_seconds=0)
    v = auth.TokenVerifier(config, KeyStore(None, [VerificationKey(keys.ed.public_key(), "ed")]), clock=clock)
    short = token(keys.ed, "EdDSA", claims(exp=int(clock.now) + 30), kid="ed")
    await v.verify(short)
    clock.now += 31  # past exp: the cache lets go and the full check runs again
    await v.verify(short)
    assert v.verified == 2


async def test_a_tampered_copy_of_a_cached_token_is_still_refused(keys: Keys) -> None:
    v = verifier(keys)
    signed = token(keys.rsa, "RS256", kid="rsa")
    await v.verify(signed)
    header, payload, signature = signed.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    with pytest.raises(auth.BadSignature):
        await v.verify(forged)
    with pytest.raises(auth.AlgorithmNotAllowed):
        await v.verify(unsigned("none", claims()))


async def test_a_cached_token_is_answered_without_verifying_until_the_cache_lets_go(keys: Keys) -> None:
    """``cached`` is what the server asks first, synchronously; None sends the call to ``verify``."""
    clock = Clock()
    config = AuthConfig(enabled=True, algorithms=["EdDSA"], public_keys=[{"file": "unused.pem"}])
    v = auth.TokenVerifier(config, KeyStore(None, [VerificationKey(keys.ed.public_key(), "ed")]), clock=clock)
    signed = token(keys.ed, "EdDSA", kid="ed")
    assert v.cached(signed) is None  # never verified
    await v.verify(signed)
    principal = v.cached(signed)
    assert principal is not None and principal.subject == "alice"
    clock.now += auth.CACHE_SECONDS + 1
    assert v.cached(signed) is None
    assert v.verified == 1
