"""The protocol definitions: wire-compatible with Triton's, and generated code that matches proto/.

(1) Wire compatibility. infergate's generated descriptors (its own ``proto/``) are
compared with the ones tritonclient ships: every message, field and enum value we
define must exist there with the same number, type and cardinality, and every RPC
with the same request/response types and streaming flags. Triton has more (shared
memory, tracing, ...); we may define less, never something different.

(2) Staleness. ``scripts/gen_protos.py`` is run into a temporary directory and the
result must equal the checked-in ``server/infergate/_proto`` and the client SDK's
``clients/python/infergate_client/_proto`` — so editing ``proto/`` without
regenerating fails here. A modified copy of ``proto/`` is
generated too, to show the check does notice a change.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
)
from tritonclient.grpc import model_config_pb2 as triton_model_config_pb2
from tritonclient.grpc import service_pb2 as triton_service_pb2

from infergate._proto import grpc_service_pb2, model_config_pb2

ROOT = Path(__file__).resolve().parent.parent
GEN_SCRIPT = ROOT / "scripts" / "gen_protos.py"
CHECKED_IN = ROOT / "server" / "infergate" / "_proto"
CLIENT_CHECKED_IN = ROOT / "clients" / "python" / "infergate_client" / "_proto"
# Every checked-in copy of the generated code: the server's and the client SDK's.
COPIES = [pytest.param(CHECKED_IN, id="server"), pytest.param(CLIENT_CHECKED_IN, id="client")]
PROTO_DIR = ROOT / "proto"

# (ours, tritonclient's) for each .proto file.
FILE_PAIRS = [
    pytest.param(grpc_service_pb2.DESCRIPTOR, triton_service_pb2.DESCRIPTOR, id="grpc_service.proto"),
    pytest.param(model_config_pb2.DESCRIPTOR, triton_model_config_pb2.DESCRIPTOR, id="model_config.proto"),
]


# --------------------------------------------------------------------------- helpers


def _all_messages(file: FileDescriptor) -> Iterator[Descriptor]:
    """Every message of a file, nested ones included."""
    stack = list(file.message_types_by_name.values())
    while stack:
        message = stack.pop()
        yield message
        stack.extend(message.nested_types)


def _all_enums(file: FileDescriptor) -> Iterator[EnumDescriptor]:
    yield from file.enum_types_by_name.values()
    for message in _all_messages(file):
        yield from message.enum_types


def _field_signature(field: FieldDescriptor) -> dict[str, object]:
    """What decides how a field travels on the wire (and how JSON/reflection name it)."""
    return {
        "number": field.number,
        "type": field.type,
        "repeated": field.is_repeated,
        "message": field.message_type.full_name if field.message_type else None,
        "enum": field.enum_type.full_name if field.enum_type else None,
        "oneof": _real_oneof(field),
    }


def _real_oneof(field: FieldDescriptor) -> str | None:
    """The field's oneof, but not the one of its own that proto3's ``optional`` declares: that one
    only tracks presence (our ``max_batch_size``, to tell a config.pbtxt's 0 from none), same wire form."""
    oneof = field.containing_oneof
    if oneof is None or (oneof.name == f"_{field.name}" and len(oneof.fields) == 1):
        return None
    return str(oneof.name)


def _method_signature(method: MethodDescriptor) -> dict[str, object]:
    return {
        "input": method.input_type.full_name,
        "output": method.output_type.full_name,
        "client_streaming": method.client_streaming,
        "server_streaming": method.server_streaming,
    }


def _find_message(file: FileDescriptor, full_name: str) -> Descriptor | None:
    return next((m for m in _all_messages(file) if m.full_name == full_name), None)


def _find_enum(file: FileDescriptor, full_name: str) -> EnumDescriptor | None:
    return next((e for e in _all_enums(file) if e.full_name == full_name), None)


# --------------------------------------------------------------------------- wire compatibility


@pytest.mark.parametrize(("ours", "triton"), FILE_PAIRS)
def test_files_share_package_and_name_with_triton(ours: FileDescriptor, triton: FileDescriptor) -> None:
    assert ours.package == triton.package == "inference"
    assert ours.name == triton.name


@pytest.mark.parametrize(("ours", "triton"), FILE_PAIRS)
def test_every_message_and_field_exists_in_triton_with_the_same_wire_form(
    ours: FileDescriptor, triton: FileDescriptor
) -> None:
    differences = []
    messages = list(_all_messages(ours))
    assert messages, "no messages found: the comparison would be vacuous"
    for message in messages:
        theirs = _find_message(triton, message.full_name)
        if theirs is None:
            differences.append(f"{message.full_name}: not in tritonclient")
            continue
        for field in message.fields:
            their_field = theirs.fields_by_name.get(field.name)
            if their_field is None:
                differences.append(f"{field.full_name}: no such field in tritonclient")
            elif _field_signature(field) != _field_signature(their_field):
                differences.append(
                    f"{field.full_name}: ours {_field_signature(field)}, tritonclient {_field_signature(their_field)}"
                )
    assert differences == []


@pytest.mark.parametrize(("ours", "triton"), FILE_PAIRS)
def test_every_enum_value_matches_triton(ours: FileDescriptor, triton: FileDescriptor) -> None:
    differences = []
    for enum in _all_enums(ours):
        theirs = _find_enum(triton, enum.full_name)
        if theirs is None:
            differences.append(f"{enum.full_name}: not in tritonclient")
            continue
        ours_values = {v.name: v.number for v in enum.values}
        their_values = {v.name: v.number for v in theirs.values}
        for name, number in ours_values.items():
            if their_values.get(name) != number:
                differences.append(f"{enum.full_name}.{name} = {number}, tritonclient: {their_values.get(name)}")
    assert differences == []


def test_model_config_data_types_cover_every_triton_data_type() -> None:
    # The server answers ModelConfig with TYPE_* values; all of Triton's must be known.
    ours = {v.name: v.number for v in model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values}
    theirs = {v.name: v.number for v in triton_model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values}
    assert ours == theirs


def test_every_rpc_exists_in_triton_with_the_same_types_and_streaming() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    # The KServe V2 core plus config, statistics, repository, and the extensions answered UNIMPLEMENTED.
    assert len(ours.methods) == len(theirs.methods) == 20
    for method in ours.methods:
        their_method = theirs.methods_by_name.get(method.name)
        assert their_method is not None, f"{method.name} is not a Triton RPC"
        assert _method_signature(method) == _method_signature(their_method), method.name


def test_only_model_stream_infer_streams() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    streaming = [m.name for m in service.methods if m.client_streaming or m.server_streaming]
    assert streaming == ["ModelStreamInfer"]


def test_a_request_serialised_by_tritonclient_parses_identically_here() -> None:
    # The same bytes mean the same thing on both sides: a round trip through both types.
    theirs = triton_service_pb2.ModelInferRequest(
        model_name="multi_io",
        model_version="1",
        id="req-7",
        inputs=[
            triton_service_pb2.ModelInferRequest.InferInputTensor(
                name="a",
                datatype="FP32",
                shape=[1, 4],
                contents=triton_service_pb2.InferTensorContents(fp32_contents=[1, 2, 3, 4]),
            )
        ],
        outputs=[triton_service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="sum")],
        raw_input_contents=[b"\x00\x01"],
    )
    theirs.parameters["timeout"].int64_param = 5
    ours = grpc_service_pb2.ModelInferRequest.FromString(theirs.SerializeToString())
    assert ours.model_name == "multi_io" and ours.model_version == "1" and ours.id == "req-7"
    assert list(ours.inputs[0].shape) == [1, 4]
    assert list(ours.inputs[0].contents.fp32_contents) == [1, 2, 3, 4]
    assert ours.outputs[0].name == "sum"
    assert ours.parameters["timeout"].int64_param == 5
    assert list(ours.raw_input_contents) == [b"\x00\x01"]
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------- staleness


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"gen_protos_{uuid.uuid4().hex}", GEN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> Path:
    generator = _load_generator()
    generator.PROTO_DIR = proto_dir  # generate() reads the module attribute
    generator.generate(out_dir)
    return out_dir


def _import_generated(package_dir: Path) -> dict[str, ModuleType]:
    """Import a generated _proto folder as a throwaway package (it brings its own descriptor pool)."""
    name = f"fresh_proto_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(
        name, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
        return {
            module: importlib.import_module(f"{name}.{module}") for module in ("model_config_pb2", "grpc_service_pb2")
        }
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(f"{name}.")]:
            del sys.modules[key]


GENERATED_FILES = sorted(p.name for p in CHECKED_IN.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"})
# Lines that only record which protoc/grpcio-tools produced the file.
VERSION_STAMPS = ("# Protobuf Python Version:", "GRPC_GENERATED_VERSION =")


def _without_version_stamps(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.lstrip().startswith(VERSION_STAMPS)]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/gen_protos.py's output for today's proto/."""
    return _generate(tmp_path_factory.mktemp("fresh_proto") / "_proto")


def test_the_generator_writes_exactly_the_checked_in_files(fresh: Path) -> None:
    assert GENERATED_FILES, "nothing checked in under server/infergate/_proto"
    assert sorted(p.name for p in fresh.iterdir() if p.is_file()) == GENERATED_FILES
    client_files = sorted(p.name for p in CLIENT_CHECKED_IN.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"})
    assert client_files == GENERATED_FILES, "clients/python/infergate_client/_proto lacks or adds files"


def test_one_generator_run_writes_the_server_and_the_client_copies() -> None:
    assert _load_generator().OUT_DIRS == [CHECKED_IN, CLIENT_CHECKED_IN]


def test_the_client_sdk_uses_its_own_copy_with_its_own_descriptor_pool() -> None:
    from infergate._proto import POOL as server_pool
    from infergate_client._proto import POOL as client_pool
    from infergate_client._proto import grpc_service_pb2 as client_pb2

    assert client_pb2.DESCRIPTOR.pool is client_pool and client_pool is not server_pool
    assert client_pb2.DESCRIPTOR.serialized_pb == grpc_service_pb2.DESCRIPTOR.serialized_pb


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("module", ["grpc_service_pb2", "model_config_pb2"])
def test_checked_in_descriptors_equal_freshly_generated_ones(fresh: Path, copy: Path, module: str) -> None:
    installed = _import_generated(copy)[module]
    regenerated = _import_generated(fresh)[module]
    assert regenerated.DESCRIPTOR.serialized_pb == installed.DESCRIPTOR.serialized_pb, (
        f"{copy.relative_to(ROOT)}/{module}.py is stale: run `make protos`"
    )


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("name", GENERATED_FILES)
def test_checked_in_file_text_equals_freshly_generated_text(fresh: Path, copy: Path, name: str) -> None:
    # Catches hand edits of generated code (the stubs, the .pyi, the private pool) too.
    assert _without_version_stamps((copy / name).read_text()) == _without_version_stamps((fresh / name).read_text()), (
        f"{copy.relative_to(ROOT)}/{name} differs from what scripts/gen_protos.py generates"
    )


def test_the_staleness_check_notices_an_edited_proto(tmp_path: Path, fresh: Path) -> None:
    edited = tmp_path / "proto"
    shutil.copytree(PROTO_DIR, edited)
    service = edited / "grpc_service.proto"
    text = service.read_text()
    anchor = "message ServerLiveResponse\n{\n"
    assert anchor in text, "the proto's layout changed; pick another anchor for this edit"
    service.write_text(text.replace(anchor, anchor + "  // an edit nobody regenerated\n  bool sleepy = 7;\n"))

    stale_check = _generate(tmp_path / "_proto", proto_dir=edited)

    edited_modules = _import_generated(stale_check)
    assert edited_modules["grpc_service_pb2"].DESCRIPTOR.serialized_pb != grpc_service_pb2.DESCRIPTOR.serialized_pb
    assert "sleepy" in edited_modules["grpc_service_pb2"].ServerLiveResponse.DESCRIPTOR.fields_by_name
    assert _without_version_stamps((stale_check / "grpc_service_pb2.py").read_text()) != _without_version_stamps(
        (CHECKED_IN / "grpc_service_pb2.py").read_text()
    )
    # An untouched file still compares equal: the check is specific, not just noisy.
    assert (stale_check / "model_config_pb2.py").read_text() == (fresh / "model_config_pb2.py").read_text()
