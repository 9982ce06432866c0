"""Ensembles (Triton's ``platform: ensemble``): one request runs a pipeline of models on the server.

The pipeline under test: ``double`` (y = 2x) and ``triple`` (y = 3x) read the
ensemble's input side by side, ``add`` sums their outputs, so ``pipeline``
answers 5x. Against a real server (explicit model control, so models can be
loaded and unloaded) with tritonclient, as a Triton user would call it: the
answer, metadata and config, each step counted in its model's statistics,
steps batched with one another on the step model, bad requests and broken
pipelines refused with the step named. Config checks and ``infergate check``
are read directly.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import yaml
from conftest import ServerProcess, eventually, launch_server, running_server, wait_until
from onnx import TensorProto, helper, numpy_helper
from security import AUDIENCE, ISSUER, SECRET, bearer, claims, token
from telemetry_support import observed_server
from test_perf_analyzer import _perf_analyzer
from triton_models import running_sum, stand_in, write_stand_in
from tritonclient.utils import InferenceServerException

from infergate.check import check_repository
from infergate.cli import main
from infergate.configfile import ConfigError
from infergate.demo import write_demo_repository
from infergate.errors import InvalidArgument
from infergate.models.config import model_config_from_data
from infergate.models.datatypes import DATATYPES
from infergate.models.ensemble import EnsembleStep, load_order, step_request
from infergate.models.spec import ModelSpec, TensorSpec
from tests.test_model_control import build_scale_model  # y = x * factor, x FP32 [batch, 4]

PIPELINE = """
platform: ensemble
max_batch_size: 8
input: [{name: INPUT, data_type: TYPE_FP32, dims: [4]}]
output: [{name: OUTPUT, data_type: TYPE_FP32, dims: [4]}]
ensemble_scheduling:
  step:
    - {model_name: double, model_version: -1, input_map: {x: INPUT}, output_map: {y: doubled}}
    - {model_name: triple, model_version: 1, input_map: {x: INPUT}, output_map: {y: tripled}}
    - {model_name: add, input_map: {a: doubled, b: tripled}, output_map: {sum: OUTPUT}}
"""


def ensemble(*steps: str, batch: int = 8, datatype: str = "TYPE_FP32", dims: str = "[4]") -> str:
    """An ensemble's config.yaml: ``INPUT`` to ``OUTPUT`` (same datatype and dims) through ``steps``."""
    return (
        f"platform: ensemble\nmax_batch_size: {batch}\n"
        f"input: [{{name: INPUT, data_type: {datatype}, dims: {dims}}}]\n"
        f"output: [{{name: OUTPUT, data_type: {datatype}, dims: {dims}}}]\n"
        "ensemble_scheduling:\n  step:\n" + "".join(f"    - {step}\n" for step in steps)
    )


# One step, on a model that waits for a full batch of 8 (or 10 s): requests to the ensemble share its batches.
BATCHED = ensemble("{model_name: gathered, input_map: {x: INPUT}, output_map: {y: OUTPUT}}")
# One step, on a model with a response cache.
RECALL = ensemble("{model_name: remembered, input_map: {x: INPUT}, output_map: {y: OUTPUT}}")
# An ensemble that does not batch, on a model that does: its [2, 4] is the model's [-1, 4].
FLAT = ensemble("{model_name: double, input_map: {x: INPUT}, output_map: {y: OUTPUT}}", batch=0, dims="[2, 4]")
# An ensemble as a step of another: pipeline (5x), then double: 10x.
OUTER = ensemble(
    "{model_name: pipeline, input_map: {INPUT: INPUT}, output_map: {OUTPUT: fivefold}}",
    "{model_name: double, input_map: {x: fivefold}, output_map: {y: OUTPUT}}",
)
# A stateless step, then a stateful one: the running sum of the doubled inputs, per sequence.
RUNNING_SUM = "{model_name: simple_sequence_implicit, input_map: {INPUT: doubled}, output_map: {OUTPUT: OUTPUT}}"
STATEFUL = ensemble(
    "{model_name: double_int, input_map: {x: INPUT}, output_map: {y: doubled}}", RUNNING_SUM, datatype="TYPE_INT32",
    dims="[1]",
)  # fmt: skip
# The same on a model that does not batch, runs two requests at once, and takes longer on larger
# inputs: without the ensemble keeping a sequence's requests in order, a small input sent after a
# large one would reach the stateful step first.
ORDERED = ensemble(
    "{model_name: timed_double, input_map: {x: INPUT}, output_map: {y: doubled}}", RUNNING_SUM, batch=0,
    datatype="TYPE_INT32", dims="[1, 1]",
)  # fmt: skip
# The add model's inputs are a and b: this step leaves b unfed and names an input it lacks.
BROKEN = ensemble("{model_name: add, input_map: {a: INPUT, c: INPUT}, output_map: {sum: OUTPUT}}")
# Five values where the step's model takes four, and an INT64 output where it gives FP32.
MISFIT = """
platform: ensemble
max_batch_size: 8
input: [{name: INPUT, data_type: TYPE_FP32, dims: [5]}]
output: [{name: OUTPUT, data_type: TYPE_INT64, dims: [4]}]
ensemble_scheduling:
  step: [{model_name: double, input_map: {x: INPUT}, output_map: {y: OUTPUT}}]
"""

STEP_MODELS = [
    *["double", "triple", "add", "gathered", "remembered"],
    *["double_int", "timed_double", "simple_sequence_implicit"],
]


def build_double_int_model() -> onnx.ModelProto:
    """``y = 2 x`` for ``x`` INT32 [batch, 1]."""
    tensor = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 1]) for n in ("x", "y")]
    nodes = [helper.make_node("Add", ["x", "x"], ["y"])]
    graph = helper.make_graph(nodes, "double_int", tensor[:1], tensor[1:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build_timed_double_model() -> onnx.ModelProto:
    """``y = 2 x`` for ``x`` INT32 [1, 1] (no batching), taking about ``x`` ms: a Loop of 3x iterations of a
    256x256 MatMul and Tanh (about 0.3 ms each here) that ``y`` depends on, so it must run."""
    loop_body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state_in", "A"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, None),
        ],
    )
    rng = np.random.default_rng(7)
    matrix = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
        helper.make_node("Cast", ["largest"], ["largest64"], to=TensorProto.INT64),
        helper.make_node("Mul", ["largest64", "three"], ["trips"]),
        helper.make_node("Loop", ["trips", "keep_going", "A"], ["state"], body=loop_body),
        helper.make_node("ReduceSum", ["state"], ["total"], keepdims=0),
        helper.make_node("IsNaN", ["total"], ["is_nan"]),
        helper.make_node("Add", ["x", "x"], ["twice"]),
        helper.make_node("Where", ["is_nan", "twice", "twice"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "timed_double",
        [helper.make_tensor_value_info("x", TensorProto.INT32, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
        initializer=[
            numpy_helper.from_array(matrix, "A"),
            numpy_helper.from_array(np.array(3, dtype=np.int64), "three"),
            numpy_helper.from_array(np.array(True), "keep_going"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build_add_model() -> onnx.ModelProto:
    """``sum = a + b`` for FP32 [batch, 4]."""
    tensor = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("a", "b", "sum")]
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["sum"])], "add", tensor[:2], tensor[2:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write(root: Path, name: str, config: str, model: onnx.ModelProto | None = None) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.yaml").write_text(textwrap.dedent(config))
    if model is not None:
        (root / name / "1" / "model.onnx").write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ensembles") / "models"
    write(root, "double", "max_batch_size: 8\n", build_scale_model(2.0))
    write(root, "triple", "max_batch_size: 8\n", build_scale_model(3.0))
    write(root, "add", "max_batch_size: 16\n", build_add_model())
    gather = (
        "max_batch_size: 8\ndynamic_batching: {preferred_batch_size: [8], max_queue_delay_microseconds: 10000000}\n"
    )
    write(root, "gathered", gather, build_scale_model(1.0))
    write(root, "remembered", "max_batch_size: 8\nresponse_cache: {enable: true}\n", build_scale_model(4.0))
    write(root, "recall", RECALL)
    write(root, "flat", FLAT)
    write(root, "outer", OUTER)
    write(root, "double_int", "max_batch_size: 8\n", build_double_int_model())
    write_stand_in(root, stand_in("simple_sequence_implicit"))
    write(root, "stateful", STATEFUL)
    timed = "max_batch_size: 0\ninstance_group: {count: 2}\nsession_options: {intra_op_num_threads: 1}\n"
    write(root, "timed_double", timed, build_timed_double_model())
    write(root, "ordered", ORDERED)
    write(root, "pipeline", PIPELINE)
    write(root, "batched", BATCHED)
    write(root, "broken", BROKEN)
    write(root, "misfit", MISFIT)
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Named before their step models: ensembles load after the rest whatever the order.
    ensembles = [
        "outer",
        "pipeline",
        "batched",
        "recall",
        "flat",
        "stateful",
        "ordered",
    ]  # outer runs pipeline: it loads after it
    loads = [arg for name in [*ensembles, *STEP_MODELS] for arg in ("--load-model", name)]
    with running_server(repository, tmp_path_factory.mktemp("logs"), "--model-control-mode", "explicit", *loads) as s:
        yield s


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy("OUTPUT")  # type: ignore[no-any-return]


def counts(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """(requests answered, batches run) of a model, from ModelStatistics."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("execution_count", 0))


X = np.arange(12, dtype=np.float32).reshape(3, 4)
HANG_GUARD_S = 30.0  # how long an answer may take before the test calls it a hang; not a performance bound


def test_an_ensemble_answers_with_its_last_step_fed_by_the_steps_before(
    client: grpcclient.InferenceServerClient,
) -> None:
    np.testing.assert_array_equal(infer(client, "pipeline", X), X * 5)


def test_every_step_is_counted_by_its_own_model_and_the_ensemble_by_itself(
    client: grpcclient.InferenceServerClient,
) -> None:
    before = {m: counts(client, m)[0] for m in ["pipeline", "double", "triple", "add"]}
    infer(client, "pipeline", X)
    infer(client, "pipeline", X[:1])
    after = {m: counts(client, m)[0] for m in before}
    assert {m: after[m] - before[m] for m in before} == {"pipeline": 2, "double": 2, "triple": 2, "add": 2}


def totals(client: grpcclient.InferenceServerClient, model: str) -> dict[str, int]:
    """A model's queue and compute times and counts, rows and batches, from ModelStatistics."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    inference = stats["inference_stats"]
    figures = {f"{k}_ns": int(inference[k].get("ns", 0)) for k in ("queue", "compute_infer")}
    figures |= {f"{k}_count": int(inference[k].get("count", 0)) for k in ("queue", "compute_infer")}
    return figures | {"rows": int(stats.get("inference_count", 0)), "runs": int(stats.get("execution_count", 0))}


def test_the_ensembles_statistics_sum_its_steps_queue_and_compute_as_triton_does(
    client: grpcclient.InferenceServerClient,
) -> None:
    models = ["pipeline", "double", "triple", "add"]
    before = {m: totals(client, m) for m in models}
    infer(client, "pipeline", X)
    infer(client, "pipeline", X[:1])
    grew = {m: {k: v - before[m][k] for k, v in totals(client, m).items()} for m in models}
    ensemble, steps = grew["pipeline"], [grew[m] for m in models[1:]]
    assert (ensemble["rows"], ensemble["runs"], ensemble["queue_count"], ensemble["compute_infer_count"]) == (
        4,
        2,
        2,
        2,
    )
    # Each step ran alone here (one request in flight), so the ensemble's times are its steps', summed.
    assert ensemble["queue_ns"] == sum(step["queue_ns"] for step in steps)
    assert ensemble["compute_infer_ns"] == sum(step["compute_infer_ns"] for step in steps) > 0


def test_perf_analyzer_measures_the_ensemble_and_each_composing_model(server: ServerProcess) -> None:
    output = _perf_analyzer(server, "-m", "pipeline", "--concurrency-range", "2")
    assert "Composing models:" in output, output
    for model in ["add", "double", "triple"]:
        served = re.search(rf"{model}, version: 1\n\s+Inference count: (\d+)", output)
        assert served and int(served.group(1)) > 0, output


def test_metadata_and_config_describe_the_pipeline_as_triton_does(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("pipeline", as_json=True)
    assert metadata["platform"] == "ensemble"
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [("INPUT", "FP32", ["-1", "4"])]
    config = client.get_model_config("pipeline", as_json=True)["config"]
    assert config["platform"] == "ensemble"
    assert config["max_batch_size"] == 8
    steps = config["ensemble_scheduling"]["step"]
    assert [(s["model_name"], s["model_version"]) for s in steps] == [("double", "-1"), ("triple", "1"), ("add", "-1")]
    assert steps[2]["input_map"] == {"a": "doubled", "b": "tripled"}
    assert steps[2]["output_map"] == {"sum": "OUTPUT"}


async def eight_requests_to_batched(server: ServerProcess) -> int:
    """Send eight one-row requests to ``batched`` at once; check the answers; return the batches
    its step model ran for them."""
    async with aioclient.InferenceServerClient(server.url) as client:
        before = await client.get_inference_statistics("gathered", as_json=True)

        async def one(i: int) -> np.ndarray:
            tensor = aioclient.InferInput("INPUT", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.full((1, 4), i, np.float32))
            return (await client.infer("batched", [tensor])).as_numpy("OUTPUT")  # type: ignore[no-any-return]

        answers = await asyncio.gather(*(one(i) for i in range(8)))
        after = await client.get_inference_statistics("gathered", as_json=True)
    assert [a.tolist() for a in answers] == [[[float(i)] * 4] for i in range(8)]
    executions = [int(stats["model_stats"][0].get("execution_count", 0)) for stats in (before, after)]
    return executions[1] - executions[0]


async def test_requests_to_an_ensemble_share_batches_on_its_step_model(server: ServerProcess) -> None:
    assert await eight_requests_to_batched(server) == 1  # eight ensemble requests, one batch of 8


async def test_the_callers_deadline_covers_the_steps_and_drops_what_they_queued(
    client: grpcclient.InferenceServerClient, server: ServerProcess
) -> None:
    tensor = grpcclient.InferInput("INPUT", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("batched", [tensor], client_timeout=0.5)  # the step waits for 8 rows, up to 10 s
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # Had the step's request stayed queued, it would take a place in the next batch of 8 and the
    # eighth of these requests would wait for a second one.
    assert await eight_requests_to_batched(server) == 1


def test_a_step_model_with_a_response_cache_answers_a_repeated_step_from_it(
    client: grpcclient.InferenceServerClient,
) -> None:
    def hits() -> int:
        stats = client.get_inference_statistics("remembered", as_json=True)["model_stats"][0]
        return int(stats["inference_stats"]["cache_hit"].get("count", 0))

    before = hits()
    x = np.full((1, 4), 7.0, np.float32)
    first, second = infer(client, "recall", x), infer(client, "recall", x)
    np.testing.assert_array_equal(first, x * 4)
    np.testing.assert_array_equal(second, x * 4)
    assert hits() == before + 1


def test_an_ensemble_that_does_not_batch_feeds_a_model_that_does(client: grpcclient.InferenceServerClient) -> None:
    np.testing.assert_array_equal(infer(client, "flat", X[:2]), X[:2] * 2)
    metadata = client.get_model_metadata("flat", as_json=True)
    assert metadata["inputs"][0]["shape"] == ["2", "4"]


def test_an_ensemble_runs_as_a_step_of_another_and_its_times_count_in_both(
    client: grpcclient.InferenceServerClient,
) -> None:
    def requests_and_compute(model: str) -> tuple[int, int]:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
        return int(stats["success"].get("count", 0)), int(stats["compute_infer"].get("ns", 0))

    before = {m: requests_and_compute(m) for m in ["outer", "pipeline", "double"]}
    np.testing.assert_array_equal(infer(client, "outer", X), X * 10)
    after = {m: requests_and_compute(m) for m in before}
    assert {m: after[m][0] - before[m][0] for m in before} == {"outer": 1, "pipeline": 1, "double": 2}
    compute = {m: after[m][1] - before[m][1] for m in before}
    assert compute["outer"] > compute["pipeline"] > 0  # the inner ensemble's steps, and double once more


def test_an_ensemble_whose_steps_would_lead_back_to_it_is_refused_naming_the_cycle(
    client: grpcclient.InferenceServerClient,
) -> None:
    """pipeline reloaded to run outer, which runs pipeline: refused, and the old pipeline keeps serving."""
    looping = yaml.safe_load(OUTER)
    looping["ensemble_scheduling"]["step"][0]["model_name"] = "outer"
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("pipeline", config=json.dumps(looping))
    assert "its steps lead back to ensemble 'pipeline' (pipeline -> outer -> pipeline): a cycle" in (
        caught.value.message()
    )
    np.testing.assert_array_equal(infer(client, "outer", X), X * 10)


def test_the_config_tritonclient_reads_loads_again_as_an_override(client: grpcclient.InferenceServerClient) -> None:
    """Triton's JSON for an ensemble (int64 versions as strings, no backend) is a valid load override."""
    config = client.get_model_config("pipeline", as_json=True)["config"]
    assert config["ensemble_scheduling"]["step"][0]["model_version"] == "-1"
    client.load_model("pipeline", config=json.dumps(config))
    np.testing.assert_array_equal(infer(client, "pipeline", X), X * 5)


def one_int(value: int, module: Any = grpcclient) -> list[Any]:
    tensor = module.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [tensor]


def test_a_stateful_step_keeps_each_sequences_state_as_triton_does(client: grpcclient.InferenceServerClient) -> None:
    """The sequence parameters go to the stateful step; two sequences interleaved keep their own sums."""
    values = {101: [3, 1, 4, 1, 5], 202: [2, 7, 1, 8, 2]}
    answers: dict[int, list[int]] = {101: [], 202: []}
    for i in range(5):
        for sequence, sent in values.items():
            ends = {"sequence_start": i == 0, "sequence_end": i == 4}
            result = client.infer("stateful", one_int(sent[i]), sequence_id=sequence, **ends)
            answers[sequence].append(int(result.as_numpy("OUTPUT")[0, 0]))
    assert answers == {sequence: running_sum([2 * v for v in sent]) for sequence, sent in values.items()}


def test_the_ensembles_statistics_sum_its_stateful_steps_times_too(client: grpcclient.InferenceServerClient) -> None:
    models = ["stateful", "double_int", "simple_sequence_implicit"]
    before = {m: totals(client, m) for m in models}
    for i, value in enumerate([3, 1, 4]):
        client.infer("stateful", one_int(value), sequence_id=303, sequence_start=i == 0, sequence_end=i == 2)
    grew = {m: {k: v - before[m][k] for k, v in totals(client, m).items()} for m in models}
    ensemble, steps = grew["stateful"], [grew[m] for m in models[1:]]
    assert [step["compute_infer_count"] for step in steps] == [3, 3]
    assert ensemble["queue_ns"] == sum(step["queue_ns"] for step in steps)
    assert ensemble["compute_infer_ns"] == sum(step["compute_infer_ns"] for step in steps) > 0


def test_a_sequence_streamed_without_waiting_reaches_its_stateful_step_in_order(server: ServerProcess) -> None:
    """Every request of a sequence sent on one stream before any answer. Its first request takes
    the first step 60 ms, the others under 1 ms, on a model with two instances: only the ensemble
    keeping the sequence's order makes the first reach the stateful step first."""
    sent = [60, 1, 1, 1]
    answers: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(server.url) as client:
        client.start_stream(callback=lambda result, error: answers.put(error or result))
        for i, value in enumerate(sent):
            tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
            ends = {"sequence_start": i == 0, "sequence_end": i == len(sent) - 1}
            client.async_stream_infer("ordered", [tensor], sequence_id=77, request_id=str(i), **ends)
        results = [answers.get(timeout=HANG_GUARD_S) for _ in sent]
        client.stop_stream()
    assert not [r for r in results if isinstance(r, InferenceServerException)], results
    got = {int(r.get_response().id): int(r.as_numpy("OUTPUT")[0, 0]) for r in results}
    assert [got[i] for i in range(len(sent))] == running_sum([2 * v for v in sent])


def test_a_sequence_keeps_its_order_across_a_reload_of_the_ensemble(repository: Path, tmp_path: Path) -> None:
    """The sequence's first request is in the first step (about 3 s, a window the metric scrapes below
    cannot miss on a busy machine) when the ensemble is reloaded; the next ones reach the new version,
    where the first step takes them under 1 ms on the model's other instance. They still wait for the
    first: an ensemble's versions share its sequences' order."""
    sent = [3000, 1, 1, 1]
    explicit = ("--model-control-mode", "explicit", "--load-model", "ordered", "--metrics-port", "0")
    with (
        running_server(repository, tmp_path, *explicit) as server,
        grpcclient.InferenceServerClient(server.url) as client,
    ):

        def send(i: int) -> int:
            ends = {"sequence_start": i == 0, "sequence_end": i == len(sent) - 1}
            result = client.infer("ordered", one_int(sent[i]), sequence_id=88, **ends)
            return int(result.as_numpy("OUTPUT")[0, 0])

        def in_flight() -> float:
            return server.metric("infergate_requests_active", rpc_method="ModelInfer")

        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(send, 0)
            wait_until(lambda: in_flight() == 1, "the first request is in the ensemble")
            config = yaml.safe_load(ORDERED) | {"metadata": {"description": "reloaded"}}
            client.load_model("ordered", config=json.dumps(config))
            assert client.get_model_config("ordered").config.parameters["description"].string_value == "reloaded"
            answers = {i: send(i) for i in range(1, len(sent))}  # each waits for its answer
            answers[0] = first.result(timeout=HANG_GUARD_S)
    assert [answers[i] for i in range(len(sent))] == running_sum([2 * v for v in sent])


def test_sequence_parameters_on_an_ensemble_with_no_stateful_step_are_refused(
    client: grpcclient.InferenceServerClient,
) -> None:
    tensor = grpcclient.InferInput("INPUT", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("pipeline", [tensor], sequence_id=5, sequence_start=True)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "ensemble 'pipeline' runs no stateful model, so it cannot take sequence_id 5" in caught.value.message()


def test_a_request_that_does_not_fit_the_ensemble_is_refused_naming_it(
    client: grpcclient.InferenceServerClient,
) -> None:
    tensor = grpcclient.InferInput("INPUT", [1, 5], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 5), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("pipeline", [tensor])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "pipeline" in caught.value.message() and "INPUT" in caught.value.message()
    too_many = np.ones((9, 4), np.float32)
    with pytest.raises(InferenceServerException) as caught:
        infer(client, "pipeline", too_many)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_an_ensemble_whose_steps_do_not_fit_their_models_does_not_load(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("broken")
    message = caught.value.message()
    assert "step 0 (add)" in message
    assert "input_map leaves the model's inputs ['b'] unfed" in message
    assert "input_map names 'c'" in message
    assert not client.is_model_ready("broken")
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("misfit")
    message = caught.value.message()
    assert "step 0 (double) input 'x' has shape [-1, 4], the ensemble input [-1, 5]" in message
    assert "ensemble output 'OUTPUT' is INT64, step 0 (double) output 'y' FP32" in message
    np.testing.assert_array_equal(infer(client, "pipeline", X), X * 5)  # the others keep serving


def test_a_step_whose_model_is_unloaded_fails_unavailable_naming_the_step(
    client: grpcclient.InferenceServerClient,
) -> None:
    client.unload_model("triple")
    try:
        with pytest.raises(InferenceServerException) as caught:
            infer(client, "pipeline", X)
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        assert "ensemble 'pipeline' step 1 (triple)" in caught.value.message()
    finally:
        client.load_model("triple")
    np.testing.assert_array_equal(infer(client, "pipeline", X), X * 5)


def test_unloading_a_step_model_with_its_dependents_unloads_the_ensembles_that_run_it(
    client: grpcclient.InferenceServerClient,
) -> None:
    """Triton's unload_dependents: ``triple`` runs in ``pipeline``, which runs in ``outer``; ``flat`` does not."""
    client.unload_model("triple", unload_dependents=True)
    try:
        ready = {m: client.is_model_ready(m) for m in ["triple", "pipeline", "outer", "flat", "double"]}
        assert ready == {"triple": False, "pipeline": False, "outer": False, "flat": True, "double": True}
    finally:
        for model in ["triple", "pipeline", "outer"]:  # steps first
            client.load_model(model)
    np.testing.assert_array_equal(infer(client, "outer", X), X * 10)


def test_unloading_a_step_model_without_its_dependents_leaves_the_ensembles_loaded(
    client: grpcclient.InferenceServerClient,
) -> None:
    client.unload_model("triple")
    try:
        assert not client.is_model_ready("triple") and client.is_model_ready("pipeline")
    finally:
        client.load_model("triple")


def test_a_step_model_reloaded_with_other_tensors_fails_the_step_not_the_answer(
    client: grpcclient.InferenceServerClient,
) -> None:
    """``triple`` replaced by a model whose input is not ``x``: the ensemble is not reloaded, so
    its next request finds the mismatch and says which step and input, instead of running."""
    other = build_add_model().SerializeToString()
    client.load_model("triple", config='{"max_batch_size": 8}', files={"file:1/model.onnx": other})
    try:

        def failed() -> int:
            stats = client.get_inference_statistics("triple", as_json=True)["model_stats"][0]
            return int(stats["inference_stats"]["fail"].get("count", 0))

        before = failed()
        with pytest.raises(InferenceServerException) as caught:
            infer(client, "pipeline", X)
        assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "ensemble 'pipeline' step 1 (triple): input 'x' takes no such input" in caught.value.message()
        assert failed() == before  # the pipeline's fault: not counted against the model (nor its canary)
    finally:
        client.load_model("triple")
    np.testing.assert_array_equal(infer(client, "pipeline", X), X * 5)


def test_loading_an_ensemble_loads_the_models_its_steps_run_as_triton_does(
    client: grpcclient.InferenceServerClient,
) -> None:
    client.unload_model("pipeline")
    client.unload_model("add")
    assert not client.is_model_ready("add")
    client.load_model("pipeline")
    assert client.is_model_ready("add")
    np.testing.assert_array_equal(infer(client, "pipeline", X), X * 5)


def test_an_ensemble_whose_step_model_does_not_exist_is_refused_naming_the_step(
    client: grpcclient.InferenceServerClient,
) -> None:
    nowhere = yaml.safe_load(PIPELINE)
    nowhere["ensemble_scheduling"]["step"][2]["model_name"] = "nowhere"
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("pipeline", config=json.dumps(nowhere))
    assert "step 2 (nowhere): Request for unknown model: 'nowhere' is not found" in caught.value.message()
    np.testing.assert_array_equal(infer(client, "pipeline", X), X * 5)  # the loaded pipeline keeps serving


def test_a_server_told_to_load_an_ensemble_loads_its_step_models_too(repository: Path, tmp_path: Path) -> None:
    with running_server(repository, tmp_path, "--model-control-mode", "explicit", "--load-model", "outer") as server:
        with grpcclient.InferenceServerClient(server.url) as client:
            ready = {m: client.is_model_ready(m) for m in ["outer", "pipeline", "double", "triple", "add", "gathered"]}
            answer = infer(client, "outer", X)
    assert ready == {"outer": True, "pipeline": True, "double": True, "triple": True, "add": True, "gathered": False}
    np.testing.assert_array_equal(answer, X * 10)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"platform": "onnxruntime_onnx"}, "ensemble_scheduling is for platform: ensemble"),
        ({"ensemble_scheduling": None}, "platform: ensemble needs ensemble_scheduling"),
        ({"instance_group": {"count": 2}}, "an ensemble takes no instance_group"),
        (
            {"input": [{"name": "INPUT", "data_type": "TYPE_FP32"}]},
            "ensemble tensors ['INPUT'] need data_type and dims",
        ),
        ({"output": [{"name": "OTHER", "data_type": "TYPE_FP32", "dims": [4]}]}, "outputs ['OTHER'] are not written"),
    ],
)
def test_an_ensemble_config_that_is_no_pipeline_is_refused_naming_the_file(change: dict, message: str) -> None:
    data = {**_pipeline(), **change}
    if data["ensemble_scheduling"] is None:
        del data["ensemble_scheduling"]
    with pytest.raises(ConfigError) as caught:
        model_config_from_data(data, "models/pipeline/config.yaml")
    assert str(caught.value).startswith("models/pipeline/config.yaml")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [{"model_name": "m", "input_map": {"x": "INPUT"}, "output_map": {"y": "INPUT"}}],
            "step 0 writes tensor 'INPUT', which an ensemble input already provides",
        ),
        (
            [{"model_name": "m", "input_map": {"x": "nowhere"}, "output_map": {"y": "OUTPUT"}}],
            "step 0 (m) reads ['nowhere'], which no input or step provides",
        ),
        (
            [
                {"model_name": "m", "input_map": {"x": "b"}, "output_map": {"y": "a"}},
                {"model_name": "n", "input_map": {"x": "a"}, "output_map": {"y": "b", "z": "OUTPUT"}},
            ],
            "steps 0 (m), 1 (n) wait on each other's outputs (a cycle)",
        ),
    ],
)
def test_steps_must_form_a_pipeline_from_the_inputs_to_the_outputs(steps: list[dict], message: str) -> None:
    data = {**_pipeline(), "ensemble_scheduling": {"step": steps}}
    with pytest.raises(ConfigError) as caught:
        model_config_from_data(data, "models/pipeline/config.yaml")
    assert message in str(caught.value)


def _pipeline() -> dict:
    return dict(yaml.safe_load(PIPELINE))


async def test_check_fits_each_ensemble_against_the_step_models_it_loaded(repository: Path) -> None:
    report = await check_repository(repository)
    ensemble = {(f.model, f.level): f.message for f in report.findings if f.check == "ensemble"}
    assert ensemble[("pipeline", "ok")] == "steps fit the models they run: double+triple -> add"
    assert ensemble[("outer", "ok")] == "steps fit the models they run: pipeline -> double"
    assert ensemble[("batched", "ok")] == "steps fit the models they run: gathered"
    assert "input_map names 'c'" in ensemble[("broken", "error")]
    assert str(repository / "broken" / "config.yaml") in ensemble[("broken", "error")]


def test_a_directory_no_request_can_name_is_skipped_and_the_rest_serve(tmp_path: Path) -> None:
    """A backslash in a directory's name made the start-up load raise past every model: the server never
    became ready and its ensembles never loaded. The directory is skipped, with a warning."""
    root = tmp_path / "models"
    write(root, "double", "max_batch_size: 8\n", build_scale_model(2.0))
    write(root, "split", SPLIT)
    write(root, "a\\b", "max_batch_size: 8\n", build_scale_model(2.0))
    with running_server(root, tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_server_ready() and client.is_model_ready("split")
        assert {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]} == {"double", "split"}
        server.logged("directory 'a\\\\b' is not a model name (a path separator in it): skipped")


def test_check_marks_an_ensemble_whose_step_model_has_unfit_routing_as_failed(tmp_path: Path) -> None:
    """The server leaves a model whose routing names a version that did not load unavailable, and an ensemble
    running it with it; the CI gate must not call that ensemble fit."""
    root = tmp_path / "models"
    write(root, "double", "max_batch_size: 8\nrouting: {weights: {1: 100, 3: 0}}\n", build_scale_model(2.0))
    write(root, "split", SPLIT)
    report = asyncio.run(check_repository(root))
    routing = [f.message for f in report.findings if f.model == "double" and f.check == "routing"]
    ensemble = [(f.level, f.message) for f in report.findings if f.model == "split" and f.check == "ensemble"]
    assert routing and "version 3" in routing[0], routing
    assert [level for level, _ in ensemble] == ["error"], ensemble


# One step on ``double`` at model_version -1, whose routing splits its requests between two versions.
SPLIT = ensemble("{model_name: double, model_version: -1, input_map: {x: INPUT}, output_map: {y: OUTPUT}}")


def split_repository(root: Path, first: onnx.ModelProto) -> Path:
    """``double`` with version 1 (``first``) and version 2 (y = 2x), 10% of requests to version 1,
    and ``split``, an ensemble whose one step runs ``double`` as routed."""
    config = "max_batch_size: 8\nversion_policy: {all: {}}\nrouting: {weights: {1: 10, 2: 90}}\n"
    write(root, "double", config, first)
    (root / "double" / "2").mkdir()
    (root / "double" / "2" / "model.onnx").write_bytes(build_scale_model(2.0).SerializeToString())
    write(root, "split", SPLIT)
    return root


def test_an_ensemble_step_must_fit_every_version_its_routing_may_choose(tmp_path: Path) -> None:
    """Version 1 of ``double`` takes ``a`` and ``b``: one request in ten would fail in the step, though
    the primary (version 2, also the newest) fits. The ensemble is refused at load, naming the step and
    the version, and the CI gate says the same."""
    root = split_repository(tmp_path / "models", build_add_model())
    explicit = ("--model-control-mode", "explicit", "--load-model", "double")
    with running_server(root, tmp_path, *explicit) as server, grpcclient.InferenceServerClient(server.url) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("split")
    message = str(refused.value.message())
    assert "step 0 (double) on version 1 (its routing may choose it): input_map leaves the model's inputs" in message
    assert "input_map names 'x'; the model's inputs are ['a', 'b']" in message
    report = asyncio.run(check_repository(root))
    found = [f.message for f in report.findings if f.check == "ensemble" and f.level == "error"]
    assert len(found) == 1 and "step 0 (double) on version 1 (its routing may choose it)" in found[0], found


def test_an_ensemble_step_on_a_split_model_whose_versions_all_fit_loads(tmp_path: Path) -> None:
    root = split_repository(tmp_path / "models", build_scale_model(2.0))
    with running_server(root, tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        for _ in range(20):
            np.testing.assert_array_equal(infer(client, "split", X), X * 2)
    assert asyncio.run(check_repository(root)).ok


def readme_example() -> tuple[str, str]:
    """The README's ensemble: its config.yaml block and the Python lines that call it."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Ensembles: pipelines of models") :]
    config = section[section.index("```yaml\n") + len("```yaml\n") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    return config[: config.index("```")], code[: code.index("```")]


def test_the_readme_ensemble_applies_matmul16_twice(tmp_path: Path) -> None:
    config, code = readme_example()
    assert config.startswith("# DIR/twice/config.yaml")
    write_demo_repository(tmp_path / "models")
    (tmp_path / "models" / "twice" / "1").mkdir(parents=True)
    (tmp_path / "models" / "twice" / "config.yaml").write_text(config)
    loads = ("--model-control-mode", "explicit", "--load-model", "matmul16", "--load-model", "twice")
    with running_server(tmp_path / "models", tmp_path, *loads) as server:
        with grpcclient.InferenceServerClient(server.url) as client:
            scope = {"client": client, "grpcclient": grpcclient, "np": np}
            exec(code, scope)  # the README's own lines
            x = grpcclient.InferInput("x", [1, 16], "FP32")
            x.set_data_from_numpy(np.ones((1, 16), np.float32))
            once = client.infer("matmul16", [x]).as_numpy("y")
            x.set_data_from_numpy(once)
            expected = client.infer("matmul16", [x]).as_numpy("y")
    np.testing.assert_array_equal(scope["twice"], expected)


def test_offline_scoring_of_an_ensemble_in_process_is_refused_pointing_at_url(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.npy"
    np.save(source, np.zeros((3, 4), dtype=np.float32))
    args = ["--model", "pipeline", "--input", str(source), "--output", str(tmp_path / "out.jsonl")]
    assert main(["batch", "--model-repository", str(repository), *args]) == 2
    assert "model pipeline is an ensemble: score it with --url" in capsys.readouterr().err


def test_permission_on_the_ensemble_runs_its_steps_without_permission_on_them(repository: Path, tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    auth = {"enabled": True, "algorithms": ["HS256"], "secret_env": "INFERGATE_TEST_JWT_SECRET"}
    config.write_text(json.dumps({"auth": {**auth, "issuer": ISSUER, "audience": AUDIENCE}}))
    loads = [arg for name in ["pipeline", *STEP_MODELS] for arg in ("--load-model", name)]
    args = ("--config", str(config), "--model-control-mode", "explicit", *loads)
    server = launch_server(repository, tmp_path, *args, env={"INFERGATE_TEST_JWT_SECRET": SECRET.decode()})
    try:
        headers = bearer(token(SECRET, "HS256", claims("infer:pipeline")))
        with grpcclient.InferenceServerClient(server.url) as client:
            tensor = grpcclient.InferInput("INPUT", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X)
            answer = client.infer("pipeline", [tensor], headers=headers).as_numpy("OUTPUT")
            tensor = grpcclient.InferInput("x", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X)
            with pytest.raises(InferenceServerException) as caught:
                client.infer("double", [tensor], headers=headers)
    finally:
        assert server.terminate() == 0, server.log()
    np.testing.assert_array_equal(answer, X * 5)
    assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "needs permission 'infer:double'" in caught.value.message()


async def test_check_of_one_ensemble_checks_the_models_its_steps_run(repository: Path) -> None:
    report = await check_repository(repository, models=["pipeline"])
    assert report.ok, report.as_table()
    loaded = {f.model for f in report.findings if f.check == "load" and f.level == "ok"}
    assert loaded == {"double", "triple", "add"}  # not gathered: no step of pipeline runs it
    assert [(f.model, f.level) for f in report.findings if f.check == "ensemble"] == [("pipeline", "ok")]


def test_ensembles_load_after_the_ensembles_their_steps_run() -> None:
    pipelines = {"outer": {"pipeline", "double"}, "pipeline": {"double", "add"}, "top": {"outer"}, "flat": {"double"}}
    assert load_order(pipelines) == [["flat", "pipeline"], ["outer"], ["top"]]
    # Ensembles that run each other come last, together: their loads say what is wrong.
    assert load_order({"a": {"b"}, "b": {"a"}, "c": set()}) == [["c"], ["a", "b"]]


def test_a_polled_ensemble_that_waited_for_its_step_model_loads_when_the_model_arrives(tmp_path: Path) -> None:
    """The ensemble reaches the repository before its step model (a rollout copying files in that
    order): it fails, naming the step, and the poll that loads the step model loads it too."""
    root = tmp_path / "models"
    solo = yaml.safe_load(BATCHED)
    solo["ensemble_scheduling"]["step"][0]["model_name"] = "double"
    write(root, "solo", json.dumps(solo))  # JSON is YAML
    polling = ("--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    with running_server(root, tmp_path, *polling, wait=False) as server:
        with grpcclient.InferenceServerClient(server.url) as client:

            def solo_reason() -> str:
                rows = client.get_model_repository_index(as_json=True).get("models", [])
                return next((row.get("reason", "") for row in rows if row["name"] == "solo"), "")

            wait_until(lambda: "step 0 (double)" in solo_reason(), "solo refused for want of double")
            staging = tmp_path / "double"
            write(staging, "double", "max_batch_size: 8\n", build_scale_model(2.0))
            (staging / "double").rename(root / "double")  # the whole directory at once, as a rollout would
            wait_until(lambda: client.is_model_ready("solo"), "solo loaded once double arrived")
            np.testing.assert_array_equal(infer(client, "solo", X), X * 2)


async def test_an_ensemble_requests_trace_holds_each_steps_queue_wait_and_batch(tmp_path: Path) -> None:
    """Traced as a request to each step model would be: a queue span per step under the request's span,
    and each step model's batch span linked to it."""
    root = tmp_path / "models"
    write(root, "double", "max_batch_size: 8\n", build_scale_model(2.0))
    write(root, "triple", "max_batch_size: 8\n", build_scale_model(3.0))
    write(root, "add", "max_batch_size: 16\n", build_add_model())
    write(root, "pipeline", PIPELINE)
    async with observed_server(root, sample_ratio=1.0) as observed:
        async with aioclient.InferenceServerClient(observed.url) as client:
            tensor = aioclient.InferInput("INPUT", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X)
            await client.infer("pipeline", [tensor])

        def request_span() -> Any:
            return next((s for s in observed.finished_spans() if s.name.endswith("/ModelInfer")), None)

        await eventually(request_span, "the ensemble request's span")
        spans, rpc = observed.finished_spans(), request_span()
    queues = [
        s for s in spans if s.name == "queue" and s.parent is not None and s.parent.span_id == rpc.context.span_id
    ]
    assert sorted(str(q.attributes["infergate.model.name"]) for q in queues) == ["add", "double", "triple"]
    batches = {s.name: s for s in spans if s.name in ("batch double", "batch triple", "batch add")}
    assert set(batches) == {"batch double", "batch triple", "batch add"}
    assert all(rpc.context.span_id in [link.context.span_id for link in b.links] for b in batches.values())


def test_a_steps_inputs_with_different_rows_are_refused_before_they_can_share_a_batch() -> None:
    """An ensemble that does not batch passes its inputs through whole; a batching step model would cut
    a batch of such requests back by the first input's rows, handing one request another's."""
    fp32 = DATATYPES["FP32"]
    spec = ModelSpec("concat", 1, (TensorSpec("a", fp32, (-1, 2)), TensorSpec("b", fp32, (-1, 2))), (), 8)
    step = EnsembleStep(0, "concat", "", (("a", "A"), ("b", "B")), ())
    tensors = {"A": np.zeros((1, 2), np.float32), "B": np.zeros((2, 2), np.float32)}
    with pytest.raises(InvalidArgument, match="input 'b' has 2 rows and the step's other inputs 1"):
        step_request("pipeline", step, spec, tensors)
    tensors["B"] = np.zeros((1, 2), np.float32)
    assert step_request("pipeline", step, spec, tensors).rows == 1
