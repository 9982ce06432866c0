"""One process's CUDA work, kept clear of CUDA graph captures.

onnxruntime captures a CUDA graph in CUDA's global capture mode
(``cudaStreamCaptureModeGlobal``). While one thread captures, a CUDA call of
any other thread that may synchronise (a stream synchronisation, an
allocation, a handle destroyed with its session) fails with "operation not
permitted when stream is capturing", the capture fails with it, and
onnxruntime aborts the process. Seen on an H200: a server loading three
models with graphs at once died at start-up (``scripts/gpu_check.sh``).

So every model on a CUDA device goes through one gate:

* loads (sessions created, warmed up, graphs captured) and closes take turns
  (:meth:`CudaGate.loading`): no session is made or destroyed while another
  model captures;
* batches run :meth:`~CudaGate.shared`: any number at once, as before;
* a capture is :meth:`~CudaGate.exclusive`: it waits for the batches running,
  and batches that arrive meanwhile wait for it. Captures happen only at load,
  a few milliseconds per captured size.

The gate is the process's own (:data:`CUDA_GATE`) because CUDA's capture mode
is: two objects could not keep two models apart. Models on the CPU never
touch it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["CUDA_GATE", "CudaGate"]


class CudaGate:
    """A shared/exclusive lock that lets a waiting exclusive holder in first, plus a lock for loads."""

    def __init__(self) -> None:
        self._state = threading.Condition()
        self._shared = 0  # holders of shared()
        self._exclusive = False  # whether exclusive() is held
        self.exclusive_waiting = 0  # callers of exclusive() not yet in
        self.shared_waiting = 0  # callers of shared() held back by an exclusive holder or waiter
        self._loads = threading.Lock()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._state:
            if self._exclusive or self.exclusive_waiting:
                self.shared_waiting += 1
                self._state.wait_for(lambda: not (self._exclusive or self.exclusive_waiting))
                self.shared_waiting -= 1
            self._shared += 1
        try:
            yield
        finally:
            with self._state:
                self._shared -= 1
                if not self._shared:
                    self._state.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._state:
            self.exclusive_waiting += 1
            self._state.wait_for(lambda: not (self._exclusive or self._shared))
            self.exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._state:
                self._exclusive = False
                self._state.notify_all()

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """One model's load or close at a time (batches of loaded models go on meanwhile)."""
        with self._loads:
            yield


# The process's gate; see the module docstring for why there is exactly one.
CUDA_GATE = CudaGate()
