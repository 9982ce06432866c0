"""The asyncio client: ``Client``'s calls as coroutines. Requests and replies come from ``_calls``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
import grpc.aio

from . import _calls as calls
from ._base import ClientBase, Metadata
from ._codec import Array, InferRequest, InferResult, ParameterValue, decode_stream_reply
from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc
from ._proto import model_config_pb2 as mc
from ._stream import Outgoing
from .errors import from_rpc_error

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient(ClientBase):
    """An asyncio client; create and use it on one event loop. Arguments: see ``ClientBase``.

    >>> async with AsyncClient("127.0.0.1:8001") as client:
    ...     (await client.infer("mlp", {"x": x}))["y"]
    """

    def _open_channel(self) -> None:
        credentials = self._credentials()
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, credentials, options=self._options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def _metadata_for_call(self, metadata: Metadata | None) -> list[tuple[str, str]]:
        if self._token_needs_thread():  # a token fetch may block: keep it off the event loop
            return await asyncio.to_thread(self._call_metadata, metadata)
        return self._call_metadata(metadata)

    async def _unary(self, call: calls.Call[T], timeout: float | None, metadata: Metadata | None) -> T:
        deadline = self._deadline(timeout)
        method = getattr(self._stub, call.method)
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await method(
                    call.request,
                    timeout=max(0.0, deadline - time.monotonic()),
                    metadata=await self._metadata_for_call(metadata),
                )
            except grpc.RpcError as exc:
                delay = self._retry_delay(exc, attempt, deadline)
                if delay is None:
                    raise from_rpc_error(exc) from exc
                await asyncio.sleep(delay)
                continue
            result: T = self._succeeded(call, reply)
            return result

    # -- health and metadata --------------------------------------------------------------

    async def is_server_live(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> bool:
        return await self._unary(calls.server_live(), timeout, metadata)

    async def is_server_ready(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> bool:
        return await self._unary(calls.server_ready(), timeout, metadata)

    async def is_model_ready(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bool:  # fmt: skip
        return await self._unary(calls.model_ready(model, version), timeout, metadata)

    async def server_metadata(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> calls.ServerMetadata:
        return await self._unary(calls.server_metadata(), timeout, metadata)

    async def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> calls.ModelMetadata:  # fmt: skip
        return await self._unary(calls.model_metadata(model, version), timeout, metadata)

    async def model_config(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> mc.ModelConfig:  # fmt: skip
        return await self._unary(calls.model_config(model, version), timeout, metadata)

    async def model_statistics(
        self, model: str = "", version: str | int | None = None, *, timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.ModelStatisticsResponse:  # fmt: skip
        return await self._unary(calls.model_statistics(model, version), timeout, metadata)

    # -- repository ------------------------------------------------------------------------

    async def repository_index(
        self, ready_only: bool = False, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> list[calls.ModelIndex]:
        return await self._unary(calls.repository_index(ready_only), timeout, metadata)

    async def load_model(self, model: str, *, timeout: float | None = None, metadata: Metadata | None = None) -> None:
        await self._unary(calls.load_model(model), timeout, metadata)

    async def unload_model(self, model: str, *, timeout: float | None = None, metadata: Metadata | None = None) -> None:
        await self._unary(calls.unload_model(model), timeout, metadata)

    # -- inference -------------------------------------------------------------------------

    async def infer(
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
        """Run ``model`` on ``inputs``; see ``Client.infer``."""
        request = InferRequest(model, inputs, outputs, request_id, parameters or {}, model_version)
        return await self._unary(calls.infer(request), timeout, metadata)

    async def stream_infer(
        self,
        requests: AsyncIterable[InferRequest] | Iterable[InferRequest],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[InferResult]:
        """Send ``requests`` on one ModelStreamInfer stream; an async iterator of results.

        The same contract as ``Client.stream_infer``: replies in the requests' order,
        a failed request raises ``InferenceFailed``, a request that cannot be encoded
        (or an exception from ``requests``) is raised after the replies to the
        requests before it, streams are not retried.
        """
        deadline = self._deadline(timeout)
        outgoing = Outgoing()
        stream = self._stub.ModelStreamInfer(
            outgoing.async_messages(requests),
            timeout=max(0.0, deadline - time.monotonic()),
            metadata=await self._metadata_for_call(metadata),
        )
        try:
            async for reply in stream:
                yield decode_stream_reply(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            stream.cancel()
        outgoing.raise_error()
