"""Triton's own load tool, perf_analyzer (C++), drives infergate unmodified.

perf_analyzer needs ModelMetadata, ModelConfig and ModelStatistics to agree
with what Triton would answer, so this is a wire-compatibility test as much as
a load test. ``make test`` installs it (scripts/install_perf_analyzer.sh).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import ServerProcess, running_server
from triton_models import stand_in, write_stand_in

from infergate.demo import write_demo_repository

PERF_ANALYZER = Path(__file__).resolve().parent.parent / "scripts" / "perf_analyzer"


def _perf_analyzer(server: ServerProcess, *args: str) -> str:
    command = [
        str(PERF_ANALYZER),
        "-u",
        server.url,
        "-i",
        "grpc",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "100",
        "--max-trials",
        "5",
        # This checks compatibility, not speed: any window is "stable" on a shared, noisy machine.
        "--stability-percentage",
        "1000",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode == 127:
        pytest.fail("perf_analyzer is not installed: run scripts/install_perf_analyzer.sh (make test does)")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param([], id="sync"),
        pytest.param(["--async"], id="async"),
        pytest.param(["--streaming"], id="streaming"),
    ],
)
def test_perf_analyzer_measures_infergate(demo_server: ServerProcess, mode: list[str]) -> None:
    output = _perf_analyzer(demo_server, "-m", "matmul16", "--concurrency-range", "4", *mode)
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", output)
    assert throughput and float(throughput.group(1)) > 0, output
    # Server-side figures come from our ModelStatistics.
    served = re.search(r"Inference count: (\d+)", output)
    assert served and int(served.group(1)) > 0, output


def test_perf_analyzer_sends_batches_the_model_config_allows(demo_server: ServerProcess) -> None:
    output = _perf_analyzer(demo_server, "-m", "mlp", "-b", "8", "--concurrency-range", "2")
    assert "Batch size: 8" in output
    assert re.search(r"Throughput: [\d.]+ infer/sec", output), output


def test_perf_analyzer_passes_tensors_through_system_shared_memory(demo_repository: Path, log_dir: Path) -> None:
    # perf_analyzer creates, registers and unregisters its own regions, inputs and outputs alike.
    with running_server(demo_repository, log_dir, "--allow-client-shm") as server:
        output = _perf_analyzer(server, "-m", "matmul16", "--shared-memory", "system", "--concurrency-range", "2")
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", output)
    assert throughput and float(throughput.group(1)) > 0, output
    served = re.search(r"Inference count: (\d+)", output)
    assert served and int(served.group(1)) > 0, output


def test_perf_analyzer_reports_infergates_response_cache(tmp_path: Path, log_dir: Path) -> None:
    """Zero inputs, sent again and again, to a model with the response cache on: perf_analyzer reads
    the hits and misses from ModelStatistics as it reads Triton's.

    perf_analyzer counts a window's server side only for a version whose queue count grew in it, so
    a window of hits alone reads as nothing unless hits count as queued, as Triton counts them."""
    write_demo_repository(tmp_path)
    config = tmp_path / "matmul16" / "config.yaml"
    config.write_text(config.read_text() + "\nresponse_cache: {enable: true}\n")
    with running_server(tmp_path, log_dir) as server:
        output = _perf_analyzer(server, "-m", "matmul16", "--input-data", "zero", "--concurrency-range", "1")
    hits = re.search(r"Cache hit count: (\d+)", output)
    assert hits and int(hits.group(1)) > 0, output
    # Every window counts on the server's side, not only the one that held the first (missed) request.
    client = re.search(r"Client: \s+Request count: (\d+)", output)
    served = re.search(r"Successful request count: (\d+)", output)
    assert client and served and int(served.group(1)) >= int(client.group(1)) // 2, output
    assert "Average Cache Hit Latency" in output, output


@pytest.mark.parametrize("mode", [[], ["--async"], ["--streaming"]], ids=["sync", "async", "streaming"])
def test_perf_analyzer_drives_a_stateful_model_in_sequences(tmp_path: Path, log_dir: Path, mode: list[str]) -> None:
    """perf_analyzer reads ``sequence_batching`` from the model config and sends sequences (an id, a
    start and an end each), as it does to Triton; the server answers them all and counts them."""
    write_stand_in(tmp_path, stand_in("simple_sequence_implicit"))
    with running_server(tmp_path, log_dir) as server:
        output = _perf_analyzer(server, "-m", "simple_sequence_implicit", "--concurrency-range", "2", *mode)
    sequences = re.search(r"Sequence count: (\d+)", output)
    assert sequences and int(sequences.group(1)) > 0, output
    served = re.search(r"Successful request count: (\d+)", output)
    assert served and int(served.group(1)) > 0, output
