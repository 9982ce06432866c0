"""The GRPCInferenceService servicer: protobuf in, protobuf out.

Each method converts its request, calls the repository, codec and model, and
converts back. This module is the one place where infergate's errors become
gRPC status codes (``_abort``); an unexpected exception is logged with its
traceback and the client gets INTERNAL with a safe message.

Data path of ModelInfer: router (via the repository: which version) →
decode/validate → model.infer (batcher → runner) → encode → shadow (mirrored
in the background after the answer is ready, see shadow.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import grpc

from infergate import __version__
from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.errors import (
    Cancelled,
    FailedPrecondition,
    InferGateError,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from infergate.models.version import ModelVersion
from infergate.repository.loader import ModelRepository, Routed
from infergate.routing.router import Router
from infergate.routing.shadow import ShadowJob, ShadowQueue
from infergate.serving.codec import DecodedRequest, decode_request, encode_response, request_timeout_us
from infergate.serving.protocol import model_config_message, model_metadata_message, model_statistics_message

__all__ = ["EXTENSIONS", "InferenceServicer", "ServerState"]

log = logging.getLogger(__name__)

# Exactly the protocol extensions that work (ServerMetadata.extensions).
EXTENSIONS = ("model_configuration", "model_repository", "statistics")

# Response parameters that tell the caller how its request was routed.
ROUTE_PARAMETER = "infergate_route"
SHADOWED_PARAMETER = "infergate_shadowed"

# Errors that say something about the request, not about the version that served it (canary judgement).
_CALLER_ERRORS = (InvalidArgument, NotFound, Cancelled)

Metadata = Callable[[], Any]  # context.invocation_metadata

# How many requests of one stream may be in progress at once; more wait (flow control).
STREAM_CONCURRENCY = 256


@dataclass
class ServerState:
    """Readiness as the protocol and health checks report it."""

    ready: bool = False
    draining: bool = False
    max_elements: int = 64 * 1024 * 1024
    model_control_mode: str = "none"
    max_rows: int = 1024  # rows of one request, on top of each model's max_batch_size
    max_inputs: int = 128


async def _abort(context: grpc.aio.ServicerContext, error: InferGateError) -> NoReturn:
    await context.abort(grpc.StatusCode[error.status.name], error.message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def _abort_internal(context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    log.exception("%s failed", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error (the server log has the cause)")
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def _guarded(method: Handler) -> Handler:
    """Turn infergate errors into their status and anything else into a safe INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the method already chose its status
        except InferGateError as exc:
            await _abort(context, exc)
        except Exception:
            await _abort_internal(context, method.__name__)

    return cast(Handler, wrapper)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on top of a model repository."""

    def __init__(self, repository: ModelRepository, state: ServerState, shadows: ShadowQueue):
        self._repository = repository
        self._state = state
        self._shadows = shadows

    # --- health and metadata -------------------------------------------------------------

    @_guarded
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_guarded
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._state.ready and not self._state.draining)

    @_guarded
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._repository.get(request.name, request.version)
        except InferGateError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self._state.draining)

    @_guarded
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="infergate", version=__version__, extensions=EXTENSIONS)

    @_guarded
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self._repository.get(request.name, request.version)
        versions = [m.version for m in self._repository.versions(request.name)]
        return model_metadata_message(model.spec, versions)

    @_guarded
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self._repository.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config_message(model))

    @_guarded
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        models = self._models_for_statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics_message(m) for m in models])

    def _models_for_statistics(self, name: str, version: str) -> list[ModelVersion]:
        if name:
            return [self._repository.get(name, version)] if version else self._repository.versions(name)
        return [m for e in self._repository.entries.values() for _, m in sorted(e.versions.items())]

    # --- inference -----------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            return await self._infer_recorded(request, context.time_remaining(), context.invocation_metadata)
        except InferGateError as exc:
            await _abort(context, exc)
        except Exception:
            await _abort_internal(context, "ModelInfer")

    async def _infer_recorded(
        self, request: pb.ModelInferRequest, remaining: float | None, metadata: Metadata
    ) -> pb.ModelInferResponse:
        """Route, infer, mirror; count the request in the model's statistics and the router's canary."""
        started = time.perf_counter_ns()
        routed: Routed | None = None
        error: Exception | None = None
        try:
            routed = self._repository.route(
                request.model_name, request.model_version, lambda router: _sticky_key(router, request, metadata)
            )
            return await self._infer(routed, request, remaining)
        except Exception as exc:
            error = exc
            raise
        finally:
            if routed is not None:
                elapsed = time.perf_counter_ns() - started
                routed.model.stats.record_request(error is None, elapsed)
                # The canary is judged on what it did wrong, not on bad requests.
                served_ok = error is None or isinstance(error, _CALLER_ERRORS)
                routed.router.observe(routed.decision, served_ok, elapsed / 1e9)

    async def _infer(
        self, routed: Routed, request: pb.ModelInferRequest, remaining: float | None
    ) -> pb.ModelInferResponse:
        model, decision = routed.model, routed.decision
        state = self._state
        decoded = decode_request(
            request, model.spec, state.max_elements, max_rows=state.max_rows, max_inputs=state.max_inputs
        )
        deadline, server_side = _deadline(remaining, request, model)
        # gRPC cancels the call at its own deadline; the batcher times only server-side timeouts.
        outputs = await model.infer(decoded.inputs, decoded.rows, decoded.group, deadline, watch=server_side)
        response = encode_response(request, model.spec, outputs, decoded.outputs)
        response.parameters[ROUTE_PARAMETER].string_param = decision.arm
        response.parameters[SHADOWED_PARAMETER].bool_param = decision.shadow is not None
        if decision.shadow is not None:
            self._mirror(routed, decision.shadow, decoded, outputs)
        return response

    def _mirror(self, routed: Routed, version: int, decoded: DecodedRequest, outputs: dict[str, Any]) -> None:
        """Queue the same inputs for the shadow version; never waits, never fails the caller."""
        spec = routed.router.routing.shadow
        found = self._repository.shadow(routed.model.name, version)
        if spec is None or found is None:  # the shadow stopped being served since the decision
            return
        shadow, stats = found
        call = functools.partial(shadow.infer, decoded.inputs, decoded.rows, decoded.group, None)
        job = ShadowJob(call, outputs, stats, spec.timeout_seconds, spec.max_busy_fraction)
        self._shadows.offer(job, limit=spec.queue_size)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of a stream run concurrently (so they batch); each answer carries its id."""
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(request_iterator, responses, context.invocation_metadata))
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader  # re-raises a failure of the reader
        finally:
            reader.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterator[pb.ModelInferRequest],
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None],
        metadata: Metadata,
    ) -> None:
        slots = asyncio.Semaphore(STREAM_CONCURRENCY)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                await responses.put(await self._stream_one(request, metadata))
            finally:
                slots.release()

        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await responses.put(None)

    async def _stream_one(self, request: pb.ModelInferRequest, metadata: Metadata) -> pb.ModelStreamInferResponse:
        try:
            response = await self._infer_recorded(request, None, metadata)
            return pb.ModelStreamInferResponse(infer_response=response)
        except InferGateError as exc:
            message = exc.message
        except Exception:
            log.exception("ModelStreamInfer request failed")
            message = "internal error (the server log has the cause)"
        echo = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)

    # --- repository extension: model control ----------------------------------------------

    @_guarded
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        rows = self._repository.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=r.name, version=r.version, state=r.state, reason=r.reason)
                for r in rows
            ]
        )

    @_guarded
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._explicit_control("RepositoryModelLoad")
        if request.parameters:
            raise Unimplemented(
                f"RepositoryModelLoad: parameters {sorted(request.parameters)} are not supported;"
                " edit config.yaml in the repository instead"
            )
        await self._repository.reconcile(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_guarded
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._explicit_control("RepositoryModelUnload")
        await self._repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _explicit_control(self, method: str) -> None:
        mode = self._state.model_control_mode
        if mode != "explicit":
            raise FailedPrecondition(
                f"{method}: models are loaded and unloaded through the API only in explicit model control mode"
                f" (this server runs in {mode!r} mode; start it with --model-control-mode explicit)"
            )


def _sticky_key(router: Router, request: pb.ModelInferRequest, metadata: Metadata) -> str | None:
    """The request's sticky routing key (a metadata header or a request parameter), if its route has one."""
    if router.sticky_header is not None:
        for key, value in metadata() or ():
            if key == router.sticky_header:
                return value if isinstance(value, str) else value.decode("utf-8", "replace")
        return None
    if router.sticky_parameter is not None and router.sticky_parameter in request.parameters:
        parameter = request.parameters[router.sticky_parameter]
        choice = parameter.WhichOneof("parameter_choice")
        return str(getattr(parameter, choice)) if choice else None
    return None


def _deadline(remaining: float | None, request: pb.ModelInferRequest, model: ModelVersion) -> tuple[float | None, bool]:
    """Absolute loop time by which the request must have run (the tightest of the gRPC
    deadline, the ``timeout`` parameter and the model's default timeout), and whether
    that limit is a server-side one (which nothing but the batcher enforces)."""
    timeout_us = request_timeout_us(request)
    server = timeout_us / 1e6 if timeout_us else model.default_timeout_s
    if remaining is None and server is None:
        return None, False
    server_side = server is not None and (remaining is None or server < remaining)
    limit = server if server_side else remaining
    assert limit is not None
    return asyncio.get_running_loop().time() + limit, server_side
