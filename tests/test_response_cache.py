"""Triton's response cache: a model with ``response_cache: {enable: true}`` answers a request it
has answered before without running it, and ModelStatistics and Triton's metrics count it as
Triton does (``cache_hit``/``cache_miss``; no execution, no inference counted for a hit).

Against a real server with tritonclient, except the cache's own bound and the digest, which
are read directly. The cache never answers for a version that a reload replaced, never
answers a request the model would refuse, and keeps at most ``response_cache.max_bytes``.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, running_server
from telemetry_support import observed_server
from tritonclient.utils import InferenceServerException

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.config import load_server_config
from infergate.configfile import ConfigError
from infergate.models.config import load_model_config
from infergate.models.response_cache import ResponseCache, request_digest
from tests.test_model_control import build_scale_model  # y = x * factor, x FP32 [batch, 4]

CACHED = "response_cache: {enable: true}\n"


def write_model(root: Path, name: str, factor: float, config: str = CACHED) -> None:
    """Version 1 of ``name`` (written aside, then renamed into place) and its config.yaml."""
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "config.yaml").write_text(config)
    staging = root / f".{name}-model.onnx"
    staging.write_bytes(build_scale_model(factor).SerializeToString())
    (root / name / "1").mkdir(exist_ok=True)
    os.replace(staging, root / name / "1" / "model.onnx")


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_model(root, "cached", 2.0)
    write_model(root, "plain", 2.0, config="max_batch_size: 8\n")
    return root


@pytest.fixture
def server(repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(repository, tmp_path, "--metrics-port", "0") as server:
        yield server


def infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray, **kwargs: object) -> np.ndarray:
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], **kwargs)  # type: ignore[arg-type]
    return result.as_numpy("y")  # type: ignore[no-any-return]


def statistics(client: grpcclient.InferenceServerClient, model: str) -> dict[str, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    inference = stats["inference_stats"]
    return {
        "hits": int(inference["cache_hit"].get("count", 0)),
        "misses": int(inference["cache_miss"].get("count", 0)),
        "successes": int(inference["success"].get("count", 0)),
        "queued": int(inference["queue"].get("count", 0)),  # Triton counts a hit here too
        "executions": int(stats.get("execution_count", 0)),
        "inferences": int(stats.get("inference_count", 0)),
    }


ONES = np.ones((1, 4), np.float32)
TWOS = np.full((1, 4), 2.0, np.float32)


def test_a_repeated_request_is_answered_from_the_cache_and_counted_as_triton_counts_it(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    try:
        first, again = infer(client, "cached", ONES), infer(client, "cached", ONES)
        np.testing.assert_array_equal(first, ONES * 2)
        np.testing.assert_array_equal(again, first)
        assert statistics(client, "cached") == {
            "hits": 1, "misses": 1, "successes": 2, "queued": 2, "executions": 1, "inferences": 1,
        }  # fmt: skip

        np.testing.assert_array_equal(infer(client, "cached", TWOS), TWOS * 2)  # other inputs: computed
        assert statistics(client, "cached")["misses"] == 2
        assert client.get_model_config("cached").config.response_cache.enable  # tritonclient's own proto
        assert server.metric("nv_cache_num_hits_per_model", model="cached") == 1
        assert server.metric("nv_cache_num_misses_per_model", model="cached") == 2
    finally:
        client.close()


def test_a_model_that_does_not_enable_the_cache_runs_every_request(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    try:
        infer(client, "plain", ONES)
        infer(client, "plain", ONES)
        assert statistics(client, "plain") == {
            "hits": 0, "misses": 0, "successes": 2, "queued": 2, "executions": 2, "inferences": 2,
        }  # fmt: skip
        assert not client.get_model_config("plain").config.response_cache.enable
    finally:
        client.close()


def test_a_request_the_model_refuses_is_refused_though_its_inputs_are_cached(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    try:
        infer(client, "cached", ONES)
        with pytest.raises(InferenceServerException) as refused:
            infer(client, "cached", ONES, sequence_id=5)  # the model takes no sequences
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "sequence" in str(refused.value.message())
    finally:
        client.close()


@pytest.mark.parametrize(
    ("max_bytes", "hits"),
    [
        (1 << 20, 1),  # A, B, A: the second A is a hit
        (1000, 0),  # room for one answer (some 600 bytes with its key and slot): B pushes A out
        (0, 0),  # off for every model
    ],
)
def test_response_cache_max_bytes_bounds_what_is_kept(
    repository: Path, tmp_path: Path, max_bytes: int, hits: int
) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(f"response_cache: {{max_bytes: {max_bytes}}}\n")
    with running_server(repository, tmp_path, "--config", str(config)) as server:
        client = grpcclient.InferenceServerClient(server.url)
        try:
            for x in (ONES, TWOS, ONES):
                infer(client, "cached", x)
            counted = statistics(client, "cached")
        finally:
            client.close()
    assert (counted["hits"], counted["executions"]) == (hits, 3 - hits)


def test_a_reloaded_version_never_answers_from_the_one_it_replaced(repository: Path, tmp_path: Path) -> None:
    """Version 1 is replaced in place (new weights, same number) and loaded again: same inputs, new answer."""
    with running_server(repository, tmp_path, "--model-control-mode", "explicit", "--load-model", "cached") as server:
        client = grpcclient.InferenceServerClient(server.url)
        try:
            np.testing.assert_array_equal(infer(client, "cached", ONES), ONES * 2)
            np.testing.assert_array_equal(infer(client, "cached", ONES), ONES * 2)  # kept
            write_model(repository, "cached", 3.0)
            client.load_model("cached")
            np.testing.assert_array_equal(infer(client, "cached", ONES), ONES * 3)
            assert statistics(client, "cached")["misses"] == 1  # the new version's own count
        finally:
            client.close()


def test_response_cache_on_a_stateful_model_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("sequence_batching: {max_sequence_idle_microseconds: 1000000}\n" + CACHED)
    with pytest.raises(ConfigError) as refused:
        load_model_config(path)
    assert str(path) in str(refused.value) and "response_cache" in str(refused.value)


def test_a_negative_max_bytes_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("response_cache: {max_bytes: -1}\n")
    with pytest.raises(ConfigError) as refused:
        load_server_config(path, {})
    assert str(path) in str(refused.value) and "response_cache.max_bytes" in str(refused.value)


async def test_traces_and_metrics_tell_a_hit_from_a_miss(repository: Path) -> None:
    """The request's span says ``infergate.cache.hit``; infergate.response_cache.lookups counts by result."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
    request = pb.ModelInferRequest(model_name="cached", inputs=[tensor], raw_input_contents=[ONES.tobytes()])
    async with observed_server(repository) as observed:
        async with grpc.aio.insecure_channel(observed.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(2):
                await stub.ModelInfer(request)
        counted = {p.attributes["result"]: p.value for p in observed.points("infergate.response_cache.lookups")}
        spans = [s for s in observed.finished_spans() if s.name.endswith("/ModelInfer")]
    assert [s.attributes.get("infergate.cache.hit") for s in spans] == [False, True]
    assert counted == {"miss": 1, "hit": 1}


# --------------------------------------------------------------------------- the cache and its key, directly


def test_the_digest_tells_apart_names_types_shapes_and_values() -> None:
    base = {"x": np.zeros((2, 2), np.float32)}
    variants = [
        {"y": np.zeros((2, 2), np.float32)},
        {"x": np.zeros((2, 2), np.float64)},
        {"x": np.zeros((4,), np.float32)},
        {"x": np.ones((2, 2), np.float32)},
        {"x": np.array([b"a", b"b"], dtype=object)},
    ]
    digests = {request_digest(base), *(request_digest(v) for v in variants)}
    assert len(digests) == 1 + len(variants)
    assert request_digest({"x": np.zeros((2, 2), np.float32)}) == request_digest(base)
    assert request_digest({"x": np.array(["a", "b"], dtype=object)}) == request_digest(variants[-1])


def test_the_cache_keeps_read_only_copies_and_drops_the_least_recently_used_first() -> None:
    probe = ResponseCache(max_bytes=1 << 20)
    probe.put(("v", b"p" * 16), {"y": np.zeros((1, 4), np.float32)})
    cache = ResponseCache(max_bytes=2 * probe.bytes)  # room for two answers of one row
    batch = np.arange(8, dtype=np.float32).reshape(2, 4)
    cache.put(("v", b"a" * 16), {"y": batch[:1]})
    cache.put(("v", b"b" * 16), {"y": batch[1:]})
    kept = cache.get(("v", b"a" * 16))  # a is now the most recently used
    assert kept is not None and kept["y"].base is None and not kept["y"].flags.writeable
    batch[0] = -1  # the batch it came from changes: the kept answer does not
    np.testing.assert_array_equal(kept["y"], [[0, 1, 2, 3]])
    cache.put(("v", b"c" * 16), {"y": batch[:1]})
    assert cache.get(("v", b"b" * 16)) is None and cache.get(("v", b"a" * 16)) is not None
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    cache.put(("v", b"d" * 16), {"y": np.zeros(1024, np.float32)})  # larger than the whole cache: not kept
    assert cache.get(("v", b"d" * 16)) is None and len(cache) == 2


def test_text_answers_count_against_max_bytes_with_the_memory_their_strings_take() -> None:
    """A short string takes some 50 bytes besides its characters: counted by characters, a cache of
    text answers would hold several times its bound."""
    bound = 200_000
    tracemalloc.start()
    try:
        cache = ResponseCache(max_bytes=bound)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(60):
            words = np.array([f"w{i}-{j}" for j in range(1000)], dtype=object)  # held by the cache alone
            cache.put(("v", i.to_bytes(16)), {"labels": words})
            del words
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0 < len(cache) < 60 and cache.bytes <= bound
    assert held <= bound * 1.1, f"the cache holds {held:,} bytes for a bound of {bound:,}"


@pytest.mark.parametrize(
    "outputs",
    [
        {"y": np.ones((1, 1), np.float32)},  # 4 bytes of answer
        {"y": np.ones((1, 16), np.float32)},  # matmul16's 64
        {"y": np.ones((1, 256), np.float32), "z": np.ones(3, np.int64)},
    ],
)
def test_small_answers_count_against_max_bytes_with_the_memory_each_entry_takes(
    outputs: dict[str, np.ndarray],
) -> None:
    """An entry holds its key, a digest, a dict, each array's header and the cache's own slot for
    it: some 500 bytes besides the answer. Counted by the answer alone, a cache of small answers
    would hold ten times its bound."""
    bound = 1 << 20
    tracemalloc.start()
    try:
        cache = ResponseCache(max_bytes=bound)
        token = object()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(4000):  # unique requests: more than fit, so the oldest make room
            cache.put((token, i.to_bytes(16)), outputs)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0 < len(cache) < 4000 and cache.bytes <= bound
    assert 0.8 * cache.bytes <= held <= 1.2 * cache.bytes, f"{held:,} bytes held, {cache.bytes:,} counted"
