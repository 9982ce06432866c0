"""What Linux's /proc says about a server's processes: the whole tree, where it listens, what it uses.

Used to stop every process a server started (some peers start helpers that
could outlive it), to prove that a server listens on loopback only, to find
the process behind a port this harness did not start (:func:`listener_pid`),
and to read what a server costs: CPU time (:func:`cpu_seconds`, and by
thread: :func:`thread_cpu`, :func:`cpu_by_role`; by process tree:
:func:`tree_cpu_seconds`) and, over a process tree
(``--workers N`` forks workers under a supervisor), resident memory, open
files and threads (:func:`usage`). :func:`parse_cpu_list` reads a list of
cores as taskset writes it.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ROLES",
    "Listener",
    "ProcessUsage",
    "cpu_by_role",
    "cpu_seconds",
    "descendants",
    "listener_pid",
    "listeners",
    "parse_cpu_list",
    "parse_proc_net_tcp",
    "process_tree",
    "thread_cpu",
    "tree_cpu_seconds",
    "usage",
]

_PROC = pathlib.Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's ``st`` column


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket: its local address and port."""

    address: str
    port: int

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    @property
    def loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1)."""
        ip = ipaddress.ip_address(self.address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback


def _parent_of(stat_text: str) -> int:
    # The command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
    return int(stat_text.rsplit(")", 1)[1].split()[1])


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = _parent_of((entry / "stat").read_text())
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), parents first."""
    children = _children()
    found: list[int] = []
    queue = list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    return [pid, *descendants(pid)]


def _decode_address(hex_address: str) -> str:
    # /proc/net/tcp* print each 32-bit word of the address in host (little-endian) byte order.
    raw = bytes.fromhex(hex_address)
    ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"  # Python would print ::ffff:7f00:1
    return str(ip)


def parse_proc_net_tcp(text: str) -> dict[int, Listener]:
    """Listening sockets in the text of /proc/net/tcp or /proc/net/tcp6, by socket inode."""
    found: dict[int, Listener] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        address, port = fields[1].split(":")
        found[int(fields[9])] = Listener(_decode_address(address), int(port, 16))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in (_PROC / str(pid) / "fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass  # the process is gone or not ours to read
    return inodes


def listeners(pids: Iterable[int]) -> list[Listener]:
    """The TCP sockets that any of ``pids`` holds open in the listening state, sorted."""
    table: dict[int, Listener] = {}
    for name in ("tcp", "tcp6"):
        try:
            table.update(parse_proc_net_tcp((_PROC / "net" / name).read_text()))
        except OSError:
            continue  # no IPv6 on this machine
    inodes = set().union(*(_socket_inodes(pid) for pid in pids))
    return sorted({table[inode] for inode in inodes if inode in table}, key=lambda s: (s.port, s.address))


def listener_pid(port: int) -> int | None:
    """The process listening on local TCP ``port``, if this user can see it.

    Several listeners with one parent (``--workers N`` and SO_REUSEPORT) give that parent,
    the supervisor, whose tree holds them all.
    """
    table: dict[int, Listener] = {}
    for name in ("tcp", "tcp6"):
        try:
            table.update(parse_proc_net_tcp((_PROC / "net" / name).read_text()))
        except OSError:
            continue
    wanted = {inode for inode, listener in table.items() if listener.port == port}
    holders = sorted(int(e.name) for e in _PROC.iterdir() if e.name.isdigit() and _socket_inodes(int(e.name)) & wanted)
    if len(holders) > 1:
        parents = set()
        for pid in holders:
            try:
                parents.add(_parent_of((_PROC / str(pid) / "stat").read_text()))
            except OSError:
                parents.add(-1)
        if len(parents) == 1 and -1 not in parents:
            return parents.pop()
    return holders[0] if holders else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process: what a server costs, whatever else the machine does."""
    return _stat_cpu((_PROC / str(pid) / "stat").read_text())


def tree_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of ``pid`` and its descendants (``--workers N`` serves from a supervisor's children).

    Per process, not per thread: a process's figure keeps the time of its threads that have ended.
    """
    total = 0.0
    for member in process_tree(pid):
        try:
            total += cpu_seconds(member)
        except FileNotFoundError:
            continue  # a child that just exited
    return total


def _stat_cpu(stat_text: str) -> float:
    fields = stat_text.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ThreadCpu:
    """One thread: its process, the name the kernel knows it by, and its user + system CPU seconds."""

    pid: int
    name: str
    seconds: float


def thread_cpu(pids: Iterable[int]) -> dict[int, ThreadCpu]:
    """Every thread of ``pids`` now, by thread id (threads that end while this reads are left out)."""
    threads: dict[int, ThreadCpu] = {}
    for pid in pids:
        try:
            tasks = list((_PROC / str(pid) / "task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                name = (task / "comm").read_text().strip()
                seconds = _stat_cpu((task / "stat").read_text())
            except (FileNotFoundError, ProcessLookupError):
                continue
            threads[int(task.name)] = ThreadCpu(pid, name, seconds)
    return threads


# How cpu_by_role sorts threads, first match wins: a process's main thread runs its event loop
# (infergate, the ceiling, grpc.aio servers generally); infergate names the threads that run models
# "ort-..." (server/infergate/threadnames.py); gRPC's core names its own.
ROLES = ("event loop", "models", "gRPC core", "other")
_GRPC_THREADS = ("event_engine", "grpc_", "default-executo", "resolver-execut", "timer_manager")


def _role(tid: int, thread: ThreadCpu) -> str:
    if tid == thread.pid:
        return "event loop"
    if thread.name.startswith("ort-"):
        return "models"
    if thread.name.startswith(_GRPC_THREADS):
        return "gRPC core"
    return "other"


def cpu_by_role(before: dict[int, ThreadCpu], after: dict[int, ThreadCpu]) -> dict[str, float]:
    """CPU seconds spent between two :func:`thread_cpu` readings, summed by :data:`ROLES`.

    A thread that started in between counts from zero; one that ended is lost.
    """
    spent = dict.fromkeys(ROLES, 0.0)
    for tid, thread in after.items():
        start = before.get(tid)
        spent[_role(tid, thread)] += thread.seconds - (start.seconds if start is not None else 0.0)
    return spent


@dataclass(frozen=True)
class ProcessUsage:
    """A process tree's resident memory (bytes), open file descriptors and threads, and how many processes."""

    rss_bytes: int
    fds: int
    threads: int
    processes: int


def usage(pid: int) -> ProcessUsage:
    """What ``pid`` and its descendants use now. Raises ProcessLookupError when ``pid`` is gone."""
    rss = fds = threads = processes = 0
    for member in process_tree(pid):
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


def _status(pid: int) -> dict[str, str]:
    text = (_PROC / str(pid) / "status").read_text()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def parse_cpu_list(text: str) -> frozenset[int]:
    """``0,1`` or ``0-3,8`` (taskset's list form) as a set of core numbers; ValueError if malformed."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if low < 0 or high < low:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return frozenset(cpus)
