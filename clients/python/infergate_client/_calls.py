"""Each unary RPC as a pure description: method name, request message, reply decoder.

Both clients run these through their own transport (blocking or asyncio), so
request building and reply decoding exist once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._codec import InferRequest, InferResult, build_infer_request, decode_infer_response
from ._proto import grpc_service_pb2 as pb
from ._proto import model_config_pb2 as mc

__all__ = [
    "Call",
    "ModelIndex",
    "ModelMetadata",
    "ServerMetadata",
    "TensorMetadata",
    "infer",
    "load_model",
    "model_config",
    "model_metadata",
    "model_ready",
    "model_statistics",
    "repository_index",
    "server_live",
    "server_metadata",
    "server_ready",
    "unload_model",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One unary call: ``method`` of GRPCInferenceService, its request, and how to read the reply."""

    method: str
    request: Any
    decode: Callable[[Any], T]


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a variable dimension


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class ModelIndex:
    name: str
    version: str
    state: str
    reason: str


def _version(version: str | int | None) -> str:
    return "" if version is None else str(version)


def server_live() -> Call[bool]:
    return Call("ServerLive", pb.ServerLiveRequest(), lambda r: bool(r.live))


def server_ready() -> Call[bool]:
    return Call("ServerReady", pb.ServerReadyRequest(), lambda r: bool(r.ready))


def model_ready(name: str, version: str | int | None = None) -> Call[bool]:
    return Call("ModelReady", pb.ModelReadyRequest(name=name, version=_version(version)), lambda r: bool(r.ready))


def server_metadata() -> Call[ServerMetadata]:
    return Call(
        "ServerMetadata",
        pb.ServerMetadataRequest(),
        lambda r: ServerMetadata(r.name, r.version, tuple(r.extensions)),
    )


def _tensors(items: Any) -> tuple[TensorMetadata, ...]:
    return tuple(TensorMetadata(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in items)


def _model_metadata(reply: pb.ModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        reply.name, tuple(reply.versions), reply.platform, _tensors(reply.inputs), _tensors(reply.outputs)
    )


def model_metadata(name: str, version: str | int | None = None) -> Call[ModelMetadata]:
    return Call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=_version(version)), _model_metadata)


def model_config(name: str, version: str | int | None = None) -> Call[mc.ModelConfig]:
    """The reply is the protocol's ``ModelConfig`` message, as Triton defines it."""
    return Call("ModelConfig", pb.ModelConfigRequest(name=name, version=_version(version)), lambda r: r.config)


def model_statistics(name: str = "", version: str | int | None = None) -> Call[pb.ModelStatisticsResponse]:
    """Every model's statistics when ``name`` is empty; the reply is the protocol's message."""
    return Call("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=_version(version)), lambda r: r)


def repository_index(ready_only: bool = False) -> Call[list[ModelIndex]]:
    return Call(
        "RepositoryIndex",
        pb.RepositoryIndexRequest(ready=ready_only),
        lambda r: [ModelIndex(m.name, m.version, m.state, m.reason) for m in r.models],
    )


def load_model(name: str) -> Call[None]:
    return Call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name), lambda r: None)


def unload_model(name: str) -> Call[None]:
    return Call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name), lambda r: None)


def infer(request: InferRequest) -> Call[InferResult]:
    return Call("ModelInfer", build_infer_request(request), decode_infer_response)
