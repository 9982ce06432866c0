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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


REFUSED: dict[str, tuple[Callable[[Keys], str], type[auth.AuthError], str]] = {
    "not a JWT": (lambda k: "not-a-jwt", auth.MalformedToken, "malformed"),
    "garbage header": (lambda k: "e30x.e30.", auth.MalformedToken, "malformed"),
    "bad signature (another RSA key, same kid)": (
        lambda k: token(k.other_rsa, "RS256", kid="rsa"),
        auth.BadSignature,
        "bad_signature",
    ),
    "HS256 with a wrong secret": (lambda k: token(b"x" * 40, "HS256"), auth.BadSignature, "bad_signature"),
    "alg none": (lambda k: unsigned("none", claims()), auth.AlgorithmNotAllowed, "alg_not_allowed"),
    "alg NONE": (lambda k: unsigned("NONE", claims()), auth.AlgorithmNotAllowed, "alg_not_allowed"),
    "key confusion: HS256 signed with the RSA public key": (
        lambda k: hs256_with(public_pem(k.rsa), claims(), kid="rsa"),
        auth.BadSignature,
        "bad_signature",
    ),
    "algorithm outside the allow-list (RS384)": (
        lambda k: token(k.rsa, "RS384", kid="rsa"),
        auth.AlgorithmNotAllowed,
        "alg_not_allowed",
    ),
    "algorithm outside the allow-list (HS512)": (
        lambda k: token(SECRET, "HS512"),
        auth.AlgorithmNotAllowed,
        "alg_not_allowed",
    ),
    "expired": (lambda k: token(k.rsa, "RS256", claims(exp=_now() - 3600), kid="rsa"), auth.Expired, "expired"),
    "not yet valid (nbf)": (
        lambda k: token(k.rsa, "RS256", claims(nbf=_now() + 3600), kid="rsa"),
        auth.NotYetValid,
        "not_yet_valid",
    ),
    "issued in the future (iat)": (
        lambda k: token(k.rsa, "RS256", claims(iat=_now() + 3600), kid="rsa"),
        auth.NotYetValid,
        "not_yet_valid",
    ),
    "wrong issuer": (
        lambda k: token(k.rsa, "RS256", claims(iss="https://evil.test"), kid="rsa"),
        auth.WrongIssuer,
        "wrong_issuer",
    ),
    "wrong audience": (
        lambda k: token(k.rsa, "RS256", claims(aud="someone-else"), kid="rsa"),
        auth.WrongAudience,
        "wrong_audience",
    ),
    "no audience": (
        lambda k: token(k.rsa, "RS256", {**claims(), "aud": None}, kid="rsa"),
        auth.MissingClaim,
        "missing_claim",
    ),
    "unknown kid": (lambda k: token(k.rsa, "RS256", kid="nobody"), auth.UnknownKey, "unknown_kid"),
    "kid of a key of another type": (lambda k: token(k.rsa, "RS256", kid="ec256"), auth.UnknownKey, "unknown_kid"),
    "ES256 key under ES384": (
        lambda k: relabel(token(k.ec256, "ES256", kid="ec256"), "ES384"),
        auth.UnknownKey,
        "unknown_kid",
    ),
    "no exp": (
        lambda k: token(k.rsa, "RS256", {key: v for key, v in claims().items() if key != "exp"}, kid="rsa"),
        auth.MissingClaim,
        "missing_claim",
    ),
    "exp too large to be a time": (
        lambda k: token(k.rsa, "RS256", claims(exp=10**400), kid="rsa"),  # a valid integer to PyJWT
        auth.MalformedToken,
        "malformed",
    ),
    "no sub": (
        lambda k: token(k.rsa, "RS256", {key: v for key, v in claims().items() if key != "sub"}, kid="rsa"),
        auth.MissingClaim,
        "missing_claim",
    ),
}


@pytest.mark.parametrize(("make", "error", "reason"), REFUSED.values(), ids=REFUSED.keys())
async def test_a_refused_token_raises_its_reason(
    keys: Keys, make: Callable[[Keys], str], error: type[auth.AuthError], reason: str
) -> None:
    with pytest.raises(error) as caught:
        await verifier(keys).verify(make(keys))
    assert type(caught.value) is error
    assert caught.value.reason == reason
    assert caught.value.status.name == "UNAUTHENTICATED"
    message = caught.value.message
    assert SECRET.decode() not in message and "BEGIN" not in message and len(message) < 120


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
