"""SIGTERM with stateful models: sequences already running may finish, none starts.

A start request waiting for a sequence slot could only be served once a live
sequence ended, and a sequence started during the drain would be cut before
its end: both are refused at once with UNAVAILABLE, so the client starts the
whole sequence again on another replica. The live sequences are still served,
as Triton serves its in-flight sequences while it stops, and the server exits
once they have ended (docs/deploy.md, "What a client must do").
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess, eventually, launch_server
from triton_models import stand_in, write_stand_in
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

MODEL = "two_slots"
# Two slots, and a sequence stays live for a minute unless it ends: only an end frees a slot here.
CONFIG = (
    stand_in("simple_sequence_implicit")
    .config_yaml.replace("max_batch_size: 8", "max_batch_size: 2\ninstance_group:\n  count: 1")
    .replace("max_sequence_idle_microseconds: 5000000", "max_sequence_idle_microseconds: 60000000")
)
GUARD_S = 120.0  # a hang guard for a busy machine, not a duration under test


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sigterm-sequences")
    write_stand_in(root, dataclasses.replace(stand_in("simple_sequence_implicit"), name=MODEL, config_yaml=CONFIG))
    return root


def one_value(value: int) -> list[InferInput]:
    tensor = InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [tensor]


async def send(client: aioclient.InferenceServerClient, sequence: int, value: int, **flags: bool) -> int:
    result = await client.infer(MODEL, one_value(value), sequence_id=sequence, client_timeout=GUARD_S, **flags)
    return int(result.as_numpy("OUTPUT")[0, 0])


def in_progress(server: ServerProcess) -> float:
    return server.metric("infergate_requests_active", rpc_method="ModelInfer")


async def refusal(client: aioclient.InferenceServerClient, sequence: int) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        await send(client, sequence, 1, sequence_start=True)
    return refused.value


async def test_on_sigterm_a_waiting_start_is_refused_at_once_and_the_live_sequences_finish(
    repository: Path, log_dir: Path
) -> None:
    # A grace of minutes: the waiting start could hold the drain that long, were it not refused.
    server = launch_server(repository, log_dir, "--shutdown-grace-seconds", "240", "--metrics-port", "0")
    try:
        async with aioclient.InferenceServerClient(server.url) as client:
            assert await send(client, 1, 1, sequence_start=True) == 1
            assert await send(client, 2, 10, sequence_start=True) == 10
            waiting = asyncio.create_task(refusal(client, 3))  # both slots are taken: it waits for one
            await eventually(lambda: in_progress(server) == 1, "the third start waits in the server")
            server.process.send_signal(signal.SIGTERM)

            refused = await waiting
            assert server.process.poll() is None, "refused while the server still runs, not when it stops"
            assert refused.status() == "StatusCode.UNAVAILABLE"
            assert refused.message() == (
                f"the server is shutting down: model {MODEL} starts no new sequences; "
                "retry the whole sequence, from its start request, on another replica"
            )
            assert (await refusal(client, 4)).message() == refused.message(), "no sequence starts any more"

            assert await send(client, 1, 2) == 3, "a live sequence goes on"
            assert await send(client, 1, 3, sequence_end=True) == 6
            assert await send(client, 2, 20, sequence_end=True) == 30
        code = await asyncio.to_thread(server.process.wait, GUARD_S)
    finally:
        server.terminate()
    assert code == 0, server.log()
    assert "2 sequence(s) live" in server.log()
