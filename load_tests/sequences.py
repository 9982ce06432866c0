"""Stateful load: many sequences in flight against a model with sequence batching and implicit state.

Builds a repository with one model, ``accumulator``: a running sum of FP32
[16] vectors whose state the server keeps between requests (``sequence_batching``
with ``state``, the direct strategy, 32 slots). Starts infergate on it (or uses
``target``) and keeps ``concurrency`` sequences in flight: each slot sends one
sequence's ``length`` requests one after another (the first with
``sequence_start``, the last with ``sequence_end``), then begins a new sequence
with a new correlation id. Requests of different sequences meet in the
server's batches, one row each.

Every answer is checked against the running sum computed here (small integers,
so float32 sums are exact); a wrong one counts as the error ``WRONG_ANSWER``.
Reports requests/s (one row each), latency percentiles and sequences
completed per second.
"""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

from .clients import CHANNEL_OPTIONS, CallFailed
from .loops import Tally, Window, closed_loop, cpu_in_window
from .models import make_model
from .report import LoadResult, format_load_table, summarize_load
from .servers import free_port, running_server

__all__ = ["MODEL", "SequenceRun", "build_repository", "run_sequences", "run_sequences_against"]

MODEL = "accumulator"
WIDTH = 16
SLOTS = 32  # max_batch_size: sequences that can hold a slot at once
WRONG_ANSWER = "WRONG_ANSWER"
_CALL_TIMEOUT_S = 30.0

_CONFIG = f"""\
max_batch_size: {SLOTS}
sequence_batching:
  max_sequence_idle_microseconds: 5000000  # a sequence a failure left open is freed soon
  control_input:
  - name: START
    control:
    - kind: CONTROL_SEQUENCE_START
      int32_false_true: [0, 1]
  - name: READY
    control:
    - kind: CONTROL_SEQUENCE_READY
      int32_false_true: [0, 1]
  state:
  - input_name: INPUT_STATE
    output_name: OUTPUT_STATE
    data_type: TYPE_FP32
    dims: [{WIDTH}]
    initial_state:
    - {{data_type: TYPE_FP32, dims: [{WIDTH}], zero_data: true, name: zeros}}
"""


def build_accumulator() -> onnx.ModelProto:
    """``OUTPUT = OUTPUT_STATE = READY * (INPUT + (1 - START) * INPUT_STATE)``, FP32 [batch, 16]."""
    nodes = [
        helper.make_node("Cast", ["START"], ["START_F"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["READY"], ["READY_F"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["ONE", "START_F"], ["KEEP"]),
        helper.make_node("Mul", ["KEEP", "INPUT_STATE"], ["CARRIED"]),
        helper.make_node("Add", ["INPUT", "CARRIED"], ["SUM"]),
        helper.make_node("Mul", ["READY_F", "SUM"], ["OUTPUT"]),
        helper.make_node("Identity", ["OUTPUT"], ["OUTPUT_STATE"]),
    ]

    def vector(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", WIDTH])

    flags = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 1]) for n in ("START", "READY")]
    inputs = [vector("INPUT"), vector("INPUT_STATE"), *flags]
    outputs = [vector("OUTPUT"), vector("OUTPUT_STATE")]
    one = helper.make_tensor("ONE", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(nodes, MODEL, inputs, outputs, initializer=[one])
    return make_model(graph)


def build_repository(root: pathlib.Path) -> None:
    directory = root / MODEL / "1"
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build_accumulator(), str(directory / "model.onnx"))
    (root / MODEL / "config.yaml").write_text(_CONFIG, encoding="utf-8")


@dataclass(frozen=True)
class SequenceRun:
    """One run: the load figures (one request = one row) and the sequences that ended inside the window."""

    result: LoadResult
    length: int
    sequences_completed: int

    @property
    def sequences_per_s(self) -> float:
        return self.sequences_completed / self.result.duration_s


class _Slot:
    """One sequence in flight at a time: sends its requests in order and checks each running sum."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub, ids: itertools.count[int], length: int, seed: int):
        self._stub = stub
        self._ids = ids
        self._length = length
        self._rng = np.random.default_rng(seed)
        self._step = length  # begin with a new sequence
        self._id = 0
        self._sum = np.zeros(WIDTH, dtype=np.float32)
        self.completed_at: list[float] = []

    async def send(self) -> None:
        if self._step == self._length:
            self._id, self._step = next(self._ids), 0
            self._sum[:] = 0
        values = self._rng.integers(0, 10, size=WIDTH).astype(np.float32)
        step = self._step
        start, end = step == 0, step == self._length - 1
        request = pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT", datatype="FP32", shape=[1, WIDTH])],
            raw_input_contents=[values.tobytes()],
        )
        request.parameters["sequence_id"].int64_param = self._id
        request.parameters["sequence_start"].bool_param = start
        request.parameters["sequence_end"].bool_param = end
        # A failed request abandons its sequence (the server frees it when idle): the next one starts anew.
        self._step = self._length
        try:
            reply = await self._stub.ModelInfer(request, timeout=_CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from None
        self._sum += values
        got = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
        if not np.array_equal(got, self._sum):
            raise CallFailed(WRONG_ANSWER, f"sequence {self._id}: expected {self._sum.tolist()}, got {got.tolist()}")
        if end:
            self.completed_at.append(time.perf_counter())
        else:
            self._step = step + 1


async def _measure(target: str, concurrency: int, length: int, warmup: float, duration: float) -> SequenceRun:
    ids = itertools.count(1)
    tally = Tally([], Counter())
    start = time.perf_counter() + warmup
    window = Window(start, start + duration)
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        slots = [_Slot(stub, ids, length, seed) for seed in range(concurrency)]
        cpu = asyncio.create_task(cpu_in_window(window))
        await asyncio.gather(*(closed_loop(slot.send, window, tally) for slot in slots))
        cpu_s, cpu_span_s = await cpu
    result = summarize_load(
        target=target,
        model=MODEL,
        client="raw-sequence",
        batch=1,
        concurrency=concurrency,
        processes=1,
        warmup_s=warmup,
        duration_s=duration,
        latencies_s=tally.latencies,
        errors=dict(tally.errors),
        cpu_s=cpu_s,
        cpu_span_s=cpu_span_s,
        response="",
        label=f"{concurrency} sequences of {length}",
    )
    completed = sum(1 for slot in slots for at in slot.completed_at if window.holds(at))
    return SequenceRun(result, length, completed)


def run_sequences_against(target: str, concurrency: int, length: int, warmup: float, duration: float) -> SequenceRun:
    """Load a server that already serves ``accumulator`` (see :func:`build_repository`)."""
    return asyncio.run(_measure(target, concurrency, length, warmup, duration))


def run_sequences(
    concurrency: int, length: int, warmup: float, duration: float, out: pathlib.Path, server_args: tuple[str, ...] = ()
) -> SequenceRun:
    """Build the repository, start infergate on it, load it, stop it."""
    with tempfile.TemporaryDirectory(prefix="sequence-bench-") as tmp:
        root = pathlib.Path(tmp)
        build_repository(root)
        port = free_port()
        target = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(root), "--port", str(port)]
        log = out / "sequences-server.log"
        with running_server("infergate", [*argv, *server_args], target, log, pathlib.Path.cwd(), models=[MODEL]):
            return run_sequences_against(target, concurrency, length, warmup, duration)


def format_sequence_run(run: SequenceRun) -> str:
    completed = f"sequences completed: {run.sequences_completed} ({run.sequences_per_s:,.1f}/s)"
    return f"{format_load_table([run.result])}\n{completed}"
