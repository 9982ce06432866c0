"""The drift monitor end to end in one process: a real version (onnxruntime sessions, batcher, instance
threads) answers requests, its monitor gets them exactly as the inference handler hands them over
(``ModelVersion.monitor.record`` after the outputs are ready), and the accumulator thread scores them.

The same behaviours through a real server and real clients are in test_drift_server.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from conftest import eventually
from monitoring_support import reference_rows, spec, tensor, write_monitored_repository

from infergate.models.config import load_model_config
from infergate.models.runner import ModelLoadError
from infergate.models.version import ModelVersion, load_model_version
from infergate.monitoring.config import DriftConfig
from infergate.monitoring.monitor import DriftMonitor
from infergate.monitoring.profile import build_profile

WINDOW = 800
DRIFT = (
    f"drift: {{sample_fraction: 1.0, window: {WINDOW}, threshold: 0.2, update_every: 10, "
    "update_interval_seconds: 0.05}"
)
ROWS_PER_REQUEST = 8


def load(root: Path) -> ModelVersion:
    config = load_model_config(root / "classifier" / "config.yaml")
    return load_model_version(root / "classifier" / "1", "classifier", 1, config)


async def load_served(tmp_path: Path) -> ModelVersion:
    """Write the repository and its profile (``infergate profile`` runs its own loop: a thread) and start it."""
    root = await asyncio.to_thread(write_monitored_repository, tmp_path, DRIFT)
    model = await asyncio.to_thread(load, root)
    model.start()
    return model


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[ModelVersion]:
    model = await load_served(tmp_path)
    try:
        yield model
    finally:
        await model.aclose()


def drift_of(model: ModelVersion) -> DriftMonitor:
    assert model.monitor is not None and model.monitor.drift is not None
    return model.monitor.drift


async def answer(model: ModelVersion, rows: np.ndarray) -> None:
    """Serve ``rows`` as requests of 8 rows and hand each answered request to the monitor, as the handler does."""
    assert model.monitor is not None
    for start in range(0, len(rows), ROWS_PER_REQUEST):
        inputs = {"x": rows[start : start + ROWS_PER_REQUEST]}
        outputs = await model.infer(inputs, len(inputs["x"]), None, None)
        model.monitor.record(inputs, outputs, request_id=f"r{start}", route="default")


async def scored(drift: DriftMonitor, rows: int) -> dict[str, float]:
    """Wait until the scores cover the first ``rows`` rows; the scores by ``io tensor[feature]``."""
    await eventually(lambda: drift.snapshot().scored_rows == rows, f"scores over {rows} rows")
    return {f"{s.io} {s.tensor}[{s.feature}]": s.score for s in drift.snapshot().scores}


async def test_reference_traffic_keeps_every_score_under_the_threshold(served: ModelVersion) -> None:
    await answer(served, reference_rows(2 * WINDOW, seed=5))
    scores = await scored(drift_of(served), 2 * WINDOW)
    assert set(scores) == {"input x[0]", "input x[1]", "input x[2]", "input x[3]", "output probabilities[class]"}
    assert max(scores.values()) < 0.2, scores
    assert not drift_of(served).snapshot().alert


async def test_one_feature_shifted_by_two_sigma_goes_above_within_one_window_and_only_it(
    served: ModelVersion,
) -> None:
    await answer(served, reference_rows(WINDOW, seed=5))
    await answer(served, reference_rows(WINDOW, seed=6, shift={3: 2.0}))  # feature 3 moves no output
    scores = await scored(drift_of(served), 2 * WINDOW)
    above = sorted(name for name, score in scores.items() if score > 0.2)
    assert above == ["input x[3]"], scores
    assert drift_of(served).snapshot().alert


async def test_a_changed_class_mix_is_output_drift(served: ModelVersion) -> None:
    await answer(served, reference_rows(WINDOW, seed=5))
    await answer(served, reference_rows(WINDOW, seed=6, shift={0: 2.0}))  # feature 0 votes for class 0
    scores = await scored(drift_of(served), 2 * WINDOW)
    assert scores["output probabilities[class]"] > 0.2, scores


async def test_entering_and_leaving_alert_each_write_one_structured_line(
    served: ModelVersion, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="infergate.drift")
    await answer(served, reference_rows(WINDOW, seed=5, shift={2: 2.0}))
    await scored(drift_of(served), WINDOW)
    await answer(served, reference_rows(WINDOW, seed=6))
    await scored(drift_of(served), 2 * WINDOW)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "drift_alert"]
    assert [r.alert for r in lines] == [True, False]  # type: ignore[attr-defined]
    entered, left = lines
    assert entered.levelno == logging.WARNING and entered.model == "classifier"  # type: ignore[attr-defined]
    assert entered.model_version == "1" and "input x[2] psi=" in entered.features  # type: ignore[attr-defined]
    assert "entered drift alert: 1 feature(s) above 0.2" in entered.getMessage()
    assert "left drift alert" in left.getMessage()


async def test_closing_the_version_stops_the_monitor_thread(tmp_path: Path) -> None:
    model = await load_served(tmp_path)
    names = {t.name for t in threading.enumerate()}
    assert "drift classifier:1" in names
    await model.aclose()
    assert "drift classifier:1" not in {t.name for t in threading.enumerate()}
    drift = drift_of(model)
    drift.observe({"x": np.zeros((1, 4), np.float32)}, {})
    assert drift.dropped == 1  # after close, sampled requests are dropped, not queued forever


# --- the hand-off: sampling, the bound, never raising ----------------------------------------


def monitor(fraction: float, queue_size: int = 256, seed: int = 3) -> DriftMonitor:
    model = spec(tensor("x", "FP32", -1, 2))
    profile = build_profile(model, {"x": np.random.default_rng(0).standard_normal((100, 2))}, {}, source="s")
    config = DriftConfig(sample_fraction=fraction, window=10, queue_size=queue_size)
    return DriftMonitor("m", 1, profile, config, batches=True, rng=random.Random(seed))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 1.0])
def test_requests_are_sampled_with_the_injected_rng(fraction: float) -> None:
    drift = monitor(fraction, queue_size=10_000)
    for _ in range(1000):
        drift.observe({"x": np.zeros((1, 2))}, {})
    draws = random.Random(3)
    expected = {0.0: 0, 1.0: 1000}.get(fraction, sum(draws.random() < fraction for _ in range(1000)))
    assert (drift.requests, drift.sampled, drift.dropped) == (1000, expected, 0)


async def test_a_full_queue_drops_and_counts_and_the_rest_is_processed_once_running() -> None:
    drift = monitor(1.0, queue_size=5)
    for _ in range(20):  # the worker is not running yet: nothing leaves the queue
        drift.observe({"x": np.ones((2, 2))}, {})
    assert (drift.sampled, drift.dropped) == (20, 15)
    drift.start()
    try:
        await eventually(lambda: drift.snapshot().rows == 10, "the five queued requests in the window")
    finally:
        await drift.aclose()


async def test_a_request_that_does_not_fit_the_profile_is_counted_and_never_raised() -> None:
    drift = monitor(1.0)
    drift.start()
    try:
        drift.observe({"x": "not an array"}, {})  # type: ignore[dict-item]
        drift.observe({"y": np.ones((1, 2))}, {})
        await eventually(lambda: drift.rejected == 2, "both requests rejected on the worker")
        drift.observe({"x": np.ones((3, 2))}, {})
        await eventually(lambda: drift.snapshot().rows == 3, "a good request still counts")
    finally:
        await drift.aclose()


async def test_a_row_with_no_elements_never_stops_scoring_of_an_integer_categorical_feature() -> None:
    """A [1, 0] row (accepted by the server) has no row mean; it must not freeze scoring until it leaves."""
    model = spec(tensor("mask", "INT64", -1, -1), tensor("x", "FP32", -1, 2))
    rng = np.random.default_rng(0)
    sample = {"mask": np.ones((2000, 5), np.int64), "x": rng.standard_normal((2000, 2)).astype(np.float32)}
    profile = build_profile(model, sample, {}, source="s")
    config = DriftConfig(sample_fraction=1.0, window=1000, min_rows=100, update_every=1)
    drift = DriftMonitor("m", 1, profile, config, batches=True, rng=random.Random(0))

    def request(mask: np.ndarray, shift: float, rows: int = 50) -> None:
        drift.observe({"mask": mask, "x": (rng.standard_normal((rows, 2)) + shift).astype(np.float32)}, {})

    request(np.ones((1, 0), np.int64), 0.0, rows=1)
    for _ in range(15):  # x moved by three sigmas: an alert by any measure
        request(np.ones((50, 5), np.int64), 3.0)
    drift.start()
    await drift.aclose()  # the worker scores everything queued before it stops
    snapshot = drift.snapshot()
    assert (snapshot.scored_rows, snapshot.alert) == (751, True)
    mask = next(s for s in snapshot.scores if s.tensor == "mask")
    assert mask.score == pytest.approx(0.0)  # the empty row is left out, the others match the reference


# --- load -------------------------------------------------------------------------------------


def test_a_version_with_drift_monitoring_but_no_profile_is_refused_at_load(tmp_path: Path) -> None:
    root = write_monitored_repository(tmp_path, DRIFT, profile=False)
    with pytest.raises(ModelLoadError) as refused:
        load(root)
    message = str(refused.value)
    assert message.startswith(f"{root / 'classifier' / 'config.yaml'}: monitoring.drift: version 1 has no reference")
    assert str(root / "classifier" / "1" / "reference_profile.json") in message
    assert "infergate profile --model-repository" in message


def test_a_profile_of_another_model_is_refused_at_load(tmp_path: Path) -> None:
    root = write_monitored_repository(tmp_path, DRIFT)
    other = build_profile(spec(tensor("pixels", "FP32", -1, 2)), {"pixels": np.zeros((5, 2))}, {}, source="s")
    path = root / "classifier" / "1" / "reference_profile.json"
    path.write_text(other.model_dump_json())
    with pytest.raises(ModelLoadError, match=rf"monitoring.drift: {path}: inputs.pixels: model classifier has no"):
        load(root)


def test_a_version_without_a_monitoring_block_has_no_monitor(tmp_path: Path) -> None:
    assert load(write_monitored_repository(tmp_path, "", profile=False)).monitor is None
