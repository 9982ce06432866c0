"""The GRPCInferenceService servicer: protobuf in, protobuf out.

Each method only converts: it reads its request, asks the catalog (lookups),
the repository (model control) or the inference handler (``handler.py``), and
encodes the answer. Exceptions end the call through the one translation in
``status.py``. The request path of ModelInfer is docs/architecture.md's first
section.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from infergate import __version__
from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.errors import FailedPrecondition, InferGateError, InvalidArgument, NotFound, Unimplemented
from infergate.heap import in_thread
from infergate.models.overrides import parse_load_parameters
from infergate.repository.loader import ModelRepository
from infergate.serving.codec import WireRequest, encode_answer, wire_request
from infergate.serving.control import LocalModelControl, ModelControl
from infergate.serving.handler import InferenceHandler
from infergate.serving.log_settings import (
    LogSettings,
    log_settings_line,
    log_settings_message,
    requested_log_settings,
)
from infergate.serving.offload import ELEMENTS_ON_LOOP, object_elements
from infergate.serving.protocol import model_config_message, model_metadata_message, model_statistics_message
from infergate.serving.request import InferenceResult
from infergate.serving.shared_memory import SystemSharedMemory
from infergate.serving.shm_tensors import SharedMemoryAccess
from infergate.serving.status import abort_with, guarded, status_of
from infergate.serving.stream import OnPause, answer_concurrently
from infergate.serving.trace_settings import (
    TRACING_OFF,
    TraceSettings,
    requested_trace_change,
    trace_settings_line,
    trace_settings_message,
)

__all__ = ["EXTENSIONS", "NOT_IMPLEMENTED", "SYSTEM_SHARED_MEMORY", "InferenceServicer", "Readiness"]

log = logging.getLogger(__name__)

# Exactly the protocol extensions that work (ServerMetadata.extensions); plus SYSTEM_SHARED_MEMORY when on.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "sequence", "statistics", "trace")
SYSTEM_SHARED_MEMORY = "system_shared_memory"

# Triton's RPCs of the extensions infergate does not implement, and the extension each belongs to.
# (CUDA shared memory: no region can be registered, so its status lists none and unregistering
# them all has nothing to do, as on a Triton built without GPUs; Triton's shm examples call both.)
NOT_IMPLEMENTED = {
    "CudaSharedMemoryRegister": "cuda_shared_memory",
}
LOGGING = "logging"  # Triton's logging extension: listed when the server owns its process's logging

# How many requests of one stream may be in progress or answered but unread by its client; beyond
# that the stream stops reading requests until the client reads (see stream.py).
STREAM_WINDOW = 256


@dataclass
class Readiness:
    """What ServerReady and ModelReady report: set by the composition root as the server starts and stops."""

    ready: bool = False
    draining: bool = False


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over a model repository and an inference handler."""

    def __init__(
        self,
        repository: ModelRepository,
        handler: InferenceHandler,
        readiness: Readiness,
        control_mode: str,
        on_stream_pause: OnPause | None = None,
        closing: asyncio.Event | None = None,
        control: ModelControl | None = None,
        shared_memory: SystemSharedMemory | None = None,
        logs: LogSettings | None = None,
        traces: TraceSettings | None = None,
    ):
        """``shared_memory``: the system shared-memory registry (None: the extension is off).
        ``logs``: the process's log settings (None: the server is embedded in a program that owns them).
        ``traces``: which calls are traced (None: the server runs without tracing)."""
        self._shared_memory = shared_memory
        self._shm_access = SharedMemoryAccess(shared_memory)
        self._logs = logs
        self._traces = traces
        optional = (SYSTEM_SHARED_MEMORY,) * (shared_memory is not None) + (LOGGING,) * (logs is not None)
        self._extensions = tuple(sorted((*EXTENSIONS, *optional)))
        self._on_stream_pause = on_stream_pause  # telemetry: streams waiting for their client to read
        self._closing = closing  # set when the server drains: streams stop reading
        self._repository = repository
        self._control = control or LocalModelControl(repository)  # --workers: every worker (serving/control.py)
        self._catalog = repository.catalog
        self._handler = handler
        self._readiness = readiness
        self._control_mode = control_mode

    # --- health and metadata -------------------------------------------------------------

    @guarded
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @guarded
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._readiness.ready and not self._readiness.draining)

    @guarded
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._catalog.get(request.name, request.version)
        except InferGateError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self._readiness.draining)

    @guarded
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="infergate", version=__version__, extensions=self._extensions)

    @guarded
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self._catalog.get(request.name, request.version)
        versions = [m.version for m in self._catalog.versions(request.name)]
        return model_metadata_message(model.spec, versions)

    @guarded
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self._catalog.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config_message(model))

    @guarded
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        models = self._catalog.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics_message(m) for m in models])

    # --- inference -----------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        wire: WireRequest | None = None
        result: InferenceResult | None = None
        try:
            wire = wire_request(request, context.invocation_metadata, self._shm_access)
            result = await self._handler.infer(wire, context.time_remaining())
            if object_elements(result.outputs) <= ELEMENTS_ON_LOOP:
                return encode_answer(result, wire)
            return await in_thread(encode_answer, result, wire)  # see offload.py
        except Exception as exc:
            code, message = status_of(exc, "ModelInfer")
        # gRPC keeps the abort's exception, whose traceback holds this frame, in a cycle with the call's
        # context until the garbage collector runs. So the abort comes after the except block (it does not
        # chain the error and its frames) and this frame lets go of the request first: the files of its
        # shared-memory regions close as soon as they are unregistered.
        wire = result = None
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of a stream run concurrently (so they batch); their answers come back in the order
        the requests came, each with its request's id and Triton's ``triton_final_response`` (true:
        every model here answers a request once)."""
        metadata = context.invocation_metadata

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                wire = wire_request(request, metadata, self._shm_access)
                result = await self._handler.infer(wire, None)
                if object_elements(result.outputs) <= ELEMENTS_ON_LOOP:
                    return _final(encode_answer(result, wire))
                return _final(await in_thread(encode_answer, result, wire))
            except Exception as exc:
                _, message = status_of(exc, "ModelStreamInfer")
            return _final_error(request, message)

        answers = answer_concurrently(request_iterator, answer, STREAM_WINDOW, self._on_stream_pause, self._closing)
        try:
            async for response in answers:
                yield response
        except Exception as exc:  # the server drains (Unavailable), or a bug
            await abort_with(context, exc, "ModelStreamInfer")

    # --- repository extension: model control ----------------------------------------------

    @guarded
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        Row = pb.RepositoryIndexResponse.ModelIndex
        rows = self._catalog.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[Row(name=r.name, version=r.version, state=r.state, reason=r.reason) for r in rows]
        )

    @guarded
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._explicit_control("RepositoryModelLoad")
        # Every parameter is checked before anything is loaded or unloaded.
        override = parse_load_parameters(request.model_name, request.parameters)
        await self._control.load(request.model_name, override)
        return pb.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._explicit_control("RepositoryModelUnload")
        name = request.model_name
        if _unload_dependents(request):  # the ensembles that run it first, as Triton's unload_dependents
            for ensemble in self._catalog.dependents(name):
                await self._control.unload(ensemble)
        await self._control.unload(name)
        return pb.RepositoryModelUnloadResponse()

    def _explicit_control(self, method: str) -> None:
        if self._control_mode != "explicit":
            raise FailedPrecondition(
                f"{method}: models are loaded and unloaded through the API only in explicit model control mode"
                f" (this server runs in {self._control_mode!r} mode; start it with --model-control-mode explicit)"
            )

    # --- system shared memory (serving/shared_memory.py) -----------------------------------

    def _registry(self, method: str) -> SystemSharedMemory:
        if self._shared_memory is None:
            raise Unimplemented(
                f"{method}: the {SYSTEM_SHARED_MEMORY} extension is off on this infergate {__version__} server "
                "(start it with --allow-client-shm, or set shared_memory.system.enabled in its config)"
            )
        return self._shared_memory

    @guarded
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        Status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        regions = self._registry("SystemSharedMemoryStatus").status(request.name)
        return pb.SystemSharedMemoryStatusResponse(
            regions={r.name: Status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size) for r in regions}
        )

    @guarded
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        registry = self._registry("SystemSharedMemoryRegister")
        registry.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @guarded
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._registry("SystemSharedMemoryUnregister").unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # --- CUDA shared memory: nothing can be registered --------------------------------------

    @guarded
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise NotFound(
                f"Unable to find cuda shared memory region: '{request.name}' (infergate {__version__} "
                "does not implement the cuda_shared_memory extension: no CUDA region is ever registered)"
            )
        return pb.CudaSharedMemoryStatusResponse()

    @guarded
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()  # none registered: nothing to do, as in Triton

    # --- extensions infergate does not implement ---------------------------------------

    @guarded
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise _not_implemented("CudaSharedMemoryRegister", self._extensions)

    @guarded
    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext
    ) -> pb.TraceSettingResponse:
        """Read which calls are traced, server-wide or for a model, or change it (serving/trace_settings.py)."""
        model = request.model_name
        if model:
            self._catalog.get(model, "")  # NotFound for a model that is not served
        traces = self._traces
        if request.settings:
            change = requested_trace_change(model, request.settings)
            if traces is None:
                raise FailedPrecondition(
                    "TraceSetting: this server runs without tracing; start it with --traces (telemetry.traces) "
                    "or OTEL_TRACES_EXPORTER=otlp to change what is traced"
                )
            await traces.change(change)
            log.info("trace settings changed for %s: %s", model or "the server", trace_settings_line(change))
        return trace_settings_message(traces.rule(model) if traces is not None else TRACING_OFF)

    @guarded
    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogSettingsResponse:
        """Read the log settings, or change the ones named, all or none (serving/log_settings.py)."""
        if self._logs is None:
            raise FailedPrecondition(
                f"LogSettings: the {LOGGING} extension is off: this server is embedded in a program "
                "that owns its process's logging"
            )
        if request.settings:
            change = requested_log_settings(self._logs.current, request.settings)
            await self._logs.change(change)
            log.info("log settings changed: %s", log_settings_line(change))
        return log_settings_message(self._logs.current)


# Triton's response parameter on every streamed response: true on a request's last (here its only) one.
_FINAL = pb.ModelStreamInferResponse()
_FINAL.infer_response.parameters["triton_final_response"].bool_param = True


def _final(answer: pb.ModelInferResponse) -> pb.ModelStreamInferResponse:
    """``answer`` as a stream's response, flagged final. Copying the flag from a response built once and
    merging the answer in took about half the time of setting the map entry on each response, in a
    timing of the two on this function alone (0.2-0.6 µs a response); never modify _FINAL."""
    response = pb.ModelStreamInferResponse()
    response.CopyFrom(_FINAL)
    response.infer_response.MergeFrom(answer)
    return response


def _final_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """As Triton answers a failed inference: the message, which request failed, and that it was its last answer."""
    response = pb.ModelStreamInferResponse()
    response.CopyFrom(_FINAL)
    response.error_message = message
    echo = response.infer_response
    echo.model_name, echo.model_version, echo.id = request.model_name, request.model_version, request.id
    return response


def _unload_dependents(request: pb.RepositoryModelUnloadRequest) -> bool:
    """RepositoryModelUnload's ``unload_dependents`` parameter (tritonclient's ``unload_dependents=True``)."""
    parameters = request.parameters
    if "unload_dependents" not in parameters:
        return False
    given = parameters["unload_dependents"]
    if given.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument("RepositoryModelUnload: the 'unload_dependents' parameter must be a bool")
    return given.bool_param


def _not_implemented(method: str, extensions: tuple[str, ...]) -> Unimplemented:
    """``extensions``: this server's, as ServerMetadata lists them."""
    return Unimplemented(
        f"{method}: the {NOT_IMPLEMENTED[method]} extension is not implemented in infergate {__version__} "
        f"(ServerMetadata lists the extensions it implements: {', '.join(extensions)})"
    )
