"""--workers N: how the supervisor stops workers that are still starting.

Each test runs a real supervisor (``infergate serve --workers 2``) in its own
process group, and holds a worker (SIGSTOP) at a chosen point of its start-up,
so what the supervisor does meanwhile is seen in /proc: a signal pending on the
held worker, a process left in the group. Whatever a failed test leaves behind
is killed with the group.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from conftest import wait_until
from models import save_model
from tritonclient.utils import InferenceServerException

from infergate.telemetry.logs import listening_address
from load_tests.models import build_slow_model
from load_tests.procfs import descendants

GUARD_S = 120.0  # a hang guard for a busy machine, not a duration under test
LISTENING = "infergate listening on "


@dataclass
class Supervisor:
    process: subprocess.Popen[str]
    log_path: Path
    printed: list[str] = field(default_factory=list)  # its stdout, line by line

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def workers(self) -> dict[int, int]:
        """Its workers that have started Python (their command line names their index): index -> pid."""
        out: dict[int, int] = {}
        for pid in descendants(self.pid):
            with contextlib.suppress(FileNotFoundError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                if "--worker-index" in argv:
                    out[int(argv[argv.index("--worker-index") + 1])] = pid
        return out

    def exit_code(self) -> int:
        return self.process.wait(timeout=GUARD_S)


@contextlib.contextmanager
def supervisor(repository: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Supervisor]:
    """``infergate serve --workers 2`` in a new process group; on exit, every process of the group is killed."""
    command = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(repository), "--port", "0",
               "--workers", "2", *args]  # fmt: skip
    with log_path.open("w") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **(env or {})},
            start_new_session=True,
        )  # fmt: skip
    running = Supervisor(process, log_path)
    # Read on a thread: a supervisor that never prints must fail the test, not hang it.
    reader = threading.Thread(target=lambda: running.printed.extend(process.stdout or ()), daemon=True)
    reader.start()
    try:
        yield running
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stopped processes too; the group outlives its leader
        process.wait()
        reader.join(GUARD_S)
        assert process.stdout is not None
        process.stdout.close()


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return ""


def _in_mask(pid: int, fields: str, sig: int) -> bool:
    """Whether ``sig`` is set in any of /proc/PID/status's masks named by the regex ``fields``."""
    masks = re.findall(rf"^(?:{fields}):\s*([0-9a-f]+)$", _status(pid), re.MULTILINE)
    return any(int(mask, 16) >> (sig - 1) & 1 for mask in masks)


def _pending(pid: int, sig: int) -> bool:
    """``sig`` was sent to the process and waits for it (it is stopped)."""
    return _in_mask(pid, "SigPnd|ShdPnd", sig)


def _handles_sigterm(pid: int) -> bool:
    """The worker installed its stop handlers (SIGTERM, then SIGINT): it now drains and exits 0 when told to stop."""
    return _in_mask(pid, "SigCgt", signal.SIGTERM)


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    out: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(stat.parent.name))
    return out


def _stop_process(pid: int) -> None:
    """SIGSTOP, and wait until it took hold: until then a signal sent to the process may still kill it."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: re.search(r"^State:\s+T", _status(pid), re.MULTILINE), f"{pid} stopped")


def _hold(running: Supervisor, index: int, previous: int | None = None) -> int:
    """SIGSTOP worker ``index`` (a pid other than ``previous``) as soon as it runs, long before it could listen."""
    wait_until(lambda: running.workers().get(index, previous) != previous, f"worker {index} started")
    pid = running.workers()[index]
    _stop_process(pid)
    return pid


def _assert_never_listened(running: Supervisor, *pids: int) -> None:
    for pid in pids:
        assert not re.search(rf"\[{pid}\] .*listening on", running.log()), f"{pid} was held too late to test anything"


def _stopped_and_gone(running: Supervisor, held: list[int], code: int) -> None:
    """The supervisor signalled every held worker (SIGTERM pending), then, let go, exits ``code`` leaving none."""
    for pid in held:
        wait_until(lambda pid=pid: _pending(pid, signal.SIGTERM), f"SIGTERM sent to the held worker {pid}")
    for pid in held:
        os.kill(pid, signal.SIGCONT)
    _exits_leaving_none(running, code)


def _exits_leaving_none(running: Supervisor, code: int) -> None:
    assert running.exit_code() == code, running.log()
    wait_until(lambda: not _group(running.pid), "no process left of the supervisor's group")


def test_a_worker_restarting_when_sigterm_comes_is_stopped_with_the_others(
    demo_repository: Path, log_dir: Path
) -> None:
    """Worker 0 crashed and its replacement is starting when the pod is told to stop: the replacement is
    signalled like any other (it was once left running, unsignalled, and the supervisor exited 1)."""
    with supervisor(demo_repository, log_dir / "restart-at-stop.log") as running:
        wait_until(lambda: any(line.startswith(LISTENING) for line in running.printed), "the supervisor listening")
        crashed = running.workers()[0]
        os.kill(crashed, signal.SIGKILL)
        replacement = _hold(running, 0, previous=crashed)
        running.process.send_signal(signal.SIGTERM)
        _assert_never_listened(running, replacement)
        _stopped_and_gone(running, [replacement], 0)


def test_a_worker_whose_restart_cannot_be_spawned_is_restarted_once_it_can(
    demo_repository: Path, log_dir: Path
) -> None:
    """Out of file descriptors, the supervisor cannot even create a replacement's pipe (OSError): it says so
    and tries again later (once, that ended the worker's keeper, and the pod served on one worker short)."""
    with supervisor(demo_repository, log_dir / "spawn-fails.log") as running:
        wait_until(lambda: any(line.startswith(LISTENING) for line in running.printed), "the supervisor listening")
        crashed = running.workers()[0]
        soft, hard = resource.prlimit(running.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(running.pid, resource.RLIMIT_NOFILE, (3, hard))  # no new descriptor: no pipe
        os.kill(crashed, signal.SIGKILL)
        wait_until(lambda: "worker 0 could not be restarted" in running.log(), "the failed spawn logged")
        resource.prlimit(running.pid, resource.RLIMIT_NOFILE, (soft, hard))
        wait_until(lambda: "worker 0 restarted" in running.log(), "worker 0 restarted", timeout=GUARD_S)
        assert running.workers()[0] != crashed
        running.process.send_signal(signal.SIGTERM)
        assert running.exit_code() == 0, running.log()


def test_a_worker_failing_to_start_stops_the_workers_still_starting(demo_repository: Path, log_dir: Path) -> None:
    with supervisor(demo_repository, log_dir / "failed-start.log") as running:
        loading = _hold(running, 1)
        failing = _hold(running, 0)
        os.kill(failing, signal.SIGKILL)
        _assert_never_listened(running, loading, failing)
        _stopped_and_gone(running, [loading], 1)
        assert "worker 0 failed to start" in running.log()


def test_a_sigterm_while_a_worker_is_still_starting_stops_it_at_once(demo_repository: Path, log_dir: Path) -> None:
    """The supervisor does not wait for a worker's handshake once told to stop (a handshake that never came
    once made it ignore SIGTERM for good)."""
    with supervisor(demo_repository, log_dir / "sigterm-at-start.log") as running:
        loading = _hold(running, 1)
        running.process.send_signal(signal.SIGTERM)
        _assert_never_listened(running, loading)
        _stopped_and_gone(running, [loading], 0)


def test_metrics_port_with_the_sdk_disabled_starts_and_stops_like_a_single_server(
    demo_repository: Path, log_dir: Path
) -> None:
    """OTEL_SDK_DISABLED=true turns metrics off whatever the flags say: a worker then prints no "metrics on"
    line, and the supervisor once waited for it forever. Like a single server, it serves no endpoint."""
    env = {"OTEL_SDK_DISABLED": "true"}
    with supervisor(demo_repository, log_dir / "sdk-disabled.log", "--metrics-port", "0", env=env) as running:
        wait_until(lambda: any(line.startswith(LISTENING) for line in running.printed), "the supervisor listening")
        running.process.send_signal(signal.SIGTERM)
        assert running.exit_code() == 0, running.log()
        assert not any("metrics on" in line for line in running.printed), running.printed
        wait_until(lambda: not _group(running.pid), "no process left of the supervisor's group")


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model whose start-up load (its warm-up) takes seconds: a window to stop a worker in."""
    root = tmp_path_factory.mktemp("slow-models")
    save_model(
        build_slow_model(20),
        root,
        "slow",
        config_yaml="max_batch_size: 4\nwarmup: {batch_sizes: [1], iterations: 100}\n",
    )
    return root


def _hold_while_loading(running: Supervisor) -> list[int]:
    """SIGSTOP both workers once they handle stop signals and before they listen (their model still loads)."""
    wait_until(lambda: len(running.workers()) == 2, "both workers started")
    pids = list(running.workers().values())
    for pid in pids:
        wait_until(lambda pid=pid: _handles_sigterm(pid), f"worker {pid} handles SIGTERM")
        _stop_process(pid)
    _assert_never_listened(running, *pids)
    return pids


def test_ctrl_c_while_the_workers_load_is_a_clean_stop(slow_repository: Path, log_dir: Path) -> None:
    """Ctrl-C reaches the whole process group: each worker drains and exits 0 before its handshake, and the
    supervisor, stopping too, exits 0 (it once reported "worker 0 failed to start (exit 0)" and exited 1)."""
    with supervisor(slow_repository, log_dir / "ctrl-c-at-start.log") as running:
        held = _hold_while_loading(running)
        os.killpg(running.pid, signal.SIGINT)
        for pid in held:
            os.kill(pid, signal.SIGCONT)
        assert running.exit_code() == 0, running.log()
        assert "failed to start" not in running.log()
        wait_until(lambda: not _group(running.pid), "no process left of the supervisor's group")


def test_a_worker_told_to_stop_while_it_loads_stops_the_server_cleanly(slow_repository: Path, log_dir: Path) -> None:
    """A worker that exits 0 before its handshake was told to stop (a control-group kill may reach it before
    the supervisor): the supervisor stops the others and exits 0, not "failed to start"."""
    with supervisor(slow_repository, log_dir / "worker-stopped-at-start.log") as running:
        stopped, other = _hold_while_loading(running)
        os.kill(stopped, signal.SIGTERM)
        os.kill(stopped, signal.SIGCONT)
        _stopped_and_gone(running, [other], 0)
        assert "failed to start" not in running.log()


def _load_on_a_thread(url: str, model: str) -> tuple[threading.Thread, dict[str, str]]:
    """RepositoryModelLoad of ``model`` from tritonclient, on a thread; its outcome: status (and message)."""
    outcome: dict[str, str] = {}

    def load() -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            client.load_model(model, client_timeout=GUARD_S)
            outcome["status"] = "OK"
        except InferenceServerException as exc:
            outcome.update(status=str(exc.status()), message=str(exc.message()))
        finally:
            client.close()

    caller = threading.Thread(target=load, daemon=True)
    caller.start()
    return caller, outcome


def _logged(running: Supervisor, pid: int, text: str) -> bool:
    return re.search(rf"\[{pid}\] .*{re.escape(text)}", running.log()) is not None


@pytest.mark.parametrize("loaded_in_worker_0", [False, True], ids=["loading-in-both", "loaded-in-worker-0"])
def test_a_load_cut_short_by_sigterm_is_answered_unavailable_not_applied(
    slow_repository: Path, log_dir: Path, loaded_in_worker_0: bool
) -> None:
    """A RepositoryModelLoad still loading when the pod is told to stop: each worker's stop cancels its load.
    The call once came back OK ("load slow: applied in 0 worker(s)"), though no worker had the model. Now it
    is UNAVAILABLE, like a single server's, and says which workers applied it: none, or worker 0 only."""
    name = "load-at-stop-partial.log" if loaded_in_worker_0 else "load-at-stop.log"
    with supervisor(slow_repository, log_dir / name, "--model-control-mode", "explicit") as running:
        wait_until(lambda: any(listening_address(line) for line in running.printed), "the supervisor listening")
        url = next(a for line in running.printed if (a := listening_address(line)))
        workers = running.workers()
        caller, outcome = _load_on_a_thread(url, "slow")
        for pid in workers.values():
            wait_until(lambda pid=pid: _logged(running, pid, "load slow: applying"), f"worker {pid} loading")
        if loaded_in_worker_0:
            held = [workers[1]]
            _stop_process(workers[1])
            # Its answer is with the hub (not only its version loaded): a stop now cannot cut the load short.
            wait_until(lambda: _logged(running, workers[0], "load slow: applied in this worker"), "worker 0 loaded")
        else:
            held = list(workers.values())
            for pid in held:
                _stop_process(pid)
        for pid in held:
            assert not _logged(running, pid, "loaded model slow"), f"{pid} was held too late to test anything"
        running.process.send_signal(signal.SIGTERM)
        _stopped_and_gone(running, held, 0)
        caller.join(GUARD_S)
        hub = [line for line in running.log().splitlines() if f"[{running.pid}] " in line and "load slow" in line]
        expected = "applied in worker(s) 0 only" if loaded_in_worker_0 else "not applied in any worker"
        assert len(hub) == 1 and "the server is stopping" in hub[0] and expected in hub[0], running.log()
        # The caller hears the hub's answer, or, when its worker exited first, "Socket closed": never OK.
        assert outcome.get("status") == "StatusCode.UNAVAILABLE", outcome
