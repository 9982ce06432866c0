"""The one interceptor the server installs: every stage, in order, composed once per method.

A small test service (raw bytes) runs behind a :class:`CallPipeline` made of
the real admission gate, the real malformed-request check, the real auth
stage and recording stages in the places of telemetry and the admin audit.
The recording stages note, per call, that their wrapper ran, so these tests
show the order a call meets the stages in, what each kind of refusal reaches,
and that the pipeline builds no handler per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from conftest import eventually
from security import SECRET, bearer, claims, token

from infergate.security.auth import TokenVerifier, current_principal
from infergate.security.config import AuthConfig
from infergate.security.interceptor import AuthInterceptor
from infergate.security.keys import KeyStore
from infergate.serving.admission import Admission
from infergate.serving.interceptors import CallPipeline, Finish, HandlerStage, observe_handler

INFER = "/inference.GRPCInferenceService/ModelInfer"  # the gate counts only inference methods
ECHO = "/test.Echo/Who"


class Recording:
    """A stage that notes its name in ``seen`` each time a call it wraps ends."""

    def __init__(self, name: str, seen: list[str]):
        self.name, self.seen = name, seen
        self.built = 0

    def select(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        self.built += 1

        def start(request: Any, context: grpc.aio.ServicerContext) -> Finish:
            self.seen.append(f"{self.name} in")
            return lambda error, response: self.seen.append(f"{self.name} out")

        return observe_handler(handler, start)


class Pipeline:
    def __init__(self, limit: int = 100):
        self.seen: list[str] = []
        self.observer, self.audit = Recording("observer", self.seen), Recording("audit", self.seen)
        config = AuthConfig(enabled=True, algorithms=["HS256"], secret_env="UNUSED")
        self.verifier = TokenVerifier(config, KeyStore(SECRET))
        self.gate = Admission(limit)
        stages: list[HandlerStage] = [self.observer]
        self.interceptor = CallPipeline(self.gate, stages, self.audit, AuthInterceptor(self.verifier, []))


async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    principal = current_principal()
    return b"<none>" if principal is None else principal.subject.encode()


def handler_for(behaviour: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=_strict, response_serializer=bytes)


def _strict(data: bytes) -> bytes:
    if data.startswith(b"\xff"):
        raise ValueError("not a request")
    return data


@pytest.fixture
async def served() -> Any:
    pipeline = Pipeline()
    server = grpc.aio.server(interceptors=[pipeline.interceptor])
    handlers = {"Who": handler_for(who), "ModelInfer": handler_for(who)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Who": handlers["Who"]})])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handlers["ModelInfer"]})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pipeline, channel
    await server.stop(None)


def metadata() -> list[tuple[str, str]]:
    return list(bearer(token(SECRET, "HS256", claims("admin infer:*"))).items())


async def test_a_call_meets_the_observers_then_the_audit_then_auth(served: Any) -> None:
    pipeline, channel = served
    assert await channel.unary_unary(ECHO)(b"", metadata=metadata()) == b"alice"
    assert pipeline.seen == ["observer in", "audit in", "audit out", "observer out"]


async def test_refusals_inside_the_pipeline_are_observed_and_a_gate_refusal_is_not(served: Any) -> None:
    pipeline, channel = served
    every_stage = ["observer in", "audit in", "audit out", "observer out"]
    # A refused call's status leaves with the abort, before the stages around it have seen it end.
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
        await channel.unary_unary(ECHO)(b"")
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await eventually(lambda: pipeline.seen == every_stage, "the refused call seen out by every stage")
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await channel.unary_unary(ECHO)(b"\xff", metadata=metadata())
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Who: the request is not a valid request message" in str(malformed.value.details())
    await eventually(lambda: pipeline.seen == every_stage * 2, "the malformed call seen out by every stage")

    pipeline.seen.clear()
    pipeline.gate.close()  # draining: inference calls are refused at the gate, before any other stage
    with pytest.raises(grpc.aio.AioRpcError) as draining:
        await channel.unary_unary(INFER)(b"", metadata=metadata())
    assert draining.value.code() == grpc.StatusCode.UNAVAILABLE
    assert pipeline.seen == []


async def test_the_gate_counts_admitted_inference_calls_until_they_end(served: Any) -> None:
    pipeline, channel = served
    assert await channel.unary_unary(INFER)(b"", metadata=metadata()) == b"alice"
    # Released when the call's task ends, which may be just after the client has its answer.
    await eventually(lambda: pipeline.gate.in_progress == 0, "the inference call released")
    await channel.unary_unary(ECHO)(b"", metadata=metadata())
    assert pipeline.gate.calls_in_progress() == 0


async def test_a_method_is_composed_once_and_a_token_verified_once(served: Any) -> None:
    pipeline, channel = served
    same_token = metadata()  # built once: a token built again in a later second differs (its iat)
    for _ in range(5):
        assert await channel.unary_unary(ECHO)(b"", metadata=same_token) == b"alice"
    assert (pipeline.observer.built, pipeline.audit.built) == (1, 1)
    assert pipeline.verifier.verified == 1


async def test_the_same_handler_answers_every_call_of_a_method() -> None:
    pipeline = Pipeline()
    inner = handler_for(who)

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return inner

    class Details:
        method = ECHO
        invocation_metadata = tuple(metadata())

    first = await pipeline.interceptor.intercept_service(continuation, Details())
    assert first is not inner
    assert await pipeline.interceptor.intercept_service(continuation, Details()) is first
