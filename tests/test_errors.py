"""Every bad request gets the right status code and a message naming what was wrong.

The rules, checked over infergate's generated stubs (``grpc.RpcError.code()``)
and over tritonclient, sync and asyncio (``InferenceServerException.status()``
reads like ``"StatusCode.INVALID_ARGUMENT"``):

* an unknown model or version is NOT_FOUND, in Triton's words
  (``Request for unknown model: '<name>' ...``); a version string that is not
  a number is INVALID_ARGUMENT (``failed to get model version from specified
  version string '<s>'``);
* a malformed request (datatype, shape, sizes, names, batch, BYTES) is
  INVALID_ARGUMENT, and the message names the model and the tensor;
* Triton's RPCs of extensions infergate does not implement are UNIMPLEMENTED, naming the extension;
* a model that failed to load is UNAVAILABLE, with the reason;
* no answer is ever UNKNOWN, and a refused request leaves the channel usable:
  each case sends a valid request on the same channel afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, TritonClient, running_server
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

import infergate
from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.demo import build_matmul16

Tensor = pb.ModelInferRequest.InferInputTensor
Requested = pb.ModelInferRequest.InferRequestedOutputTensor

X_BYTES = np.arange(16, dtype=np.float32).tobytes()  # one row of matmul16's x


# --------------------------------------------------------------------------- request building


@dataclass
class Infer:
    """A ModelInferRequest described by its parts; ``raw`` holds one entry per input."""

    model: str = "matmul16"
    inputs: list[Any] = field(default_factory=lambda: [Tensor(name="x", datatype="FP32", shape=[1, 16])])
    raw: list[bytes] = field(default_factory=lambda: [X_BYTES])
    outputs: list[str] = field(default_factory=list)
    version: str = ""

    def message(self) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(
            model_name=self.model,
            model_version=self.version,
            id="bad-request",
            inputs=self.inputs,
            raw_input_contents=self.raw,
            outputs=[Requested(name=n) for n in self.outputs],
        )


def _bytes_tensor(*items: bytes) -> bytes:
    return serialize_byte_tensor(np.array(items, dtype=np.object_)).item()  # type: ignore[no-any-return]


def multi_io(**overrides: tuple[Any, bytes] | None) -> Infer:
    """A valid multi_io request (batch 1) with some inputs replaced (or, with None, left out)."""
    tensors: dict[str, tuple[Any, bytes]] = {
        "a": (Tensor(name="a", datatype="FP32", shape=[1, 4]), np.ones(4, np.float32).tobytes()),
        "b": (Tensor(name="b", datatype="INT64", shape=[1, 4]), np.ones(4, np.int64).tobytes()),
        "flag": (Tensor(name="flag", datatype="BOOL", shape=[1, 1]), b"\x01"),
        "text": (Tensor(name="text", datatype="BYTES", shape=[1, 2]), _bytes_tensor(b"one", b"two")),
    }
    for name, replacement in overrides.items():
        if replacement is None:
            del tensors[name]
        else:
            tensors[name] = replacement
    return Infer(model="multi_io", inputs=[t for t, _ in tensors.values()], raw=[r for _, r in tensors.values()])


def x(shape: list[int], data: bytes = X_BYTES, datatype: str = "FP32") -> Infer:
    """matmul16 with one input ``x`` of the given form."""
    return Infer(inputs=[Tensor(name="x", datatype=datatype, shape=shape)], raw=[data])


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

# Versions no model has, and the status and words of the refusal. "²" is a digit to str.isdigit() but not to int().
MISSING = (NOT_FOUND, "Request for unknown model: 'matmul16' version {} is not found")
MALFORMED = (INVALID, "failed to get model version from specified version string '{}'")
UNKNOWN_VERSIONS = {
    "2": ("2", *MISSING),
    "0": ("0", *MISSING),
    "latest": ("latest", *MALFORMED),
    "-1": ("-1", *MALFORMED),
    "1.0": ("1.0", *MALFORMED),
    "\u00b2": ("superscript-two", *MALFORMED),
}

# (request, status, fragments the message must contain)
BAD_REQUESTS = [
    pytest.param(Infer(model="no_such_model"), NOT_FOUND, ["no_such_model"], id="unknown model"),
    *[
        pytest.param(Infer(version=v), status, ["matmul16", words.format(v)], id=f"unknown version {name}")
        for v, (name, status, words) in UNKNOWN_VERSIONS.items()
    ],
    pytest.param(
        x([1, 16], np.zeros(16, np.float64).tobytes(), "FP64"),
        INVALID,
        ["matmul16", "'x'", "FP64", "FP32"],
        id="wrong datatype",
    ),
    pytest.param(x([16]), INVALID, ["matmul16", "'x'", "[16]", "[-1, 16]"], id="wrong rank"),
    pytest.param(x([1, 8], X_BYTES[:32]), INVALID, ["matmul16", "'x'", "[1, 8]", "[-1, 16]"], id="wrong shape"),
    pytest.param(x([1, 16], X_BYTES[:60]), INVALID, ["matmul16", "'x'", "60", "64"], id="raw size too small"),
    pytest.param(x([1, 16], X_BYTES + b"\0"), INVALID, ["matmul16", "'x'", "65", "64"], id="raw size too big"),
    pytest.param(
        Infer(inputs=[Tensor(name="x", datatype="FP32", shape=[1, 16])], raw=[X_BYTES, X_BYTES]),
        INVALID,
        ["matmul16", "raw_input_contents"],
        id="more raw contents than inputs",
    ),
    pytest.param(
        Infer(
            inputs=[Tensor(name="x", datatype="FP32", shape=[1, 16]), Tensor(name="z", datatype="FP32", shape=[1, 16])],
            raw=[X_BYTES, X_BYTES],
        ),
        INVALID,
        ["matmul16", "'z'"],
        id="unknown input",
    ),
    pytest.param(multi_io(text=None), INVALID, ["multi_io", "text"], id="missing input"),
    pytest.param(Infer(inputs=[], raw=[]), INVALID, ["matmul16", "x"], id="no inputs at all"),
    pytest.param(
        Infer(inputs=[Tensor(name="x", datatype="FP32", shape=[1, 16])] * 2, raw=[X_BYTES] * 2),
        INVALID,
        ["matmul16", "'x'", "twice"],
        id="duplicate input",
    ),
    pytest.param(x([65, 16], X_BYTES * 65), INVALID, ["matmul16", "'x'", "65", "64"], id="batch above max_batch_size"),
    pytest.param(x([0, 16], b""), INVALID, ["matmul16", "'x'", "0"], id="empty batch"),
    pytest.param(
        multi_io(b=(Tensor(name="b", datatype="INT64", shape=[2, 4]), np.ones(8, np.int64).tobytes())),
        INVALID,
        ["multi_io", "'b'", "2"],
        id="inputs disagree on the batch",
    ),
    pytest.param(Infer(outputs=["y", "nope"]), INVALID, ["matmul16", "'nope'"], id="unknown requested output"),
    pytest.param(x([-1, 16]), INVALID, ["matmul16", "'x'", "-1"], id="negative dimension"),
    pytest.param(x([1, -16]), INVALID, ["matmul16", "'x'", "-16"], id="negative inner dimension"),
    pytest.param(
        multi_io(text=(Tensor(name="text", datatype="BYTES", shape=[1, 2]), _bytes_tensor(b"ok", b"\xff\xfe"))),
        INVALID,
        ["multi_io", "'text'", "UTF-8"],
        id="non-UTF-8 BYTES",
    ),
    pytest.param(
        multi_io(text=(Tensor(name="text", datatype="BYTES", shape=[1, 2]), b"\x05\x00\x00\x00ab")),
        INVALID,
        ["multi_io", "'text'"],
        id="BYTES element past the end",
    ),
    pytest.param(
        multi_io(text=(Tensor(name="text", datatype="BYTES", shape=[1, 2]), _bytes_tensor(b"a", b"b", b"c"))),
        INVALID,
        ["multi_io", "'text'"],
        id="more BYTES elements than the shape",
    ),
    pytest.param(
        Infer(
            inputs=[
                Tensor(
                    name="x", datatype="FP32", shape=[1, 16], contents=pb.InferTensorContents(fp32_contents=[1.0] * 15)
                )
            ],
            raw=[],
        ),
        INVALID,
        ["matmul16", "'x'", "15", "16"],
        id="typed contents of the wrong length",
    ),
    pytest.param(
        Infer(
            model="multi_io",
            raw=[],
            inputs=[
                Tensor(name="a", datatype="FP32", shape=[1, 4], contents=pb.InferTensorContents(fp32_contents=[1] * 4)),
                Tensor(
                    name="b", datatype="INT64", shape=[1, 4], contents=pb.InferTensorContents(int64_contents=[1] * 4)
                ),
                Tensor(
                    name="flag", datatype="BOOL", shape=[1, 1], contents=pb.InferTensorContents(bool_contents=[True])
                ),
                Tensor(
                    name="text",
                    datatype="BYTES",
                    shape=[1, 2],
                    contents=pb.InferTensorContents(bytes_contents=[b"\xc3\x28", b"ok"]),
                ),
            ],
        ),
        INVALID,
        ["multi_io", "'text'", "UTF-8"],
        id="non-UTF-8 BYTES in typed contents",
    ),
]


# --------------------------------------------------------------------------- raw stubs


@pytest.fixture
def channel(demo_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(demo_server.url) as ch:
        yield ch


def assert_valid_request_succeeds(stub: Any) -> None:
    response = stub.ModelInfer(Infer().message())
    assert response.model_name == "matmul16"
    assert np.frombuffer(response.raw_output_contents[0], np.float32).shape == (16,)


@pytest.mark.parametrize(("bad", "status", "fragments"), BAD_REQUESTS)
def test_a_bad_request_is_refused_with_its_status_and_a_precise_message(
    channel: grpc.Channel, bad: Infer, status: grpc.StatusCode, fragments: list[str]
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(bad.message())
    assert refused.value.code() == status, refused.value.details()
    for fragment in fragments:
        assert fragment in refused.value.details()
    assert_valid_request_succeeds(stub)


@pytest.mark.parametrize("version", list(UNKNOWN_VERSIONS), ids=[n for n, _, _ in UNKNOWN_VERSIONS.values()])
def test_an_unknown_version_is_refused_alike_by_every_rpc_that_takes_one(channel: grpc.Channel, version: str) -> None:
    _, status, words = UNKNOWN_VERSIONS[version]
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ModelReady(pb.ModelReadyRequest(name="matmul16", version=version)).ready is False
    calls = {
        "ModelMetadata": lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="matmul16", version=version)),
        "ModelConfig": lambda: stub.ModelConfig(pb.ModelConfigRequest(name="matmul16", version=version)),
        "ModelStatistics": lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="matmul16", version=version)),
    }
    for rpc, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert (rpc, refused.value.code()) == (rpc, status), refused.value.details()
        assert "matmul16" in refused.value.details() and words.format(version) in refused.value.details()
    assert_valid_request_succeeds(stub)


@pytest.mark.parametrize("rpc", ["ModelMetadata", "ModelConfig", "ModelStatistics"])
def test_metadata_of_an_unknown_model_is_not_found(channel: grpc.Channel, rpc: str) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = getattr(pb, f"{rpc}Request")(name="no_such_model")
    with pytest.raises(grpc.RpcError) as refused:
        getattr(stub, rpc)(request)
    assert refused.value.code() == NOT_FOUND
    assert "no_such_model" in refused.value.details()


@pytest.mark.parametrize(
    ("rpc", "request_message"),
    [
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="matmul16")),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="matmul16")),
    ],
)
def test_model_load_and_unload_are_refused_outside_explicit_mode(
    channel: grpc.Channel, rpc: str, request_message: Any
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        getattr(stub, rpc)(request_message)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc in refused.value.details()
    assert "--model-control-mode explicit" in refused.value.details()
    assert_valid_request_succeeds(stub)


def test_a_bad_request_in_a_stream_gets_an_error_naming_it_and_the_rest_are_answered(channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    good = [Infer().message() for _ in range(3)]
    for i, request in enumerate(good):
        request.id = f"good-{i}"
    bad = x([1, 8], X_BYTES[:32]).message()
    bad.id = "bad"
    answers = {a.infer_response.id: a for a in stub.ModelStreamInfer(iter([good[0], bad, good[1], good[2]]))}

    assert sorted(answers) == ["bad", "good-0", "good-1", "good-2"]
    assert "matmul16" in answers["bad"].error_message and "'x'" in answers["bad"].error_message
    assert answers["bad"].infer_response.model_name == "matmul16"
    for i in range(3):
        assert answers[f"good-{i}"].error_message == ""
        assert len(answers[f"good-{i}"].infer_response.raw_output_contents) == 1
    assert_valid_request_succeeds(stub)


# --------------------------------------------------------------------------- tritonclient


def tc_input(name: str, array: npt.NDArray[Any], datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def tc_x(array: npt.NDArray[Any] | None = None, datatype: str = "FP32") -> grpcclient.InferInput:
    return tc_input("x", np.ones((1, 16), np.float32) if array is None else array, datatype)


def tc_multi_io(text: npt.NDArray[Any] | None) -> list[grpcclient.InferInput]:
    inputs = [
        tc_input("a", np.ones((1, 4), np.float32), "FP32"),
        tc_input("b", np.ones((1, 4), np.int64), "INT64"),
        tc_input("flag", np.ones((1, 1), bool), "BOOL"),
    ]
    if text is not None:
        inputs.append(tc_input("text", text, "BYTES"))
    return inputs


# (model, inputs, infer keyword arguments, status, fragments)
TRITONCLIENT_BAD_REQUESTS = [
    pytest.param("no_such_model", lambda: [tc_x()], {}, "NOT_FOUND", ["no_such_model"], id="unknown model"),
    pytest.param(
        "matmul16",
        lambda: [tc_x()],
        {"model_version": "3"},
        "NOT_FOUND",
        ["matmul16", "version 3"],
        id="unknown version",
    ),
    pytest.param(
        "matmul16",
        lambda: [tc_x(np.ones((1, 16), np.float64), "FP64")],
        {},
        "INVALID_ARGUMENT",
        ["matmul16", "'x'", "FP64"],
        id="wrong datatype",
    ),
    pytest.param(
        "matmul16",
        lambda: [tc_x(np.ones((1, 4, 4), np.float32))],
        {},
        "INVALID_ARGUMENT",
        ["matmul16", "'x'", "[1, 4, 4]"],
        id="wrong rank",
    ),
    pytest.param(
        "matmul16",
        lambda: [tc_x(np.ones((2, 15), np.float32))],
        {},
        "INVALID_ARGUMENT",
        ["matmul16", "'x'", "[2, 15]"],
        id="wrong shape",
    ),
    pytest.param(
        "matmul16",
        lambda: [tc_x(), tc_input("bias", np.ones((1, 16), np.float32), "FP32")],
        {},
        "INVALID_ARGUMENT",
        ["matmul16", "'bias'"],
        id="unknown input",
    ),
    pytest.param(
        "multi_io", lambda: tc_multi_io(None), {}, "INVALID_ARGUMENT", ["multi_io", "text"], id="missing input"
    ),
    pytest.param(
        "matmul16", lambda: [tc_x(), tc_x()], {}, "INVALID_ARGUMENT", ["matmul16", "'x'", "twice"], id="duplicate input"
    ),
    pytest.param(
        "matmul16",
        lambda: [tc_x(np.ones((65, 16), np.float32))],
        {},
        "INVALID_ARGUMENT",
        ["matmul16", "'x'", "65"],
        id="batch above max_batch_size",
    ),
    pytest.param(
        "matmul16",
        lambda: [tc_x()],
        {"outputs": [grpcclient.InferRequestedOutput("z")]},
        "INVALID_ARGUMENT",
        ["matmul16", "'z'"],
        id="unknown requested output",
    ),
    pytest.param(
        "multi_io",
        lambda: tc_multi_io(np.array([[b"\xff", b"ok"]], dtype=np.object_)),
        {},
        "INVALID_ARGUMENT",
        ["multi_io", "'text'", "UTF-8"],
        id="non-UTF-8 BYTES",
    ),
]


@pytest.mark.parametrize(("model", "inputs", "kwargs", "status", "fragments"), TRITONCLIENT_BAD_REQUESTS)
async def test_tritonclient_sees_the_status_and_message(
    client: TritonClient,
    model: str,
    inputs: Callable[[], list[grpcclient.InferInput]],
    kwargs: dict[str, Any],
    status: str,
    fragments: list[str],
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        await client.infer(model, inputs(), **kwargs)
    assert refused.value.status() == f"StatusCode.{status}", refused.value.message()
    for fragment in fragments:
        assert fragment in refused.value.message()
    result = await client.infer("matmul16", [tc_x()])
    assert result.as_numpy("y").shape == (1, 16)


@pytest.mark.parametrize(
    ("method", "args", "extension"),
    [
        # System shared memory is off on this server; test_shared_memory.py covers what it then says.
        ("register_cuda_shared_memory", ("region", b"aGFuZGxl", 0, 64), "cuda_shared_memory"),
    ],
)
async def test_tritonclient_hears_which_extension_infergate_does_not_implement(
    client: TritonClient, method: str, args: tuple[Any, ...], extension: str
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        await getattr(client, method)(*args)
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
    assert f"the {extension} extension is not implemented in infergate {infergate.__version__}" in str(
        refused.value.message()
    )
    assert await client.is_server_ready() is True


# --------------------------------------------------------------------------- models that fail to load

TYPO_CONFIG = """\
max_batch_size: 8
dynamic_batching:
  max_queue_sise: 4
"""


@dataclass
class BrokenRepository:
    root: Path
    server: ServerProcess


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[BrokenRepository]:
    """A repository with one good model beside a corrupt ONNX file and a config typo, not strict."""
    root = tmp_path_factory.mktemp("broken_repository")
    for name in ("good", "corrupt", "typo"):
        (root / name / "1").mkdir(parents=True)
    onnx.save_model(build_matmul16(), str(root / "good" / "1" / "model.onnx"))
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    onnx.save_model(build_matmul16(), str(root / "typo" / "1" / "model.onnx"))
    (root / "typo" / "config.yaml").write_text(TYPO_CONFIG)
    server_config = tmp_path_factory.mktemp("broken_config") / "server.yaml"
    server_config.write_text("strict_readiness: false\n")
    # Not strict: the server becomes SERVING once every model has been tried.
    with running_server(root, log_dir, "--config", str(server_config)) as server:
        yield BrokenRepository(root, server)


@pytest.fixture
def broken_stub(broken: BrokenRepository) -> Iterator[Any]:
    with grpc.insecure_channel(broken.server.url) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def test_models_that_failed_to_load_are_not_ready_and_the_good_one_is(broken_stub: Any) -> None:
    ready = {
        name: broken_stub.ModelReady(pb.ModelReadyRequest(name=name)).ready for name in ("good", "corrupt", "typo")
    }
    assert ready == {"good": True, "corrupt": False, "typo": False}
    assert broken_stub.ServerReady(pb.ServerReadyRequest()).ready is True  # strict_readiness: false


def test_a_corrupt_model_file_is_unavailable_with_the_reason(broken: BrokenRepository, broken_stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        broken_stub.ModelInfer(Infer(model="corrupt").message())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    details = refused.value.details()
    assert "corrupt" in details
    assert str(broken.root / "corrupt" / "1" / "model.onnx") in details


def test_a_config_typo_is_unavailable_with_the_file_and_field(broken: BrokenRepository, broken_stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        broken_stub.ModelInfer(Infer(model="typo").message())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    details = refused.value.details()
    assert "typo" in details
    assert str(broken.root / "typo" / "config.yaml") in details
    assert "dynamic_batching.max_queue_sise" in details


@pytest.mark.parametrize("rpc", ["ModelMetadata", "ModelConfig", "ModelStatistics"])
def test_describing_a_failed_model_is_unavailable_too(broken_stub: Any, rpc: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        getattr(broken_stub, rpc)(getattr(pb, f"{rpc}Request")(name="corrupt"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "corrupt" in refused.value.details()


def test_the_good_model_still_serves_beside_the_failed_ones(broken_stub: Any) -> None:
    response = broken_stub.ModelInfer(Infer(model="good").message())
    assert response.model_name == "good"
    assert np.frombuffer(response.raw_output_contents[0], np.float32).shape == (16,)


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_tritonclient_sees_unavailable_for_a_failed_model(broken: BrokenRepository, flavour: str) -> None:
    client = TritonClient(flavour, broken.server.url)
    try:
        assert await client.is_model_ready("typo") is False
        with pytest.raises(InferenceServerException) as refused:
            await client.infer("typo", [tc_x()])
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "max_queue_sise" in refused.value.message()
        assert (await client.infer("good", [tc_x()])).as_numpy("y").shape == (1, 16)
    finally:
        await client.close()


def test_the_server_log_names_the_file_and_field_of_the_typo(broken: BrokenRepository) -> None:
    log = broken.server.logged("max_queue_sise")
    typo_lines = [line for line in log.splitlines() if "max_queue_sise" in line]
    assert any(
        str(broken.root / "typo" / "config.yaml") in line and "dynamic_batching.max_queue_sise" in line
        for line in typo_lines
    ), typo_lines
    broken.server.logged(str(broken.root / "corrupt" / "1" / "model.onnx"))
