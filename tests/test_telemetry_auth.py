"""Who is refused and why: authentication refusals are counted by reason, never by token; a traced
call names its caller (the token's subject and client id), never the token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import eventually
from opentelemetry.sdk.trace import ReadableSpan
from security import AUDIENCE, ISSUER, SECRET, bearer, claims, token
from telemetry_support import Observed, observed_server, telemetry_repository

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

AUTH = {
    "auth": {
        "enabled": True,
        "algorithms": ["HS256"],
        "secret_env": "INFERGATE_TEST_TELEMETRY_SECRET",
        "issuer": ISSUER,
        "audience": AUDIENCE,
    }
}


@pytest.fixture
async def observed(demo_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Observed]:
    monkeypatch.setenv("INFERGATE_TEST_TELEMETRY_SECRET", SECRET.decode())
    async with observed_server(telemetry_repository(demo_repository, tmp_path), AUTH) as server:
        yield server


async def status(stub: pb_grpc.GRPCInferenceServiceStub, metadata: dict[str, str]) -> grpc.StatusCode:
    try:
        await stub.ModelMetadata(pb.ModelMetadataRequest(name="matmul16"), metadata=tuple(metadata.items()))
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_refusals_are_counted_by_reason(observed: Observed) -> None:
    async with grpc.aio.insecure_channel(observed.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        expired = claims(exp=1)
        assert await status(stub, {}) == grpc.StatusCode.UNAUTHENTICATED
        assert await status(stub, {}) == grpc.StatusCode.UNAUTHENTICATED
        assert await status(stub, bearer(token(SECRET, "HS256", expired))) == grpc.StatusCode.UNAUTHENTICATED
        no_metadata = bearer(token(SECRET, "HS256", claims("infer:*")))
        assert await status(stub, no_metadata) == grpc.StatusCode.PERMISSION_DENIED
        assert await status(stub, bearer(token(SECRET, "HS256", claims()))) == grpc.StatusCode.OK
    counted = {point.attributes["reason"]: point.value for point in observed.points("infergate.auth.refusals")}
    assert counted == {"missing_token": 2, "expired": 1, "permission_denied": 1}
    refused = {
        point.attributes["rpc.grpc.status_code"]: point.value
        for point in observed.points("infergate.requests")
        if point.attributes.get("rpc.method") == "ModelMetadata"
    }
    assert refused[grpc.StatusCode.UNAUTHENTICATED.value[0]] == 3  # refused calls are traced and counted too
    answered = [
        point.attributes
        for point in observed.points("infergate.requests")
        if point.attributes.get("rpc.method") == "ModelMetadata"
        and point.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    ]
    assert [a["model"] for a in answered] == ["matmul16"]  # ModelMetadataRequest names it in `name`


async def test_a_traced_call_names_its_caller_and_a_refused_one_names_none(observed: Observed) -> None:
    signed = token(SECRET, "HS256", claims())
    async with grpc.aio.insecure_channel(observed.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert await status(stub, bearer(signed)) == grpc.StatusCode.OK
        assert await status(stub, {}) == grpc.StatusCode.UNAUTHENTICATED

    def metadata_spans() -> list[ReadableSpan]:
        return [s for s in observed.finished_spans() if s.name.endswith("/ModelMetadata")]

    # A refused call's status leaves with its abort, before the span around it ends: wait for its span.
    await eventually(lambda: len(metadata_spans()) == 2, "the refused call's span")
    spans = metadata_spans()
    callers = [(s.attributes or {}).get("enduser.id") for s in spans]
    assert callers == ["alice", None]
    assert (spans[0].attributes or {}).get("infergate.client.id") == "svc-a"
    assert not any(signed in str(value) for s in spans for value in (s.attributes or {}).values())
