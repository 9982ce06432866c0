"""Property: no ModelInferRequest, however wrong, hurts the server.

10,000 requests reach a real server over one channel. Hypothesis draws 1,250
of them from scratch (random models, names including unicode, datatypes,
shapes with negative and huge dims, raw byte lengths, typed contents,
parameters of every type, requested outputs); after each, seven mutants of a
valid request for a demo model follow (a dim changed, an input dropped or
duplicated, raw data cut or grown, a datatype swapped, a tensor or its
contents grafted from the drawn request, a timeout added). Mutating with a
seeded ``random.Random`` is cheap where drawing is not, which keeps the run
well under a minute on a shared machine. Every answer must be a proper status:
success, or a refusal a client can act on, never UNKNOWN or INTERNAL (which
would mean a Python exception escaped). Afterwards the process is alive and
valid requests succeed. The run is derandomized: CI sees the same requests
every time. A second test sends 2,000 mutants over one ModelStreamInfer
stream, which answers errors in-band: one answer per request, none of them an
internal error, and the stream ends cleanly.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import ServerProcess
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.models.datatypes import DATATYPES

REQUESTS = 10_000
MUTANTS = 7  # mutants of valid requests sent with each request hypothesis draws (mutating is cheap, drawing is not)
EXAMPLES = REQUESTS // (1 + MUTANTS)
STREAM_REQUESTS = 2_000
HANG_GUARD_S = 30.0  # a call that takes this long is a hang; not a performance bound

# What a client may be told about a bad request; UNKNOWN and INTERNAL are bugs.
PROPER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

MODELS = ["matmul16", "multi_io", "identity_all"]  # small tensors: a failing example stays readable
Tensor = pb.ModelInferRequest.InferInputTensor
Param = pb.InferParameter

# --------------------------------------------------------------------------- valid requests to mutate


def _fill(datatype: str, shape: list[int]) -> bytes:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", 2) + b"ok" for _ in range(count))
    return np.zeros(count, dtype=DATATYPES[datatype].numpy).tobytes()


def valid_requests(stub: pb_grpc.GRPCInferenceServiceStub) -> list[pb.ModelInferRequest]:
    requests = []
    for model in MODELS:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=HANG_GUARD_S)
        inputs, raw = [], []
        for t in meta.inputs:
            shape = [1 if d < 0 else d for d in t.shape]
            inputs.append(Tensor(name=t.name, datatype=t.datatype, shape=shape))
            raw.append(_fill(t.datatype, shape))
        requests.append(pb.ModelInferRequest(model_name=model, id="valid", inputs=inputs, raw_input_contents=raw))
    return requests


# --------------------------------------------------------------------------- strategies

# Cheap to draw: a list of awkward strings, and now and then a short random one.
AWKWARD = ["", " ", "x ", "\x00", "名前", "ñ", "🙂", "a" * 300, "\u202eRTL", "../etc", "%s%n", "x\ny"]
text = st.sampled_from(AWKWARD) | st.text(max_size=4)
names = st.sampled_from(["x", "y", "image", "a", "b", "c", "d", "in_FP32", "in_BYTES", ""]) | text
datatypes = st.sampled_from([*DATATYPES, "", "FP8", "fp32", "STRING", "BF16"]) | text
dims = (
    st.integers(0, 20)
    | st.integers(-3, -1)
    | st.sampled_from([2**31 - 1, 2**31, 2**32 + 1, 2**62, 2**63 - 1, -(2**63)])
    | st.integers(-(2**63), 2**63 - 1)
)
shapes = st.lists(dims, max_size=6)
parameters = st.dictionaries(
    st.sampled_from(["timeout", "binary_data_size", "sequence_id", "priority", "shm_region"]) | text,
    st.builds(Param, bool_param=st.booleans())
    | st.builds(Param, int64_param=st.integers(-(2**63), 2**63 - 1))
    | st.builds(Param, uint64_param=st.integers(0, 2**64 - 1))
    | st.builds(Param, double_param=st.floats(allow_nan=True))
    | st.builds(Param, string_param=text),
    max_size=2,
)
contents = st.one_of(
    st.builds(pb.InferTensorContents, fp32_contents=st.lists(st.floats(width=32), max_size=6)),
    st.builds(pb.InferTensorContents, int_contents=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6)),
    st.builds(pb.InferTensorContents, int64_contents=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6)),
    st.builds(pb.InferTensorContents, bool_contents=st.lists(st.booleans(), max_size=6)),
    st.builds(pb.InferTensorContents, bytes_contents=st.lists(st.binary(max_size=8), max_size=6)),
    st.builds(pb.InferTensorContents, uint64_contents=st.lists(st.integers(0, 2**64 - 1), max_size=6)),
)
tensors = st.builds(
    Tensor, name=names, datatype=datatypes, shape=shapes, parameters=parameters, contents=st.none() | contents
)


@st.composite
def scratch(draw: st.DrawFn) -> pb.ModelInferRequest:
    inputs = draw(st.lists(tensors, max_size=4))
    raw = draw(
        st.none()
        | st.lists(st.binary(max_size=96), min_size=len(inputs), max_size=len(inputs))
        | st.lists(st.binary(max_size=32), max_size=5)
    )
    return pb.ModelInferRequest(
        model_name=draw(st.sampled_from(MODELS) | text),
        model_version=draw(st.sampled_from(["", "1", "2", "0", "-1", "01", "x"]) | text),
        id=draw(text),
        inputs=inputs,
        raw_input_contents=raw or [],
        parameters=draw(parameters),
        outputs=draw(st.lists(st.builds(pb.ModelInferRequest.InferRequestedOutputTensor, name=names), max_size=3)),
    )


INTERESTING_DIMS = [0, 1, 2, 3, 4, 16, -1, -2, 2**31 - 1, 2**31, 2**32 + 1, 2**62, 2**63 - 1, -(2**63)]
DATATYPE_NAMES = [*DATATYPES, "", "FP8", "fp32", "STRING"]
INPUT_NAMES = ["x", "a", "b", "flag", "text", "in_FP32", "in_BYTES", *AWKWARD]
MUTATIONS = ["dim", "shape", "drop", "duplicate", "raw", "datatype", "name", "timeout", "graft", "contents"]


def mutant(rng: random.Random, valid: list[pb.ModelInferRequest], donor: pb.ModelInferRequest) -> pb.ModelInferRequest:
    """A valid request with one to three mutations, some grafted from ``donor`` (a request from scratch)."""
    request = pb.ModelInferRequest()
    request.CopyFrom(rng.choice(valid))
    for _ in range(rng.randint(1, 3)):
        _mutate(rng, request, donor)
    return request


def _mutate(rng: random.Random, request: pb.ModelInferRequest, donor: pb.ModelInferRequest) -> None:
    n, raw = len(request.inputs), request.raw_input_contents
    i = rng.randrange(max(n, 1))
    kind = rng.choice(MUTATIONS) if n else "timeout"
    if kind == "timeout":
        request.parameters["timeout"].int64_param = rng.choice([-1, 0, 1, 10**7, 2**63 - 1])
    elif kind == "dim" and request.inputs[i].shape:
        shape = request.inputs[i].shape
        shape[rng.randrange(len(shape))] = rng.choice([*INTERESTING_DIMS, rng.randint(-(2**63), 2**63 - 1)])
    elif kind == "shape":
        request.inputs[i].ClearField("shape")
        request.inputs[i].shape.extend(rng.choices(INTERESTING_DIMS, k=rng.randint(0, 5)))
    elif kind == "drop":
        del request.inputs[i]
        if i < len(raw) and rng.random() < 0.5:
            del raw[i]
    elif kind == "duplicate":
        request.inputs.append(request.inputs[i])
        if i < len(raw) and rng.random() < 0.5:
            raw.append(raw[i])
    elif kind == "raw" and i < len(raw):
        data = raw[i]
        raw[i] = rng.choice(
            [data[:-1], data + b"\x00", b"", data * 2, data[: len(data) // 2], rng.randbytes(len(data))]
        )
    elif kind == "datatype":
        request.inputs[i].datatype = rng.choice(DATATYPE_NAMES)
    elif kind == "name":
        request.inputs[i].name = rng.choice(INPUT_NAMES)
    elif kind == "graft" and donor.inputs:
        request.inputs[i].CopyFrom(rng.choice(donor.inputs))
    elif kind == "contents" and donor.inputs:
        request.ClearField("raw_input_contents")
        request.inputs[i].contents.CopyFrom(rng.choice(donor.inputs).contents)


# --------------------------------------------------------------------------- the property


@pytest.fixture(scope="module")
def stub(demo_server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(demo_server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def status_of(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    try:
        stub.ModelInfer(request, timeout=HANG_GUARD_S)
    except grpc.RpcError as error:
        failure: Any = error
        return failure.code(), failure.details()
    return grpc.StatusCode.OK, ""


def test_no_request_gets_an_improper_status(demo_server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    valid = valid_requests(stub)
    for request in valid:
        assert status_of(stub, request)[0] == grpc.StatusCode.OK
    seen: dict[grpc.StatusCode, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(request=scratch(), seed=st.integers(0, 2**32 - 1))
    def property(request: pb.ModelInferRequest, seed: int) -> None:
        rng = random.Random(seed)
        batch = [request, *(mutant(rng, valid, request) for _ in range(MUTANTS))]
        calls = [stub.ModelInfer.future(sent, timeout=HANG_GUARD_S) for sent in batch]  # in flight together
        for sent, call in zip(batch, calls, strict=True):
            code, details = call.code(), call.details()
            seen[code] = seen.get(code, 0) + 1
            assert code in PROPER, f"{code}: {details}\n{sent}"

    property()
    assert sum(seen.values()) >= REQUESTS
    assert demo_server.process.poll() is None, demo_server.log()
    for request in valid:
        assert status_of(stub, request)[0] == grpc.StatusCode.OK
    # The requests reached deep: some succeeded and many were refused, for several reasons.
    assert seen.get(grpc.StatusCode.OK, 0) > 0 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0


def test_a_stream_of_mutated_requests_answers_each_one_and_ends_cleanly(
    demo_server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """ModelStreamInfer answers bad requests in-band: one answer per request, none an internal error."""
    valid = valid_requests(stub)
    rng = random.Random(0)
    requests = [mutant(rng, valid, rng.choice(valid)) for _ in range(STREAM_REQUESTS)]
    for index, request in enumerate(requests):
        request.id = str(index)
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=HANG_GUARD_S * 4))
    assert sorted(int(a.infer_response.id) for a in answers) == list(range(STREAM_REQUESTS))
    internal = [a.error_message for a in answers if "internal error" in a.error_message]
    assert internal == []
    assert any(a.error_message == "" for a in answers) and any(a.error_message for a in answers)
    assert demo_server.process.poll() is None
