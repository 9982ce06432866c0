"""The transport ceiling: a bare grpc.aio server whose ModelInfer costs nothing.

ModelInfer is registered with no request deserializer and no response serializer,
so grpcio hands it the request bytes and sends back bytes it is given: it returns
one pre-serialised ModelInferResponse (zeros, with the model's output names,
datatypes and shapes, so clients parse it as they would a real reply). No Python
server on grpcio can answer ModelInfer faster, which makes it the yardstick for
infergate's per-request overhead.

The reply depends on the batch size, so replies are cached per (model name,
request length); the model name is read from the request's first field (field 1,
which serialisers write first) without parsing the rest. Only the first request
of each kind is parsed, to learn the batch size. The reply does not echo the
request id. ModelMetadata, ModelConfig, ModelStatistics (all zeros), ModelReady,
ServerLive, ServerReady and ServerMetadata are answered normally, so the harness,
tritonclient and perf_analyzer can all drive it.

It runs on the event loop infergate would choose (``--event-loop``, default
``auto``: uvloop when installed), so it keeps every advantage infergate has.
It binds 127.0.0.1 only. With several processes they share the port through
SO_REUSEPORT (grpcio's default on Linux) and the kernel spreads connections.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import model_config_pb2 as mc
from infergate.eventloop import EventLoopChoice, describe_choice
from infergate.eventloop import run as run_on_loop
from infergate.models.datatypes import DATATYPES

from .payloads import build_infer_response
from .signature import ModelSignature, metadata_from_signature

__all__ = ["LOOPBACK", "CeilingService", "run_ceiling", "serve"]

LOOPBACK = "127.0.0.1"
_SERVICE = "inference.GRPCInferenceService"
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]
_MAX_CACHED_REPLIES = 1024
_FALLBACK_MAX_BATCH = 64  # declared in ModelConfig when the repository gives none

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpcio ships no type stubs


def _config_dims(shape: tuple[int, ...], batched: bool) -> list[int]:
    return list(shape[1:] if batched else shape)


def model_config(signature: ModelSignature) -> mc.ModelConfig:
    """Triton's ModelConfig for ``signature``: dims without the batch dimension if it batches."""
    batched = signature.batched
    max_batch = (signature.max_batch_size or _FALLBACK_MAX_BATCH) if batched else 0

    return mc.ModelConfig(
        name=signature.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=max_batch,
        input=[
            mc.ModelInput(name=s.name, data_type=DATATYPES[s.datatype].triton, dims=_config_dims(s.shape, batched))
            for s in signature.inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=DATATYPES[s.datatype].triton, dims=_config_dims(s.shape, batched))
            for s in signature.outputs
        ],
    )


class CeilingService:
    """Handlers for ``inference.GRPCInferenceService`` over a fixed set of models."""

    def __init__(self, models: dict[str, ModelSignature]) -> None:
        self._models = dict(models)
        self._replies: dict[tuple[bytes, int], bytes] = {}

    async def model_infer(self, request: bytes, context: Context) -> bytes:
        """Return the cached reply for this kind of request; parse only on a miss."""
        key = None
        if len(request) > 1 and request[0] == 0x0A and request[1] < 0x80:
            key = (request[2 : 2 + request[1]], len(request))
            reply = self._replies.get(key)
            if reply is not None:
                return reply
        return await self._first_reply(request, key, context)

    async def _first_reply(self, data: bytes, key: tuple[bytes, int] | None, context: Context) -> bytes:
        request = pb.ModelInferRequest.FromString(data)
        signature = await self._signature(request.model_name, context)
        batch = 1
        if signature.batched and request.inputs and request.inputs[0].shape:
            batch = int(request.inputs[0].shape[0])
        reply: bytes = build_infer_response(signature, batch).SerializeToString()
        if key is not None and len(self._replies) < _MAX_CACHED_REPLIES:
            self._replies[key] = reply
        return reply

    async def _signature(self, name: str, context: Context) -> ModelSignature:
        signature = self._models.get(name)
        if signature is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}")
            raise RuntimeError("context.abort returned")  # it always raises
        return signature

    async def model_metadata(self, request: Any, context: Context) -> Any:
        return metadata_from_signature(await self._signature(request.name, context))

    async def model_config(self, request: Any, context: Context) -> Any:
        signature = await self._signature(request.name, context)
        return pb.ModelConfigResponse(config=model_config(signature))

    async def model_statistics(self, request: Any, context: Context) -> Any:
        names = [request.name] if request.name else sorted(self._models)
        stats = [
            pb.ModelStatistics(name=name, version=(await self._signature(name, context)).version) for name in names
        ]
        return pb.ModelStatisticsResponse(model_stats=stats)

    async def model_ready(self, request: Any, context: Context) -> Any:
        return pb.ModelReadyResponse(ready=request.name in self._models)

    async def server_live(self, request: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def server_metadata(self, request: Any, context: Context) -> Any:
        return pb.ServerMetadataResponse(name="load_tests.ceiling", version="0")

    def handler(self) -> grpc.GenericRpcHandler:
        """One generic handler; ModelInfer passes bytes through unparsed."""

        def parsed(method: Callable[..., Any], request: Any, response: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
                "ModelMetadata": parsed(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
                "ModelConfig": parsed(self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
                "ModelStatistics": parsed(self.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
                "ModelReady": parsed(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
                "ServerLive": parsed(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
                "ServerReady": parsed(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
                "ServerMetadata": parsed(self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            },
        )


async def serve(models: dict[str, ModelSignature], port: int, on_ready: Callable[[int], None]) -> None:
    """Serve on 127.0.0.1:``port`` (0 = any) until SIGINT or SIGTERM.

    ``on_ready`` receives the bound port once the server accepts calls.
    """
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    server.add_generic_rpc_handlers((CeilingService(models).handler(),))
    bound = server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    on_ready(bound)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1.0)


def _child(models: dict[str, ModelSignature], port: int, ready: Any, event_loop: EventLoopChoice) -> None:
    run_on_loop(serve(models, port, ready.put), event_loop)


def _announce(port: int, models: dict[str, ModelSignature], processes: int, event_loop: EventLoopChoice) -> None:
    names = ", ".join(sorted(models))
    described = describe_choice(event_loop)
    print(
        f"ceiling: listening on {LOOPBACK}:{port} ({processes} process(es); event loop: {described}; models: {names})",
        flush=True,
    )


def _run_processes(models: dict[str, ModelSignature], port: int, processes: int, event_loop: EventLoopChoice) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    children = [
        context.Process(target=_child, args=(models, port, ready, event_loop), daemon=True) for _ in range(processes)
    ]
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        for child in children:
            child.start()
        for _ in children:
            ready.get(timeout=60)
        _announce(port, models, processes, event_loop)
        while not stop.is_set() and all(child.is_alive() for child in children):
            stop.wait(0.5)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()


def run_ceiling(
    models: dict[str, ModelSignature], port: int, processes: int = 1, event_loop: EventLoopChoice = "auto"
) -> None:
    """Serve ``models`` until SIGINT/SIGTERM; prints one 'listening' line once ready.

    Several processes need an explicit ``port`` (they share it via SO_REUSEPORT).
    ``event_loop`` is chosen as infergate's is (``auto``: uvloop when installed), so the ceiling
    keeps every advantage infergate has and stays an upper bound.
    """
    if not models:
        raise ValueError("the ceiling needs at least one model")
    if processes > 1 and port == 0:
        raise ValueError("--processes > 1 needs an explicit --port")
    if processes <= 1:
        run_on_loop(serve(models, port, lambda bound: _announce(bound, models, 1, event_loop)), event_loop)
    else:
        _run_processes(models, port, processes, event_loop)
