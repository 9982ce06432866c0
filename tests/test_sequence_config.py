"""Sequence batching as configured: Triton's ``sequence_batching`` block and the pure parts around it.

Tables for the config schema (a bad block names the file and the field),
the request parameters (``sequence_id``/``sequence_start``/``sequence_end``),
the checks of a config against the ONNX graph, the spec clients see, the
CORRID values, the initial states and the batching a strategy implies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from infergate._proto import grpc_service_pb2 as pb
from infergate.configfile import ConfigError
from infergate.errors import InvalidArgument
from infergate.models.config import DynamicBatching, SequenceBatching, load_model_config
from infergate.models.datatypes import DATATYPES, encode_bytes_tensor
from infergate.models.sequence import (
    SequenceParams,
    batching_for_sequences,
    check_sequence_config,
    corrid_tensor,
    load_initial_states,
    refuse_sequence,
    request_spec,
    sequence_params,
)
from infergate.models.spec import ModelSpec, TensorSpec

SIMPLE_SEQUENCE = """
max_batch_size: 8
sequence_batching:
  control_input:
  - name: START
    control:
    - kind: CONTROL_SEQUENCE_START
      int32_false_true: [0, 1]
  - name: READY
    control:
    - kind: CONTROL_SEQUENCE_READY
      int32_false_true: [0, 1]
"""


def write(directory: Path, text: str) -> Path:
    path = directory / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def sequences(block: str) -> SequenceBatching:
    return SequenceBatching.model_validate(yaml.safe_load(block))


# --------------------------------------------------------------------------- schema


def test_triton_s_simple_sequence_block_reads_with_triton_s_names(tmp_path: Path) -> None:
    config = load_model_config(write(tmp_path, SIMPLE_SEQUENCE))
    assert config.sequence_batching is not None
    start = config.sequence_batching.control("CONTROL_SEQUENCE_START")
    assert start is not None and start[0] == "START" and start[1].int32_false_true == [0, 1]
    assert config.sequence_batching.control("CONTROL_SEQUENCE_CORRID") is None
    assert config.sequence_batching.idle_seconds == 1.0  # Triton's default


def test_zero_idle_microseconds_means_triton_s_default_of_one_second() -> None:
    assert sequences("max_sequence_idle_microseconds: 0").idle_seconds == 1.0


def test_a_full_sequence_block_with_state_and_oldest_strategy_reads_field_by_field() -> None:
    block = sequences(
        """
max_sequence_idle_microseconds: 5000000
oldest: {max_candidate_sequences: 4, preferred_batch_size: [2], max_queue_delay_microseconds: 100}
control_input:
- name: CORRID
  control: [{kind: CONTROL_SEQUENCE_CORRID, data_type: TYPE_STRING}]
- name: END
  control: [{kind: CONTROL_SEQUENCE_END, bool_false_true: [false, true]}]
state:
- input_name: INPUT_STATE
  output_name: OUTPUT_STATE
  data_type: TYPE_FP32
  dims: [-1]
  initial_state: [{data_type: TYPE_FP32, dims: [3], zero_data: true, name: zeros}]
"""
    )
    assert block.oldest is not None and block.oldest.max_candidate_sequences == 4
    corrid = block.control("CONTROL_SEQUENCE_CORRID")
    assert corrid is not None and corrid[1].data_type == "TYPE_STRING"
    assert block.state[0].initial_state[0].dims == [3]


BAD_SEQUENCE_BLOCKS = [
    pytest.param("  direct: {}\n  oldest: {}\n", "sequence_batching", "choose one strategy", id="two strategies"),
    pytest.param(
        "  control_input:\n  - name: S\n    control: [{kind: CONTROL_SEQUENCE_START}]\n",
        "sequence_batching.control_input.0.control.0",
        "exactly one of int32_false_true",
        id="start without values",
    ),
    pytest.param(
        "  control_input:\n  - name: S\n    control: [{kind: CONTROL_SEQUENCE_START, int32_false_true: [0, 1, 2]}]\n",
        "sequence_batching.control_input.0.control.0",
        "exactly 2 values",
        id="three values",
    ),
    pytest.param(
        "  control_input:\n  - name: S\n    control: [{kind: CONTROL_SEQUENCE_START, int32_false_true: [0, 1],"
        " fp32_false_true: [0, 1]}]\n",
        "sequence_batching.control_input.0.control.0",
        "got int32_false_true, fp32_false_true",
        id="two kinds of values",
    ),
    pytest.param(
        "  control_input:\n  - name: C\n    control: [{kind: CONTROL_SEQUENCE_CORRID}]\n",
        "sequence_batching.control_input.0.control.0",
        "needs data_type",
        id="corrid without a type",
    ),
    pytest.param(
        "  control_input:\n  - name: C\n    control: [{kind: CONTROL_SEQUENCE_CORRID, data_type: TYPE_FP32}]\n",
        "sequence_batching.control_input.0.control.0",
        "needs data_type",
        id="corrid of a float type",
    ),
    pytest.param(
        "  control_input:\n  - name: A\n    control: [{kind: CONTROL_SEQUENCE_END, int32_false_true: [0, 1]}]\n"
        "  - name: B\n    control: [{kind: CONTROL_SEQUENCE_END, int32_false_true: [0, 1]}]\n",
        "sequence_batching",
        "CONTROL_SEQUENCE_END given for more than one",
        id="a kind twice",
    ),
    pytest.param(
        "  control_input:\n  - name: A\n    control: [{kind: CONTROL_SEQUENCE_END, int32_false_true: [0, 1]}]\n"
        "  state: [{input_name: A, output_name: B, data_type: TYPE_INT32, dims: [1]}]\n",
        "sequence_batching",
        "used by more than one",
        id="an input used twice",
    ),
    pytest.param(
        "  state: [{input_name: A, output_name: B, data_type: TYPE_INT32, dims: [2],"
        " initial_state: [{data_type: TYPE_INT32, dims: [3], zero_data: true}]}]\n",
        "sequence_batching.state.0",
        "do not fit dims",
        id="initial state of another shape",
    ),
    pytest.param(
        "  state: [{input_name: A, output_name: B, data_type: TYPE_INT32, dims: [2],"
        " initial_state: [{data_type: TYPE_INT32, dims: [2]}]}]\n",
        "sequence_batching.state.0.initial_state.0",
        "exactly one of zero_data, data_file",
        id="initial state without data",
    ),
    pytest.param("  sequence_idle: 5\n", "sequence_batching.sequence_idle", "Extra inputs", id="unknown key"),
]


@pytest.mark.parametrize(("block", "field", "says"), BAD_SEQUENCE_BLOCKS)
def test_a_bad_sequence_block_names_the_file_and_the_field(tmp_path: Path, block: str, field: str, says: str) -> None:
    path = write(tmp_path, "sequence_batching:\n" + block)
    with pytest.raises(ConfigError) as refused:
        load_model_config(path)
    message = str(refused.value)
    assert f"{path}: {field}:" in message, message
    assert says in message, message


def test_a_model_uses_either_dynamic_or_sequence_batching(tmp_path: Path) -> None:
    path = write(tmp_path, SIMPLE_SEQUENCE + "dynamic_batching:\n  max_queue_delay_microseconds: 100\n")
    with pytest.raises(ConfigError, match="choose one of dynamic_batching and sequence_batching"):
        load_model_config(path)


# --------------------------------------------------------------------------- routing of a stateful model

STICKY_SPLIT = "routing:\n  weights: {1: 50, 2: 50}\n  sticky: {parameter: sequence_id}\n"


@pytest.mark.parametrize(
    ("routing", "field", "says"),
    [
        pytest.param(
            "routing:\n  canary: {version: 2, steps: [10, 50]}\n", "routing.canary", "growing share", id="canary"
        ),
        pytest.param("routing:\n  shadow: {version: 2}\n", "routing.shadow", "never mirrored", id="shadow"),
        pytest.param(
            "routing:\n  weights: {1: 50, 2: 50}\n", "routing.sticky", "sticky: {parameter: sequence_id}", id="split"
        ),
        pytest.param(
            "routing:\n  weights: {1: 50, 2: 50}\n  sticky: {header: x-user}\n",
            "routing.sticky",
            "sticky: {parameter: sequence_id}",
            id="split sticky on a header",
        ),
    ],
)
def test_routing_that_could_move_a_running_sequence_is_refused_naming_the_file_and_field(
    tmp_path: Path, routing: str, field: str, says: str
) -> None:
    path = write(tmp_path, SIMPLE_SEQUENCE + routing)
    with pytest.raises(ConfigError) as refused:
        load_model_config(path)
    message = str(refused.value)
    assert f"{path}: {field}: a model with sequence_batching keeps each sequence on one version" in message
    assert says in message


@pytest.mark.parametrize(
    "routing",
    [STICKY_SPLIT, "routing:\n  weights: {1: 0, 2: 100}\n"],
    ids=["split sticky on the correlation id", "one version takes all"],
)
def test_routing_that_keeps_each_sequence_on_one_version_is_taken(tmp_path: Path, routing: str) -> None:
    assert load_model_config(write(tmp_path, SIMPLE_SEQUENCE + routing)).routing is not None


def test_the_same_routing_on_a_model_without_sequence_batching_is_taken(tmp_path: Path) -> None:
    routing = "routing:\n  weights: {1: 50, 2: 50}\n  shadow: {version: 3}\n  canary: {version: 4, steps: [10]}\n"
    assert load_model_config(write(tmp_path, "max_batch_size: 8\n" + routing)).routing is not None


# --------------------------------------------------------------------------- request parameters


def parameters(**values: Any) -> dict[str, pb.InferParameter]:
    out = {}
    for name, value in values.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[type(value)]
        out[name] = pb.InferParameter(**{kind: value})
    return out


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param({}, None, id="none"),
        pytest.param({"timeout": 5}, None, id="other parameters only"),
        pytest.param({"sequence_id": 1000}, SequenceParams(1000), id="an integer id"),
        pytest.param({"sequence_id": "a-uuid"}, SequenceParams("a-uuid"), id="a string id"),
        pytest.param(
            {"sequence_id": 7, "sequence_start": True, "sequence_end": False},
            SequenceParams(7, start=True),
            id="start",
        ),
        pytest.param({"sequence_id": 7, "sequence_end": True}, SequenceParams(7, end=True), id="end"),
        pytest.param({"sequence_start": True}, SequenceParams(0, start=True), id="flags without an id"),
    ],
)
def test_sequence_parameters_are_read_from_the_request(given: dict[str, Any], expected: SequenceParams | None) -> None:
    assert sequence_params(parameters(**given)) == expected


def test_an_unsigned_id_is_read_too() -> None:
    assert sequence_params({"sequence_id": pb.InferParameter(uint64_param=2**63)}) == SequenceParams(2**63)


@pytest.mark.parametrize("negative", [-1, -5, -(2**63)])
def test_a_negative_id_is_the_unsigned_id_it_wraps_to_as_in_triton(negative: int) -> None:
    # tritonclient sends every integer id as int64: a client hashing ids into uint64 space sends those
    # of 2**63 and above as negative numbers, and Triton reads them back as uint64.
    signed = sequence_params({"sequence_id": pb.InferParameter(int64_param=negative)})
    unsigned = sequence_params({"sequence_id": pb.InferParameter(uint64_param=2**64 + negative)})
    assert signed == unsigned == SequenceParams(2**64 + negative)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        pytest.param(
            {"sequence_id": 1.5},
            "invalid value type for 'sequence_id' parameter, expected int64_param or string_param.",
            id="float id",
        ),
        pytest.param(
            {"sequence_id": 1, "sequence_start": 1},
            "invalid value type for 'sequence_start' parameter, expected bool_param.",
            id="integer start",
        ),
        pytest.param(
            {"sequence_id": 1, "sequence_end": "yes"},
            "invalid value type for 'sequence_end' parameter, expected bool_param.",
            id="string end",
        ),
    ],
)
def test_sequence_parameters_of_the_wrong_type_are_refused_in_triton_s_words(given: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        sequence_params(parameters(**given))
    assert says in refused.value.message


@pytest.mark.parametrize(
    "params",
    [SequenceParams(5), SequenceParams("x"), SequenceParams(0, start=True)],
    ids=["integer id", "string id", "a start flag"],
)
def test_a_model_without_sequence_batching_refuses_sequence_requests(params: SequenceParams) -> None:
    with pytest.raises(InvalidArgument, match="model 'simple' does not use sequence batching"):
        refuse_sequence("simple", params)


@pytest.mark.parametrize("params", [None, SequenceParams(0)], ids=["no parameters", "zero id and no flags"])
def test_a_model_without_sequence_batching_takes_plain_requests(params: SequenceParams | None) -> None:
    refuse_sequence("simple", params)


# --------------------------------------------------------------------------- against the graph


def tensor(name: str, datatype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, DATATYPES[datatype], shape)


STATEFUL = ModelSpec(
    "acc",
    1,
    inputs=(
        tensor("INPUT", "INT32", -1, 1),
        tensor("START", "INT32", -1, 1),
        tensor("CORRID", "BYTES", -1, 1),
        tensor("INPUT_STATE", "INT32", -1, 1),
    ),
    outputs=(tensor("OUTPUT", "INT32", -1, 1), tensor("OUTPUT_STATE", "INT32", -1, 1)),
    max_batch_size=8,
)

STATEFUL_BLOCK = """
control_input:
- {name: START, control: [{kind: CONTROL_SEQUENCE_START, int32_false_true: [0, 1]}]}
- {name: CORRID, control: [{kind: CONTROL_SEQUENCE_CORRID, data_type: TYPE_STRING}]}
state: [{input_name: INPUT_STATE, output_name: OUTPUT_STATE, data_type: TYPE_INT32, dims: [1]}]
"""


def test_a_config_that_matches_the_graph_passes() -> None:
    check_sequence_config(STATEFUL, sequences(STATEFUL_BLOCK))


@pytest.mark.parametrize(
    ("replace", "by", "says"),
    [
        pytest.param(
            "name: START", "name: BEGIN", "'BEGIN' (CONTROL_SEQUENCE_START): the model has no input", id="no input"
        ),
        pytest.param("int32_false_true", "fp32_false_true", "'START' is INT32, the config implies FP32", id="type"),
        pytest.param("TYPE_STRING", "TYPE_UINT64", "'CORRID' is BYTES, the config implies UINT64", id="corrid type"),
        pytest.param("dims: [1]", "dims: [4]", "has shape [-1, 1], the config implies [-1, 4]", id="state shape"),
        pytest.param("output_name: OUTPUT_STATE", "output_name: NEXT", "no output of that name", id="state output"),
    ],
)
def test_a_config_that_does_not_match_the_graph_says_where(replace: str, by: str, says: str) -> None:
    with pytest.raises(ValueError) as refused:
        check_sequence_config(STATEFUL, sequences(STATEFUL_BLOCK.replace(replace, by)))
    assert says in str(refused.value)


def test_clients_see_neither_controls_nor_state() -> None:
    seen = request_spec(STATEFUL, sequences(STATEFUL_BLOCK))
    assert [t.name for t in seen.inputs] == ["INPUT"]
    assert [t.name for t in seen.outputs] == ["OUTPUT"]
    assert seen.max_batch_size == 8


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("correlation_id", "datatype", "expected"),
    [
        pytest.param(1000, "UINT64", np.array([[1000]], dtype=np.uint64), id="uint64"),
        pytest.param(2**64 - 1, "UINT64", np.array([[2**64 - 1]], dtype=np.uint64), id="largest uint64"),
        pytest.param(2**32 + 5, "UINT32", np.array([[5]], dtype=np.uint32), id="uint32 keeps the low 32 bits"),
        pytest.param(2**32 + 5, "INT32", np.array([[5]], dtype=np.int32), id="int32 keeps the low 32 bits"),
        pytest.param(7, "INT64", np.array([[7]], dtype=np.int64), id="int64"),
        pytest.param("1002", "BYTES", np.array([["1002"]], dtype=object), id="string"),
    ],
)
def test_corrid_carries_the_id_in_the_control_s_datatype(
    correlation_id: int | str, datatype: str, expected: np.ndarray[Any, Any]
) -> None:
    value = corrid_tensor(correlation_id, DATATYPES[datatype], batches=True)
    assert value.dtype == expected.dtype
    assert value.tolist() == expected.tolist()


def test_corrid_of_a_model_that_does_not_batch_has_no_batch_dimension() -> None:
    assert corrid_tensor(3, DATATYPES["UINT64"], batches=False).shape == (1,)


def test_initial_state_is_zeros_a_file_or_zeros_with_variable_dims_as_one(tmp_path: Path) -> None:
    (tmp_path / "initial_state").mkdir()
    (tmp_path / "initial_state" / "start.bin").write_bytes(np.array([1.5, 2.5], dtype="<f4").tobytes())
    block = sequences(
        """
state:
- {input_name: A, output_name: A2, data_type: TYPE_INT32, dims: [-1, 2]}
- {input_name: B, output_name: B2, data_type: TYPE_FP32, dims: [2],
   initial_state: [{data_type: TYPE_FP32, dims: [2], data_file: start.bin}]}
- {input_name: C, output_name: C2, data_type: TYPE_STRING, dims: [2],
   initial_state: [{data_type: TYPE_STRING, dims: [2], zero_data: true}]}
"""
    )
    states = load_initial_states(block, tmp_path)
    assert states["A"].tolist() == [[0, 0]] and states["A"].dtype == np.int32
    assert states["B"].tolist() == [1.5, 2.5]
    assert states["C"].tolist() == ["", ""]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        pytest.param(None, "cannot read", id="missing"),
        pytest.param(b"\x00" * 5, "5 bytes, expected 8", id="wrong size"),
    ],
)
def test_a_bad_initial_state_file_is_named(tmp_path: Path, content: bytes | None, says: str) -> None:
    (tmp_path / "initial_state").mkdir()
    if content is not None:
        (tmp_path / "initial_state" / "s.bin").write_bytes(content)
    block = sequences(
        "state: [{input_name: B, output_name: B2, data_type: TYPE_FP32, dims: [2],"
        " initial_state: [{data_type: TYPE_FP32, dims: [2], data_file: s.bin}]}]"
    )
    with pytest.raises(ValueError) as refused:
        load_initial_states(block, tmp_path)
    assert str(tmp_path / "initial_state" / "s.bin") in str(refused.value)
    assert says in str(refused.value)


@pytest.mark.parametrize("name", ["/etc/hostname", "../secret.bin", "../../secret.bin"])
def test_an_initial_state_file_outside_the_initial_state_directory_is_not_read(tmp_path: Path, name: str) -> None:
    """A config can come over the API: it must not read, nor probe the size of, any other file of the host."""
    (tmp_path / "initial_state").mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 8)
    block = sequences(
        "state: [{input_name: B, output_name: B2, data_type: TYPE_FP32, dims: [2],"
        f" initial_state: [{{data_type: TYPE_FP32, dims: [2], data_file: '{name}'}}]}}]"
    )
    with pytest.raises(ValueError, match=r"initial_state data_file .* leads out of the 'initial_state' directory"):
        load_initial_states(block, tmp_path)


def test_a_bytes_initial_state_file_holds_length_prefixed_elements(tmp_path: Path) -> None:
    (tmp_path / "initial_state").mkdir()
    data = encode_bytes_tensor(np.array(["ab", "c"], dtype=object))
    (tmp_path / "initial_state" / "s.bin").write_bytes(data)
    block = sequences(
        "state: [{input_name: B, output_name: B2, data_type: TYPE_STRING, dims: [2],"
        " initial_state: [{data_type: TYPE_STRING, dims: [2], data_file: s.bin}]}]"
    )
    assert load_initial_states(block, tmp_path)["B"].tolist() == ["ab", "c"]


@pytest.mark.parametrize(
    ("block", "max_batch_size", "expected"),
    [
        pytest.param("{}", 8, DynamicBatching(), id="direct by default: run what is ready"),
        pytest.param("direct: {max_queue_delay_microseconds: 500}", 8, DynamicBatching(), id="direct delay alone"),
        pytest.param(
            "direct: {max_queue_delay_microseconds: 500, minimum_slot_utilization: 0.5}",
            8,
            DynamicBatching(max_queue_delay_microseconds=500, preferred_batch_size=[4]),
            id="direct with utilization",
        ),
        pytest.param(
            "oldest: {max_candidate_sequences: 4, max_queue_delay_microseconds: 10000, preferred_batch_size: [4, 16]}",
            8,
            DynamicBatching(max_queue_delay_microseconds=10000, preferred_batch_size=[4]),
            id="oldest",
        ),
    ],
)
def test_the_strategy_sets_the_batcher(block: str, max_batch_size: int, expected: DynamicBatching) -> None:
    assert batching_for_sequences(sequences(block), max_batch_size) == expected
