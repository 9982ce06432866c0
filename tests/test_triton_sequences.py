"""Stateful models (Triton's sequence batching) over a real server, through tritonclient.

The behaviours Triton's sequence example clients rely on, sync, over a stream
(sync and asyncio) and with a string correlation id; implicit state kept
between requests (running sums checked against a local computation, four
sequences at once); idle sequences freed; sequence parameters refused on a
model without sequence batching; and a version split that keeps every
sequence on one version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess, running_server
from triton_models import running_sum, stand_in, write_stand_in, write_triton_repository
from tritonclient.utils import InferenceServerException

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

VALUES = [0, 11, 7, 5, 3, 2, 0, 1]  # what Triton's sequence examples send
IMPLICIT = "simple_sequence_implicit"
# One slot and a short idle limit: a second sequence can start only once the first was freed.
ONE_SLOT = "one_slot_sequence"
IDLE_US = 200_000
# Two versions of a running sum, split 50/50 and sticky on the correlation id.
SPLIT = "split_sequence"
SPLIT_ROUTING = "version_policy: {all: {}}\nrouting:\n  weights: {1: 50, 2: 50}\n  sticky: {parameter: sequence_id}\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("sequence-models")
    write_triton_repository(
        root, ["simple", "simple_sequence", "simple_dyna_sequence", "simple_string_dyna_sequence", IMPLICIT]
    )
    implicit = stand_in(IMPLICIT)
    one_slot = implicit.config_yaml.replace("max_batch_size: 8", "max_batch_size: 1").replace(
        "max_sequence_idle_microseconds: 5000000", f"max_sequence_idle_microseconds: {IDLE_US}"
    )
    write_stand_in(root, dataclasses.replace(implicit, name=ONE_SLOT, config_yaml=one_slot))
    split = implicit.config_yaml + SPLIT_ROUTING
    write_stand_in(root, dataclasses.replace(implicit, name=SPLIT, config_yaml=split), versions=(1, 2))
    with running_server(root, tmp_path_factory.mktemp("sequence-logs")) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


@pytest.fixture
async def aio(server: ServerProcess) -> AsyncIterator[aioclient.InferenceServerClient]:
    c = aioclient.InferenceServerClient(server.url)
    try:
        yield c
    finally:
        await c.close()


def one_value(value: int, module: Any = grpcclient) -> list[Any]:
    tensor = module.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [tensor]


def flags(index: int, count: int) -> dict[str, bool]:
    return {"sequence_start": index == 0, "sequence_end": index == count - 1}


def send_sequence(
    client: grpcclient.InferenceServerClient, model: str, sequence: int | str, values: list[int]
) -> list[int]:
    answers = []
    for i, value in enumerate(values):
        result = client.infer(model, one_value(value), sequence_id=sequence, **flags(i, len(values)))
        answers.append(int(result.as_numpy("OUTPUT")[0, 0]))
    return answers


# --------------------------------------------------------------------------- Triton's example models


@pytest.mark.parametrize("sequence", [1000, "0f8e2c1a-uuid"])
def test_simple_sequence_answers_as_triton_s_example_clients_expect(
    client: grpcclient.InferenceServerClient, sequence: int | str
) -> None:
    # OUTPUT = READY * (INPUT + START): the server fills START and READY.
    assert send_sequence(client, "simple_sequence", sequence, VALUES) == [1, 11, 7, 5, 3, 2, 0, 1]
    negated = [-v for v in VALUES]
    assert send_sequence(client, "simple_sequence", sequence, negated) == [1, -11, -7, -5, -3, -2, 0, -1]


def test_dyna_sequence_adds_the_integer_correlation_id_on_the_last_request(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert send_sequence(client, "simple_dyna_sequence", 1000, VALUES) == [1, 11, 7, 5, 3, 2, 0, 1 + 1000]


def test_string_dyna_sequence_sums_its_inputs_and_adds_the_string_id_at_the_end(
    client: grpcclient.InferenceServerClient,
) -> None:
    sums = running_sum(VALUES)
    assert send_sequence(client, "simple_string_dyna_sequence", "1002", VALUES) == [*sums[:-1], sums[-1] + 1002]


def test_an_integer_id_on_a_model_whose_correlation_id_is_a_string_is_refused(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        client.infer("simple_string_dyna_sequence", one_value(1), sequence_id=7, sequence_start=True)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "sequence batching control 'CORRID' data-type is 'UINT64'" in str(refused.value.message())


def test_a_sync_stream_answers_every_request_of_a_sequence_in_order(client: grpcclient.InferenceServerClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, value in enumerate(VALUES):  # all sent before any answer is read
            client.async_stream_infer(
                IMPLICIT, one_value(value), request_id=f"s_{i}", sequence_id=55, **flags(i, len(VALUES))
            )
        got = {}
        for _ in VALUES:
            result, error = answers.get(timeout=30)
            assert error is None, error
            got[result.get_response().id] = int(result.as_numpy("OUTPUT")[0, 0])
    finally:
        client.stop_stream()
    assert [got[f"s_{i}"] for i in range(len(VALUES))] == running_sum(VALUES)


# --------------------------------------------------------------------------- implicit state


async def test_four_concurrent_sequences_of_twenty_requests_each_get_their_running_sums(
    aio: aioclient.InferenceServerClient,
) -> None:
    rng = np.random.default_rng(18)
    inputs = {seq: [int(v) for v in rng.integers(-50, 50, size=20)] for seq in (101, 102, "uuid-103", 104)}

    async def run(sequence: int | str, values: list[int]) -> list[int]:
        answers = []
        for i, value in enumerate(values):
            result = await aio.infer(
                IMPLICIT, one_value(value, aioclient), sequence_id=sequence, **flags(i, len(values))
            )
            answers.append(int(result.as_numpy("OUTPUT")[0, 0]))
        return answers

    got = await asyncio.gather(*(run(seq, values) for seq, values in inputs.items()))
    for (seq, values), answers in zip(inputs.items(), got, strict=True):
        assert answers == running_sum(values), seq


async def test_four_sequences_interleaved_on_one_aio_stream_each_get_their_running_sums(
    aio: aioclient.InferenceServerClient,
) -> None:
    rng = np.random.default_rng(81)
    inputs = {seq: [int(v) for v in rng.integers(-50, 50, size=20)] for seq in (201, 202, 203, "s-204")}

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for step in range(20):  # round robin: every sequence has requests in flight at once
            for seq, values in inputs.items():
                yield {
                    "model_name": IMPLICIT,
                    "inputs": one_value(values[step], aioclient),
                    "request_id": f"{seq}/{step}",
                    "sequence_id": seq,
                    **flags(step, 20),
                }

    got: dict[str, int] = {}
    async for result, error in aio.stream_infer(requests()):
        assert error is None, error
        got[result.get_response().id] = int(result.as_numpy("OUTPUT")[0, 0])
        if len(got) == 80:
            break
    for seq, values in inputs.items():
        assert [got[f"{seq}/{step}"] for step in range(20)] == running_sum(values), seq


def test_a_negative_id_is_the_unsigned_id_it_wraps_to_as_in_triton(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    # tritonclient sends an integer id as int64; a raw uint64 of the same 64 bits continues its sequence.
    assert client.infer(IMPLICIT, one_value(3), sequence_id=-5, sequence_start=True).as_numpy("OUTPUT")[0, 0] == 3
    request = pb.ModelInferRequest(model_name=IMPLICIT, raw_input_contents=[np.int32(4).tobytes()])
    request.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
    request.parameters["sequence_id"].uint64_param = 2**64 - 5
    with grpc.insecure_channel(server.url) as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert np.frombuffer(answer.raw_output_contents[0], dtype=np.int32).tolist() == [7]
    assert client.infer(IMPLICIT, one_value(1), sequence_id=-5, sequence_end=True).as_numpy("OUTPUT")[0, 0] == 8


def test_a_non_start_request_of_an_unknown_sequence_is_refused_in_triton_s_words(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        client.infer(IMPLICIT, one_value(1), sequence_id=987654)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert (
        f"inference request for sequence 987654 to model '{IMPLICIT}' must specify the START flag "
        "on the first request of the sequence"
    ) in str(refused.value.message())


def test_a_sequence_model_refuses_a_request_without_a_correlation_id(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as refused:
        client.infer(IMPLICIT, one_value(1))
    assert f"inference request to model '{IMPLICIT}' must specify a non-zero or non-empty correlation ID" in str(
        refused.value.message()
    )


def test_an_idle_sequence_is_freed_and_its_next_request_is_refused_saying_why(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert client.infer(ONE_SLOT, one_value(3), sequence_id=1, sequence_start=True).as_numpy("OUTPUT")[0, 0] == 3
    # The only slot is taken: this start is answered once sequence 1 has been idle too long and was freed.
    result = client.infer(ONE_SLOT, one_value(4), sequence_id=2, sequence_start=True, client_timeout=30)
    assert result.as_numpy("OUTPUT")[0, 0] == 4
    with pytest.raises(InferenceServerException) as refused:
        client.infer(ONE_SLOT, one_value(1), sequence_id=1)
    message = str(refused.value.message())
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must specify the START flag" in message
    assert f"idle for more than max_sequence_idle_microseconds={IDLE_US} and was freed" in message
    client.infer(ONE_SLOT, one_value(1), sequence_id=2, sequence_end=True)


# --------------------------------------------------------------------------- models without sequence batching


@pytest.mark.parametrize(
    "parameters",
    [{"sequence_id": 5}, {"sequence_id": "abc", "sequence_start": True}],
    ids=["int id", "string id with start"],
)
def test_a_sequence_id_on_a_model_without_sequence_batching_is_refused(
    client: grpcclient.InferenceServerClient, parameters: dict[str, Any]
) -> None:
    inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("simple", inputs, **parameters)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "model 'simple' does not use sequence batching" in str(refused.value.message())
    assert client.infer("simple", inputs).as_numpy("OUTPUT0")[0, 0] == 2


# --------------------------------------------------------------------------- --workers N


def test_with_several_workers_a_stateful_model_is_refused_at_load_and_the_others_serve(
    tmp_path: Path, log_dir: Path
) -> None:
    # Each worker would keep its own sequences, and the kernel gives a client's connections to either.
    write_triton_repository(tmp_path, ["simple", IMPLICIT])
    with (
        running_server(tmp_path, log_dir, "--workers", "2", "--strict-readiness=false") as server,
        grpcclient.InferenceServerClient(server.url) as client,
    ):
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index[IMPLICIT]["state"] == "UNAVAILABLE"
        assert index[IMPLICIT]["reason"] == (
            f"model '{IMPLICIT}' uses sequence_batching and this server runs 2 worker processes: "
            "sequence state lives in one process; serve stateful models with --workers 1 (a separate deployment)"
        )
        assert not client.is_model_ready(IMPLICIT)
        assert client.is_model_ready("simple")
    assert server.logged(f"model {IMPLICIT} version 1 failed to load", times=2), "refused by each worker"


# --------------------------------------------------------------------------- routing


def test_a_split_sticky_on_the_correlation_id_keeps_each_sequence_on_one_version(
    client: grpcclient.InferenceServerClient,
) -> None:
    served: dict[int, set[str]] = {}
    for sequence in range(1, 17):
        values = [sequence, 1, 2]
        answers = []
        for i, value in enumerate(values):
            result = client.infer(SPLIT, one_value(value), sequence_id=sequence, **flags(i, len(values)))
            answers.append(int(result.as_numpy("OUTPUT")[0, 0]))
            served.setdefault(sequence, set()).add(result.get_response().model_version)
        assert answers == running_sum(values), sequence
    assert all(len(versions) == 1 for versions in served.values()), served
    assert set().union(*served.values()) == {"1", "2"}, "the split sends some sequences to each version"
