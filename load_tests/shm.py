"""Large tensors over the wire and through system shared memory, side by side.

Builds a repository with one model, ``image``: a batch of 16 images, FP32
[16, 3, 224, 224] (9.6 MB), global-average-pooled and projected onto 1000
classes (FP32 [16, 1000], 64 KB out). The model reads every input byte once
and does little else, so what is measured is how the tensors travel. Starts
infergate with ``--allow-client-shm`` on it (or uses ``target``, which must
run on this host with that flag and that model) and, for each of ``rounds``
rounds, loads it closed-loop once per variant, in turn:

* **wire**: each request carries the batch in ``raw_input_contents`` and the
  scores come back in ``raw_output_contents``;
* **shared memory**: each slot has its own input and output regions
  (``tritonclient.utils.shared_memory``, registered once); each request
  copies the batch into the input region, names both regions, and copies the
  scores out of the output region.

Both do what a client with a new batch in a numpy array must do, and both
check every answer against the scores computed here (a wrong one counts as
``WRONG_ANSWER``). Reports requests/s, images/s and latency per variant and
the shared-memory/wire ratio of each round.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import tritonclient.utils.shared_memory as shm  # type: ignore[import-untyped,unused-ignore]
from onnx import TensorProto, helper, numpy_helper

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

from .clients import CHANNEL_OPTIONS, CallFailed
from .loops import Tally, Window, closed_loop, cpu_in_window
from .models import make_model
from .report import LoadResult, format_load_table, summarize_load
from .servers import free_port, running_server

__all__ = ["MODEL", "SHAPE", "VARIANTS", "ShmRun", "build_repository", "format_shm_runs", "run_shm", "run_shm_against"]

MODEL = "image"
SHAPE = (16, 3, 224, 224)
CLASSES = 1000
VARIANTS = ("wire", "shared memory")
WRONG_ANSWER = "WRONG_ANSWER"
_CALL_TIMEOUT_S = 60.0
_IN_BYTES = int(np.prod(SHAPE)) * 4
_OUT_BYTES = SHAPE[0] * CLASSES * 4


def _weights() -> npt.NDArray[np.float32]:
    return np.random.default_rng(7).standard_normal((SHAPE[1], CLASSES)).astype(np.float32)


def build_image_model() -> onnx.ModelProto:
    """``scores = GlobalAveragePool(x) @ W``: x FP32 [batch, 3, 224, 224] -> scores FP32 [batch, 1000]."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("MatMul", ["features", "W"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        MODEL,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *SHAPE[1:]])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(_weights(), "W")],
    )
    return make_model(graph)


def expected_scores(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """What the model answers for ``batch``, computed here."""
    pooled: npt.NDArray[np.float32] = batch.mean(axis=(2, 3), dtype=np.float32)
    return pooled @ _weights()


def build_repository(root: pathlib.Path) -> None:
    directory = root / MODEL / "1"
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build_image_model(), str(directory / "model.onnx"))
    config = f"max_batch_size: {SHAPE[0]}\nsession_options: {{intra_op_num_threads: 1}}\n"
    (root / MODEL / "config.yaml").write_text(config, encoding="utf-8")


class _Sender(Protocol):
    async def send(self) -> None: ...
    async def close(self) -> None: ...


class _Slot:
    """What both variants share: a batch of its own, the scores it must get back, and the call."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub, seed: int):
        self.stub = stub
        self.batch = np.random.default_rng(seed).random(SHAPE, dtype=np.float32)
        self.expected = expected_scores(self.batch)

    async def call(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        try:
            reply: pb.ModelInferResponse = await self.stub.ModelInfer(request, timeout=_CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from None
        return reply

    def check(self, scores: npt.NDArray[Any]) -> None:
        if not np.allclose(scores, self.expected, rtol=1e-4, atol=1e-4):
            raise CallFailed(WRONG_ANSWER, "the scores differ from the ones computed locally")


class _Wire(_Slot):
    async def send(self) -> None:
        request = pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=SHAPE)],
            raw_input_contents=[self.batch.tobytes()],
        )
        reply = await self.call(request)
        self.check(np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(SHAPE[0], CLASSES))

    async def close(self) -> None:
        pass


class _SharedMemory(_Slot):
    """Regions of its own, created and registered once; each request copies the batch in and the scores out."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub, seed: int):
        super().__init__(stub, seed)
        tag = f"{os.getpid()}-{seed}-{uuid.uuid4().hex[:8]}"
        self.names = (f"bench-in-{tag}", f"bench-out-{tag}")
        self.keys = (f"/infergate-bench-in-{tag}", f"/infergate-bench-out-{tag}")
        self.handles = [
            shm.create_shared_memory_region(name, key, size)
            for name, key, size in zip(self.names, self.keys, (_IN_BYTES, _OUT_BYTES), strict=True)
        ]
        x = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=SHAPE)
        x.parameters["shared_memory_region"].string_param = self.names[0]
        x.parameters["shared_memory_byte_size"].int64_param = _IN_BYTES
        scores = pb.ModelInferRequest.InferRequestedOutputTensor(name="scores")
        scores.parameters["shared_memory_region"].string_param = self.names[1]
        scores.parameters["shared_memory_byte_size"].int64_param = _OUT_BYTES
        self.request = pb.ModelInferRequest(model_name=MODEL, inputs=[x], outputs=[scores])

    async def register(self) -> None:
        for name, key, size in zip(self.names, self.keys, (_IN_BYTES, _OUT_BYTES), strict=True):
            register = pb.SystemSharedMemoryRegisterRequest(name=name, key=key, byte_size=size)
            await self.stub.SystemSharedMemoryRegister(register, timeout=_CALL_TIMEOUT_S)

    async def send(self) -> None:
        shm.set_shared_memory_region(self.handles[0], [self.batch])
        await self.call(self.request)
        self.check(shm.get_contents_as_numpy(self.handles[1], np.float32, [SHAPE[0], CLASSES]).copy())

    async def close(self) -> None:
        try:
            for name in self.names:
                unregister = pb.SystemSharedMemoryUnregisterRequest(name=name)
                await self.stub.SystemSharedMemoryUnregister(unregister, timeout=_CALL_TIMEOUT_S)
        finally:
            for handle in self.handles:
                shm.destroy_shared_memory_region(handle)


async def _measure(target: str, variant: str, concurrency: int, warmup: float, duration: float) -> LoadResult:
    tally = Tally([], Counter())
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        senders: list[_Sender] = []
        try:
            for seed in range(concurrency):
                if variant == "wire":
                    senders.append(_Wire(stub, seed))
                else:
                    shared = _SharedMemory(stub, seed)
                    senders.append(shared)
                    await shared.register()
            start = time.perf_counter() + warmup
            window = Window(start, start + duration)
            cpu = asyncio.create_task(cpu_in_window(window))
            await asyncio.gather(*(closed_loop(s.send, window, tally) for s in senders))
            cpu_s, cpu_span_s = await cpu
        finally:
            for sender in senders:
                await sender.close()
    return summarize_load(
        target=target,
        model=MODEL,
        client=f"raw-{variant.replace(' ', '-')}",
        batch=SHAPE[0],
        concurrency=concurrency,
        processes=1,
        warmup_s=warmup,
        duration_s=duration,
        latencies_s=tally.latencies,
        errors=dict(tally.errors),
        cpu_s=cpu_s,
        cpu_span_s=cpu_span_s,
        response="",
        label=variant,
    )


@dataclass(frozen=True)
class ShmRun:
    """Every measurement of one run, in the order taken: round by round, each variant in turn."""

    rounds: list[dict[str, LoadResult]]

    def ratios(self) -> list[float]:
        """Shared-memory requests/s over wire requests/s, per round."""
        return [r["shared memory"].requests_per_s / r["wire"].requests_per_s for r in self.rounds]


def run_shm_against(target: str, concurrency: int, warmup: float, duration: float, rounds: int) -> ShmRun:
    """Load a server on this host that serves ``image`` with ``--allow-client-shm`` (see :func:`build_repository`)."""
    taken: list[dict[str, LoadResult]] = []
    for _ in range(rounds):
        taken.append({v: asyncio.run(_measure(target, v, concurrency, warmup, duration)) for v in VARIANTS})
        print(format_shm_runs(ShmRun(taken[-1:])).splitlines()[-1], flush=True)
    return ShmRun(taken)


def run_shm(
    concurrency: int,
    warmup: float,
    duration: float,
    rounds: int,
    out: pathlib.Path,
    server_args: Sequence[str] = (),
) -> ShmRun:
    """Build the repository, start infergate on it with shared memory allowed, load it, stop it."""
    with tempfile.TemporaryDirectory(prefix="shm-bench-") as tmp:
        root = pathlib.Path(tmp)
        build_repository(root)
        port = free_port()
        target = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(root), "--port", str(port)]
        argv += ["--allow-client-shm", *server_args]
        with running_server("infergate", argv, target, out / "shm-server.log", pathlib.Path.cwd(), models=[MODEL]):
            return run_shm_against(target, concurrency, warmup, duration, rounds)


def format_shm_runs(run: ShmRun) -> str:
    """The load table (both variants of every round) and one ratio line per round."""
    results = [result for taken in run.rounds for result in taken.values()]
    lines = [format_load_table(results)]
    for index, (taken, ratio) in enumerate(zip(run.rounds, run.ratios(), strict=True), start=1):
        wire, shared = taken["wire"], taken["shared memory"]
        p50 = shared.p50_ms / wire.p50_ms if wire.p50_ms else float("nan")
        lines.append(
            f"round {index}: shared memory {ratio:.2f}x the wire's images/s "
            f"({shared.samples_per_s:,.0f} vs {wire.samples_per_s:,.0f}), p50 {p50:.2f}x"
        )
    return "\n".join(lines)
