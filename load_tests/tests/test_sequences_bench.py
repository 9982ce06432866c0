"""The stateful load scenario: its model keeps a running sum, and one command runs it with every answer right."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnxruntime as ort

from infergate.models.config import load_model_config
from load_tests.cli import main
from load_tests.sequences import MODEL, SLOTS, WIDTH, build_repository


def test_the_accumulator_sums_its_inputs_and_starts_over_on_start(tmp_path: pathlib.Path) -> None:
    build_repository(tmp_path)
    session = ort.InferenceSession(str(tmp_path / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    state = np.full((1, WIDTH), 100, dtype=np.float32)  # what a previous sequence left: ignored on START
    total = np.zeros((1, WIDTH), dtype=np.float32)
    for step in range(3):
        x = np.full((1, WIDTH), step + 1, dtype=np.float32)
        feeds = {
            "INPUT": x,
            "INPUT_STATE": state,
            "START": np.array([[step == 0]], np.int32),
            "READY": np.ones((1, 1), np.int32),
        }
        output, state = session.run(["OUTPUT", "OUTPUT_STATE"], feeds)
        total += x
        np.testing.assert_array_equal(output, total)
    config = load_model_config(tmp_path / MODEL / "config.yaml")
    assert config.sequence_batching is not None and config.max_batch_size == SLOTS


def test_one_command_runs_sequences_against_a_real_server_and_every_answer_is_right(tmp_path: pathlib.Path) -> None:
    argv = ["sequences", "--concurrency", "4", "--length", "5", "--warmup", "0", "--duration", "0.5"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "sequences.json").read_text())
    assert run["result"]["requests"] > 0 and run["result"]["errors"] == {}
    assert run["length"] == 5
