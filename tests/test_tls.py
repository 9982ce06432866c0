"""TLS and mutual TLS on the gRPC port, with certificates made at test time.

A CA, a server certificate for 127.0.0.1 and client certificates are generated
with ``cryptography``; the calls come from tritonclient (``ssl=True``) and raw
grpc stubs. With a client CA, a client without a certificate from that CA is
turned away at the handshake. Rotated files are picked up by new connections
without a restart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import STARTUP_TIMEOUT, ServerProcess, launch_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from security import Issued, issue, make_ca

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate_client import Client, InferGateError, RetryPolicy, Tls

HANG_GUARD_S = 30.0  # how long a call may take before the test calls it a hang; not a performance bound


@dataclass
class Pki:
    directory: Path
    ca: Issued
    client_ca: Issued

    def path(self, name: str) -> str:
        return str(self.directory / name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, client_ca = make_ca("server CA"), make_ca("client CA")
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    (directory / "client-ca.crt").write_bytes(client_ca.cert_pem)
    issue(ca, "infergate").write(directory, "server")
    issue(client_ca, "svc-a", client=True).write(directory, "client")
    issue(make_ca("stranger CA"), "mallory", client=True).write(directory, "stranger")
    return Pki(directory, ca, client_ca)


def secure_channel(url: str, pki: Pki, root: str = "ca.crt", client: str | None = None) -> grpc.Channel:
    key = (pki.directory / f"{client}.key").read_bytes() if client else None
    chain = (pki.directory / f"{client}.crt").read_bytes() if client else None
    credentials = grpc.ssl_channel_credentials((pki.directory / root).read_bytes(), key, chain)
    return grpc.secure_channel(url, credentials)


def wait_serving(server: ServerProcess, channel: grpc.Channel) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=STARTUP_TIMEOUT)
    try:
        for update in watch:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                return
    finally:
        watch.cancel()
    raise AssertionError(server.log())


def start(repository: Path, pki: Pki, name: str, tls: dict[str, Any], client: str | None = None) -> ServerProcess:
    config = pki.directory / f"{name}.yaml"
    config.write_text(json.dumps({"tls": tls}))
    server = launch_server(repository, pki.directory, "--config", str(config), wait=False)
    with secure_channel(server.url, pki, client=client) as channel:
        wait_serving(server, channel)
    return server


@pytest.fixture(scope="module")
def tls_server(demo_repository: Path, pki: Pki) -> Iterator[ServerProcess]:
    tls = {"cert_file": pki.path("server.crt"), "key_file": pki.path("server.key")}
    server = start(demo_repository, pki, "tls", tls)
    yield server
    assert server.terminate() == 0, server.log()


@pytest.fixture(scope="module")
def mtls_server(demo_repository: Path, pki: Pki) -> Iterator[ServerProcess]:
    tls = {
        "cert_file": pki.path("server.crt"),
        "key_file": pki.path("server.key"),
        "client_ca_file": pki.path("client-ca.crt"),
    }
    server = start(demo_repository, pki, "mtls", tls, client="client")
    yield server
    assert server.terminate() == 0, server.log()


def matmul_input() -> grpcclient.InferInput:
    x = grpcclient.InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    return x


def live(channel: grpc.Channel) -> bool:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return bool(stub.ServerLive(pb.ServerLiveRequest(), timeout=HANG_GUARD_S).live)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        live(channel)
    code: grpc.StatusCode = caught.value.code()  # type: ignore[attr-defined]
    return code


# --------------------------------------------------------------------------- TLS


def test_tritonclient_infers_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    client = grpcclient.InferenceServerClient(tls_server.url, ssl=True, root_certificates=pki.path("ca.crt"))
    try:
        assert client.infer("matmul16", [matmul_input()]).as_numpy("y").shape == (1, 16)
    finally:
        client.close()


def test_a_plaintext_client_cannot_talk_to_a_tls_port(tls_server: ServerProcess) -> None:
    with grpc.insecure_channel(tls_server.url) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_ca_is_refused(tls_server: ServerProcess, pki: Pki) -> None:
    with secure_channel(tls_server.url, pki, root="client-ca.crt") as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------- mutual TLS


def test_tritonclient_with_a_client_certificate_infers_over_mtls(mtls_server: ServerProcess, pki: Pki) -> None:
    client = grpcclient.InferenceServerClient(
        mtls_server.url,
        ssl=True,
        root_certificates=pki.path("ca.crt"),
        private_key=pki.path("client.key"),
        certificate_chain=pki.path("client.crt"),
    )
    try:
        assert client.infer("matmul16", [matmul_input()]).as_numpy("y").shape == (1, 16)
    finally:
        client.close()


@pytest.mark.parametrize("client", [None, "stranger"], ids=["no client certificate", "certificate from another CA"])
def test_mtls_turns_away_clients_without_a_trusted_certificate(
    mtls_server: ServerProcess, pki: Pki, client: str | None
) -> None:
    with secure_channel(mtls_server.url, pki, client=client) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_raw_stub_with_a_client_certificate_is_served(mtls_server: ServerProcess, pki: Pki) -> None:
    with secure_channel(mtls_server.url, pki, client="client") as channel:
        assert live(channel)


# --------------------------------------------------------------------------- rotation


def test_rotated_certificates_are_used_by_new_connections_without_a_restart(
    demo_repository: Path, pki: Pki, tmp_path: Path
) -> None:
    cert, key = issue(pki.ca, "infergate").write(tmp_path, "server")
    server = start(demo_repository, pki, "rotating", {"cert_file": str(cert), "key_file": str(key)})
    try:
        new_ca = make_ca("next server CA")
        (pki.directory / "next-ca.crt").write_bytes(new_ca.cert_pem)
        staged_cert, staged_key = issue(new_ca, "infergate").write(tmp_path, "staged")
        os.replace(staged_key, key)  # rename into place: never a half-written file
        os.replace(staged_cert, cert)
        with secure_channel(server.url, pki, root="next-ca.crt") as channel:
            assert live(channel)
        with secure_channel(server.url, pki, root="ca.crt") as channel:
            assert refused(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.terminate() == 0, server.log()
    assert "TLS certificate files changed" in server.log()


def test_the_sdk_infers_over_mtls_and_is_refused_without_a_client_certificate(
    mtls_server: ServerProcess, pki: Pki
) -> None:
    x = {"x": np.ones((1, 16), dtype=np.float32)}
    mutual = Tls(
        root_certificates=pki.directory / "ca.crt",
        private_key=pki.directory / "client.key",
        certificate_chain=pki.directory / "client.crt",
    )
    with Client(mtls_server.url, tls=mutual) as client:
        assert client.infer("matmul16", x)["y"].shape == (1, 16)
    anonymous = Tls(root_certificates=pki.directory / "ca.crt")
    no_retry = RetryPolicy(max_attempts=1)
    with Client(mtls_server.url, tls=anonymous, retry=no_retry, timeout=10) as client:
        with pytest.raises(InferGateError):
            client.infer("matmul16", x)
