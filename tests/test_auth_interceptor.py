"""The auth interceptor's contract with handlers, on an in-process grpc.aio server.

A small test service (raw bytes, no protobuf) answers with the principal it
sees through ``current_principal()``, so these tests show what any handler
downstream of the interceptor gets: the verified caller, also inside tasks the
handler starts, and nothing once the call is over. Methods the rule table does
not list are admin actions. The RepositoryIndex filter is a pure function,
tested here as a table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from security import SECRET, bearer, claims, ed25519_key, jwk, token
from test_auth_verify import documented_reasons

from infergate._proto import grpc_service_pb2 as pb
from infergate.security import interceptor as interceptor_module
from infergate.security.auth import Principal, TokenVerifier, current_principal, visible_models
from infergate.security.config import AuthConfig, JwksConfig
from infergate.security.interceptor import METHOD_RULES, AuthInterceptor, filter_repository_index, rule_for
from infergate.security.keys import FetchedKeySet, JwksUrlSource, KeyStore
from infergate.serving.servicer import NOT_IMPLEMENTED

WHO = "/test.Echo/Who"
WHO_STREAM = "/test.Echo/WhoStream"


def _subject() -> bytes:
    principal = current_principal()
    return b"<none>" if principal is None else principal.subject.encode()


async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _subject()


async def who_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield await asyncio.create_task(asyncio.sleep(0, _subject()))  # a task copies the context


async def serve(exempt: list[str], interceptor: AuthInterceptor | None = None) -> tuple[grpc.aio.Server, int]:
    if interceptor is None:
        config = AuthConfig(enabled=True, algorithms=["HS256"], secret_env="UNUSED", exempt_methods=exempt)
        interceptor = AuthInterceptor(TokenVerifier(config, KeyStore(SECRET)), exempt)
    server = grpc.aio.server(interceptors=[interceptor])
    handlers = {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "WhoStream": grpc.stream_stream_rpc_method_handler(who_stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server, port = await serve(exempt=[])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)


def metadata(scope: str) -> list[tuple[str, str]]:
    return list(bearer(token(SECRET, "HS256", claims(scope))).items())


async def test_the_handler_sees_the_verified_principal(channel: grpc.aio.Channel) -> None:
    assert await channel.unary_unary(WHO)(b"", metadata=metadata("admin")) == b"alice"
    assert current_principal() is None  # nothing leaks out of a call


async def test_callers_on_one_connection_are_each_seen_as_themselves_call_after_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The interceptor remembers the token in each header value it has read, and forgets them all
    when it holds too many (here two): three callers taking turns still get their own principal."""
    monkeypatch.setattr(interceptor_module, "TOKENS_REMEMBERED", 2)
    server, port = await serve(exempt=[])
    callers = {name: list(bearer(token(SECRET, "HS256", claims("admin", sub=name))).items()) for name in "abc"}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            who_is = channel.unary_unary(WHO)
            seen = [await who_is(b"", metadata=callers[name]) for name in "abcabcaa"]
    finally:
        await server.stop(None)
    assert seen == [name.encode() for name in "abcabcaa"]


async def test_tasks_of_a_streaming_handler_see_the_principal(channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream(WHO_STREAM)(metadata=metadata("admin"))
    for _ in range(3):
        await call.write(b"")
    await call.done_writing()
    assert [answer async for answer in call] == [b"alice"] * 3


async def test_a_stream_whose_key_is_withdrawn_ends_at_its_next_request_and_counts_key_withdrawn() -> None:
    """The refusal counter gets the stream's reason once; a new call with the same token is an unknown kid."""
    key = ed25519_key()
    published = {"keys": [jwk(key, "k1")]}  # what the issuer's endpoint answers (read on the fetch thread)
    jwks = JwksConfig(url="https://keys.invalid/jwks.json", min_refresh_seconds=0)
    store = KeyStore(None, [], JwksUrlSource(jwks, fetch=lambda: FetchedKeySet(json.dumps(published).encode())))
    reasons: list[str] = []
    verifier = TokenVerifier(AuthConfig(enabled=True, algorithms=["EdDSA"], jwks=jwks), store)
    server, port = await serve([], AuthInterceptor(verifier, [], on_refusal=reasons.append))
    signed = list(bearer(token(key, "EdDSA", claims("admin"), kid="k1")).items())
    try:
        assert await store.refresh()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(WHO_STREAM)(metadata=signed)
            await call.write(b"")
            assert await call.read() == b"alice"
            assert await store.refresh()  # the same set: the key stays
            await call.write(b"")
            assert await call.read() == b"alice"

            published["keys"] = [jwk(ed25519_key(), "k2")]  # the issuer withdraws k1
            assert await store.refresh()
            await call.write(b"")
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "withdrawn from the key set" in (ended.value.details() or "")
            assert reasons == ["key_withdrawn"]
            assert "key_withdrawn" in documented_reasons()

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(WHO)(b"", metadata=signed)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reasons == ["key_withdrawn", "unknown_kid"]
    finally:
        await server.stop(None)
        await store.aclose()


async def test_a_key_withdrawn_and_published_again_is_a_new_key_to_a_stream_it_verified_before() -> None:
    """Its stream sent nothing while the key was out of the set; it is refused all the same."""
    key = ed25519_key()
    published = {"keys": [jwk(key, "k1")]}
    jwks = JwksConfig(url="https://keys.invalid/jwks.json", min_refresh_seconds=0)
    store = KeyStore(None, [], JwksUrlSource(jwks, fetch=lambda: FetchedKeySet(json.dumps(published).encode())))
    verifier = TokenVerifier(AuthConfig(enabled=True, algorithms=["EdDSA"], jwks=jwks), store)
    server, port = await serve([], AuthInterceptor(verifier, []))
    unnamed = list(bearer(token(key, "EdDSA", claims("admin"))).items())  # names no kid: any key with it will do
    try:
        assert await store.refresh()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(WHO_STREAM)(metadata=unnamed)
            await call.write(b"")
            assert await call.read() == b"alice"

            published["keys"] = [jwk(ed25519_key(), "k2")]
            assert await store.refresh()
            published["keys"] = [jwk(key, "k1"), jwk(key, "k1-renamed")]
            assert await store.refresh()
            await call.write(b"")
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "withdrawn from the key set" in (ended.value.details() or "")
            assert await channel.unary_unary(WHO)(b"", metadata=unnamed) == b"alice"  # a new call verifies afresh
    finally:
        await server.stop(None)
        await store.aclose()


async def test_unlisted_methods_are_admin_actions(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(WHO)(b"", metadata=metadata("infer:* metadata"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'admin'" in (caught.value.details() or "")
    assert rule_for(WHO).audit


async def test_no_token_is_unauthenticated_on_both_kinds_of_method(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await channel.unary_unary(WHO)(b"")
    assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
    call = channel.stream_stream(WHO_STREAM)()
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        async for _ in call:
            pass
    assert stream.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_exempt_methods_pass_without_a_token_and_without_a_principal() -> None:
    server, port = await serve(exempt=["/test.Echo/Who*"])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary(WHO)(b"") == b"<none>"
    finally:
        await server.stop(None)


def test_every_inference_method_has_a_rule() -> None:
    # The ones that only ever answer UNIMPLEMENTED fall under the default: an admin action.
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        if method.name in NOT_IMPLEMENTED:
            assert rule_for(path).permission == "admin"
        else:
            assert path in METHOD_RULES


# --------------------------------------------------------------------------- RepositoryIndex filter

NAMES = ["fraud-eu", "fraud-us", "mlp", "cnn"]


@pytest.mark.parametrize(
    ("permissions", "visible"),
    [
        ({"infer:*"}, NAMES),
        ({"infer:fraud-*"}, ["fraud-eu", "fraud-us"]),
        ({"infer:fraud-eu", "infer:cnn"}, ["fraud-eu", "cnn"]),
        ({"infer:FRAUD-*"}, []),  # patterns are case-sensitive, like model names
        ({"metadata"}, []),
        ({"admin"}, NAMES),
        (set(), []),
    ],
)
def test_repository_index_shows_only_the_callers_models(permissions: set[str], visible: list[str]) -> None:
    principal = Principal("alice", permissions=frozenset(permissions))
    assert visible_models(principal, NAMES) == visible
    response = pb.RepositoryIndexResponse(
        models=[pb.RepositoryIndexResponse.ModelIndex(name=n, version="1", state="READY") for n in NAMES]
    )
    assert [m.name for m in filter_repository_index(principal, response).models] == visible
