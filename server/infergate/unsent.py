"""The bytes this process has written to its TCP connections that their peers have not yet acknowledged.

Why the server waits for them before it exits: a drained server ends with
``os._exit`` (cli.py says why it does not shut gRPC down). By then every
answer has been handed to the kernel, but not necessarily delivered: on a
slow link, or to a client slow to read, much of it may still sit in the
socket's send queue. Closing a socket whose receive queue holds unread bytes
(a window update, a ping) makes the kernel send a reset and drop that send
queue, and the client sees "Connection reset by peer" for a call that ran.
Once the peer has acknowledged every byte, a reset loses nothing: the client's
kernel hands over what it received before it reports the reset.

Read from ``/proc/self/net/tcp`` and ``tcp6`` (Linux): the ``tx_queue`` of an
established connection is the bytes sent or queued that its peer has not
acknowledged; only this process's sockets (by inode, from ``/proc/self/fd``)
count. Unix sockets (the ``--workers`` control channel) do not: their peer is
the supervisor, which is waiting for this process to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

__all__ = ["unacknowledged_bytes", "wait_until_delivered"]

log = logging.getLogger(__name__)

POLL_S = 0.01


def unacknowledged_bytes(pid: int | str = "self") -> int:
    """Bytes the TCP connections of process ``pid`` have queued that their peers have not acknowledged
    (0 where it cannot be read: not Linux)."""
    inodes = _socket_inodes(pid)
    total = 0
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        with contextlib.suppress(OSError):
            with open(table) as lines:
                next(lines, None)  # the header
                for line in lines:
                    fields = line.split()  # sl local remote state tx_queue:rx_queue ... uid timeout inode
                    if len(fields) > 9 and fields[9] in inodes:
                        total += int(fields[4].split(":")[0], 16)
    return total


def _socket_inodes(pid: int | str) -> set[str]:
    """The inodes of the process's sockets ("socket:[123]" -> "123")."""
    inodes = set()
    fds = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for name in os.listdir(fds):
            with contextlib.suppress(OSError):  # closed meanwhile
                target = os.readlink(f"{fds}/{name}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


async def wait_until_delivered(deadline: float) -> bool:
    """Wait until every byte written to a connection is acknowledged, or until ``deadline``
    (``time.monotonic()``); True when they all were."""
    left = unacknowledged_bytes()
    if left:
        log.info("drained; waiting for %d bytes of answers to reach their clients", left)
    while left:
        if time.monotonic() >= deadline:
            log.warning("%d bytes of answers were still unacknowledged when the shutdown grace ran out", left)
            return False
        await asyncio.sleep(POLL_S)
        left = unacknowledged_bytes()
    return True
