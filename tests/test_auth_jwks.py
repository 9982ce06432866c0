"""Keys from a JWKS URL served over HTTPS by a local ``http.server`` with a test CA.

The key set is fetched off the event loop, cached, and fetched again when a
token names an unknown ``kid`` — at most once per ``min_refresh_seconds``
(measured with an injected clock here, so no test waits).
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import launch_server
from security import bearer, claims, ec_key, ed25519_key, issue, jwk, make_ca, rsa_key, token

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.security import auth
from infergate.security.config import AuthConfig, JwksConfig
from infergate.security.keys import JwksUrlSource, KeyStore


@dataclass
class KeySetServer:
    url: str
    ca_file: Path
    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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
