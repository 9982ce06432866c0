"""What the machine says about itself: the GPU (nvidia-smi), processes, memory per process.

Everything here degrades to "not available" instead of failing: the check runs
on machines without a GPU (``--cpu``) and must still write its report.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "GpuSample",
    "GpuSampler",
    "children",
    "cpu_seconds",
    "gpu_facts",
    "gpu_memory_by_pid",
    "rss_mib",
    "sampling",
]

_SMI_TIMEOUT_S = 10.0


def _smi(*args: str) -> list[list[str]] | None:
    """Rows of ``nvidia-smi --format=csv,noheader,nounits ARGS``, or None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, *args, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=_SMI_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_facts() -> dict[str, str]:
    """Name, driver and memory of the first GPU; {"gpu": "none"} without nvidia-smi."""
    rows = _smi("--query-gpu=name,driver_version,memory.total")
    if not rows:
        return {"gpu": "none (no nvidia-smi)"}
    name, driver, memory = (rows[0] + ["", "", ""])[:3]
    return {"gpu": name, "driver": driver, "gpu_memory_mib": memory, "gpus": str(len(rows))}


def gpu_memory_by_pid() -> dict[int, float] | None:
    """MiB of GPU memory each compute process holds, or None without nvidia-smi."""
    rows = _smi("--query-compute-apps=pid,used_memory")
    if rows is None:
        return None
    memory: dict[int, float] = {}
    for row in rows:
        with contextlib.suppress(ValueError, IndexError):
            memory[int(row[0])] = float(row[1])
    return memory


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (Linux /proc), or None if it is gone."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time ``pid`` has used, in seconds (Linux /proc), or None if it is gone."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the parent pid is the second field after it.
        parent = stat.rsplit(")", 1)[-1].split()[1]
        if parent == str(pid):
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class GpuSample:
    """GPU utilisation and memory in use, averaged and peaked over a sampling window."""

    samples: int = 0
    util_mean_pct: float | None = None
    util_max_pct: float | None = None
    memory_used_max_mib: float | None = None


@dataclass
class GpuSampler:
    """``nvidia-smi`` read every ``interval_s`` on a thread; :meth:`result` summarises what it saw."""

    interval_s: float = 0.5
    _util: list[float] = field(default_factory=list)
    _memory: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = _smi("--query-gpu=utilization.gpu,memory.used")
            for row in rows or []:
                with contextlib.suppress(ValueError, IndexError):
                    self._util.append(float(row[0]))
                    self._memory.append(float(row[1]))
            self._stop.wait(self.interval_s)

    def stop(self) -> GpuSample:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_SMI_TIMEOUT_S)
        return self.result()

    def result(self) -> GpuSample:
        if not self._util:
            return GpuSample()
        return GpuSample(
            samples=len(self._util),
            util_mean_pct=sum(self._util) / len(self._util),
            util_max_pct=max(self._util),
            memory_used_max_mib=max(self._memory),
        )


@contextlib.contextmanager
def sampling(interval_s: float = 0.5) -> Iterator[GpuSampler]:
    """Sample the GPU while the block runs; read ``sampler.result()`` after it."""
    sampler = GpuSampler(interval_s)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


def cpu_count() -> int:
    return os.cpu_count() or 1
