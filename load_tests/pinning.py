"""Keeping a server and its load apart on one machine: the server on some cores, the generator on the rest.

On a machine that the generator shares with the server it measures, the two
take CPU from each other, and the scheduler moves both across the cores as
other work comes and goes. Pinning the server to ``server_cpus`` (it is started
under ``taskset``, :func:`on_cpus`) and this process, with the load processes it
starts, to the other cores (:func:`generator_pinned`) keeps the server's cores
its own: what it serves is then what those cores can serve, whatever the
client costs, as when clients run on other machines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["cpu_list", "generator_pinned", "on_cpus"]


def cpu_list(cpus: Iterable[int]) -> str:
    """Cores in taskset's list form: ``0,1``."""
    return ",".join(map(str, sorted(cpus)))


def on_cpus(argv: Sequence[str], cpus: Iterable[int]) -> list[str]:
    """``argv`` run under taskset on ``cpus`` (taskset execs it: the process started is the server)."""
    return [shutil.which("taskset") or "taskset", "--cpu-list", cpu_list(cpus), *argv]


@contextlib.contextmanager
def generator_pinned(server_cpus: Iterable[int] | None) -> Iterator[frozenset[int] | None]:
    """Keep this process (and the generator processes it starts) off ``server_cpus`` while inside;
    yield the cores it keeps (None: ``server_cpus`` is None, nothing is pinned)."""
    if server_cpus is None:
        yield None
        return
    server = frozenset(server_cpus)
    allowed = frozenset(os.sched_getaffinity(0))
    if not server < allowed:
        raise ValueError(f"server CPUs {sorted(server)} must be a proper subset of this process's {sorted(allowed)}")
    os.sched_setaffinity(0, allowed - server)
    try:
        yield allowed - server
    finally:
        os.sched_setaffinity(0, allowed)
