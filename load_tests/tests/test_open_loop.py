"""Open loop, count-limited runs, model mixes, .npy payloads and the output files, against the ceiling server.

Short bounded runs; nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import json
import math
import pathlib
import sys
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from infergate.demo import build_matmul16
from load_tests.cli import main
from load_tests.compare import compare_table
from load_tests.generator import GeneratorError, LoadConfig, run_load
from load_tests.loops import Tally, Window, closed_loop, open_loop
from load_tests.mix import parse_mix
from load_tests.report import read_results
from load_tests.servers import free_port, running_server
from load_tests.suite import REPO_ROOT


@pytest.fixture(scope="module")
def ceiling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ceiling server with two models of the same signature, ``a`` and ``b``, and ``z``, whose input is
    named ``z`` (FP32 [batch, 16])."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path_factory.mktemp("mix-ceiling")
    for name in ("a", "b", "z"):
        (folder / "repo" / name / "1").mkdir(parents=True)
    for name in ("a", "b"):
        onnx.save_model(build_matmul16(), str(folder / "repo" / name / "1" / "model.onnx"))
    tensors = [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch", 16]) for t in ("z", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["z"], ["y"])], "z", tensors[:1], tensors[1:])
    onnx.save_model(helper.make_model(graph), str(folder / "repo" / "z" / "1" / "model.onnx"))
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "load_tests",
        "ceiling",
        "--port",
        str(port),
        "--model-repository",
        str(folder / "repo"),
    ]
    target = f"127.0.0.1:{port}"
    with running_server("ceiling", argv, target, folder / "ceiling.log", REPO_ROOT, 30.0):
        yield target


@pytest.mark.parametrize(
    ("text", "mix"),
    [("mlp", (("mlp", 1.0),)), ("mlp:3, cnn:1", (("mlp", 3.0), ("cnn", 1.0))), ("a:0.5", (("a", 0.5),))],
)
def test_a_model_mix_is_names_with_weights(text: str, mix: tuple[tuple[str, float], ...]) -> None:
    assert parse_mix(text) == mix


@pytest.mark.parametrize("text", ["mlp:0", "mlp:-1", ":2", "mlp,"])
def test_a_bad_mix_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_mix(text)


def test_an_open_loop_run_sends_at_a_rate_and_reports_it(ceiling: str) -> None:
    config = LoadConfig(target=ceiling, model="a", mode="open", rate=200, duration=0.5, warmup=0.1)
    result = run_load(config)
    assert result.mode == "open" and result.rate == 200 and result.concurrency == 0
    assert math.isfinite(result.send_lag_p99_ms)  # measured: each request's send time against its schedule
    assert result.requests > 0 and result.errors == {}
    assert result.p50_ms <= result.p90_ms <= result.p99_ms


@pytest.mark.parametrize(("mode", "processes"), [("closed", 1), ("closed", 2), ("open", 1), ("open", 2)])
def test_a_count_limited_run_measures_exactly_that_many_requests(ceiling: str, mode: str, processes: int) -> None:
    config = LoadConfig(
        target=ceiling, model="a", mode=mode, rate=2000, concurrency=4, requests=60, processes=processes, warmup=0.1
    )
    result = run_load(config)
    assert result.requests + result.error_count == 60
    assert result.duration_s > 0
    assert math.isfinite(result.send_lag_p99_ms) == (mode == "open")  # a closed loop has no schedule to lag


def test_a_weighted_mix_sends_every_model(ceiling: str) -> None:
    result = run_load(LoadConfig(target=ceiling, model="a:3,b:1", concurrency=2, duration=0.3, warmup=0.1))
    assert result.requests > 0 and result.errors == {}
    assert result.response == "y FP32 [1,16]; y FP32 [1,16]"  # both models answered the first request


def test_inputs_can_come_from_npy_files_whose_rows_are_the_batch(ceiling: str, tmp_path: pathlib.Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((3, 16), np.float32))
    config = LoadConfig(target=ceiling, model="a", inputs=(("x", str(tmp_path / "x.npy")),), duration=0.3, warmup=0)
    result = run_load(config)  # --batch left at 1: the file's three rows are what each request carries
    assert result.response == "y FP32 [3,16]"
    assert result.batch == 3 and result.samples_per_s == pytest.approx(3 * result.requests_per_s)


def test_a_mix_whose_models_send_different_batches_is_refused(ceiling: str, tmp_path: pathlib.Path) -> None:
    """samples/s is requests/s times the batch: with two batch sizes in one mix, it would be neither."""
    np.save(tmp_path / "x.npy", np.ones((3, 16), np.float32))
    config = LoadConfig(target=ceiling, model="a,z", inputs=(("x", str(tmp_path / "x.npy")),), duration=0.3, warmup=0)
    with pytest.raises(GeneratorError, match=r"batches of 1 and 3 rows"):
        run_load(config)


async def test_open_loop_latency_counts_from_the_intended_send_time() -> None:
    # The first send stalls the whole event loop for 50 ms. Requests due meanwhile are sent late; measured
    # from their intended time, their latency shows the stall (a closed loop would hide it).
    stalled: list[bool] = []

    async def send() -> None:
        if not stalled:
            stalled.append(True)
            time.sleep(0.05)  # noqa: ASYNC251 -- the stall under test

    now = time.perf_counter()
    open_tally = Tally([], Counter())
    await open_loop(send, Window(now, now + 0.2), rate=1000, tally=open_tally, seed=1, max_in_flight=100)
    assert max(open_tally.latencies) >= 0.04
    assert max(open_tally.lags) >= 0.04  # and the send lag says it was the generator that stalled

    stalled.clear()
    now = time.perf_counter()
    closed_tally = Tally([], Counter())
    await asyncio.wait_for(closed_loop(send, Window(now, now + 0.2), closed_tally), 5)
    assert sorted(closed_tally.latencies)[-2] < 0.04  # only the stalled request itself looks slow


async def test_arrivals_beyond_max_in_flight_are_counted_not_sent() -> None:
    release = asyncio.Event()

    async def send() -> None:
        await release.wait()

    tally = Tally([], Counter())
    window = Window(time.perf_counter(), limit=20)
    loop = asyncio.create_task(open_loop(send, window, rate=10_000, tally=tally, seed=0, max_in_flight=5))
    await window.reached.wait()
    release.set()
    await asyncio.wait_for(loop, 5)
    assert tally.errors["GENERATOR_FULL"] == 15 and len(tally.latencies) == 5


def test_the_cli_sweeps_and_writes_json_csv_and_png(ceiling: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "sweep"
    argv = ["closed", "--url", ceiling, "--model", "a", "--concurrency", "1,2", "--duration", "0.3", "--warmup", "0"]
    assert main([*argv, "--out", str(out), "--no-deadline"]) == 0
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert [r["concurrency"] for r in runs] == [1, 2]
    assert [r["deadline"] for r in runs] == [False, False]
    assert (out / "runs.csv").read_text().splitlines()[0].startswith("target,model,client,batch,concurrency")
    assert len((out / "runs.csv").read_text().splitlines()) == 3
    assert (out / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r.concurrency for r in read_results(out / "runs.json")] == [1, 2]


def test_the_cli_runs_an_open_sweep_with_a_token_and_an_npy_input(ceiling: str, tmp_path: pathlib.Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((2, 16), np.float32))
    argv = ["open", "--url", ceiling, "--model", "a", "--rate", "50,100", "--duration", "0.3", "--warmup", "0"]
    argv += ["--token", "t0k3n", "--input", f"x=@{tmp_path / 'x.npy'}", "--json", str(tmp_path / "open.json")]
    assert main(argv) == 0
    runs = read_results(tmp_path / "open.json")
    assert [r.rate for r in runs] == [50.0, 100.0] and runs[0].response == "y FP32 [2,16]"


def test_compare_lays_two_files_side_by_side(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from load_tests.report import summarize_load, write_json

    def run(rps: int, p50_s: float) -> object:
        return summarize_load(
            target="t", model="m", client="raw", batch=1, concurrency=8, processes=1, warmup_s=0, duration_s=1.0,
            latencies_s=[p50_s] * rps, errors={}, cpu_s=0, cpu_span_s=1, response="",
        )  # fmt: skip

    write_json(tmp_path / "before.json", {"runs": [run(100, 0.002)]})
    write_json(tmp_path / "after.json", {"runs": [run(150, 0.001)]})
    assert main(["compare", str(tmp_path / "before.json"), str(tmp_path / "after.json")]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split()[:4] == ["m", "closed", "c8", "1"]
    assert "1.50x" in line and "0.50x" in line
    a, b = read_results(tmp_path / "before.json"), read_results(tmp_path / "after.json")
    assert "1.50x" in compare_table(a, b)
