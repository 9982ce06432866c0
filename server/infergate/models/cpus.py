"""How many CPUs the models of this process may share, for onnxruntime's thread counts.

Two things make that fewer than the CPUs the process may run on (its affinity):

* **A CPU quota.** A container limited to 2 CPUs on a 64-core node (Kubernetes'
  ``resources.limits.cpu``) still sees 64 CPUs in its affinity; onnxruntime's own
  choice would then start 64 threads per session, and the quota would throttle
  them all. The quota is read from the cgroup (v2 ``cpu.max``, v1
  ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``) of this process and of every
  cgroup above it, rounded up to whole CPUs.
* **Several workers.** ``--workers N`` runs N processes on the same CPUs; each
  process's models get an Nth of them.

Read once per model load; nothing here is cached.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["affinity_cpus", "cgroup_cpu_limit", "cpu_share", "model_cpus", "usable_cpus"]

_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(root: Path, relative: str) -> list[Path]:
    """``root/relative`` and each cgroup directory above it, up to ``root``."""
    parts = [p for p in relative.strip("/").split("/") if p and p not in (".", "..")]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")  # "<quota> <period>" or "max <period>"
    if text is None:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None  # a quota of -1: no limit


def cgroup_cpu_limit(proc_cgroup: Path = _PROC_CGROUP, root: Path = _CGROUP_ROOT) -> float | None:
    """The tightest CPU quota on this process's cgroups, in CPUs (1.5 for 150 ms a 100 ms period); None: none."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2 (or the unified part of a hybrid layout)
            found = (_v2_limit(d) for d in _ancestors(root, relative))
        elif "cpu" in controllers.split(","):  # cgroup v1's cpu controller, mounted as cpu or cpu,cpuacct
            mounts = [root / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / name).is_dir()]
            found = (_v1_limit(d) for mount in mounts[:1] for d in _ancestors(mount, relative))
        else:
            continue
        limits.extend(limit for limit in found if limit is not None)
    return min(limits, default=None)


def usable_cpus() -> int:
    """The CPUs this process may keep busy: its affinity, cut to its CPU quota (rounded up)."""
    return _cut_to_quota(affinity_cpus(), cgroup_cpu_limit())


def _cut_to_quota(affinity: int, limit: float | None) -> int:
    return affinity if limit is None else max(1, min(affinity, math.ceil(limit)))


def model_cpus(workers: int = 1) -> int | None:
    """CPUs one process's models may share: None when that is every CPU the process may run on (then
    one session may take onnxruntime's own thread count), else how many (a quota, or one of
    ``workers`` processes on the same CPUs), at least 1."""
    return cpu_share(affinity_cpus(), cgroup_cpu_limit(), workers)


def cpu_share(affinity: int, limit: float | None, workers: int) -> int | None:
    """:func:`model_cpus` for a process with ``affinity`` CPUs, a quota of ``limit`` CPUs (None: none)
    and ``workers`` processes sharing them."""
    share = max(1, _cut_to_quota(affinity, limit) // max(1, workers))
    return None if share == affinity else share
