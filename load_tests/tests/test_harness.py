"""The harness's contracts: pure helpers by table, then a real ceiling server under load."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from collections.abc import Iterator

import pytest

from infergate._proto import grpc_service_pb2 as pb
from load_tests.ceiling import CeilingService
from load_tests.compute import ComputeResult
from load_tests.generator import LoadConfig, run_closed_loop, split_concurrency
from load_tests.payloads import (
    InvalidResponse,
    build_infer_request,
    build_infer_response,
    random_inputs,
    tensor_bytes,
    validate_response,
)
from load_tests.report import LoadResult, summarize_load
from load_tests.servers import free_port, running_server
from load_tests.signature import ModelSignature, TensorSpec
from load_tests.suite import REPO_ROOT, evaluate_targets

MATMUL = ModelSignature("matmul16", (TensorSpec("x", "FP32", (-1, 16)),), (TensorSpec("y", "FP32", (-1, 16)),))


@pytest.mark.parametrize(
    ("total", "parts", "expected"),
    [(64, 1, [64]), (64, 2, [32, 32]), (7, 3, [3, 2, 2]), (3, 3, [1, 1, 1])],
)
def test_concurrency_is_split_evenly(total: int, parts: int, expected: list[int]) -> None:
    assert split_concurrency(total, parts) == expected


@pytest.mark.parametrize(
    ("shape", "batch", "expected"),
    [((-1, 16), 8, (8, 16)), ((-1, -1), 4, (4, 1)), ((3, -1), 4, (3, 1)), ((), 2, ())],
)
def test_variable_dims_become_batch_then_one(shape: tuple[int, ...], batch: int, expected: tuple[int, ...]) -> None:
    assert TensorSpec("t", "FP32", shape).concrete_shape(batch) == expected


def test_bytes_tensors_are_length_prefixed() -> None:
    import numpy as np

    array = np.array([b"ab", b""], dtype=object)
    assert tensor_bytes("BYTES", array) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


def test_a_reply_of_the_right_shape_validates() -> None:
    reply = build_infer_response(MATMUL, batch=4)
    assert validate_response(reply, MATMUL, batch=4) == "y FP32 [4,16]"


@pytest.mark.parametrize("mutate", ["batch", "length", "no_raw"])
def test_a_wrong_reply_is_rejected(mutate: str) -> None:
    reply = build_infer_response(MATMUL, batch=4)
    if mutate == "batch":
        reply.outputs[0].shape[0] = 5
    elif mutate == "length":
        reply.raw_output_contents[0] = b"\x00" * 4
    else:
        del reply.raw_output_contents[:]
    with pytest.raises(InvalidResponse):
        validate_response(reply, MATMUL, batch=4)


async def test_the_ceiling_replies_per_model_and_batch_size() -> None:
    service = CeilingService({"matmul16": MATMUL})
    replies = []
    for batch in (1, 3, 1):
        request = build_infer_request(MATMUL, random_inputs(MATMUL, batch))
        data = await service.model_infer(request.SerializeToString(), context=None)
        replies.append(pb.ModelInferResponse.FromString(data))
    assert [list(r.outputs[0].shape) for r in replies] == [[1, 16], [3, 16], [1, 16]]


def _result(label: str, rps: float, p50_s: float, batch: int = 1) -> LoadResult:
    return summarize_load(
        target="t", model="m", client="raw", batch=batch, concurrency=1, processes=1,
        warmup_s=0, duration_s=1.0, latencies_s=[p50_s] * int(rps), errors={}, cpu_s=0.0,
        cpu_span_s=1.0, response="", label=label,
    )  # fmt: skip


def test_targets_compare_infergate_with_both_ceilings() -> None:
    ceiling = {
        "matmul16_b1_c64": _result("c", 1000, 0.001),
        "matmul16_b1_c1": _result("c", 10, 0.001),
    }
    infergate = {
        "matmul16_b1_c64": _result("i", 800, 0.001),
        "matmul16_b1_c1": _result("i", 10, 0.0012),
        "mlp_b1_c64": _result("i", 2400, 0.001),
    }
    checks = {c.key: c for c in evaluate_targets(ceiling, infergate, [])}
    assert checks["a"].value == pytest.approx(0.8) and not checks["a"].met  # the target is 0.85
    assert checks["b"].value == pytest.approx(0.2) and not checks["b"].met
    assert checks["c"].met
    assert math.isnan(checks["d"].value) and not checks["d"].met  # no compute results


def _compute(samples_per_s: float, batch: int = 64) -> ComputeResult:
    return ComputeResult(
        model="mlp", batch=batch, calls=100, seconds=1.0, samples_per_s=samples_per_s, calls_per_s=100.0,
        p50_ms=1.0, p99_ms=1.0, mean_ms=1.0, intra_op_threads=0,
    )  # fmt: skip


def test_the_in_process_baseline_is_the_best_layout_and_the_target_names_it() -> None:
    one_session = _compute(900.0)  # onnxruntime's own threads
    two_sessions = dataclasses.replace(_compute(1000.0), sessions=2, intra_op_threads=1)
    infergate = {"mlp_b8_c32": _result("i", 85, 0.001, batch=10)}
    (check,) = [c for c in evaluate_targets({}, infergate, [one_session, two_sessions]) if c.key == "d"]
    assert check.value == pytest.approx(0.85)
    assert check.description.endswith("(2 sessions x 1 thread, batch 64)")


@pytest.mark.parametrize(("ceiling_rps", "infergate_rps", "met"), [(1000, 840, False), (1000, 850, True)])
def test_infergate_must_reach_85_percent_of_the_ceiling(ceiling_rps: int, infergate_rps: int, met: bool) -> None:
    ceiling = {"matmul16_b1_c64": _result("c", ceiling_rps, 0.001)}
    infergate = {"matmul16_b1_c64": _result("i", infergate_rps, 0.001)}
    (check,) = [c for c in evaluate_targets(ceiling, infergate, []) if c.key == "a"]
    assert (check.target, check.met) == (0.85, met)


@pytest.mark.parametrize(("samples_per_s", "met"), [(790, False), (800, True)])
def test_mlp_must_reach_80_percent_of_in_process_onnxruntime(samples_per_s: int, met: bool) -> None:
    infergate = {"mlp_b8_c32": _result("i", samples_per_s // 10, 0.001, batch=10)}
    (check,) = [c for c in evaluate_targets({}, infergate, [_compute(1000.0), _compute(600.0, 8)]) if c.key == "d"]
    assert (check.target, check.met) == (0.8, met)


@pytest.fixture(scope="module")
def ceiling_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("ceiling")
    port = free_port()
    argv = [
        sys.executable, "-m", "load_tests", "ceiling", "--port", str(port),
        "--model", "matmul16", "--input", "x:FP32:-1,16", "--output", "y:FP32:-1,16",
    ]  # fmt: skip
    target = f"127.0.0.1:{port}"
    with running_server("ceiling", argv, target, folder / "ceiling.log", REPO_ROOT, 30.0):
        yield target


@pytest.mark.parametrize(("client", "processes"), [("raw", 1), ("tritonclient", 1), ("sdk", 1), ("raw", 2)])
def test_closed_loop_against_the_ceiling(ceiling_target: str, client: str, processes: int) -> None:
    config = LoadConfig(
        target=ceiling_target, model="matmul16", batch=2, concurrency=4, duration=0.5,
        warmup=0.1, processes=processes, client=client,
    )  # fmt: skip
    result = run_closed_loop(config)
    assert result.requests > 0 and result.errors == {}
    assert result.samples_per_s == pytest.approx(2 * result.requests_per_s)
    assert result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.response == "y FP32 [2,16]"
    assert result.generator_cpu_s > 0


@pytest.mark.parametrize(
    ("flags", "says"), [((), "event loop: uvloop"), (("--event-loop", "asyncio"), "event loop: asyncio")]
)
def test_the_ceiling_runs_on_the_loop_infergate_would_choose(
    tmp_path: pathlib.Path, flags: tuple[str, ...], says: str
) -> None:
    """Its default is infergate's (uvloop when installed): it stays an upper bound on what infergate can do."""
    port = free_port()
    argv = [sys.executable, "-m", "load_tests", "ceiling", "--port", str(port),
            "--model", "m", "--input", "x:FP32:-1", "--output", "y:FP32:-1", *flags]  # fmt: skip
    log = tmp_path / "c.log"
    with running_server("c", argv, f"127.0.0.1:{port}", log, REPO_ROOT):
        pass
    assert says in log.read_text()


def test_servers_are_stopped_after_use(tmp_path: pathlib.Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "load_tests", "ceiling", "--port", str(port),
            "--model", "m", "--input", "x:FP32:-1", "--output", "y:FP32:-1"]  # fmt: skip
    with running_server("c", argv, f"127.0.0.1:{port}", tmp_path / "c.log", REPO_ROOT) as proc:
        assert proc.poll() is None
    assert proc.returncode is not None
