"""The CUDA gate: a graph capture runs with no other CUDA work in the process (device_gate.py).

onnxruntime captures in CUDA's global mode, so any other thread's CUDA call during a
capture aborts the process. These tests pin the gate's order with real threads; the
GPU check (scripts/gpu_check.sh) runs it on a GPU, serving several models with graphs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from conftest import wait_until

from infergate.models.device_gate import CudaGate


def _holder(enter: Callable[[], object], entered: list[str], name: str) -> tuple[threading.Thread, threading.Event]:
    """A thread that enters ``enter()``, records ``name`` and holds on until its event is set."""
    release = threading.Event()

    def hold() -> None:
        with enter():  # type: ignore[attr-defined]
            entered.append(name)
            release.wait()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread, release


def test_a_capture_waits_for_the_batches_running_and_batches_wait_for_a_waiting_capture() -> None:
    gate, entered = CudaGate(), []
    batch_a, end_a = _holder(gate.shared, entered, "batch a")
    wait_until(lambda: entered == ["batch a"], "the first batch runs")
    capture, end_capture = _holder(gate.exclusive, entered, "capture")
    wait_until(lambda: gate.exclusive_waiting == 1, "the capture waits")
    batch_b, end_b = _holder(gate.shared, entered, "batch b")
    wait_until(lambda: gate.shared_waiting == 1, "a batch arriving now waits behind the capture")
    assert entered == ["batch a"]

    end_a.set()
    wait_until(lambda: entered == ["batch a", "capture"], "the capture runs once the batch ended")
    assert gate.shared_waiting == 1, "the second batch still waits while the capture runs"

    end_capture.set()
    wait_until(lambda: entered == ["batch a", "capture", "batch b"], "then the waiting batch runs")
    end_b.set()
    for thread in (batch_a, capture, batch_b):
        thread.join()


def test_batches_run_together_and_loads_take_turns() -> None:
    gate, entered = CudaGate(), []
    first, end_first = _holder(gate.shared, entered, "batch 1")
    second, end_second = _holder(gate.shared, entered, "batch 2")
    wait_until(lambda: sorted(entered) == ["batch 1", "batch 2"], "two batches at once")

    load_a, end_load_a = _holder(gate.loading, entered, "load a")
    wait_until(lambda: "load a" in entered, "a load goes on beside the batches")
    load_b, end_load_b = _holder(gate.loading, entered, "load b")
    assert "load b" not in entered
    end_load_a.set()
    wait_until(lambda: "load b" in entered, "the second load once the first ended")
    for end in (end_load_b, end_first, end_second):
        end.set()
    for thread in (first, second, load_a, load_b):
        thread.join()
