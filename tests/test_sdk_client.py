"""The Python SDK against a real infergate server: both clients, every demo model, errors, deadlines, streams.

Every test runs with the blocking ``Client`` and the asyncio ``AsyncClient``
(the ``sdk`` fixture awaits whatever the client returns), because both must
behave the same. Expected outputs come from onnxruntime run in this process on
the same model files.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import ServerProcess, running_server
from models import build_slow_model, save_model

from infergate.demo import build_matmul16
from infergate_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InferenceFailed,
    InferRequest,
    InvalidArgument,
    NotFound,
    RetryPolicy,
)

DEMO_MODELS = ["matmul16", "mlp", "cnn", "multi_io", "identity_all"]


class EitherClient:
    """``Client`` or ``AsyncClient``; every method is awaited, streams are collected into lists."""

    def __init__(self, flavour: str, url: str, **kwargs: Any) -> None:
        self.flavour = flavour
        self.raw: Any = (Client if flavour == "sync" else AsyncClient)(url, **kwargs)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.raw, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if name == "stream_infer":
                return [r async for r in result] if self.flavour == "aio" else list(result)
            return await result if inspect.isawaitable(result) else result

        return call


@pytest.fixture(params=["sync", "aio"])
async def sdk(request: pytest.FixtureRequest, demo_server: ServerProcess) -> AsyncIterator[EitherClient]:
    client = EitherClient(request.param, demo_server.url)
    try:
        yield client
    finally:
        await client.close()


def _random(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        return np.array([f"w{n}" for n in rng.integers(0, 100, int(np.prod(shape)))], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return rng.random(shape) < 0.5
    dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(datatype)
    if dtype is not None:
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(datatype.lower())


def _expected(repository: Path, model: str, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: v.astype(str) if v.dtype == object else v for k, v in inputs.items()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.mark.parametrize("model", DEMO_MODELS)
async def test_every_demo_model_answers_what_onnxruntime_computes(
    sdk: EitherClient, demo_repository: Path, model: str
) -> None:
    metadata = await sdk.model_metadata(model)
    rng = np.random.default_rng(7)
    inputs = {t.name: _random(t.datatype, tuple(2 if d < 0 else d for d in t.shape), rng) for t in metadata.inputs}
    result = await sdk.infer(model, inputs)
    expected = _expected(demo_repository, model, inputs)
    assert sorted(result) == sorted(expected)
    for name, want in expected.items():
        got = result[name]
        if want.dtype == object:
            assert [b.decode() for b in got.reshape(-1)] == list(want.reshape(-1))
        else:
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert result.model_name == model and result.model_version == "1"


async def test_requested_outputs_request_id_and_explicit_version(sdk: EitherClient) -> None:
    inputs = {"a": np.ones((1, 4), np.float32), "b": np.arange(4).reshape(1, 4), "flag": np.array([[True]])}
    inputs["text"] = np.array([["x", "y"]], dtype=object)
    result = await sdk.infer(
        "multi_io", inputs, outputs=["doubled"], request_id="req-7", model_version=1, parameters={"note": "hi"}
    )
    assert list(result) == ["doubled"] and result["doubled"].tolist() == [[0, 2, 4, 6]]
    assert result.request_id == "req-7" and result.model_version == "1"


async def test_health_metadata_config_and_statistics(sdk: EitherClient) -> None:
    assert await sdk.is_server_live() and await sdk.is_server_ready()
    assert await sdk.is_model_ready("matmul16") and not await sdk.is_model_ready("nope")
    server = await sdk.server_metadata()
    assert server.name == "infergate" and "statistics" in server.extensions
    meta = await sdk.model_metadata("matmul16")
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("x", "FP32", (-1, 16))]
    config = await sdk.model_config("matmul16")
    assert config.name == "matmul16" and config.max_batch_size == 64
    await sdk.infer("matmul16", {"x": np.zeros((1, 16), np.float32)})
    stats = await sdk.model_statistics("matmul16")
    assert stats.model_stats[0].inference_stats.success.count > 0


@pytest.mark.parametrize(
    ("model", "inputs", "kind", "message"),
    [
        ("matmul16", {"x": np.zeros((1, 3), np.float32)}, InvalidArgument, "expected \\[-1, 16\\]"),
        ("matmul16", {"x": np.zeros((1, 16), np.float64)}, InvalidArgument, "FP64"),
        ("nope", {"x": np.zeros(1)}, NotFound, "Request for unknown model: 'nope' is not found"),
    ],
)
async def test_server_errors_become_the_sdk_exceptions(
    demo_server: ServerProcess, flavour: str, model: str, inputs: dict[str, Any], kind: type[Exception], message: str
) -> None:
    retries: list[int] = []
    client = EitherClient(flavour, demo_server.url, retry=RetryPolicy(on_retry=lambda n, e: retries.append(n)))
    try:
        with pytest.raises(kind, match=message) as caught:
            await client.infer(model, inputs)
    finally:
        await client.close()
    assert isinstance(caught.value.__cause__, grpc.RpcError)  # the original error is kept
    assert retries == []  # only UNAVAILABLE is retried


@pytest.fixture(params=["sync", "aio"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Any:
    repository = tmp_path_factory.mktemp("slow-repo")
    save_model(build_slow_model(2000), repository, "slow")
    with running_server(repository, log_dir) as server:
        yield server


async def test_a_call_past_its_deadline_raises_deadline_exceeded_and_is_not_retried(
    slow_server: ServerProcess, flavour: str
) -> None:
    retries: list[int] = []
    client = EitherClient(flavour, slow_server.url, retry=RetryPolicy(on_retry=lambda n, e: retries.append(n)))
    try:
        with pytest.raises(DeadlineExceeded):
            await client.infer("slow", {"x": np.zeros((1, 4), np.float32)}, timeout=0.2)
    finally:
        await client.close()
    assert retries == []


def _stream_requests(count: int) -> list[InferRequest]:
    return [InferRequest("matmul16", {"x": np.full((1, 16), i, np.float32)}, request_id=f"r{i}") for i in range(count)]


async def test_streaming_answers_every_request_by_id(sdk: EitherClient) -> None:
    results = await sdk.stream_infer(_stream_requests(6))
    by_id = {r.request_id: r["y"] for r in results}
    assert sorted(by_id) == [f"r{i}" for i in range(6)]
    one = (await sdk.infer("matmul16", {"x": np.ones((1, 16), np.float32)}))["y"]
    np.testing.assert_allclose(by_id["r3"], 3 * one, rtol=1e-5)


async def test_a_failed_request_in_a_stream_raises_inference_failed(sdk: EitherClient) -> None:
    requests = [InferRequest("matmul16", {"x": np.zeros((1, 3), np.float32)}, request_id="bad")]
    with pytest.raises(InferenceFailed, match="expected \\[-1, 16\\]") as caught:
        await sdk.stream_infer(requests)
    assert caught.value.request_id == "bad"


async def test_round_robin_spreads_calls_over_two_real_servers(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, flavour: str
) -> None:
    repository = tmp_path_factory.mktemp("rr-repo")
    save_model(build_matmul16(), repository, "matmul16")
    with running_server(repository, log_dir) as first, running_server(repository, log_dir) as second:
        client = EitherClient(flavour, [first.url, second.url])
        try:
            served = [0, 0]
            for _ in range(200):  # until both have answered: the policy connects to both
                await client.infer("matmul16", {"x": np.ones((1, 16), np.float32)})
                served = [await _served(server) for server in (first, second)]
                if all(served):
                    break
            assert all(served), f"calls per server: {served}"
        finally:
            await client.close()


async def _served(server: ServerProcess) -> int:
    with Client(server.url) as direct:
        return int(direct.model_statistics("matmul16").model_stats[0].inference_stats.success.count)


# --------------------------------------------------------------------------- errors found before sending


def _matmul(i: int) -> InferRequest:
    return InferRequest("matmul16", {"x": np.full((1, 16), i, np.float32)}, request_id=f"r{i}")


async def _stream_until_error(client: EitherClient, requests: Any) -> tuple[list[str], BaseException | None]:
    """The request ids answered before the stream raised, and what it raised (``None`` if it did not)."""
    answered: list[str] = []
    try:
        if client.flavour == "aio":
            async for result in client.raw.stream_infer(requests):
                answered.append(result.request_id)
        else:
            for result in client.raw.stream_infer(requests):
                answered.append(result.request_id)
    except BaseException as exc:  # a CancelledError too: it must not be what the caller sees
        return answered, exc
    return answered, None


async def test_a_stream_request_that_cannot_be_encoded_raises_invalid_argument_after_the_earlier_replies(
    demo_server: ServerProcess, flavour: str
) -> None:
    bad = InferRequest("matmul16", {"x": np.zeros((1, 16), np.complex64)}, request_id="bad")
    client = EitherClient(flavour, demo_server.url)
    try:
        answered, error = await _stream_until_error(client, [_matmul(0), _matmul(1), bad, _matmul(3)])
    finally:
        await client.close()
    assert isinstance(error, InvalidArgument), repr(error)
    assert error.code is None and "complex64" in error.details
    assert isinstance(error.__cause__, TypeError)
    assert answered == ["r0", "r1"]  # what was sent before the bad request is answered; nothing after it


async def test_a_request_iterable_that_raises_ends_the_stream_with_its_own_error(
    demo_server: ServerProcess, flavour: str
) -> None:
    def source() -> Iterator[InferRequest]:
        yield _matmul(0)
        raise RuntimeError("the request source failed")

    async def async_source() -> AsyncIterator[InferRequest]:
        for request in source():
            yield request

    client = EitherClient(flavour, demo_server.url)
    try:
        seen = [await _stream_until_error(client, source())]
        if flavour == "aio":
            seen.append(await _stream_until_error(client, async_source()))
    finally:
        await client.close()
    for answered, error in seen:
        assert type(error) is RuntimeError and str(error) == "the request source failed", repr(error)
        assert answered == ["r0"]


@pytest.mark.parametrize(
    ("inputs", "parameters", "message", "cause"),
    [
        ({"x": np.zeros((1, 16), np.complex64)}, {}, "numpy dtype complex64 has no", TypeError),
        ({}, {}, "needs at least one input", ValueError),
        ({"x": np.zeros((1, 16), np.float32)}, {"p": np.int64(3)}, "'p': int64 is not bool", TypeError),
    ],
)
async def test_a_request_that_cannot_be_encoded_raises_invalid_argument_without_a_code(
    demo_server: ServerProcess,
    flavour: str,
    inputs: dict[str, Any],
    parameters: dict[str, Any],
    message: str,
    cause: type[Exception] | None,
) -> None:
    client = EitherClient(flavour, demo_server.url)
    try:
        with pytest.raises(InvalidArgument, match=message) as caught:
            await client.infer("matmul16", inputs, parameters=parameters)
    finally:
        await client.close()
    assert caught.value.code is None  # the SDK refused it: nothing was sent
    assert str(caught.value).startswith("InvalidArgument: infer('matmul16'")
    assert (type(caught.value.__cause__) if cause else caught.value.__cause__) == cause
