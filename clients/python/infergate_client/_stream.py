"""The request side of ``stream_infer``, shared by both clients: the caller's requests as messages.

gRPC reads the request iterable in its own thread (or task). An exception there
is not the caller's to see: the blocking client reports "UNKNOWN: Exception
iterating requests!" and the asyncio one a bare ``CancelledError``. So the
messages here end instead (a half-close: the server answers every request sent
before) and keep the exception in ``error``, which ``stream_infer`` raises once
those replies are out.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

from ._codec import InferRequest, build_infer_request
from ._proto import grpc_service_pb2 as pb

__all__ = ["Outgoing"]


class Outgoing:
    """One stream's request messages; ``error`` is what ended them early, if anything.

    A request that cannot be encoded gives ``InvalidArgument`` (``code`` None, the
    original error as ``__cause__``); an exception of the caller's iterable is kept
    as it is. Only ``Exception`` is caught: a cancellation still cancels.
    """

    def __init__(self) -> None:
        self.error: Exception | None = None

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _encode(self, request: InferRequest) -> pb.ModelInferRequest | None:
        try:
            return build_infer_request(request)
        except Exception as exc:
            self.error = exc
            return None

    def messages(self, requests: Iterable[InferRequest]) -> Iterator[pb.ModelInferRequest]:
        try:
            iterator = iter(requests)
        except Exception as exc:
            self.error = exc
            return
        while True:
            try:
                request = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                self.error = exc
                return
            message = self._encode(request)
            if message is None:
                return
            yield message

    async def async_messages(
        self, requests: AsyncIterable[InferRequest] | Iterable[InferRequest]
    ) -> AsyncIterator[pb.ModelInferRequest]:
        if not isinstance(requests, AsyncIterable):
            for encoded in self.messages(requests):
                yield encoded
            return
        iterator = aiter(requests)
        while True:
            try:
                request = await anext(iterator)
            except StopAsyncIteration:
                return
            except Exception as exc:
                self.error = exc
                return
            message = self._encode(request)
            if message is None:
                return
            yield message
