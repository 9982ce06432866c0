"""SIGTERM under load loses no call the server took on.

Clients that do not watch health (tritonclient, each caller on its own
connection, 32 in flight) keep calling while the server is stopped. Every
call the server admitted before it stopped admitting gets its real answer;
every other call gets UNAVAILABLE, which clients retry; none is CANCELLED.
This holds with and without ``shutdown_delay_seconds`` and with and without
``--workers 2``. A client that retries UNAVAILABLE on another replica loses
nothing at all (docs/deploy.md says so).

The suite runs each configuration FAULT_REPEAT times (2 by default, to keep
the suite short); INFERGATE_FAULT_REPEAT=20 is the long run recorded in
BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess, eventually, launch_server
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate.demo import build_matmul16

FAULT_REPEAT = int(os.environ.get("INFERGATE_FAULT_REPEAT", "2"))
IN_FLIGHT = 32


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sigterm")
    (root / "tiny" / "1").mkdir(parents=True)
    onnx.save(build_matmul16(), root / "tiny" / "1" / "model.onnx")
    (root / "tiny" / "config.yaml").write_text("max_batch_size: 64\n")
    return root


def inputs(value: float) -> list[InferInput]:
    tensor = InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.full((1, 16), value, np.float32))
    return [tensor]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)


async def call_until(url: str, stop: asyncio.Event, tally: Tally, expected: np.ndarray) -> None:
    """One caller on its own connection, calling back to back until ``stop``; it never watches health."""
    async with aioclient.InferenceServerClient(url) as client:
        while not stop.is_set():
            try:
                result = await client.infer("tiny", inputs(1.0), client_timeout=30)
            except InferenceServerException as exc:
                tally.outcomes[str(exc.status())] += 1
                await asyncio.sleep(0.005)  # a refused caller tries again, a little later
                continue
            tally.outcomes["OK"] += 1
            if not np.allclose(result.as_numpy("y"), expected):
                tally.wrong.append(str(result.as_numpy("y")))


async def sigterm_under_load(server: ServerProcess, expected: np.ndarray) -> Tally:
    tally, stop = Tally(), asyncio.Event()
    callers = [asyncio.create_task(call_until(server.url, stop, tally, expected)) for _ in range(IN_FLIGHT)]
    await eventually(lambda: tally.outcomes["OK"] >= 200, "200 answered calls before the signal")
    server.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(server.process.wait, 60)
    await eventually(lambda: tally.outcomes["StatusCode.UNAVAILABLE"] >= IN_FLIGHT, "every caller refused")
    stop.set()
    await asyncio.gather(*callers)
    assert code == 0, server.log()
    return tally


def expected_answer(repository: Path) -> np.ndarray:
    """What the model computes for the callers' input, by onnxruntime in this process."""
    session = ort.InferenceSession(str(repository / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.full((1, 16), 1.0, np.float32)})
    return np.asarray(y)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="plain"),
        pytest.param(("--config", "delay"), id="shutdown-delay"),
        pytest.param(("--workers", "2"), id="workers-2"),
        pytest.param(("--workers", "2", "--config", "delay"), id="workers-2-shutdown-delay"),
    ],
)
async def test_sigterm_under_load_answers_every_admitted_call_and_cancels_none(
    repository: Path, log_dir: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    delay = tmp_path / "delay.yaml"
    delay.write_text("shutdown_delay_seconds: 0.5\n")
    args = tuple(str(delay) if a == "delay" else a for a in extra)
    totals: Counter[str] = Counter()
    expected = expected_answer(repository)
    for _ in range(FAULT_REPEAT):
        server = launch_server(repository, log_dir, *args)
        try:
            tally = await sigterm_under_load(server, expected)
        finally:
            server.terminate()
        assert tally.wrong == [], "a call was answered with something else than its result"
        totals.update(tally.outcomes)
    assert set(totals) <= {"OK", "StatusCode.UNAVAILABLE"}, totals
    assert totals["OK"] >= 200 * FAULT_REPEAT


async def test_a_client_that_retries_unavailable_on_another_replica_loses_nothing(
    repository: Path, log_dir: Path
) -> None:
    replicas = [launch_server(repository, log_dir), launch_server(repository, log_dir)]
    expected = expected_answer(repository)
    served, failed, stop = Counter[str](), Counter[str](), asyncio.Event()

    async def caller(first: int) -> None:
        clients = [aioclient.InferenceServerClient(r.url) for r in replicas]
        turn = first
        try:
            while not stop.is_set():
                try:
                    result = await clients[turn].infer("tiny", inputs(1.0), client_timeout=30)
                except InferenceServerException as exc:
                    if exc.status() != "StatusCode.UNAVAILABLE":
                        failed[str(exc.status())] += 1
                    turn = 1 - turn  # what the docs ask of a client: retry UNAVAILABLE elsewhere
                    continue
                served[str(turn)] += 1
                assert np.allclose(result.as_numpy("y"), expected)
        finally:
            for client in clients:
                await client.close()

    try:
        callers = [asyncio.create_task(caller(i % 2)) for i in range(IN_FLIGHT)]
        await eventually(lambda: served["0"] >= 100, "calls answered by the replica to be stopped")
        replicas[0].process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(replicas[0].process.wait, 60) == 0
        before = served["1"]
        await eventually(lambda: served["1"] >= before + 200, "the other replica answering everyone")
        stop.set()
        await asyncio.gather(*callers)
    finally:
        for replica in replicas:
            replica.terminate()
    assert failed == Counter(), failed
