"""Python client for infergate and any Open Inference Protocol (KServe V2) gRPC server.

numpy in, numpy out::

    from infergate_client import Client

    with Client("127.0.0.1:8001") as client:
        outputs = client.infer("mlp", {"x": x})   # {"y": array}

``AsyncClient`` offers the same calls as coroutines, and ``stream_infer`` as an
async iterator. Errors are the exceptions of ``infergate_client.errors``.
"""

from ._calls import ModelIndex, ModelMetadata, ServerMetadata, TensorMetadata
from ._codec import InferRequest, InferResult, datatype_of
from .aio import AsyncClient
from .client import Client
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InferenceFailed,
    InferGateError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .options import Keepalive, RefreshingToken, RetryBudget, RetryPolicy, Tls

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "InferGateError",
    "InferRequest",
    "InferResult",
    "InferenceFailed",
    "InvalidArgument",
    "Keepalive",
    "ModelIndex",
    "ModelMetadata",
    "NotFound",
    "PermissionDenied",
    "RefreshingToken",
    "ResourceExhausted",
    "RetryBudget",
    "RetryPolicy",
    "ServerError",
    "ServerMetadata",
    "TensorMetadata",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "datatype_of",
]
