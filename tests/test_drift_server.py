"""Drift monitoring and payload logging through a real server: ``python -m infergate serve`` on 127.0.0.1,
requests from tritonclient, scores read from Prometheus and from the DriftStatus admin RPC.

The handler offers every answered request to its version's monitor, which samples it off the request path;
the admin service answers DriftStatus from the served versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, eventually, launch_server
from monitoring_support import reference_rows, write_monitored_repository
from prometheus_client.parser import text_string_to_metric_families
from triton_models import stand_in, write_stand_in

from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc

WINDOW = 400
THRESHOLD = 0.2
DRIFT = f"drift: {{sample_fraction: 1.0, window: {WINDOW}, update_every: 5, update_interval_seconds: 0.2}}"
SALT = "s" * 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[tuple[ServerProcess, str, Path]]:
    """One server for the module, one monitored copy of the classifier per test (drift state is per version),
    plus ``logged`` with a payload log too, and ``echo`` (OUTPUT0 = INPUT0, BYTES) logging to ``echo.jsonl``
    beside the payload file; yields the server, its metrics URL and the payload file."""
    root = tmp_path_factory.mktemp("drift-server")
    repository = root / "models"
    for name in ("reference", "shifted", "mixed"):
        write_monitored_repository(repository, DRIFT, name=name)
    write_monitored_repository(repository, DRIFT, name="constant", sample=constant_reference())
    payloads = root / "payloads.jsonl"
    logged = f"{DRIFT}\npayload_log: {{path: {payloads}, sample_fraction: 1.0, hash: [x]}}"
    write_monitored_repository(repository, logged, name="logged")
    echo_log = f"payload_log: {{path: {root / 'echo.jsonl'}, sample_fraction: 1.0, hash: [INPUT0, OUTPUT0]}}"
    echo = dataclasses.replace(
        stand_in("simple_identity"), name="echo", config_yaml=f"max_batch_size: 8\nmonitoring:\n  {echo_log}\n"
    )
    write_stand_in(repository, echo)
    server = launch_server(repository, log_dir, "--metrics-port", "0", env={"INFERGATE_PAYLOAD_SALT": SALT})
    try:
        assert server.metrics_url is not None
        yield server, server.metrics_url, payloads
    finally:
        assert server.terminate() == 0, server.log()


def constant_reference() -> np.ndarray:
    """The reference sample with feature 2 (which moves no output) always 0."""
    rows = reference_rows(4000, seed=1)
    rows[:, 2] = 0.0
    return rows


def send(url: str, model: str, rows: np.ndarray, headers: dict[str, str] | None = None) -> None:
    client = grpcclient.InferenceServerClient(url)
    try:
        for start in range(0, len(rows), 8):
            x = grpcclient.InferInput("x", [len(rows[start : start + 8]), 4], "FP32")
            x.set_data_from_numpy(rows[start : start + 8])
            client.infer(model, [x], request_id=f"r{start}", headers=headers)
    finally:
        client.close()


async def status(url: str, model: str) -> apb.ModelDrift:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = apb_grpc.InferGateAdminStub(channel)  # type: ignore[no-untyped-call]
        reply = await stub.DriftStatus(apb.DriftStatusRequest(name=model), timeout=10)
    (drift,) = reply.models
    return drift


async def scored(url: str, model: str, rows: int) -> apb.ModelDrift:
    """DriftStatus once the scores cover ``rows`` rows. Fails at once when nothing was sampled (no wiring)."""
    first = await status(url, model)
    assert first.sampled > 0, "no request was handed to the drift monitor: the request path does not call it"

    async def covered() -> bool:
        return (await status(url, model)).scored_rows == rows

    await eventually(covered, f"scores over {rows} rows")
    return await status(url, model)


def above(model: apb.ModelDrift) -> list[str]:
    return sorted(f"{f.io} {f.tensor}[{f.feature}]" for f in model.features if f.alert)


def gauges(metrics_url: str, model: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The drift gauges' samples of ``model`` from a real Prometheus scrape."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {
        name: [(s.labels, s.value) for s in families[name].samples if s.labels["model"] == model]
        if name in families
        else []
        for name in ("infergate_drift_score", "infergate_drift_alert")
    }


async def test_reference_traffic_keeps_every_score_under_the_threshold(
    server: tuple[ServerProcess, str, Path],
) -> None:
    process, metrics_url, _ = server
    send(process.url, "reference", reference_rows(2 * WINDOW, seed=5))
    model = await scored(process.url, "reference", 2 * WINDOW)
    assert len(model.features) == 5 and above(model) == [] and not model.alert
    read = gauges(metrics_url, "reference")
    assert len(read["infergate_drift_score"]) == 5
    assert max(value for _, value in read["infergate_drift_score"]) < THRESHOLD
    assert [(labels["version"], value) for labels, value in read["infergate_drift_alert"]] == [("1", 0.0)]


async def test_a_feature_shifted_by_two_sigma_goes_above_within_one_window_and_only_it(
    server: tuple[ServerProcess, str, Path],
) -> None:
    process, metrics_url, _ = server
    send(process.url, "shifted", reference_rows(WINDOW, seed=5))
    send(process.url, "shifted", reference_rows(WINDOW, seed=6, shift={3: 2.0}))
    model = await scored(process.url, "shifted", 2 * WINDOW)
    assert above(model) == ["input x[3]"] and model.alert
    read = gauges(metrics_url, "shifted")
    shifted = [v for labels, v in read["infergate_drift_score"] if labels["input"] == "x" and labels["feature"] == "3"]
    assert shifted and shifted[0] > THRESHOLD
    assert [value for _, value in read["infergate_drift_alert"]] == [1.0]
    process.logged("model shifted version 1 entered drift alert")


async def test_a_feature_constant_in_the_reference_goes_above_once_it_moves_up(
    server: tuple[ServerProcess, str, Path],
) -> None:
    """The profile's top quantile bin is open-ended: values above the reference's one value must land in a
    bin past its maximum, not in the bin that holds the whole reference (where PSI would stay 0)."""
    process, _, _ = server
    rows = reference_rows(WINDOW, seed=6)
    rows[:, 2] = 0.5
    send(process.url, "constant", rows)
    model = await scored(process.url, "constant", WINDOW)
    assert above(model) == ["input x[2]"] and model.alert


async def test_a_changed_class_mix_is_detected_as_output_drift(server: tuple[ServerProcess, str, Path]) -> None:
    process, _, _ = server
    send(process.url, "mixed", reference_rows(WINDOW, seed=5))
    send(process.url, "mixed", reference_rows(WINDOW, seed=6, shift={0: 2.0}))
    model = await scored(process.url, "mixed", 2 * WINDOW)
    assert "output probabilities[class]" in above(model)


async def test_the_payload_log_records_requests_without_metadata(server: tuple[ServerProcess, str, Path]) -> None:
    process, _, payloads = server
    secret = "Bearer do-not-log-this-token"
    send(process.url, "logged", reference_rows(16, seed=1), headers={"authorization": secret, "x-user": "alice"})

    def written() -> int:
        return len(payloads.read_text().splitlines()) if payloads.exists() else 0

    assert (await status(process.url, "logged")).sampled > 0, "the request path does not call the model's monitor"
    await eventually(lambda: written() == 2, "two payload records")
    text = payloads.read_text()
    assert "do-not-log-this-token" not in text and "alice" not in text
    assert '"id":"r0"' in text and '"route":"default"' in text
    assert os.stat(payloads).st_mode & 0o077 == 0


async def test_an_output_named_in_hash_is_hashed_too_so_an_echoed_input_is_not_written(
    server: tuple[ServerProcess, str, Path],
) -> None:
    """A model may answer with its input (here every element): hashing the input alone would still write it."""
    process, _, payloads = server
    echoed = payloads.with_name("echo.jsonl")
    client = grpcclient.InferenceServerClient(process.url)
    try:
        text = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
        text.set_data_from_numpy(np.array([[b"alice@example.com", b"555-0100"]], dtype=object))
        answer = client.infer("echo", [text], request_id="e1")
    finally:
        client.close()
    assert answer.as_numpy("OUTPUT0").tolist() == [[b"alice@example.com", b"555-0100"]]
    await eventually(lambda: echoed.exists() and echoed.read_text().endswith("\n"), "the echo record written")
    assert "alice" not in echoed.read_text() and "555-0100" not in echoed.read_text()
    (record,) = [json.loads(line) for line in echoed.read_text().splitlines()]
    hashed = [[hmac.new(SALT.encode(), v, hashlib.sha256).hexdigest() for v in (b"alice@example.com", b"555-0100")]]
    assert record["inputs"] == {"INPUT0": hashed}
    assert record["outputs"] == {"OUTPUT0": hashed}
