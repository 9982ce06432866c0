"""The shared-memory scenario: its model scores what the client expects, and one command runs both variants."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnxruntime as ort

from infergate.models.config import load_model_config
from load_tests.cli import main
from load_tests.shm import MODEL, SHAPE, build_repository, expected_scores


def test_the_image_model_answers_the_scores_the_client_checks(tmp_path: pathlib.Path) -> None:
    build_repository(tmp_path)
    session = ort.InferenceSession(str(tmp_path / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(3).random((2, *SHAPE[1:]), dtype=np.float32)
    (scores,) = session.run(None, {"x": batch})
    np.testing.assert_allclose(scores, expected_scores(batch), rtol=1e-4, atol=1e-4)
    assert load_model_config(tmp_path / MODEL / "config.yaml").max_batch_size == SHAPE[0]


def test_one_command_measures_the_wire_and_shared_memory_side_by_side(tmp_path: pathlib.Path) -> None:
    argv = ["shm", "--concurrency", "1", "--rounds", "1", "--warmup", "0", "--duration", "0.5"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "shm.json").read_text())
    (taken,) = run["rounds"]
    for variant in ("wire", "shared memory"):
        assert taken[variant]["requests"] > 0 and taken[variant]["errors"] == {}, taken[variant]
    assert len(run["ratios"]) == 1 and run["ratios"][0] > 0
    assert "round 1: shared memory" in (tmp_path / "shm.md").read_text()
