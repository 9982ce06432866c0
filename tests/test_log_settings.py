"""Triton's logging extension: tritonclient reads and changes how a running server logs (LogSettings).

* With no settings the call reads them: Triton's six names, as the server started.
* Each setting changes what the server writes from the next line on: verbose
  turns on the per-call access log (even on a server started without it) and
  off again, ``log_info: false`` hides INFO lines, ``log_format`` switches to
  ISO 8601 times or JSON objects.
* A request that names an unknown setting, a value of the wrong kind or an
  unknown format is refused INVALID_ARGUMENT naming it, and changes nothing, not
  even the valid settings beside it; ``log_file`` cannot be changed (UNIMPLEMENTED).
* A server embedded in another program leaves that program's logging alone:
  FAILED_PRECONDITION, and ServerMetadata does not list the extension.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, embedded_server, running_server, wait_until
from tritonclient.utils import InferenceServerException

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

STARTED = {
    "log_file": "",
    "log_info": True,
    "log_warning": True,
    "log_error": True,
    "log_verbose_level": 0,
    "log_format": "default",
}
ACCESS = "infergate.access: ModelInfer model=matmul16"
CHANGED = "log settings changed:"


@pytest.fixture
def server(demo_repository: Path, log_dir: Path) -> Iterator[ServerProcess]:
    with running_server(demo_repository, log_dir) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.url)
    yield client
    client.close()


def settings(response: Any) -> dict[str, object]:
    """A LogSettingsResponse as plain values, by setting name."""
    return {name: getattr(value, value.WhichOneof("parameter_choice")) for name, value in response.settings.items()}


def infer(client: grpcclient.InferenceServerClient) -> None:
    x = grpcclient.InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    assert client.infer("matmul16", [x]).as_numpy("y") is not None


def test_the_settings_read_back_as_the_server_started(client: grpcclient.InferenceServerClient) -> None:
    assert settings(client.get_log_settings()) == STARTED
    assert "logging" in client.get_server_metadata().extensions


def test_a_server_started_at_warning_in_json_reads_back_so(demo_repository: Path, log_dir: Path) -> None:
    with running_server(demo_repository, log_dir, "--log-level", "warning", "--log-format", "json") as server:
        client = grpcclient.InferenceServerClient(server.url)
        try:
            assert settings(client.get_log_settings()) == {**STARTED, "log_info": False, "log_format": "json"}
        finally:
            client.close()


def test_verbose_turns_the_access_log_on_and_off_on_a_server_started_without_it(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    infer(client)
    answer = settings(client.update_log_settings({"log_verbose_level": 1}))
    assert answer == {**STARTED, "log_verbose_level": 1}
    # Lines are written in the order logged (by a thread of their own): once the change's line is in the
    # log, so is any line the call before it wrote.
    assert ACCESS not in server.logged(CHANGED)
    infer(client)
    assert server.logged(ACCESS).count(ACCESS) == 1

    client.update_log_settings({"log_verbose_level": 0})
    infer(client)
    client.update_log_settings({"log_verbose_level": 0})  # changes nothing; its line follows the call's
    assert server.logged(CHANGED, 3).count(ACCESS) == 1, "an access line after verbose went back to 0"


def test_a_caller_cannot_write_a_line_of_its_own_into_the_text_log(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    """A model name is the caller's text; a newline in it must not start a line that looks like the server's."""
    forged = "2026-01-01 00:00:00,000 [1] ERROR infergate.server: forged"
    client.update_log_settings({"log_verbose_level": 1})  # the access log names every call's model
    try:
        x = grpcclient.InferInput("x", [1, 16], "FP32")
        x.set_data_from_numpy(np.ones((1, 16), np.float32))
        with pytest.raises(InferenceServerException, match="Request for unknown model"):
            client.infer(f"nobody\n{forged}", [x])
    finally:
        client.update_log_settings({"log_verbose_level": 0})
    log = server.logged(CHANGED, 2)  # the line of the change back, after the call's
    assert "nobody\\n" + forged in log  # written, on the caller's line
    assert not any(line.startswith(forged) for line in log.splitlines())


def test_log_info_off_hides_info_lines_until_it_is_on_again(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    assert settings(client.update_log_settings({"log_info": False}))["log_info"] is False
    assert settings(client.update_log_settings({"log_info": True}))["log_info"] is True
    changes = [line for line in server.logged(CHANGED).splitlines() if CHANGED in line]
    # The first change's own INFO line came after it took effect, so it was not written.
    assert len(changes) == 1 and "log_info=True" in changes[0], changes


@pytest.mark.parametrize(
    ("fmt", "looks_right"),
    [
        ("json", lambda line: json.loads(line)["message"].startswith(CHANGED)),
        ("ISO8601", lambda line: re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[\d+\] INFO ", line)),
    ],
)
def test_log_format_changes_the_lines_written_from_then_on(
    server: ServerProcess, client: grpcclient.InferenceServerClient, fmt: str, looks_right: Any
) -> None:
    assert settings(client.update_log_settings({"log_format": fmt}))["log_format"] == fmt
    last = last_change(server, 1)
    assert looks_right(last), last
    assert settings(client.update_log_settings({"log_format": "default"}))["log_format"] == "default"
    last = last_change(server, 2)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] INFO ", last), last


def last_change(server: ServerProcess, changes: int) -> str:
    """The line the server wrote for its ``changes``-th change, once written (the audit trail's line follows it)."""
    wait_until(lambda: len(change_lines(server)) >= changes, f"the line of change {changes}")
    return change_lines(server)[changes - 1]


def change_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if CHANGED in line and "infergate.audit" not in line]


def _value(**kind: Any) -> pb.LogSettingsRequest.SettingValue:
    return pb.LogSettingsRequest.SettingValue(**kind)


@pytest.mark.parametrize(
    ("given", "status", "fragment"),
    [
        ({"log_infos": _value(bool_param=False)}, grpc.StatusCode.INVALID_ARGUMENT, "unknown setting 'log_infos'"),
        ({"log_info": _value(uint32_param=0)}, grpc.StatusCode.INVALID_ARGUMENT, "log_info takes a bool"),
        ({"log_verbose_level": _value()}, grpc.StatusCode.INVALID_ARGUMENT, "got no value"),
        ({"log_format": _value(string_param="xml")}, grpc.StatusCode.INVALID_ARGUMENT, "'xml' is not one of"),
        ({"log_file": _value(string_param="/tmp/x.log")}, grpc.StatusCode.UNIMPLEMENTED, "log_file cannot be"),
    ],
)
def test_a_setting_that_cannot_be_applied_is_refused_and_changes_nothing(
    server: ServerProcess,
    client: grpcclient.InferenceServerClient,
    given: dict[str, pb.LogSettingsRequest.SettingValue],
    status: grpc.StatusCode,
    fragment: str,
) -> None:
    # A valid change beside it: all or none, so it must not happen either.
    request = pb.LogSettingsRequest(settings={**given, "log_error": _value(bool_param=False)})
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.GRPCInferenceServiceStub(channel).LogSettings(request, timeout=30)
    assert refused.value.code() == status
    assert fragment in str(refused.value.details())
    assert settings(client.get_log_settings()) == STARTED
    infer(client)  # and the server serves on


def test_tritonclient_sends_the_settings_it_read_back_unchanged(client: grpcclient.InferenceServerClient) -> None:
    read = settings(client.get_log_settings())
    assert settings(client.update_log_settings(read)) == STARTED  # log_file "" included: not a change


def test_tritonclient_hears_a_typo_instead_of_nothing(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as refused:
        client.update_log_settings({"log_verbose": 1})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "log_verbose_level" in str(refused.value.message())  # the known names, to find the right one


async def test_an_embedded_server_leaves_its_programs_logging_alone(demo_repository: Path) -> None:
    async with embedded_server(demo_repository) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.LogSettings(pb.LogSettingsRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "owns its process's logging" in str(refused.value.details())
        metadata = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
        assert "logging" not in metadata.extensions
