"""The audit trail of a real server: every lifecycle event, read back from ``--audit-log FILE``.

Each test starts ``python -m infergate serve`` on 127.0.0.1 with an audit
file, changes something (the repository on disk, a tritonclient call, traffic)
and waits for the lines that must follow. Version N of the ``scale`` model
answers ``x * N``; a "failing" version loads but fails every inference. One
test calls the admin audit interceptor directly, to show that it leaves every
method but the admin writes alone.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from monitoring_support import reference_rows, write_monitored_repository
from onnx import TensorProto, helper
from security import AUDIENCE, ISSUER, SECRET, claims, token
from tritonclient.utils import InferenceServerException

from infergate.audit import AuditLog
from infergate.serving.admin_audit import AdminAudit
from tests.conftest import running_server, wait_until
from tests.test_model_control import add_version, write_config

Line = dict[str, Any]
POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.1")
EXPLICIT = ("--model-control-mode", "explicit")


def lines(path: Path) -> list[Line]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def events(path: Path, **match: Any) -> list[Line]:
    """The lines whose keys hold the given values (``detail_method`` matches ``detail["method"]``)."""

    def fits(line: Line) -> bool:
        for key, value in match.items():
            held = line["detail"].get(key.removeprefix("detail_")) if key.startswith("detail_") else line[key]
            if held != value:
                return False
        return True

    return [line for line in lines(path) if fits(line)]


def await_line(path: Path, **match: Any) -> Line:
    """The first line matching ``match``, once it is in the file."""
    wait_until(lambda: events(path, **match), f"an audit line with {match}")
    return events(path, **match)[0]


def summary(path: Path, *keys: str) -> list[tuple[Any, ...]]:
    """The events in order, each as (event, model, version, source) plus ``keys``; server start and stop left out."""
    return [
        (line["event"], line["model"], line["version"], line["source"], *(line[k] for k in keys))
        for line in lines(path)
        if not line["event"].startswith("server_")
    ]


def failing_model() -> bytes:
    """Takes ``x`` FP32 [batch, 4] like ``scale`` and looks each value up in a table of one entry: zeros (the
    warm-up's) pass, the ones that :func:`infer` sends fail in the runtime."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["y"], axis=0),
        ],
        "failing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("table", TensorProto.FLOAT, [1], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def infer(client: tc.InferenceServerClient, model: str = "scale") -> str:
    """Send one request; its route (the ``infergate_route`` parameter), or "failed"."""
    x = tc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    try:
        result = client.infer(model, [x])
    except InferenceServerException:
        return "failed"
    return str(result.get_response().parameters["infergate_route"].string_param)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


@pytest.fixture
def audit(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


# --------------------------------------------------------------------------- the repository


def test_startup_loads_a_poll_swaps_a_version_in_and_retires_the_old_and_a_failed_load_is_written_once(
    repository: Path, audit: Path, log_dir: Path
) -> None:
    add_version(repository, "scale", 1)
    write_config(repository, "scale", "version_policy: {latest: {num_versions: 1}}\n")
    with running_server(repository, log_dir, "--audit-log", str(audit), *POLL):
        await_line(audit, event="version_swapped_in", version="1")
        assert summary(audit, "principal", "outcome") == [
            ("load", "scale", "1", "startup", "anonymous", "ok"),
            ("version_swapped_in", "scale", "1", "startup", "anonymous", "ok"),
        ]

        add_version(repository, "scale", 2)
        retired = await_line(audit, event="version_retired", version="1")
        assert retired["reason"] == "no longer selected by the version policy"
        assert summary(audit)[2:] == [
            ("load", "scale", "2", "poll"),
            ("version_swapped_in", "scale", "2", "poll"),
            ("version_retired", "scale", "1", "poll"),
        ]

        add_version(repository, "scale", 3, b"not an onnx model")
        failed = await_line(audit, event="load_failed", version="3")
        assert (failed["source"], failed["outcome"]) == ("poll", "failed")
        assert "model.onnx" in failed["reason"]
        # A later change is seen by a later poll: a failed version is not retried (nor written) until its file changes.
        write_config(repository, "scale", "version_policy: {latest: {num_versions: 1}}\nrouting: {weights: {2: 1}}\n")
        await_line(audit, event="routing_applied")
        assert len(events(audit, event="load_failed")) == 1


def test_a_config_that_does_not_validate_is_a_failed_load_of_the_model_written_once(
    repository: Path, audit: Path, log_dir: Path
) -> None:
    add_version(repository, "scale", 1)
    write_config(repository, "scale", "max_batch_size: many\n")
    args = ("--audit-log", str(audit), *POLL)
    with running_server(repository, log_dir, *args, wait=False):  # never ready (strict readiness)
        failed = await_line(audit, event="load_failed")
        assert (failed["model"], failed["version"], failed["source"]) == ("scale", "", "startup")
        assert "config.yaml" in failed["reason"] and "max_batch_size" in failed["reason"]
        add_version(repository, "other", 1)  # seen by a later poll, which met the same bad config again
        await_line(audit, event="version_swapped_in", model="other")
        assert len(events(audit, event="load_failed")) == 1


def test_a_routing_change_applied_and_one_rejected(repository: Path, audit: Path, log_dir: Path) -> None:
    for version in (1, 2):
        add_version(repository, "scale", version)
    write_config(repository, "scale", "version_policy: {all: {}}\n")
    with running_server(repository, log_dir, "--audit-log", str(audit), *POLL) as server:
        await_line(audit, event="version_swapped_in", version="2")
        assert not events(audit, event="routing_applied")  # no routing block: nothing to apply

        write_config(repository, "scale", "version_policy: {all: {}}\nrouting: {weights: {1: 100}}\n")
        applied = await_line(audit, event="routing_applied")
        assert (applied["model"], applied["source"]) == ("scale", "poll")
        assert applied["detail"]["routing"]["weights"] == {"1": 100.0}

        write_config(repository, "scale", "version_policy: {all: {}}\nrouting: {weights: {7: 100}}\n")
        rejected = await_line(audit, event="routing_rejected")
        assert (rejected["outcome"], rejected["source"]) == ("rejected", "poll")
        assert "routing.weights.7" in rejected["reason"] and "previous routing stays" in rejected["reason"]

        # Polls meet the same rejection again and again (each says so in the server log): it is written once.
        wait_until(lambda: server.log().count("failed to load 'scale'") >= 3, "three polls meeting the rejection")
        write_config(repository, "scale", "version_policy: {all: {}}\nrouting: {weights: {2: 100}}\n")
        wait_until(lambda: len(events(audit, event="routing_applied")) == 2, "the next routing applied")
        assert len(events(audit, event="routing_rejected")) == 1
        assert not events(audit, event="load")[2:]  # a routing change reloads nothing


def test_a_routing_that_fits_no_loaded_version_applies_nothing_and_discards_what_it_loaded(
    repository: Path, audit: Path, log_dir: Path
) -> None:
    for version in (1, 2):
        add_version(repository, "scale", version)
    write_config(repository, "scale", "version_policy: {specific: {versions: [1]}}\nrouting: {weights: {1: 100}}\n")
    with running_server(repository, log_dir, "--audit-log", str(audit), *POLL):
        await_line(audit, event="routing_applied")
        # Version 2 would replace 1, but the routing (new and previous) sends everything to 1.
        write_config(repository, "scale", "version_policy: {specific: {versions: [2]}}\nrouting: {weights: {1: 100}}\n")
        discarded = await_line(audit, event="version_retired", version="2")
        assert discarded["reason"].startswith("discarded: config not applied")
        [rejected] = events(audit, event="routing_rejected")
        assert rejected["reason"].startswith("config not applied:") and "routing.weights.1" in rejected["reason"]
        assert summary(audit) == [
            ("load", "scale", "1", "startup"),
            ("version_swapped_in", "scale", "1", "startup"),
            ("routing_applied", "scale", "", "startup"),
            ("load", "scale", "2", "poll"),
            ("routing_rejected", "scale", "", "poll"),
            ("version_retired", "scale", "2", "poll"),
        ]


# --------------------------------------------------------------------------- model control, auth off and on


def test_explicit_load_and_unload_without_auth_are_audited_as_anonymous(
    repository: Path, audit: Path, log_dir: Path
) -> None:
    add_version(repository, "scale", 1)
    with (
        running_server(repository, log_dir, "--audit-log", str(audit), *EXPLICIT) as server,
        tc.InferenceServerClient(server.url) as client,
    ):
        client.load_model("scale")
        client.unload_model("scale")
        with pytest.raises(InferenceServerException):
            client.load_model("nope")
        with pytest.raises(InferenceServerException):
            client.load_model("n" * 100_000)
        with pytest.raises(InferenceServerException, match="not a model name"):  # files need no directory
            client.load_model("../up", config="{}", files={"file:1/model.onnx": b"x"})
        assert [m.name for m in client.get_model_repository_index().models] == ["scale"]  # reads are not audited
        wait_until(lambda: len(events(audit, event="admin")) == 5, "five admin lines")
    assert summary(audit, "principal", "outcome") == [
        ("load", "scale", "1", "api", "anonymous", "ok"),
        ("version_swapped_in", "scale", "1", "api", "anonymous", "ok"),
        ("admin", "scale", "", "api", "anonymous", "OK"),
        ("version_retired", "scale", "1", "api", "anonymous", "ok"),
        ("unload", "scale", "", "api", "anonymous", "ok"),
        ("admin", "scale", "", "api", "anonymous", "OK"),
        ("admin", "nope", "", "api", "anonymous", "NOT_FOUND"),
        ("admin", "n" * 256 + "…", "", "api", "anonymous", "INVALID_ARGUMENT"),
        ("admin", "../up", "", "api", "anonymous", "INVALID_ARGUMENT"),
    ]
    methods = [line["detail"]["method"] for line in events(audit, event="admin")]
    assert methods == ["RepositoryModelLoad", "RepositoryModelUnload"] + ["RepositoryModelLoad"] * 3
    assert max(len(line) for line in audit.read_text().splitlines()) < 1024  # a client's long name is cut


def test_a_write_the_disk_cuts_short_is_taken_back_and_its_events_are_counted(
    repository: Path, audit: Path, log_dir: Path
) -> None:
    """A disk that fills in the middle of a line (here the server's file-size limit, RLIMIT_FSIZE, a few
    bytes past the trail's end: the write stops there, the next one fails with EFBIG) leaves no half line
    for the next event to be glued to; the server log counts the events lost."""
    stopped = json.dumps({"event": "server_stopped", "reason": "signal", "source": "runtime"})
    audit.write_text(f"{stopped}\n" * 20_000)  # a long history: the server's own log stays below the limit
    add_version(repository, "scale", 1)
    with (
        running_server(repository, log_dir, "--audit-log", str(audit), *EXPLICIT) as server,
        tc.InferenceServerClient(server.url) as client,
    ):
        await_line(audit, event="server_started")
        pid = server.process.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (audit.stat().st_size + 10, hard))
        with pytest.raises(InferenceServerException):
            client.load_model("nope")  # its admin event is cut after 10 bytes
        server.logged("cannot write the audit log")
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))  # room again
        client.load_model("scale")
        await_line(audit, event="admin", outcome="OK")
    assert audit.read_bytes().endswith(b"\n")
    assert summary(audit, "outcome") == [  # every line parses; the refused load's admin event is lost
        ("load", "scale", "1", "api", "ok"),
        ("version_swapped_in", "scale", "1", "api", "ok"),
        ("admin", "scale", "", "api", "OK"),
    ]
    assert "1 event(s) lost" in server.log()


@pytest.fixture
def auth_config(tmp_path: Path) -> Path:
    config = tmp_path / "server.yaml"
    auth = {"enabled": True, "algorithms": ["HS256"], "secret_env": "AUDIT_TEST_SECRET"}
    config.write_text(json.dumps({"auth": {**auth, "issuer": ISSUER, "audience": AUDIENCE}}))
    return config


def bearer_of(subject: str, scope: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token(SECRET, 'HS256', claims(scope, sub=subject))}"}


def test_with_auth_each_admin_write_names_the_caller_and_refused_ones_are_audited_too(
    repository: Path, audit: Path, log_dir: Path, auth_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDIT_TEST_SECRET", SECRET.decode())
    add_version(repository, "scale", 1)
    args = ("--audit-log", str(audit), "--config", str(auth_config), *EXPLICIT)
    with running_server(repository, log_dir, *args) as server, tc.InferenceServerClient(server.url) as client:
        client.load_model("scale", headers=bearer_of("alice", "admin"))
        with pytest.raises(InferenceServerException, match="admin"):
            client.unload_model("scale", headers=bearer_of("bob", "infer:* metadata"))
        with pytest.raises(InferenceServerException):
            client.unload_model("scale")  # no token
        client.unload_model("scale", headers=bearer_of("alice", "admin"))
        wait_until(lambda: len(events(audit, event="admin")) == 4, "four admin lines")
    admin = [
        (r["detail"]["method"], r["principal"], r["detail"]["client_id"], r["outcome"])
        for r in events(audit, event="admin")
    ]
    assert admin == [
        ("RepositoryModelLoad", "alice", "svc-a", "OK"),
        ("RepositoryModelUnload", "bob", "svc-a", "PERMISSION_DENIED"),
        ("RepositoryModelUnload", "anonymous", None, "UNAUTHENTICATED"),
        ("RepositoryModelUnload", "alice", "svc-a", "OK"),
    ]
    assert [(r["event"], r["principal"]) for r in lines(audit) if r["source"] == "api" and r["event"] != "admin"] == [
        ("load", "alice"),
        ("version_swapped_in", "alice"),
        ("version_retired", "alice"),
        ("unload", "alice"),
    ]


@dataclass(frozen=True)
class CallDetails:
    """What gRPC hands an interceptor about a call (``grpc.HandlerCallDetails`` is an interface)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


async def test_the_admin_audit_hands_every_other_method_its_handler_untouched() -> None:
    """Inference pays nothing for the audit: the interceptor decides by method name alone."""

    async def answer(request: Any, context: Any) -> None: ...

    handler = grpc.unary_unary_rpc_method_handler(answer)

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return handler

    interceptor = AdminAudit(AuditLog())
    inference = "/inference.GRPCInferenceService/"
    for method in ("ModelInfer", "ModelStreamInfer", "ModelMetadata", "RepositoryIndex"):
        assert await interceptor.intercept_service(continuation, CallDetails(inference + method)) is handler
    routing = CallDetails("/infergate.admin.InferGateAdmin/RoutingStatus")
    assert await interceptor.intercept_service(continuation, routing) is handler  # an admin read
    load = CallDetails(inference + "RepositoryModelLoad")
    audited = await interceptor.intercept_service(continuation, load)
    assert audited is not handler
    assert await interceptor.intercept_service(continuation, load) is audited  # built once, not per call


# --------------------------------------------------------------------------- the server deciding by itself


def test_a_canary_rollback_and_a_shadow_pause_are_written_as_runtime_events(
    repository: Path, audit: Path, log_dir: Path
) -> None:
    add_version(repository, "scale", 1)
    add_version(repository, "scale", 2, failing_model())
    canary = "{version: 2, steps: [50, 100], step_requests: 20}"
    write_config(
        repository, "scale", f"version_policy: {{all: {{}}}}\nrouting: {{weights: {{1: 1}}, canary: {canary}}}\n"
    )
    with (
        running_server(repository, log_dir, "--audit-log", str(audit), *POLL) as server,
        tc.InferenceServerClient(server.url) as client,
    ):
        applied = await_line(audit, event="routing_applied")
        assert applied["source"] == "startup" and applied["detail"]["routing"]["canary"]["version"] == 2
        sent = 0
        while not events(audit, event="canary_rollback"):  # every canary request fails: rolled back after 20
            infer(client)
            sent += 1
            assert sent < 2000, "the canary was never judged"
        [rollback] = events(audit, event="canary_rollback")
        assert (rollback["version"], rollback["source"], rollback["outcome"]) == ("2", "runtime", "failed")
        assert rollback["reason"].startswith("error rate 100.00%")
        assert not events(audit, event="canary_step")

        shadow = "{version: 2, fraction: 1.0, max_busy_fraction: 1.0}"
        write_config(
            repository, "scale", f"version_policy: {{all: {{}}}}\nrouting: {{weights: {{1: 1}}, shadow: {shadow}}}\n"
        )
        await_line(audit, event="routing_applied", source="poll")
        sent = 0
        while not events(audit, event="shadow_paused"):  # ten shadow failures in a row pause it
            assert infer(client) == "split"  # callers never see the shadow
            sent += 1
            assert sent < 2000, "the shadow was never paused"
        [paused] = events(audit, event="shadow_paused")
        assert (paused["model"], paused["version"], paused["source"]) == ("scale", "2", "runtime")
        assert paused["detail"]["seconds"] == 0.5 and "10 shadow calls failed in a row" in paused["reason"]


def test_a_drift_alert_is_written_when_it_starts_and_when_it_ends(repository: Path, audit: Path, log_dir: Path) -> None:
    drift = "drift: {sample_fraction: 1.0, window: 400, update_every: 5, update_interval_seconds: 0.2}"
    write_monitored_repository(repository, drift)
    with (
        running_server(repository, log_dir, "--audit-log", str(audit)) as server,
        tc.InferenceServerClient(server.url) as client,
    ):

        def send(rows: np.ndarray) -> None:
            for start in range(0, len(rows), 8):
                x = tc.InferInput("x", [len(rows[start : start + 8]), 4], "FP32")
                x.set_data_from_numpy(rows[start : start + 8])
                client.infer("classifier", [x])

        send(reference_rows(400, seed=6, shift={3: 2.0}))
        entered = await_line(audit, event="drift_alert_entered")
        assert (entered["model"], entered["version"], entered["source"]) == ("classifier", "1", "runtime")
        assert "input x[3]" in entered["reason"] and entered["detail"]["threshold"] == 0.2
        send(reference_rows(400, seed=5))
        left = await_line(audit, event="drift_alert_left")
    assert left["reason"] == "every feature at or below 0.2"
    assert [line["event"] for line in lines(audit) if line["event"].startswith("drift")] == [
        "drift_alert_entered",
        "drift_alert_left",
    ]
