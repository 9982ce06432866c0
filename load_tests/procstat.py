"""What a server process uses, read from Linux's /proc: resident memory, open files, threads.

A server may be several processes (``infergate serve --workers N`` forks
workers under a supervisor), so :func:`usage` adds up a process and all its
descendants. :func:`listener_pid` finds the process listening on a local TCP
port, for a server this harness did not start.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

__all__ = ["ProcessUsage", "descendants", "listener_pid", "usage"]

_PROC = pathlib.Path("/proc")
_TCP_LISTEN = "0A"  # st column of /proc/net/tcp for a listening socket


@dataclass(frozen=True)
class ProcessUsage:
    """A process tree's resident memory (bytes), open file descriptors and threads, and how many processes."""

    rss_bytes: int
    fds: int
    threads: int
    processes: int


def _status(pid: int) -> dict[str, str]:
    text = (_PROC / str(pid) / "status").read_text()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def _parent(pid: int) -> int | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, ``pid`` first."""
    children: dict[int, list[int]] = {}
    for child in _pids():
        parent = _parent(child)
        if parent is not None:
            children.setdefault(parent, []).append(child)
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, ()))
    return found


def usage(pid: int) -> ProcessUsage:
    """What ``pid`` and its descendants use now. Raises ProcessLookupError when ``pid`` is gone."""
    rss = fds = threads = processes = 0
    for member in descendants(pid):
        try:
            status = _status(member)
            open_files = len(os.listdir(_PROC / str(member) / "fd"))
        except FileNotFoundError:
            if member == pid:
                raise ProcessLookupError(f"process {pid} is gone") from None
            continue  # a child that just exited
        rss += int(status.get("VmRSS", "0 kB").split()[0]) * 1024
        threads += int(status.get("Threads", "0"))
        fds += open_files
        processes += 1
    return ProcessUsage(rss, fds, threads, processes)


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def listener_pid(port: int) -> int | None:
    """The process listening on local TCP ``port``, if this user can see it.

    Several listeners with one parent (``--workers N`` and SO_REUSEPORT) give that parent,
    the supervisor, whose tree holds them all.
    """
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    holders = [pid for pid in _pids() if sockets and _holds(pid, sockets)]
    if len(holders) > 1:
        parents = {_parent(pid) for pid in holders}
        if len(parents) == 1 and None not in parents:
            return parents.pop()
    return min(holders, default=None)


def _pids() -> list[int]:
    return sorted(int(entry.name) for entry in _PROC.iterdir() if entry.name.isdigit())


def _holds(pid: int, sockets: set[str]) -> bool:
    try:
        return any(os.readlink(fd) in sockets for fd in (_PROC / str(pid) / "fd").iterdir())
    except OSError:  # gone, or not ours to read
        return False
