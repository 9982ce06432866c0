"""The blocking client. Requests and replies come from ``_calls``; retries from ``_base``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from . import _calls as calls
from ._base import ClientBase, Metadata
from ._codec import Array, InferRequest, InferResult, ParameterValue, decode_stream_reply
from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc
from ._proto import model_config_pb2 as mc
from ._stream import Outgoing
from .errors import from_rpc_error

__all__ = ["Client"]

T = TypeVar("T")


class Client(ClientBase):
    """A blocking client; one channel, safe to share between threads. Arguments: see ``ClientBase``.

    >>> with Client("127.0.0.1:8001") as client:
    ...     client.infer("mlp", {"x": x})["y"]
    """

    def _open_channel(self) -> None:
        credentials = self._credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=self._options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _unary(self, call: calls.Call[T], timeout: float | None, metadata: Metadata | None) -> T:
        deadline = self._deadline(timeout)
        method = getattr(self._stub, call.method)
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = method(
                    call.request,
                    timeout=max(0.0, deadline - time.monotonic()),
                    metadata=self._call_metadata(metadata),
                )
            except grpc.RpcError as exc:
                delay = self._retry_delay(exc, attempt, deadline)
                if delay is None:
                    raise from_rpc_error(exc) from exc
                time.sleep(delay)
                continue
            result: T = self._succeeded(call, reply)
            return result

    # -- health and metadata --------------------------------------------------------------

    def is_server_live(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> bool:
        return self._unary(calls.server_live(), timeout, metadata)

    def is_server_ready(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> bool:
        return self._unary(calls.server_ready(), timeout, metadata)

    def is_model_ready(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bool:  # fmt: skip
        return self._unary(calls.model_ready(model, version), timeout, metadata)

    def server_metadata(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> calls.ServerMetadata:
        return self._unary(calls.server_metadata(), timeout, metadata)

    def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> calls.ModelMetadata:  # fmt: skip
        return self._unary(calls.model_metadata(model, version), timeout, metadata)

    def model_config(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> mc.ModelConfig:  # fmt: skip
        return self._unary(calls.model_config(model, version), timeout, metadata)

    def model_statistics(
        self, model: str = "", version: str | int | None = None, *, timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.ModelStatisticsResponse:  # fmt: skip
        return self._unary(calls.model_statistics(model, version), timeout, metadata)

    # -- repository ------------------------------------------------------------------------

    def repository_index(
        self, ready_only: bool = False, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> list[calls.ModelIndex]:
        return self._unary(calls.repository_index(ready_only), timeout, metadata)

    def load_model(self, model: str, *, timeout: float | None = None, metadata: Metadata | None = None) -> None:
        self._unary(calls.load_model(model), timeout, metadata)

    def unload_model(self, model: str, *, timeout: float | None = None, metadata: Metadata | None = None) -> None:
        self._unary(calls.unload_model(model), timeout, metadata)

    # -- inference -------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Array],
        *,
        outputs: Sequence[str] = (),
        request_id: str = "",
        parameters: Mapping[str, ParameterValue] | None = None,
        model_version: str | int | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> InferResult:
        """Run ``model`` on ``inputs`` (numpy arrays by name); returns its outputs by name.

        ``outputs`` asks for some outputs only; the result also carries
        ``model_version``, ``request_id`` and ``parameters`` of the reply.
        """
        request = InferRequest(model, inputs, outputs, request_id, parameters or {}, model_version)
        return self._unary(calls.infer(request), timeout, metadata)

    def stream_infer(
        self, requests: Iterable[InferRequest], *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Iterator[InferResult]:
        """Send ``requests`` on one ModelStreamInfer stream; yields results as they arrive.

        An infergate server answers in the order the requests were sent (a Triton
        server too, for a model that is not decoupled); each reply carries its
        request's ``request_id``. A failed request raises ``InferenceFailed`` and
        ends the stream. A request that cannot be encoded, or an exception from
        ``requests`` itself, ends what is sent: the requests before it are answered,
        then it is raised (``InvalidArgument`` with ``code`` None, or the iterable's
        own exception). Streams are not retried; ``timeout`` covers the whole stream.
        """
        deadline = self._deadline(timeout)
        outgoing = Outgoing()
        replies = self._stub.ModelStreamInfer(
            outgoing.messages(requests),
            timeout=max(0.0, deadline - time.monotonic()),
            metadata=self._call_metadata(metadata),
        )
        try:
            for reply in replies:
                yield decode_stream_reply(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            replies.cancel()
        outgoing.raise_error()
