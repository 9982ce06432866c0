"""Dynamic batching, seen from a client of a real server.

The batcher's own contract is specified in test_batcher.py with a controlled
clock; these tests show the same guarantees end to end over gRPC, on models
built for the purpose (tests/models.py): a slow model whose batches take a
while to run, so requests pile up behind it, and a model that fails at run
time on an out-of-range index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess, eventually, running_server
from models import build_gather_model, build_slow_model, save_model
from onnx import TensorProto, helper
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException


def _identity_variable_model() -> onnx.ModelProto:
    """y = x for x FP32 [batch, n]: requests with different n must never share a batch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("batching-repo")
    window = "dynamic_batching: {max_queue_delay_microseconds: 300000}\n"
    save_model(build_slow_model(50), repo, "slow_batched", config_yaml="max_batch_size: 16\n" + window)
    # Runs a batch only when 8 rows wait (or after 10 s): requests stay queued until a test completes the batch,
    # so no scrape has to catch a window.
    held = "dynamic_batching: {max_queue_delay_microseconds: 10000000}\n"
    save_model(build_slow_model(50), repo, "held", config_yaml="max_batch_size: 8\n" + held)
    # A hint of 1000 runs for 0.5 s on a fast core: long enough for a scrape to see the first request running.
    # One instance (auto would give it two): what queues behind a running request is what these tests are about.
    save_model(
        build_slow_model(1000),
        repo,
        "slow_serial",
        config_yaml="max_batch_size: 1\ndynamic_batching: {max_queue_size: 2}\ninstance_group: {count: 1}\n",
    )
    save_model(build_gather_model(), repo, "gather", config_yaml="max_batch_size: 16\n" + window)
    save_model(build_gather_model(), repo, "gather_held", config_yaml="max_batch_size: 8\n" + held)
    save_model(_identity_variable_model(), repo, "identity", config_yaml="max_batch_size: 16\n" + window)
    with running_server(repo, log_dir, "--metrics-port", "0") as server:
        yield server


def _active(server: ServerProcess) -> float:
    return server.metric("infergate_requests_active", rpc_method="ModelInfer")


def _input(name: str, array: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


async def _infer(client: aioclient.InferenceServerClient, model: str, name: str, array: np.ndarray, **kw):  # type: ignore[no-untyped-def]
    datatype = "INT64" if array.dtype == np.int64 else "FP32"
    return await client.infer(model, [_input(name, array, datatype)], **kw)


async def _batch_sizes(client: aioclient.InferenceServerClient, model: str) -> dict[int, int]:
    stats = (await client.get_inference_statistics(model)).model_stats[0]
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


async def test_concurrent_requests_are_executed_together(batching_server: ServerProcess) -> None:
    async with aioclient.InferenceServerClient(batching_server.url) as client:
        inputs = [np.full((1, 4), i, dtype=np.float32) for i in range(8)]
        results = await asyncio.gather(*(_infer(client, "slow_batched", "x", x) for x in inputs))
        for x, result in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(result.as_numpy("y"), x)
        sizes = await _batch_sizes(client, "slow_batched")
    assert sum(size * count for size, count in sizes.items()) == 8
    assert max(sizes) > 1, f"no batching happened: {sizes}"


async def test_requests_with_different_inner_shapes_never_share_a_batch(batching_server: ServerProcess) -> None:
    async with aioclient.InferenceServerClient(batching_server.url) as client:
        inputs = [np.full((1, 3 if i % 2 else 5), i, dtype=np.float32) for i in range(8)]
        results = await asyncio.gather(*(_infer(client, "identity", "x", x) for x in inputs))
        for x, result in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(result.as_numpy("y"), x)
        stats = (await client.get_inference_statistics("identity")).model_stats[0]
    # Four rows of each width; every batch holds one width only, so no batch exceeds 4 rows.
    assert stats.inference_count == 8
    assert all(b.batch_size <= 4 for b in stats.batch_stats), stats.batch_stats


async def test_one_request_that_fails_at_run_time_does_not_fail_its_batch(batching_server: ServerProcess) -> None:
    async with aioclient.InferenceServerClient(batching_server.url) as client:
        indices = [np.array([[i]], dtype=np.int64) for i in range(7)] + [np.array([[100]], dtype=np.int64)]
        results = await asyncio.gather(
            *(_infer(client, "gather", "idx", idx) for idx in indices), return_exceptions=True
        )
    *good, bad = results
    for i, result in enumerate(good):
        assert not isinstance(result, BaseException), result
        np.testing.assert_array_equal(result.as_numpy("y"), [[float(i)]])
    assert isinstance(bad, InferenceServerException)
    assert bad.status() == "StatusCode.INTERNAL"
    assert "gather" in bad.message() and "failed to execute" in bad.message()


async def test_a_request_that_fails_in_its_batch_counts_as_a_failure_not_an_inference(
    batching_server: ServerProcess,
) -> None:
    """Eight requests in one batch (it runs only once 8 rows wait); one fails when run alone after it."""
    async with aioclient.InferenceServerClient(batching_server.url) as client:
        indices = [np.array([[i]], dtype=np.int64) for i in range(7)] + [np.array([[100]], dtype=np.int64)]
        results = await asyncio.gather(
            *(_infer(client, "gather_held", "idx", idx) for idx in indices), return_exceptions=True
        )
        assert [isinstance(r, InferenceServerException) for r in results] == [False] * 7 + [True]
        stats = (await client.get_inference_statistics("gather_held")).model_stats[0]
    assert stats.inference_count == 7  # Triton's: successful inferences only
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (7, 1)
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(7, 1)]


async def test_a_cancelled_caller_leaves_the_rest_of_its_batch_answered(batching_server: ServerProcess) -> None:
    async with aioclient.InferenceServerClient(batching_server.url) as client:
        inputs = [np.full((1, 4), 10 + i, dtype=np.float32) for i in range(8)]
        tasks = [asyncio.create_task(_infer(client, "held", "x", x)) for x in inputs[:6]]
        await eventually(lambda: batching_server.queued("held") == 6, "six requests queued")
        tasks[2].cancel()
        await eventually(lambda: _active(batching_server) == 5, "the server saw the cancellation")
        # Two more complete the batch of 8 rows (the cancelled one's included): it runs without it.
        tasks += [asyncio.create_task(_infer(client, "held", "x", x)) for x in inputs[6:]]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        for i in (0, 1, 3, 4, 5, 6, 7):
            np.testing.assert_array_equal(results[i].as_numpy("y"), inputs[i])
        sizes = await _batch_sizes(client, "held")
    assert sizes == {7: 1}, f"the cancelled request ran, or the batch split: {sizes}"


async def test_a_request_whose_deadline_passes_in_the_queue_is_never_executed(
    batching_server: ServerProcess,
) -> None:
    async with aioclient.InferenceServerClient(batching_server.url) as client:
        before = (await client.get_inference_statistics("slow_serial")).model_stats[0].execution_count
        x = np.ones((1, 4), dtype=np.float32)
        # The first request occupies the only instance for 0.5-1 s; the others wait behind it.
        first = asyncio.create_task(_infer(client, "slow_serial", "x", x))
        running = lambda: _active(batching_server) == 1 and batching_server.queued("slow_serial") == 0  # noqa: E731
        await eventually(running, "the first request running on the instance")
        grpc_deadline = _infer(client, "slow_serial", "x", x, client_timeout=0.05)
        timeout_param = _infer(client, "slow_serial", "x", x, timeout=50_000)  # microseconds
        outcomes = await asyncio.gather(grpc_deadline, timeout_param, return_exceptions=True)
        await first
        stats = (await client.get_inference_statistics("slow_serial")).model_stats[0]
    for outcome in outcomes:
        assert isinstance(outcome, InferenceServerException), outcome
        assert outcome.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "deadline" in outcomes[1].message().lower()
    assert stats.execution_count - before == 1, "an expired request was executed"


async def test_a_full_queue_refuses_at_once_and_the_others_complete(batching_server: ServerProcess) -> None:
    async with aioclient.InferenceServerClient(batching_server.url) as client:
        x = np.ones((1, 4), dtype=np.float32)
        outcomes = await asyncio.gather(
            *(_infer(client, "slow_serial", "x", x) for _ in range(6)), return_exceptions=True
        )
    refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    # One runs, two wait (max_queue_size 2): at least three of six are refused.
    assert len(refused) >= 3 and len(refused) + len(served) == 6
    for error in refused:
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert "queue full" in error.message()


async def test_requested_outputs_and_id_survive_batching(batching_server: ServerProcess) -> None:
    async with aioclient.InferenceServerClient(batching_server.url) as client:
        calls = [
            client.infer(
                "slow_batched",
                [_input("x", np.full((2, 4), i, dtype=np.float32), "FP32")],
                outputs=[InferRequestedOutput("y")],
                request_id=f"req-{i}",
            )
            for i in range(4)
        ]
        results = await asyncio.gather(*calls)
    for i, result in enumerate(results):
        assert result.get_response().id == f"req-{i}"
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((2, 4), i, dtype=np.float32))
