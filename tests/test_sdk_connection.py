"""The SDK's connection behaviour: retries and their budget, tokens, metadata, TLS and mTLS.

Retries run against real infergate servers (one that comes up late on a port
that refused at first). What the client *sends* is checked with a small real
gRPC server in this process that answers ServerMetadata with the metadata it
received, over plain TCP or TLS (certificates made by ``openssl`` per session).
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, launch_server
from security import SECRET, token
from test_sdk_client import EitherClient

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate_client import RefreshingToken, RetryBudget, RetryPolicy, Tls, Unavailable
from load_tests.servers import free_port


@pytest.fixture(params=["sync", "aio"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------- retries


async def test_a_call_retries_until_a_server_comes_up_on_a_refusing_port(
    demo_repository: Path, log_dir: Path, flavour: str
) -> None:
    port = free_port()
    first_retry = threading.Event()
    retries: list[int] = []

    def on_retry(attempt: int, error: grpc.RpcError) -> None:
        retries.append(attempt)
        first_retry.set()

    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.5, on_retry=on_retry)
    client = EitherClient(flavour, f"127.0.0.1:{port}", retry=policy, retry_budget=RetryBudget(max_tokens=10_000))
    if flavour == "sync":  # a blocking call must not hold the event loop that starts the server
        call = asyncio.ensure_future(asyncio.to_thread(client.raw.is_server_live, timeout=120))
    else:
        call = asyncio.ensure_future(client.raw.is_server_live(timeout=120))
    server: ServerProcess | None = None
    try:
        assert await asyncio.to_thread(first_retry.wait, 60), "the call never failed over to a retry"
        server = await asyncio.to_thread(launch_server, demo_repository, log_dir, "--port", str(port))
        assert await call is True
    finally:
        await client.close()
        if server is not None:
            assert server.terminate() == 0
    assert retries and retries == list(range(1, len(retries) + 1))


async def test_the_retry_budget_stops_a_retry_storm(flavour: str) -> None:
    retries: list[int] = []
    client = EitherClient(
        flavour,
        f"127.0.0.1:{free_port()}",  # nothing listens: every attempt is UNAVAILABLE
        retry=RetryPolicy(max_attempts=100, initial_backoff_s=0.01, on_retry=lambda n, e: retries.append(n)),
        retry_budget=RetryBudget(max_tokens=4),
    )
    try:
        with pytest.raises(Unavailable) as caught:
            await client.is_server_live()
    finally:
        await client.close()
    assert retries == [1]  # 4 tokens: the first failure leaves 3 (> half), the second 2 (not)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_max_attempts_bounds_the_retries(flavour: str) -> None:
    retries: list[int] = []
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, on_retry=lambda n, e: retries.append(n))
    client = EitherClient(flavour, f"127.0.0.1:{free_port()}", retry=policy)
    try:
        with pytest.raises(Unavailable):
            await client.is_server_live()
    finally:
        await client.close()
    assert retries == [1, 2]


async def test_no_retry_pause_runs_past_the_call_deadline(flavour: str) -> None:
    retries: list[int] = []
    policy = RetryPolicy(
        max_attempts=100, initial_backoff_s=30, max_backoff_s=60, on_retry=lambda n, e: retries.append(n)
    )
    client = EitherClient(flavour, f"127.0.0.1:{free_port()}", retry=policy)
    try:
        with pytest.raises(Unavailable):
            await client.is_server_live(timeout=5.0)  # the first pause (24-36 s) would outlast the deadline
    finally:
        await client.close()
    assert retries == []


# --------------------------------------------------------------------------- what the client sends


def _received_pairs(context: grpc.ServicerContext) -> list[str]:
    return [f"{key}={value}" for key, value in context.invocation_metadata() if key != "user-agent"]


class _EchoMetadata(pb_grpc.GRPCInferenceServiceServicer):
    """Tells what metadata it received: as ServerMetadata's extensions, or as ModelInfer's BYTES output ``metadata``."""

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="echo", extensions=_received_pairs(context))

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        pairs = [item.encode() for item in _received_pairs(context)]
        reply = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        reply.outputs.add(name="metadata", datatype="BYTES", shape=[len(pairs)])
        reply.raw_output_contents.append(b"".join(len(p).to_bytes(4, "little") + p for p in pairs))
        return reply


@dataclass
class EchoServer:
    url: str
    server: grpc.Server


def _start_echo(credentials: grpc.ServerCredentials | None = None) -> EchoServer:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))  # its own threads: sync clients may block
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoMetadata(), server)  # type: ignore[no-untyped-call]
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return EchoServer(f"127.0.0.1:{port}", server)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = _start_echo()
    yield server
    server.server.stop(grace=None)


def _received(extensions: tuple[str, ...]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in extensions)


async def test_client_and_call_metadata_and_a_static_token_are_sent(echo: EchoServer, flavour: str) -> None:
    client = EitherClient(flavour, echo.url, token="s3cret", metadata={"x-user-id": "alice"})
    try:
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        received = _received((await client.server_metadata(metadata={"traceparent": traceparent})).extensions)
    finally:
        await client.close()
    assert received["authorization"] == "Bearer s3cret"
    assert received["x-user-id"] == "alice" and received["traceparent"] == traceparent


async def test_a_calls_metadata_replaces_the_clients_for_the_same_key(echo: EchoServer, flavour: str) -> None:
    """One value per key: sticky routing reads the first ``x-user-id``; two ``authorization`` headers are refused."""
    client = EitherClient(flavour, echo.url, token="client-token", metadata={"x-user-id": "alice", "x-team": "ml"})
    try:
        sent = [
            sorted((await client.server_metadata(metadata=metadata)).extensions)
            for metadata in (
                {"X-User-Id": "bob"},
                [("authorization", "Bearer call-token"), ("x-tag", "1"), ("x-tag", "2")],
                None,
            )
        ]
    finally:
        await client.close()
    assert sent == [
        ["authorization=Bearer client-token", "x-team=ml", "x-user-id=bob"],
        ["authorization=Bearer call-token", "x-tag=1", "x-tag=2", "x-team=ml", "x-user-id=alice"],
        ["authorization=Bearer client-token", "x-team=ml", "x-user-id=alice"],
    ]


@pytest.fixture(scope="module")
def auth_server(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("sdk-auth")
    config = directory / "server.yaml"
    config.write_text('{"auth": {"enabled": true, "algorithms": ["HS256"], "secret_env": "SDK_TEST_JWT_SECRET"}}')
    server = launch_server(
        demo_repository, directory, "--config", str(config), env={"SDK_TEST_JWT_SECRET": SECRET.decode()}
    )
    yield server
    assert server.terminate() == 0, server.log()


async def test_a_calls_own_token_is_sent_instead_of_the_clients(auth_server: ServerProcess, flavour: str) -> None:
    """A service with its own token calls on behalf of a user with theirs: one authorization header, the call's."""
    service = token(SECRET, "HS256", {"sub": "service", "exp": int(time.time()) + 600, "scope": "infer:*"})
    user = token(SECRET, "HS256", {"sub": "user", "exp": int(time.time()) + 600, "scope": "infer:matmul16"})
    client = EitherClient(flavour, auth_server.url, token=service)
    try:
        result = await client.infer(
            "matmul16", {"x": np.ones((1, 16), np.float32)}, metadata={"Authorization": f"Bearer {user}"}
        )
    finally:
        await client.close()
    assert result["y"].shape == (1, 16)


async def test_a_refreshing_token_is_fetched_once_and_renewed_before_expiry(echo: EchoServer, flavour: str) -> None:
    now = [0.0]
    fetches: list[float] = []

    def fetch() -> tuple[str, float]:
        fetches.append(now[0])
        return f"token-{len(fetches)}", now[0] + 60

    client = EitherClient(flavour, echo.url, token=RefreshingToken(fetch, leeway_s=10, clock=lambda: now[0]))
    try:
        sent = [_received((await client.server_metadata()).extensions)["authorization"] for _ in range(3)]
        now[0] = 55.0  # inside the leeway: refresh before it expires
        sent.append(_received((await client.server_metadata()).extensions)["authorization"])
    finally:
        await client.close()
    assert sent == ["Bearer token-1"] * 3 + ["Bearer token-2"]
    assert fetches == [0.0, 55.0]


# --------------------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca: Path
    server_key: Path
    server_cert: Path
    client_key: Path
    client_cert: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(name: str, cn: str, folder: Path) -> None:
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder)
    (folder / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=folder
    )
    _issue("server", "localhost", folder)
    _issue("client", "test-client", folder)
    return Pki(
        folder / "ca.pem", folder / "server.key", folder / "server.pem", folder / "client.key", folder / "client.pem"
    )


@pytest.fixture(scope="module")
def mtls_echo(pki: Pki) -> Iterator[EchoServer]:
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    server = _start_echo(credentials)
    yield server
    server.server.stop(grace=None)


async def test_mtls_with_the_client_certificate_connects(mtls_echo: EchoServer, pki: Pki, flavour: str) -> None:
    tls = Tls(root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert)
    client = EitherClient(flavour, mtls_echo.url, tls=tls, token="t")
    try:
        assert _received((await client.server_metadata()).extensions)["authorization"] == "Bearer t"
    finally:
        await client.close()


async def test_mtls_without_a_client_certificate_is_refused(mtls_echo: EchoServer, pki: Pki, flavour: str) -> None:
    client = EitherClient(flavour, mtls_echo.url, tls=Tls(root_certificates=pki.ca), retry=RetryPolicy(max_attempts=1))
    try:
        with pytest.raises(Unavailable):
            await client.server_metadata(timeout=10)
    finally:
        await client.close()


async def test_tls_refuses_a_server_the_roots_do_not_vouch_for(mtls_echo: EchoServer, flavour: str) -> None:
    client = EitherClient(flavour, mtls_echo.url, tls=Tls(), retry=RetryPolicy(max_attempts=1))  # system roots
    try:
        with pytest.raises(Unavailable):
            await client.server_metadata(timeout=10)
    finally:
        await client.close()
