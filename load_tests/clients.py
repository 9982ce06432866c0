"""The two ways the generator sends ModelInfer, and the ModelMetadata look-up.

Both clients expose the same two coroutines: ``first()`` sends one request and
returns the parsed reply (for validation), ``send()`` sends one request and
discards the reply. Every failed call raises :class:`CallFailed` with the gRPC
status code name, so the generator counts errors the same way for both.

- :class:`RawClient` serialises one ModelInferRequest once and sends those bytes
  on a plain grpc.aio channel with no serializer/deserializer: the cheapest
  possible Python client, so the server is what gets measured.
- :class:`TritonClient` goes through ``tritonclient.grpc.aio`` and builds
  ``InferInput`` objects with ``set_data_from_numpy`` on every call: what a
  realistic Python client costs.
- :class:`SdkClient` goes through this repository's ``infergate_client.AsyncClient``
  (numpy in, numpy out, retries off so every failure is counted): what the SDK costs.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate_client import AsyncClient, InferGateError, RetryPolicy, datatype_of

from .payloads import Array, build_infer_request, tensor_bytes
from .signature import ModelSignature, signature_from_metadata

__all__ = [
    "CHANNEL_OPTIONS",
    "OWN_CONNECTION",
    "CallFailed",
    "Client",
    "RawClient",
    "SdkClient",
    "TritonClient",
    "auth_metadata",
    "fetch_signature",
    "open_client",
]

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]
# A channel with its own subchannel pool opens its own TCP connection instead of sharing this process's,
# so the kernel may hand it to another worker of a --workers N server.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


class CallFailed(Exception):
    """One ModelInfer call failed; ``code`` is the gRPC status code name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class Client(Protocol):
    """What the generator needs from a client."""

    async def first(self) -> pb.ModelInferResponse: ...
    async def send(self) -> None: ...
    async def close(self) -> None: ...


Metadata = tuple[tuple[str, str], ...]


def auth_metadata(token: str) -> Metadata:
    """``authorization: Bearer TOKEN`` for a non-empty token, else nothing."""
    return (("authorization", f"Bearer {token}"),) if token else ()


async def fetch_signature(target: str, model: str, deadline_s: float, metadata: Metadata = ()) -> ModelSignature:
    """Ask ``target`` for the metadata of ``model``; raises CallFailed on an RPC error."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            request = pb.ModelMetadataRequest(name=model)
            reply = await stub.ModelMetadata(request, timeout=deadline_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from None
    return signature_from_metadata(reply)


class RawClient:
    """Sends one pre-serialised request's bytes; replies stay unparsed. ``timeout`` None: no per-call deadline."""

    def __init__(
        self,
        target: str,
        signature: ModelSignature,
        arrays: dict[str, Array],
        timeout: float | None,
        metadata: Metadata = (),
        own_connection: bool = False,
    ) -> None:
        self._payload = build_infer_request(signature, arrays).SerializeToString()
        self._timeout = timeout
        self._metadata = metadata or None
        options = [*CHANNEL_OPTIONS, OWN_CONNECTION] if own_connection else CHANNEL_OPTIONS
        self._channel = grpc.aio.insecure_channel(target, options=options)
        self._call = self._channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)

    async def first(self) -> pb.ModelInferResponse:
        try:
            reply = await self._call(self._payload, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from None
        return pb.ModelInferResponse.FromString(reply)

    async def send(self) -> None:
        # The hot path: no extra coroutine layer, no parsing.
        try:
            await self._call(self._payload, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from None

    async def close(self) -> None:
        await self._channel.close()


class TritonClient:
    """Sends through ``tritonclient.grpc.aio``, building its inputs on every call."""

    def __init__(
        self,
        target: str,
        signature: ModelSignature,
        arrays: dict[str, Array],
        timeout: float | None,
        metadata: Metadata = (),
    ) -> None:
        from tritonclient.grpc import aio as triton_aio  # type: ignore[import-untyped,unused-ignore]

        self._triton = triton_aio
        self._client = triton_aio.InferenceServerClient(target)
        self._model = signature.name
        self._tensors = [(spec.datatype, spec.name, arrays[spec.name]) for spec in signature.inputs]
        self._timeout = timeout
        self._headers = dict(metadata) or None

    async def _infer(self) -> Any:
        inputs = []
        for datatype, name, array in self._tensors:
            tensor = self._triton.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            return await self._client.infer(self._model, inputs, client_timeout=self._timeout, headers=self._headers)
        except self._triton.InferenceServerException as exc:
            code = str(exc.status() or "UNKNOWN").removeprefix("StatusCode.")
            raise CallFailed(code, exc.message() or "") from None

    async def first(self) -> pb.ModelInferResponse:
        result = await self._infer()
        # tritonclient has its own generated classes; re-read the bytes as ours.
        return pb.ModelInferResponse.FromString(result.get_response().SerializeToString())

    async def send(self) -> None:
        await self._infer()

    async def close(self) -> None:
        await self._client.close()


class SdkClient:
    """Sends through ``infergate_client.AsyncClient``, encoding inputs and decoding outputs on every call.

    The SDK always sends a deadline: ``timeout`` None falls back to its default.
    """

    def __init__(
        self,
        target: str,
        signature: ModelSignature,
        arrays: dict[str, Array],
        timeout: float | None,
        metadata: Metadata = (),
    ) -> None:
        retry = RetryPolicy(max_attempts=1)
        self._client = (
            AsyncClient(target, metadata=metadata, retry=retry)
            if timeout is None
            else AsyncClient(target, timeout=timeout, metadata=metadata, retry=retry)
        )
        self._model = signature.name
        self._arrays = arrays

    async def _infer(self) -> dict[str, Array]:
        try:
            return await self._client.infer(self._model, self._arrays)
        except InferGateError as exc:
            raise CallFailed(exc.code.name if exc.code else "UNKNOWN", exc.details) from None

    async def first(self) -> pb.ModelInferResponse:
        # Re-encode what the SDK decoded, so the reply check also covers the SDK's decoding.
        reply = pb.ModelInferResponse(model_name=self._model)
        for name, array in (await self._infer()).items():
            datatype = datatype_of(array)
            reply.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            reply.raw_output_contents.append(tensor_bytes(datatype, array))
        return reply

    async def send(self) -> None:
        await self._infer()

    async def close(self) -> None:
        await self._client.close()


def open_client(
    kind: str,
    target: str,
    signature: ModelSignature,
    arrays: dict[str, Array],
    timeout: float | None,
    metadata: Metadata = (),
    own_connection: bool = False,
) -> Client:
    """A ``raw``, ``tritonclient`` or ``sdk`` client for ``signature``'s model at ``target``.

    ``own_connection``: a connection of its own, not shared with this process's other channels (raw only).
    """
    if kind == "raw":
        return RawClient(target, signature, arrays, timeout, metadata, own_connection)
    if own_connection:
        raise ValueError("only the raw client opens a connection of its own")
    if kind == "tritonclient":
        return TritonClient(target, signature, arrays, timeout, metadata)
    if kind == "sdk":
        return SdkClient(target, signature, arrays, timeout, metadata)
    raise ValueError(f"unknown client {kind!r}: use raw, tritonclient or sdk")
