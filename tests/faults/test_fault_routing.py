"""A routing block that does not fit the loaded versions is never replaced by "the newest takes
everything": at first load the model is not ready, with the file, the field and the reason in
the log, the repository index and every request's error; on reload the previous routing stays.

Version N of ``scale`` answers ``x * N``, so every answer names the version that computed it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tritonclient.grpc as tc
from conftest import running_server, wait_until
from test_model_control import add_version, write_config
from test_routing_server import infer
from tritonclient.utils import InferenceServerException

# The README's routing example at first, with one version too few loaded: latest 3 of 1..5
# serves 3, 4 and 5, but the weights name version 2 (and 5, the newest, is the canary).
MISFIT = """\
version_policy: {latest: {num_versions: 3}}
routing:
  weights: {2: 90, 3: 10}
  shadow: {version: 4, fraction: 0.1}
  canary: {version: 5, steps: [5, 25, 50, 100]}
"""


def scale_repository(root: Path, versions: range) -> Path:
    root.mkdir(exist_ok=True)
    for version in versions:
        add_version(root, "scale", version)
    return root


def test_a_routing_block_that_does_not_fit_at_first_load_leaves_the_model_not_ready(
    tmp_path: Path, log_dir: Path
) -> None:
    root = scale_repository(tmp_path / "models", range(1, 6))
    write_config(root, "scale", MISFIT)
    with running_server(root, log_dir, wait=False) as server, tc.InferenceServerClient(server.url) as client:
        wait_until(lambda: _reason(client), "the model's load to finish")
        reason = _reason(client)
        assert "scale/config.yaml" in reason and "routing.weights.2" in reason
        assert "version 2 is not loaded" in reason
        with pytest.raises(InferenceServerException) as caught:
            infer(client)
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        assert "routing.weights.2" in caught.value.message()
        assert not client.is_model_ready("scale")
    assert "routing.weights.2: version 2 is not loaded" in server.log()


@pytest.fixture
def poll_server_over(tmp_path: Path, log_dir: Path):  # type: ignore[no-untyped-def]
    def start(root: Path):  # type: ignore[no-untyped-def]
        return running_server(root, log_dir, "--model-control-mode", "poll", "--repository-poll-secs", "0.1")

    return start


def test_on_reload_a_routing_block_that_does_not_fit_keeps_the_previous_routing(
    tmp_path: Path,
    poll_server_over,  # type: ignore[no-untyped-def]
) -> None:
    root = scale_repository(tmp_path / "models", range(1, 4))
    write_config(root, "scale", "version_policy: {all: {}}\nrouting: {weights: {1: 100}}\n")
    with poll_server_over(root) as server, tc.InferenceServerClient(server.url) as client:
        assert {infer(client)[0] for _ in range(30)} == {"1"}
        # Version 3 is the newest; a weight on a version that does not exist must not hand it the traffic.
        write_config(root, "scale", "version_policy: {all: {}}\nrouting: {weights: {9: 100}}\n")
        wait_until(lambda: "routing.weights.9" in _reason(client), "the routing error in the index")
        assert {infer(client)[0] for _ in range(30)} == {"1"}


def test_when_no_routing_fits_the_new_versions_nothing_of_the_reload_is_applied(
    tmp_path: Path,
    poll_server_over,  # type: ignore[no-untyped-def]
) -> None:
    root = scale_repository(tmp_path / "models", range(1, 3))
    write_config(root, "scale", "version_policy: {all: {}}\nrouting: {weights: {1: 100}}\n")
    with poll_server_over(root) as server, tc.InferenceServerClient(server.url) as client:
        assert {infer(client)[0] for _ in range(30)} == {"1"}
        # Now only version 2 would load (latest 1), and the new weights name a version that is not there:
        # neither the new routing nor the previous one ({1: 100}) fits version 2 alone.
        write_config(root, "scale", "version_policy: {latest: {num_versions: 1}}\nrouting: {weights: {7: 100}}\n")
        wait_until(lambda: "config not applied" in _reason(client), "the reload refused")
        assert "routing.weights.7" in _reason(client)
        assert {infer(client)[0] for _ in range(30)} == {"1"}
        assert {m.version for m in client.get_model_repository_index().models if m.name == "scale"} == {"1", "2"}


def _reason(client: tc.InferenceServerClient) -> str:
    return " ".join(m.reason for m in client.get_model_repository_index().models if m.name == "scale")
