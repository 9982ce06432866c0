"""Keys from a JWKS URL served over HTTPS by a local ``http.server`` with a test CA.

The key set is fetched off the event loop, cached, and fetched again on a
schedule (``refresh_seconds``, sooner when the response's ``Cache-Control``
says so) and when a token names an unknown ``kid`` — at most once per
``min_refresh_seconds``. Time is an injected clock here, so no test waits,
except the end-to-end one, which waits for the refusal itself.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import WAIT_S, eventually, launch_server
from security import bearer, claims, ec_key, ed25519_key, issue, jwk, make_ca, rsa_key, token

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.security import auth
from infergate.security.config import AuthConfig, JwksConfig
from infergate.security.freshness import freshness_seconds
from infergate.security.keys import FetchedKeySet, JwksUrlSource, KeyStore


@dataclass
class KeySetServer:
    url: str
    ca_file: Path
    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (Cache-Control, Age)
    requests: int = 0


@pytest.fixture(scope="module")
def key_set_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeySetServer]:
    directory = tmp_path_factory.mktemp("jwks")
    ca = make_ca()
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    cert, key = issue(ca, "keys").write(directory, "https")
    state = KeySetServer("", directory / "ca.crt")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests += 1
            body = json.dumps(state.document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in state.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    state.url = f"https://127.0.0.1:{httpd.server_address[1]}/.well-known/jwks.json"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def plain_headers(key_set_server: KeySetServer) -> None:
    key_set_server.headers = {}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ManualSleep:
    """The refresh task's ``sleep``: each wait is put in ``asked`` and lasts until :meth:`elapse` moves ``clock``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.asked: asyncio.Queue[float] = asyncio.Queue()
        self._elapsed: asyncio.Queue[float] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        self.asked.put_nowait(seconds)
        self.clock.now += await self._elapsed.get()

    def elapse(self, seconds: float) -> None:
        self._elapsed.put_nowait(seconds)


async def test_an_unknown_kid_refetches_the_key_set_at_most_once_per_interval(key_set_server: KeySetServer) -> None:
    first, second, third = rsa_key(), ec_key(), ed25519_key()
    key_set_server.document = {"keys": [jwk(first, "k1")]}
    clock = Clock()
    jwks = JwksConfig(url=key_set_server.url, ca_file=key_set_server.ca_file, min_refresh_seconds=60)
    source = JwksUrlSource(jwks, clock=clock)
    store = KeyStore(None, [], source)
    config = AuthConfig(enabled=True, algorithms=["RS256", "ES256", "EdDSA"], jwks=jwks)
    verifier = auth.TokenVerifier(config, store)
    try:
        assert (await verifier.verify(token(first, "RS256", kid="k1"))).subject == "alice"
        assert source.fetches == 1  # nothing cached yet: the first token fetched the set

        key_set_server.document = {"keys": [jwk(first, "k1"), jwk(second, "k2")]}  # the issuer rotates
        clock.now += 61
        assert (await verifier.verify(token(second, "ES256", kid="k2"))).subject == "alice"
        assert source.fetches == 2

        key_set_server.document["keys"].append(jwk(third, "k3"))
        with pytest.raises(auth.UnknownKey):  # within the interval: no fetch, however many tokens ask
            for _ in range(5):
                await verifier.verify(token(third, "EdDSA", kid="k3"))
        assert source.fetches == 2

        clock.now += 61
        assert (await verifier.verify(token(third, "EdDSA", kid="k3"))).subject == "alice"
        assert source.fetches == 3 == key_set_server.requests
    finally:
        store.close()


async def test_a_caller_that_gives_up_does_not_throw_away_the_key_set_its_token_fetched() -> None:
    """Its deadline passes while the fetch runs; the rate limit would then refuse a second fetch for a minute."""
    key, release = rsa_key(), threading.Event()

    def slow_fetch() -> FetchedKeySet:  # the issuer's endpoint, answering slowly
        release.wait(WAIT_S)
        return FetchedKeySet(json.dumps({"keys": [jwk(key, "rotated")]}).encode())

    jwks = JwksConfig(url="https://keys.invalid/jwks.json", min_refresh_seconds=60, fetch_timeout_seconds=60)
    source = JwksUrlSource(jwks, clock=Clock(), fetch=slow_fetch)
    store = KeyStore(None, [], source)
    verifier = auth.TokenVerifier(AuthConfig(enabled=True, algorithms=["RS256"], jwks=jwks), store)
    rotated = token(key, "RS256", kid="rotated")
    try:
        impatient = asyncio.create_task(verifier.verify(rotated))  # an unknown kid: fetch the set
        await eventually(lambda: source.fetches == 1, "the fetch started")
        impatient.cancel()
        with pytest.raises(asyncio.CancelledError):
            await impatient
        release.set()
        await eventually(lambda: store.candidates("RS256", "rotated"), "the fetched keys kept")
        assert (await verifier.verify(rotated)).subject == "alice"
        assert source.fetches == 1
    finally:
        release.set()
        store.close()


async def test_a_failed_fetch_leaves_the_cached_keys_and_refuses_only_the_unknown_kid(
    key_set_server: KeySetServer,
) -> None:
    key = ec_key()
    key_set_server.document = {"keys": [jwk(key, "k1")]}
    clock = Clock()
    wrong_ca = JwksConfig(url=key_set_server.url, min_refresh_seconds=0)  # the system CAs do not know the test CA
    good = JwksConfig(url=key_set_server.url, ca_file=key_set_server.ca_file, min_refresh_seconds=0)
    store = KeyStore(None, [], JwksUrlSource(good, clock=clock))
    failing = KeyStore(None, [], JwksUrlSource(wrong_ca, clock=clock))
    config = AuthConfig(enabled=True, algorithms=["ES256"], jwks=good)
    try:
        assert await store.refresh()
        assert not await failing.refresh()
        assert (await auth.TokenVerifier(config, store).verify(token(key, "ES256", kid="k1"))).subject == "alice"
        with pytest.raises(auth.UnknownKey):
            await auth.TokenVerifier(config, failing).verify(token(key, "ES256", kid="k1"))
    finally:
        store.close()
        failing.close()


def test_a_server_verifies_tokens_with_keys_from_a_jwks_url(
    key_set_server: KeySetServer, demo_repository: Path, tmp_path: Path
) -> None:
    key = ed25519_key()
    key_set_server.document = {"keys": [jwk(key, "served")]}
    config = tmp_path / "server.yaml"
    jwks = {"url": key_set_server.url, "ca_file": str(key_set_server.ca_file)}
    config.write_text(json.dumps({"auth": {"enabled": True, "algorithms": ["EdDSA"], "jwks": jwks}}))
    server = launch_server(demo_repository, tmp_path, "--config", str(config))
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(
                model_name="matmul16",
                inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])],
                raw_input_contents=[np.ones(16, dtype=np.float32).tobytes()],
            )
            metadata = list(bearer(token(key, "EdDSA", claims("infer:*"), kid="served")).items())
            assert stub.ModelInfer(request, metadata=metadata, timeout=30).outputs
    finally:
        assert server.terminate() == 0, server.log()


async def test_a_withdrawn_key_is_refused_from_the_next_scheduled_fetch_even_while_its_token_is_cached(
    key_set_server: KeySetServer,
) -> None:
    withdrawn, kept = ec_key(), ec_key()
    key_set_server.document = {"keys": [jwk(withdrawn, "old"), jwk(kept, "new")]}
    clock, wall = Clock(), Clock()  # the schedule's monotonic clock; the token cache's wall clock never moves
    jwks = JwksConfig(url=key_set_server.url, ca_file=key_set_server.ca_file, refresh_seconds=300)
    source = JwksUrlSource(jwks, clock=clock)
    sleep = ManualSleep(clock)
    store = KeyStore(None, [], source, sleep=sleep)
    verifier = auth.TokenVerifier(AuthConfig(enabled=True, algorithms=["ES256"], jwks=jwks), store, clock=wall)
    old, new = token(withdrawn, "ES256", kid="old"), token(kept, "ES256", kid="new")
    try:
        await store.start()
        assert source.fetches == 1
        assert await sleep.asked.get() == 300  # the next fetch is due refresh_seconds after the first began
        assert (await verifier.verify(old)).subject == "alice"  # verified, and now cached
        key_set_server.document = {"keys": [jwk(kept, "new")]}  # the issuer withdraws "old"

        sleep.elapse(299)
        assert await sleep.asked.get() == 1  # not due yet: until then the withdrawn key still verifies
        assert source.fetches == 1
        assert (await verifier.verify(old)).subject == "alice"

        sleep.elapse(1)
        assert await sleep.asked.get() == 300  # the task fetched and waits for the next round
        assert source.fetches == 2
        with pytest.raises(auth.UnknownKey):
            await verifier.verify(old)
        assert (await verifier.verify(new)).subject == "alice"
    finally:
        await store.aclose()
    assert sleep.asked.empty()  # the task is gone: it asks for no further wait


@pytest.mark.parametrize(
    ("headers", "due"),
    [
        ({}, 300),
        ({"Cache-Control": "public, max-age=120"}, 120),
        ({"Cache-Control": "max-age=120", "Age": "30"}, 90),
        ({"Cache-Control": "max-age=120", "Age": "100"}, 60),  # stale sooner, but no sooner than min_refresh_seconds
        ({"Cache-Control": "max-age=86400"}, 300),  # a long max-age does not stretch refresh_seconds
        ({"Cache-Control": "no-store"}, 60),
    ],
)
async def test_the_next_scheduled_fetch_honours_the_responses_cache_control(
    key_set_server: KeySetServer, headers: dict[str, str], due: float
) -> None:
    key_set_server.document = {"keys": [jwk(ec_key(), "k1")]}
    key_set_server.headers = headers
    clock = Clock()
    jwks = JwksConfig(url=key_set_server.url, ca_file=key_set_server.ca_file, refresh_seconds=300)
    source = JwksUrlSource(jwks, clock=clock)
    try:
        assert await source.refresh_if_due() is not None
        assert source.seconds_until_due() == due
        clock.now += due - 1
        assert await source.refresh_if_due() is None
        assert source.fetches == 1
        clock.now += 1
        assert await source.refresh_if_due() is not None
        assert source.fetches == 2
    finally:
        source.close()


@pytest.mark.parametrize(
    ("cache_control", "age", "fresh"),
    [
        (None, None, None),
        ("", None, None),
        ("public, must-revalidate", None, None),
        ("max-age=300", None, 300.0),
        ("public, MAX-AGE=300", None, 300.0),
        ('max-age="300"', None, 300.0),
        ("max-age=300", "100", 200.0),
        ("max-age=300", "400", 0.0),
        ("max-age=300", "soon", 300.0),
        ("max-age=-5", None, None),
        ("max-age=1e3", None, None),
        ("max-age=600, max-age=300", None, 300.0),
        ("s-maxage=10, max-age=300", None, 300.0),
        ("no-cache", None, 0.0),
        ("no-store, max-age=300", None, 0.0),
        ('no-cache="Set-Cookie", max-age=300', None, 300.0),
    ],
)
def test_freshness_is_max_age_less_age_and_zero_for_no_cache(
    cache_control: str | None, age: str | None, fresh: float | None
) -> None:
    assert freshness_seconds(cache_control, age) == fresh


async def test_a_server_refuses_a_withdrawn_key_once_its_refresh_schedule_fetches_the_key_set(
    key_set_server: KeySetServer, demo_repository: Path, tmp_path: Path
) -> None:
    withdrawn, kept = ed25519_key(), ed25519_key()
    key_set_server.document = {"keys": [jwk(withdrawn, "old"), jwk(kept, "new")]}
    config = tmp_path / "server.yaml"
    jwks = {"url": key_set_server.url, "ca_file": str(key_set_server.ca_file), "refresh_seconds": 0.5}
    config.write_text(json.dumps({"auth": {"enabled": True, "algorithms": ["EdDSA"], "jwks": jwks}}))
    request = pb.ModelInferRequest(
        model_name="matmul16",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[np.ones(16, dtype=np.float32).tobytes()],
    )
    old = tuple(bearer(token(withdrawn, "EdDSA", claims("infer:*"), kid="old")).items())
    new = tuple(bearer(token(kept, "EdDSA", claims("infer:*"), kid="new")).items())
    server = launch_server(demo_repository, tmp_path, "--config", str(config))
    try:
        async with grpc.aio.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ModelInfer(request, metadata=old, timeout=30)).outputs  # verified and cached
            key_set_server.document = {"keys": [jwk(kept, "new")]}  # the issuer withdraws "old"

            async def refused() -> bool:
                try:
                    await stub.ModelInfer(request, metadata=old, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
                    assert "no key with kid 'old'" in (exc.details() or "")
                    return True
                return False

            await eventually(refused, "a token signed with the withdrawn key refused")
            assert (await stub.ModelInfer(request, metadata=new, timeout=30)).outputs
    finally:
        assert server.terminate() == 0, server.log()
    assert "key(s) withdrawn from the key set" in server.log()


def _infer_request() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="matmul16",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[np.ones(16, dtype=np.float32).tobytes()],
    )


def _jwks_server_config(key_set_server: KeySetServer, tmp_path: Path) -> Path:
    """A server that verifies EdDSA tokens with the keys of ``key_set_server``, fetched every 0.5 s."""
    config = tmp_path / "server.yaml"
    jwks = {"url": key_set_server.url, "ca_file": str(key_set_server.ca_file), "refresh_seconds": 0.5}
    config.write_text(json.dumps({"auth": {"enabled": True, "algorithms": ["EdDSA"], "jwks": jwks}}))
    return config


def _metadata(key: Any, kid: str | None) -> tuple[tuple[str, str], ...]:
    """A token for ``kid`` (None: it names no kid) that is valid for a day: only the key set can end its rights."""
    return tuple(bearer(token(key, "EdDSA", claims("infer:*", exp=int(time.time()) + 86400), kid=kid)).items())


async def _accepted(stub: pb_grpc.GRPCInferenceServiceStub, metadata: tuple[tuple[str, str], ...]) -> bool:
    """Does a unary call with this token get an answer? (False: refused UNAUTHENTICATED.)"""
    try:
        await stub.ModelInfer(_infer_request(), metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
        return False
    return True


async def _refused(stub: pb_grpc.GRPCInferenceServiceStub, metadata: tuple[tuple[str, str], ...]) -> bool:
    return not await _accepted(stub, metadata)


async def test_a_stream_ends_unauthenticated_once_the_key_that_signed_its_token_is_withdrawn(
    key_set_server: KeySetServer, demo_repository: Path, tmp_path: Path
) -> None:
    """The token is valid for a day, but its key is gone from the key set: the stream keeps no right
    a new call with the same token would be refused."""
    withdrawn, kept = ed25519_key(), ed25519_key()
    key_set_server.document = {"keys": [jwk(withdrawn, "old"), jwk(kept, "new")]}
    server = launch_server(demo_repository, tmp_path, "--config", str(_jwks_server_config(key_set_server, tmp_path)))
    old = _metadata(withdrawn, "old")
    try:
        async with grpc.aio.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stream = stub.ModelStreamInfer(metadata=old, timeout=60)
            await stream.write(_infer_request())
            assert (await stream.read()).error_message == ""

            key_set_server.document = {"keys": [jwk(kept, "new")]}  # the issuer withdraws "old"
            await eventually(lambda: _refused(stub, old), "a new call with the withdrawn key's token refused")

            await stream.write(_infer_request())
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await stream.read()
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED, ended.value
            assert "withdrawn from the key set" in (ended.value.details() or "")
            assert await _accepted(stub, _metadata(kept, "new"))
    finally:
        assert server.terminate() == 0, server.log()


async def test_a_stream_whose_key_stays_in_the_key_set_keeps_working_after_a_fetch_withdraws_another(
    key_set_server: KeySetServer, demo_repository: Path, tmp_path: Path
) -> None:
    kept, withdrawn, added = ed25519_key(), ed25519_key(), ed25519_key()
    key_set_server.document = {"keys": [jwk(kept, "kept"), jwk(withdrawn, "old")]}
    server = launch_server(demo_repository, tmp_path, "--config", str(_jwks_server_config(key_set_server, tmp_path)))
    try:
        async with grpc.aio.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stream = stub.ModelStreamInfer(metadata=_metadata(kept, "kept"), timeout=60)
            await stream.write(_infer_request())
            assert (await stream.read()).error_message == ""

            key_set_server.document = {"keys": [jwk(kept, "kept"), jwk(added, "added")]}  # "old" out, "added" in
            old = _metadata(withdrawn, "old")
            await eventually(lambda: _refused(stub, old), "a new call with the withdrawn key's token refused")
            assert await _accepted(stub, _metadata(added, "added"))

            for _ in range(2):
                await stream.write(_infer_request())
                assert (await stream.read()).error_message == ""
            await stream.done_writing()
            assert await stream.read() == grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
    finally:
        assert server.terminate() == 0, server.log()


async def _answered(stream: Any) -> bool:
    """Does the stream answer one more request? (False: it ended UNAUTHENTICATED, ``key_withdrawn``.)"""
    await stream.write(_infer_request())
    try:
        return bool((await stream.read()).error_message == "")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
        assert "withdrawn from the key set" in (exc.details() or ""), exc
        return False


async def test_a_stream_whose_token_names_no_kid_lives_while_any_published_key_verifies_it(
    key_set_server: KeySetServer, demo_repository: Path, tmp_path: Path
) -> None:
    """The issuer renames a key: for a while the set publishes it under both kids. A token that names no
    kid may be verified by either entry, so its stream lives while one of them is published; a token that
    names a kid keeps to that kid, as a new call with it would."""
    key = ed25519_key()
    key_set_server.document = {"keys": [jwk(key, "2026-a"), jwk(key, "2026-b")]}
    server = launch_server(demo_repository, tmp_path, "--config", str(_jwks_server_config(key_set_server, tmp_path)))
    unnamed, named_a, named_b = _metadata(key, None), _metadata(key, "2026-a"), _metadata(key, "2026-b")
    try:
        async with grpc.aio.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            streams = {
                metadata: stub.ModelStreamInfer(metadata=metadata, timeout=60)
                for metadata in (unnamed, named_a, named_b)
            }
            for stream in streams.values():
                assert await _answered(stream)

            key_set_server.document = {"keys": [jwk(key, "2026-b")]}  # "2026-a" out, the key stays as "2026-b"
            await eventually(lambda: _refused(stub, named_a), "a new call naming the withdrawn kid refused")
            assert await _accepted(stub, unnamed)
            assert await _answered(streams[unnamed])
            assert await _answered(streams[named_b])
            assert not await _answered(streams[named_a])  # its kid is gone, though its key is still published

            key_set_server.document = {"keys": [jwk(ed25519_key(), "2027")]}  # the key itself withdrawn
            await eventually(lambda: _refused(stub, unnamed), "a new call with the kid-less token refused")
            assert not await _answered(streams[unnamed])
            assert not await _answered(streams[named_b])
    finally:
        assert server.terminate() == 0, server.log()
