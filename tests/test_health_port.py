"""``health_port``: grpc.health.v1 alone on a plaintext port next to a TLS serving port.

The kubelet's gRPC probes speak plaintext, so a pod serving TLS needs its health on
a port of its own. Against a real TLS server (certificates made at test time): the
plaintext health port answers Check and Watch and nothing else; inference is served
only over TLS on the serving port; during the drain the health port says NOT_SERVING
for both entries. With a broken model it mirrors the serving port's two entries: ``""``
(every model loaded) NOT_SERVING, ``inference.GRPCInferenceService`` (answering) SERVING.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, launch_server, running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from security import issue, make_ca

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.server import HEALTH_SERVICES, SERVICE_NAME
from infergate.telemetry.logs import HEALTH

HANG_GUARD_S = 30.0  # how long a call may take before the test calls it a hang; not a performance bound
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _matmul_request() -> pb.ModelInferRequest:
    x = np.ones((1, 16), np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])
    return pb.ModelInferRequest(model_name="matmul16", inputs=[tensor], raw_input_contents=[x.tobytes()])


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, demo_repository: Path
) -> Iterator[tuple[ServerProcess, str, bytes]]:
    """A TLS server with ``health_port: 0``; yields it, its health address and the CA certificate."""
    directory = tmp_path_factory.mktemp("health-port")
    ca = make_ca("health-port CA")
    issue(ca, "infergate").write(directory, "server")
    config = directory / "server.yaml"
    tls = {"cert_file": str(directory / "server.crt"), "key_file": str(directory / "server.key")}
    config.write_text(json.dumps({"tls": tls, "health_port": 0, "shutdown_delay_seconds": 1}))
    server = launch_server(demo_repository, directory, "--config", str(config), wait=False)
    assert server.process.stdout is not None
    line = server.process.stdout.readline()
    assert line.startswith(HEALTH + "127.0.0.1:"), line
    try:
        yield server, line[len(HEALTH) :].strip(), ca.cert_pem
    finally:
        server.terminate()  # the drain test may have stopped it already; this also closes its stdout


def _wait_for(channel: grpc.Channel, wanted: int, service: str = "") -> None:
    request = health_pb2.HealthCheckRequest(service=service)
    watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=HANG_GUARD_S)
    try:
        for update in watch:
            if update.status == wanted:
                return
    finally:
        watch.cancel()


def test_health_answers_in_plaintext_and_inference_only_over_tls(
    tls_server: tuple[ServerProcess, str, bytes],
) -> None:
    server, health_address, ca = tls_server
    with grpc.insecure_channel(health_address) as plain:
        _wait_for(plain, SERVING)
        for service in ("", "inference.GRPCInferenceService"):
            check = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(service=service))
            assert check.status == SERVING
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.GRPCInferenceServiceStub(plain).ModelInfer(_matmul_request(), timeout=HANG_GUARD_S)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED

    with grpc.insecure_channel(server.url) as plain_to_tls:  # the serving port has no plaintext
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.GRPCInferenceServiceStub(plain_to_tls).ModelInfer(_matmul_request(), timeout=HANG_GUARD_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    credentials = grpc.ssl_channel_credentials(ca)
    with grpc.secure_channel(server.url, credentials) as secure:
        reply = pb_grpc.GRPCInferenceServiceStub(secure).ModelInfer(_matmul_request(), timeout=HANG_GUARD_S)
        assert reply.model_name == "matmul16" and len(reply.raw_output_contents[0]) == 16 * 4


def test_the_health_port_reports_not_serving_through_the_drain(
    tls_server: tuple[ServerProcess, str, bytes],
) -> None:
    server, health_address, _ = tls_server
    with grpc.insecure_channel(health_address) as plain:
        stub = health_pb2_grpc.HealthStub(plain)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service=s), timeout=HANG_GUARD_S) for s in HEALTH_SERVICES]
        updates = [iter(watch) for watch in watches]
        for statuses in updates:
            assert next(status.status for status in statuses if status.status == SERVING) == SERVING
        server.process.send_signal(signal.SIGTERM)
        assert [next(statuses).status for statuses in updates] == [NOT_SERVING, NOT_SERVING]
        for watch in watches:
            watch.cancel()
    assert server.process.wait(HANG_GUARD_S * 2) == 0, server.log()


def test_with_a_broken_model_the_health_port_says_what_the_serving_port_says(
    tmp_path: Path, demo_repository: Path, log_dir: Path
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(demo_repository / "matmul16", repository / "matmul16")
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    config = tmp_path / "server.yaml"
    config.write_text(json.dumps({"health_port": 0}))  # plaintext serving port: both can be asked
    with running_server(repository, log_dir, "--config", str(config), wait=False) as server:
        assert server.process.stdout is not None
        line = server.process.stdout.readline()
        assert line.startswith(HEALTH), line
        with grpc.insecure_channel(line[len(HEALTH) :].strip()) as health_port:
            _wait_for(health_port, SERVING, SERVICE_NAME)  # start-up loading is over
            with grpc.insecure_channel(server.url) as serving_port:
                for service, status in (("", NOT_SERVING), (SERVICE_NAME, SERVING)):
                    request = health_pb2.HealthCheckRequest(service=service)
                    for channel in (health_port, serving_port):
                        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=HANG_GUARD_S)
                        assert reply.status == status, (service, channel is health_port)
