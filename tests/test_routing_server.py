"""Routing through a real server: A/B weights, sticky keys, shadow traffic, reloads, canary rollback.

Version N of the ``scale`` model answers ``x * N``, so the numbers prove which
version computed each answer.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc
from infergate.server import SERVICE_NAME
from infergate_client import Client, RetryPolicy
from infergate_client.errors import Unavailable
from tests.conftest import WAIT_S, ServerProcess, running_server, wait_until
from tests.models import build_slow_model
from tests.test_model_control import add_version, write_config

ROUTED = """\
version_policy: {all: {}}
routing:
  weights: {1: 50, 2: 50}
  sticky: {header: x-user-id}
  shadow: {version: 3, fraction: 1.0, max_busy_fraction: 1.0}
"""


def x_input() -> tc.InferInput:
    tensor = tc.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    return tensor


def infer(client: tc.InferenceServerClient, **kwargs: object) -> tuple[str, str, bool]:
    """(served version, routing arm, shadowed) of one request; checks the answer matches the version."""
    result = client.infer("scale", [x_input()], **kwargs)  # type: ignore[arg-type]
    response = result.get_response()
    version = response.model_version
    assert result.as_numpy("y")[0, 0] == float(version)
    parameters = response.parameters
    return version, parameters["infergate_route"].string_param, parameters["infergate_shadowed"].bool_param


def routing_status(server: ServerProcess, name: str = "scale") -> apb.ModelRouting:
    with grpc.insecure_channel(server.url) as channel:
        response = apb_grpc.InferGateAdminStub(channel).RoutingStatus(apb.RoutingStatusRequest(name=name))
    (model,) = response.models
    return model


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    for version in (1, 2, 3):
        add_version(root, "scale", version)
    write_config(root, "scale", ROUTED)
    return root


@pytest.fixture
def server(repository: Path, log_dir: Path) -> Iterator[ServerProcess]:
    with running_server(repository, log_dir, "--model-control-mode", "poll", "--repository-poll-secs", "0.1") as s:
        yield s


@pytest.fixture
def client(server: ServerProcess) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(server.url) as c:
        yield c


def test_requests_are_split_by_weight_and_each_answer_says_how_it_was_routed(
    client: tc.InferenceServerClient, server: ServerProcess
) -> None:
    outcomes = Counter(infer(client) for _ in range(400))
    versions = Counter(version for version, _, _ in outcomes.elements())
    assert set(versions) == {"1", "2"}  # never the shadow
    assert min(versions.values()) > 100  # 50/50 within a wide binomial margin (sd = 10)
    assert {arm for _, arm, _ in outcomes} == {"split"}
    shadow = routing_status(server).shadow  # every request is picked (fraction 1.0); a busy machine may drop a few
    shadowed = sum(count for (_, _, copied), count in outcomes.items() if copied)
    assert (shadowed, 400 - shadowed) == (shadow.sent, shadow.dropped)


def test_a_request_naming_a_version_bypasses_the_split(client: tc.InferenceServerClient) -> None:
    assert infer(client, model_version="3") == ("3", "requested", False)
    assert infer(client, model_version="1") == ("1", "requested", False)


def test_a_sticky_key_always_lands_on_the_same_version(client: tc.InferenceServerClient) -> None:
    assignments: dict[str, set[str]] = {}
    for user in range(40):
        for _ in range(5):
            version, arm, _ = infer(client, headers={"x-user-id": f"user-{user}"})
            assert arm == "sticky"
            assignments.setdefault(f"user-{user}", set()).add(version)
    assert all(len(versions) == 1 for versions in assignments.values())
    assert {v for versions in assignments.values() for v in versions} == {"1", "2"}


def outcomes(client: tc.InferenceServerClient, version: str) -> tuple[int, int]:
    """(successes, failures) of one version of ``scale``, from ModelStatistics."""
    stats = client.get_inference_statistics("scale", version, as_json=True)["model_stats"][0]["inference_stats"]
    return int(stats["success"].get("count", 0)), int(stats["fail"].get("count", 0))


def test_the_shadow_is_compared_and_reported_but_never_answers(
    client: tc.InferenceServerClient, server: ServerProcess
) -> None:
    before = routing_status(server).shadow.compared, outcomes(client, "3")
    for _ in range(50):
        assert infer(client)[0] in {"1", "2"}
    # Every request is mirrored (fraction 1.0); on a busy machine the busy-time budget may drop a few copies.
    accounted = lambda: routing_status(server).shadow  # noqa: E731
    wait_until(lambda: accounted().compared + accounted().dropped >= 50, "all 50 shadow copies compared or dropped")
    status = routing_status(server)
    # The shadow version's statistics count its calls as requests, as its batches and rows are counted.
    assert outcomes(client, "3") == (before[1][0] + status.shadow.compared - before[0], before[1][1])
    assert status.shadow.version == "3"
    assert status.shadow.errors == 0
    assert status.shadow.compared >= 10
    agreement = status.shadow.outputs["y"]
    assert agreement.max_abs_diff == pytest.approx(2.0)  # 3x against 1x (and 1.0 against 2x)
    assert [arm.version for arm in status.arms] == ["1", "2"]
    assert status.sticky_header == "x-user-id"


def test_an_answer_says_it_was_shadowed_only_when_its_copy_went_to_the_shadow(tmp_path: Path, log_dir: Path) -> None:
    """Copies the shadow's busy-time budget (or its full queue) turns away are dropped: their answers
    say ``infergate_shadowed: false``, and RoutingStatus counts them as dropped, the others as sent."""
    root = tmp_path / "models"
    root.mkdir()
    add_version(root, "scale", 1)
    add_version(root, "scale", 2, build_slow_model(50).SerializeToString())  # y = x, ~50 ms per batch
    write_config(
        root,
        "scale",
        "version_policy: {all: {}}\nrouting:\n  weights: {1: 1}\n"
        "  shadow: {version: 2, fraction: 1.0, queue_size: 4, max_busy_fraction: 0.01}\n",
    )
    with running_server(root, log_dir) as server, tc.InferenceServerClient(server.url) as client:
        answers: list[bool] = []
        while all(answers):  # until the budget (0.5 s of shadow time, then 1% of wall time) drops a copy
            version, arm, shadowed = infer(client)
            assert (version, arm) == ("1", "split")
            answers.append(shadowed)
            assert len(answers) < 2000, "no shadow copy was ever dropped"
        shadow = routing_status(server).shadow
    assert (answers.count(True), answers.count(False)) == (shadow.sent, shadow.dropped)


def test_a_shadow_that_always_fails_is_counted_and_never_seen_by_callers(
    repository: Path, client: tc.InferenceServerClient, server: ServerProcess
) -> None:
    wrong = helper.make_graph(  # expects 5 columns: every mirrored request fails inside the runtime
        [helper.make_node("Identity", ["x"], ["y"])],
        "wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
    )
    model = helper.make_model(wrong, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    add_version(repository, "scale", 4, model.SerializeToString())
    write_config(repository, "scale", ROUTED.replace("version: 3", "version: 4"))
    wait_until(lambda: routing_status(server).shadow.version == "4", "shadow switched to version 4")
    for _ in range(10):
        assert infer(client)[0] in {"1", "2"}
    wait_until(lambda: routing_status(server).shadow.errors >= 10, "10 shadow errors counted")
    for _ in range(50):  # ten failures in a row pause the shadow: these copies are dropped, not sent
        assert infer(client)[0] in {"1", "2"}
    status = routing_status(server).shadow
    assert status.compared == 0
    assert status.dropped >= 1
    assert outcomes(client, "4") == (0, status.errors)
    assert status.errors + status.dropped + status.compared <= 60


def test_routing_reloads_without_restart_and_a_bad_routing_keeps_the_previous_one(
    repository: Path, client: tc.InferenceServerClient, server: ServerProcess
) -> None:
    write_config(repository, "scale", "version_policy: {all: {}}\nrouting: {weights: {2: 100}}\n")
    wait_until(lambda: [a.version for a in routing_status(server).arms] == ["2"], "weights reloaded")
    assert {infer(client)[0] for _ in range(50)} == {"2"}

    write_config(repository, "scale", "version_policy: {all: {}}\nrouting: {weights: {7: 100}}\n")

    def reported() -> bool:
        index = client.get_model_repository_index().models
        return any("routing.weights.7" in m.reason for m in index if m.name == "scale")

    wait_until(reported, "the routing error in the repository index")
    (reason,) = {m.reason for m in client.get_model_repository_index().models if m.name == "scale"}
    assert "config.yaml" in reason and "version 7 is not loaded" in reason
    assert {infer(client)[0] for _ in range(50)} == {"2"}


def test_a_canary_that_breaches_its_latency_limit_is_rolled_back(tmp_path: Path, log_dir: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    add_version(root, "scale", 1)
    add_version(root, "scale", 2, build_slow_model(20).SerializeToString())  # y = x, ~20 ms per batch
    write_config(
        root,
        "scale",
        "version_policy: {all: {}}\n"
        "routing:\n  weights: {1: 1}\n"
        "  canary: {version: 2, steps: [50, 100], step_requests: 20, max_p99_ratio: 2.0}\n",
    )
    with running_server(root, log_dir) as server, tc.InferenceServerClient(server.url) as client:
        arms: Counter[str] = Counter()
        while routing_status(server).canary.state == "ramping":
            result = client.infer("scale", [x_input()])
            arms[result.get_response().parameters["infergate_route"].string_param] += 1
            assert sum(arms.values()) < 2000, "the canary was never judged"
        canary = routing_status(server).canary
        assert canary.state == "rolled_back", canary
        assert canary.weight == 0 and "p99" in canary.reason
        assert arms["canary"] >= 20
        after = {client.infer("scale", [x_input()]).get_response().model_version for _ in range(50)}
        assert after == {"1"}
        server.logged("rolled back")


def test_in_poll_mode_a_model_whose_routing_never_fits_stays_unavailable_and_is_not_retried(
    tmp_path: Path, log_dir: Path
) -> None:
    """Its versions load, the routing block names one that does not exist: nothing of it is applied, and
    every later poll leaves it UNAVAILABLE with the reason (never LOADING, which clients wait on)."""
    root = tmp_path / "models"
    root.mkdir()
    for version in (2, 3):
        add_version(root, "fraud", version)
    write_config(root, "fraud", "version_policy: {all: {}}\nrouting: {weights: {2: 90, 7: 10}}\n")
    poll = ("--model-control-mode", "poll", "--repository-poll-secs", "0.1")
    with (
        running_server(root, log_dir, *poll, wait=False) as server,  # not ready: fraud serves nothing
        grpc.insecure_channel(server.url) as channel,
        tc.InferenceServerClient(server.url) as client,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=WAIT_S
        )
        assert any(u.status == health_pb2.HealthCheckResponse.SERVING for u in watch)  # loading is over
        watch.cancel()

        def fraud() -> list[tuple[str, str]]:
            return [(m.state, m.reason) for m in client.get_model_repository_index().models if m.name == "fraud"]

        for later in ("late", "later"):  # each loads in a poll that began after the previous one had ended
            add_version(root, later, 1)
            wait_until(functools.partial(client.is_model_ready, later), f"{later} loaded by a poll")
            [(state, reason)] = fraud()
            assert state == "UNAVAILABLE", reason
            assert "config.yaml: routing.weights.7: version 7 is not loaded (loaded: 2, 3)" in reason
            assert not client.is_model_ready("fraud")

        retries: list[int] = []
        with Client(server.url, timeout=WAIT_S, retry=RetryPolicy(on_retry=lambda n, e: retries.append(n))) as sdk:
            with pytest.raises(Unavailable, match=r"no available versions \(UNAVAILABLE\).*routing\.weights\.7"):
                sdk.infer("fraud", {"x": np.ones((1, 4), np.float32)})
        assert retries == []
