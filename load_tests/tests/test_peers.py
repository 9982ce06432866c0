"""The suite's peer plumbing, with no peer installed: names, generated configs, starts, checks, tables.

The peers themselves (Triton, KServe, MLServer) are too heavy to install for the
test suite; ``python -m load_tests suite --peers`` runs them for real. Here the
peer command lines and files are checked as written, and the start/retry/stop
path runs real subprocesses (the ceiling server standing in for a peer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
import onnxruntime as ort
import pytest

from infergate.demo import write_demo_repository
from load_tests.answers import WrongAnswer, check_answers
from load_tests.cli import build_parser
from load_tests.peers.launch import (
    LOOPBACK,
    PEERS,
    Launch,
    Peer,
    Ports,
    mlserver_model_settings,
    parse_peer_names,
    peer_models,
    python_libdir,
)
from load_tests.peers.onnx_runner import OnnxRunner
from load_tests.peers.serve import PeerNotInstalled, running_peer
from load_tests.peers.spec import PeerModel, Tensor, read_models, write_models
from load_tests.procfs import Listener, parse_proc_net_tcp
from load_tests.report import HeadlineColumn, LoadResult, headline_rows, summarize_load
from load_tests.servers import ServerFailed, free_port, running_server, stop_process
from load_tests.suite import REPO_ROOT, evaluate_peer_targets

MODELS = ["matmul16", "mlp"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("peer-repo")
    write_demo_repository(root)
    return root


@pytest.fixture
def fake_venvs(tmp_path: pathlib.Path) -> pathlib.Path:
    """A .tools/peers stand-in whose environments are this interpreter (enough to plan a start)."""
    for name in PEERS:
        (tmp_path / name / "bin").mkdir(parents=True)
        (tmp_path / name / "bin" / "python").symlink_to(sys.executable)
        (tmp_path / name / ".installed").touch()
    return tmp_path


# ------------------------------------------------------------------ names and arguments


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("all", ("triton", "kserve", "mlserver")),
        ("mlserver,triton", ("triton", "mlserver")),
        (" kserve ", ("kserve",)),
    ],
)
def test_peer_names_are_all_or_a_list_in_a_fixed_order(text: str, names: tuple[str, ...]) -> None:
    assert parse_peer_names(text) == names


@pytest.mark.parametrize("text", ["", "tfserving", "triton,nope"])
def test_an_unknown_peer_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unknown peer"):
        parse_peer_names(text)


@pytest.mark.parametrize(
    ("argv", "peers"),
    [
        ([], None),
        (["--peers"], ("triton", "kserve", "mlserver")),
        (["--peers", "kserve,mlserver"], ("kserve", "mlserver")),
    ],
)
def test_suite_takes_peers_as_a_bare_flag_or_a_list(argv: list[str], peers: tuple[str, ...] | None) -> None:
    args = build_parser().parse_args(["suite", *argv])
    assert args.peers == peers
    assert args.peer_intra_op_threads == 1 and args.peer_queue_delay_us is None and args.peer_instances == 1


def test_suite_takes_a_number_of_peer_instances_from_one_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["suite", "--peers", "--peer-instances", "2"]).peer_instances == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["suite", "--peers", "--peer-instances", "0"])
    assert "--peer-instances" in capsys.readouterr().err


def test_suite_refuses_an_unknown_peer_or_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--peers", "onnxserve"], ["--scenarios", "mlp_b2_c2"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["suite", *argv])
    assert "unknown peer" in capsys.readouterr().err


# ------------------------------------------------------------------ the models every peer serves


def test_peers_serve_each_model_with_its_own_batch_size_and_delay(repository: pathlib.Path) -> None:
    models = {m.name: m for m in peer_models(repository, MODELS)}
    assert models["matmul16"].inputs == (Tensor("x", "FP32", (-1, 16)),)
    assert models["mlp"].outputs == (Tensor("y", "FP32", (-1, 512)),)
    assert all(
        m.max_batch_size == 64 and m.max_queue_delay_us == 0 and m.intra_op_threads == 1 for m in models.values()
    )
    assert models["mlp"].file == str((repository / "mlp" / "1" / "model.onnx").resolve())


def test_a_delay_given_for_peers_overrides_the_models_own(repository: pathlib.Path) -> None:
    models = peer_models(repository, MODELS, intra_op_threads=2, queue_delay_us=2000)
    assert [(m.max_queue_delay_us, m.intra_op_threads, m.instances) for m in models] == [(2000, 2, 1), (2000, 2, 1)]


def test_peers_serve_each_model_with_the_instances_asked_for(repository: pathlib.Path, tmp_path: pathlib.Path) -> None:
    models = peer_models(repository, MODELS, instances=2)
    assert [m.instances for m in models] == [2, 2]
    write_models(tmp_path / "models.json", models)
    assert [m.instances for m in read_models(tmp_path / "models.json")] == [2, 2]


def test_the_models_file_reads_back_as_written(repository: pathlib.Path, tmp_path: pathlib.Path) -> None:
    models = peer_models(repository, MODELS)
    write_models(tmp_path / "models.json", models)
    assert read_models(tmp_path / "models.json") == models


@pytest.mark.parametrize(
    "change",
    [{"max_batch_size": 0}, {"inputs": (Tensor("x", "FP32", (16,)),)}, {"max_queue_delay_us": -1}, {"instances": 0}],
)
def test_a_model_peers_cannot_batch_is_refused(repository: pathlib.Path, change: dict[str, object]) -> None:
    model = peer_models(repository, ["matmul16"])[0]
    with pytest.raises(ValueError, match="matmul16"):
        dataclasses.replace(model, **change)  # type: ignore[arg-type]


def test_every_peer_runs_the_same_onnxruntime_session(repository: pathlib.Path) -> None:
    model = peer_models(repository, ["mlp"])[0]
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    reference = ort.InferenceSession(model.file, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(OnnxRunner(model).run({"x": x})["y"], reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ what each peer is started with


def _plan(name: str, root: pathlib.Path, workdir: pathlib.Path, models: Sequence[PeerModel]) -> Launch:
    return dataclasses.replace(PEERS[name], root=root).prepare(workdir, models, Ports(8101, 8102, 8103))


def test_triton_gets_its_libpython_first_and_a_private_home(
    repository: pathlib.Path, fake_venvs: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    launch = _plan("triton", fake_venvs, tmp_path / "work", peer_models(repository, MODELS))
    assert launch.env["LD_LIBRARY_PATH"].split(":")[0] == python_libdir(pathlib.Path(sys.executable))
    assert pathlib.Path(launch.env["PYTRITON_HOME"]).is_dir()
    assert launch.argv[1:3] == ("-m", "load_tests.peers.triton_peer")
    assert launch.argv[-4:] == ("--grpc-port", "8101", "--http-port", "8102")
    assert [m.name for m in read_models(pathlib.Path(launch.argv[4]))] == MODELS
    assert launch.target == "127.0.0.1:8101" and launch.cwd == REPO_ROOT


def test_kserve_is_started_with_its_two_ports(
    repository: pathlib.Path, fake_venvs: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    launch = _plan("kserve", fake_venvs, tmp_path / "work", peer_models(repository, MODELS))
    assert launch.argv[1:3] == ("-m", "load_tests.peers.kserve_peer")
    assert launch.argv[-4:] == ("--grpc-port", "8101", "--http-port", "8102")
    assert launch.env == {}


def test_mlserver_gets_a_loopback_settings_file_and_one_folder_per_model(
    repository: pathlib.Path, fake_venvs: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    launch = _plan("mlserver", fake_venvs, tmp_path / "work", peer_models(repository, MODELS, queue_delay_us=2000))
    root = pathlib.Path(launch.argv[-1])
    assert launch.argv[-2] == "start" and launch.cwd == root
    settings = json.loads((root / "settings.json").read_text())
    assert settings["host"] == LOOPBACK and not settings["debug"] and settings["metrics_endpoint"] is None
    assert (settings["grpc_port"], settings["http_port"], settings["metrics_port"]) == (8101, 8102, 8103)
    mlp = json.loads((root / "mlp" / "model-settings.json").read_text())
    assert (mlp["max_batch_size"], mlp["max_batch_time"]) == (64, 0.002)
    assert mlp["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 512]}]
    assert launch.env["PYTHONPATH"].split(":")[0] == str(REPO_ROOT)
    assert settings["parallel_workers"] == 1  # MLServer's default: one worker process


def test_mlserver_runs_one_worker_process_per_model_instance(
    repository: pathlib.Path, fake_venvs: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    launch = _plan("mlserver", fake_venvs, tmp_path / "work", peer_models(repository, MODELS, instances=2))
    settings = json.loads((pathlib.Path(launch.argv[-1]) / "settings.json").read_text())
    assert settings["parallel_workers"] == 2


def test_triton_reads_each_models_instances_from_its_models_file(
    repository: pathlib.Path, fake_venvs: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    launch = _plan("triton", fake_venvs, tmp_path / "work", peer_models(repository, MODELS, instances=2))
    assert [m.instances for m in read_models(pathlib.Path(launch.argv[4]))] == [2, 2]


def test_mlservers_runtime_is_importable_by_the_name_it_is_given(repository: pathlib.Path) -> None:
    implementation = mlserver_model_settings(peer_models(repository, ["mlp"])[0])["implementation"]
    module, _, cls = implementation.rpartition(".")
    source = (REPO_ROOT / module.replace(".", "/")).with_suffix(".py").read_text()
    assert f"class {cls}(" in source


# ------------------------------------------------------------------ starting, retrying, stopping


def _ceiling_peer(root: pathlib.Path, attempts: int, fail_first: bool) -> Peer:
    """A Peer whose 'server' is the ceiling; the first start exits at once when ``fail_first``."""

    def prepare(peer: Peer, workdir: pathlib.Path, models: Sequence[PeerModel], ports: Ports) -> Launch:
        if fail_first and workdir.name == "start1":
            return Launch((sys.executable, "-c", "raise SystemExit(3)"), REPO_ROOT, f"127.0.0.1:{ports.grpc}")
        argv = (
            sys.executable, "-m", "load_tests", "ceiling", "--port", str(ports.grpc),
            "--model", "matmul16", "--input", "x:FP32:-1,16", "--output", "y:FP32:-1,16",
        )  # fmt: skip
        return Launch(argv, REPO_ROOT, f"127.0.0.1:{ports.grpc}")

    (root / "fake" / ".installed").parent.mkdir(parents=True)
    (root / "fake" / ".installed").touch()
    return Peer("fake", "Fake 1.0", "fake", batches=True, start_attempts=attempts, configuration="",
                _prepare=prepare, root=root)  # fmt: skip


def test_a_peer_that_fails_its_first_start_is_started_once_more(
    repository: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    said: list[str] = []
    peer = _ceiling_peer(tmp_path, attempts=2, fail_first=True)
    models = peer_models(repository, ["matmul16"])
    with running_peer(peer, models, tmp_path / "work", tmp_path / "fake.log", 30.0, said.append) as run:
        assert run.attempts == 2 and run.listening == [f"[::ffff:127.0.0.1]:{run.target.rsplit(':')[1]}"]
    assert len(said) == 1 and "did not start (attempt 1 of 2" in said[0] and "retrying" in said[0]
    assert "exited with code 3" in said[0]


def test_a_peer_without_retries_fails_on_its_first_bad_start(repository: pathlib.Path, tmp_path: pathlib.Path) -> None:
    peer = _ceiling_peer(tmp_path, attempts=1, fail_first=True)
    with (
        pytest.raises(ServerFailed, match="exited with code 3"),
        running_peer(peer, peer_models(repository, ["matmul16"]), tmp_path / "w", tmp_path / "f.log", 30.0, print),
    ):
        pass


def test_a_peer_not_installed_says_how_to_install_it(repository: pathlib.Path, tmp_path: pathlib.Path) -> None:
    peer = dataclasses.replace(PEERS["triton"], root=tmp_path)
    with (
        pytest.raises(PeerNotInstalled, match=r"scripts/install_peers\.sh triton"),
        running_peer(peer, peer_models(repository, ["mlp"]), tmp_path / "w", tmp_path / "t.log", 30.0, print),
    ):
        pass


_ESCAPER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_stopping_a_server_also_ends_a_child_that_left_its_process_group() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _ESCAPER], stdout=subprocess.PIPE, start_new_session=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert os.getpgid(child) != parent.pid
        stop_process(parent, grace=5.0)
        deadline = time.monotonic() + 30.0  # a hang guard, not a measurement
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child)
    finally:
        parent.stdout.close()
        if not _gone(child):
            os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------ sockets and answers


@pytest.mark.parametrize(
    ("line", "listener"),
    [
        ("0: 0100007F:1F90 00000000:0000 0A 0:0 00:0 0 0 0 101 1", Listener("127.0.0.1", 8080)),
        ("1: 00000000:0050 00000000:0000 0A 0:0 00:0 0 0 0 102 1", Listener("0.0.0.0", 80)),
        ("2: 00000000000000000000000001000000:1F91 0:0 0A 0:0 00:0 0 0 0 103 1", Listener("::1", 8081)),
        ("3: 0000000000000000FFFF00000100007F:1F92 0:0 0A 0:0 00:0 0 0 0 104 1", Listener("::ffff:127.0.0.1", 8082)),
        ("4: 00000000000000000000000000000000:1F93 0:0 0A 0:0 00:0 0 0 0 105 1", Listener("::", 8083)),
    ],
)
def test_listening_sockets_are_read_from_proc_net_tcp(line: str, listener: Listener) -> None:
    parsed = parse_proc_net_tcp("header\n" + line)
    assert list(parsed.values()) == [listener]
    assert listener.loopback == (listener.address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"))


def test_connected_sockets_are_not_listeners() -> None:
    line = "0: 0100007F:1F90 0100007F:A000 01 0:0 00:0 0 0 0 101 1"  # state 01: established
    assert parse_proc_net_tcp("header\n" + line) == {}


@pytest.fixture(scope="module")
def ceiling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("answers-ceiling")
    port = free_port()
    argv = [sys.executable, "-m", "load_tests", "ceiling", "--port", str(port),
            "--model", "matmul16", "--input", "x:FP32:-1,16", "--output", "y:FP32:-1,16"]  # fmt: skip
    with running_server("ceiling", argv, f"127.0.0.1:{port}", folder / "ceiling.log", REPO_ROOT, 30.0):
        yield f"127.0.0.1:{port}"


def test_a_server_answering_zeros_is_caught(ceiling: str, repository: pathlib.Path) -> None:
    with pytest.raises(WrongAnswer, match="matmul16: output 'y' differs from onnxruntime"):
        check_answers(ceiling, repository, ["matmul16"])


def test_infergate_answers_as_onnxruntime_does(repository: pathlib.Path, tmp_path: pathlib.Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with running_server("infergate", argv, f"127.0.0.1:{port}", tmp_path / "i.log", REPO_ROOT, 60.0, models=MODELS):
        check_answers(f"127.0.0.1:{port}", repository, MODELS)


# ------------------------------------------------------------------ the side-by-side table and the peer targets


def _run(rps: float, p50_ms: float, batch: int = 1) -> LoadResult:
    return summarize_load(
        target="t", model="m", client="raw", batch=batch, concurrency=1, processes=1, warmup_s=0,
        duration_s=1.0, latencies_s=[p50_ms / 1000] * int(rps), errors={}, cpu_s=0.0, cpu_span_s=1.0, response="",
    )  # fmt: skip


def test_the_headline_table_has_one_row_per_server_and_a_dash_for_a_missing_run() -> None:
    columns = [HeadlineColumn("c1", "c1: p50 ms", "p50_ms"), HeadlineColumn("c64", "c64: req/s", "requests_per_s")]
    headers, cells = headline_rows(
        [("infergate", {"c1": _run(10, 0.8), "c64": _run(3000, 20.0)}), ("KServe 0.21", {"c1": _run(5, 3.4)})],
        columns,
    )
    assert headers == ["server", "c1: p50 ms", "c64: req/s"]
    assert cells == [["infergate", "0.800", "3,000"], ["KServe 0.21", "3.400", "-"]]


def test_peer_targets_compare_infergate_with_the_best_peer() -> None:
    infergate = {"matmul16_b1_c64": _run(3000, 20), "mlp_b1_c64": _run(1800, 30), "matmul16_b1_c1": _run(10, 0.8)}
    peers = {
        "triton": {"matmul16_b1_c64": _run(2500, 25), "mlp_b1_c64": _run(1200, 50), "matmul16_b1_c1": _run(10, 1.0)},
        "kserve": {"matmul16_b1_c64": _run(2000, 30), "mlp_b1_c64": _run(400, 90), "matmul16_b1_c1": _run(10, 0.5)},
    }
    checks = {c.key: c for c in evaluate_peer_targets(infergate, peers)}
    assert checks["e"].value == pytest.approx(1.2) and "triton" in checks["e"].description and not checks["e"].met
    assert checks["f"].value == pytest.approx(1.5) and checks["f"].met
    # KServe does not batch, so the p50 to beat is Triton's, not KServe's lower one.
    assert checks["g"].value == pytest.approx(-0.2) and "triton" in checks["g"].description and checks["g"].met


def test_no_peer_means_no_peer_targets_and_a_failed_peer_means_unmet() -> None:
    assert evaluate_peer_targets({}, {}) == []
    checks = evaluate_peer_targets({"mlp_b1_c64": _run(1800, 30)}, {"mlserver": {}})
    assert all(math.isnan(c.value) and not c.met for c in checks)
    # A peer that failed cannot be left out of "the best peer": the comparison is incomplete.
    partial = {"triton": {"mlp_b1_c64": _run(100, 30)}, "mlserver": {}}
    check = {c.key: c for c in evaluate_peer_targets({"mlp_b1_c64": _run(1800, 30)}, partial)}["f"]
    assert math.isnan(check.value) and "missing: mlserver" in check.description
