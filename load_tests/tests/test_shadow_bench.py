"""The shadow benchmark's repository: a primary, a ~10x slower shadow and one that always fails."""

from __future__ import annotations

import pathlib

import numpy as np
import onnxruntime as ort
import pytest

from infergate.models.config import load_model_config
from load_tests.shadow import SCENARIOS, build_repository, write_config


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("shadow-bench")
    build_repository(root, SCENARIOS["shadow 10x slower"])
    return root


def session(root: pathlib.Path, version: int) -> ort.InferenceSession:
    return ort.InferenceSession(str(root / "mlp" / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])


def test_the_slow_shadow_computes_the_mlp_ten_times_over(repository: pathlib.Path) -> None:
    primary, slow = session(repository, 3), session(repository, 1)
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    once = primary.run(None, {"x": x})[0]
    expected = x
    for _ in range(10):
        expected = primary.run(None, {"x": expected})[0]
    np.testing.assert_allclose(slow.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
    assert once.shape == (2, 512)


def test_the_failing_shadow_refuses_what_the_primary_accepts(repository: pathlib.Path) -> None:
    with pytest.raises(Exception, match="dimensions"):
        session(repository, 2).run(None, {"x": np.zeros((1, 512), dtype=np.float32)})


def test_the_routing_of_each_scenario_is_a_valid_config(tmp_path: pathlib.Path) -> None:
    for scenario, routing in SCENARIOS.items():
        root = tmp_path / scenario.replace(" ", "-")
        write_config(root, routing)
        config = load_model_config(root / "mlp" / "config.yaml")
        assert config.routing is not None and config.routing.weights == {3: 1.0}
        assert (config.routing.shadow is not None) == bool(routing)
