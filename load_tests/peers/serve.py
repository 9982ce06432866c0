"""Start one peer for the suite, prove it is up and loopback-only, always stop it.

A start counts once gRPC ServerReady and ModelReady of every model answer
true (polled, within the suite's ready timeout). A peer whose
:attr:`~load_tests.peers.launch.Peer.start_attempts` is 2 (Triton) is started
once more, on fresh ports and a fresh working folder, when the first start
fails; a log line says so. The whole process tree is stopped on the way out,
error or not (``load_tests.servers.stop_process``).
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..servers import ServerFailed, check_loopback_only, running_server
from .launch import Peer, Ports
from .spec import PeerModel

__all__ = ["PeerNotInstalled", "RunningPeer", "running_peer"]


class PeerNotInstalled(Exception):
    """The peer's environment under .tools/peers/ is missing."""


@dataclass(frozen=True)
class RunningPeer:
    """A started peer: where to send load and what it listens on."""

    target: str
    listening: list[str]
    attempts: int


@contextlib.contextmanager
def running_peer(
    peer: Peer,
    models: Sequence[PeerModel],
    workdir: pathlib.Path,
    log_path: pathlib.Path,
    ready_timeout: float,
    progress: Callable[[str], None],
) -> Iterator[RunningPeer]:
    """Start ``peer`` serving ``models``, retrying as the peer allows; yield it, then stop it.

    Raises PeerNotInstalled, or ServerFailed when the last attempt did not
    become ready or listens beyond loopback.
    """
    if not peer.installed:
        raise PeerNotInstalled(f"{peer.name} is not installed: run scripts/install_peers.sh {peer.name}")
    names = [model.name for model in models]
    for attempt in range(1, peer.start_attempts + 1):
        launch = peer.prepare(workdir / f"start{attempt}", models, Ports.free())
        server = running_server(
            peer.name, launch.argv, launch.target, log_path, launch.cwd, ready_timeout, env=launch.env, models=names
        )
        stack = contextlib.ExitStack()
        try:
            process = stack.enter_context(server)
        except ServerFailed as exc:
            if attempt == peer.start_attempts:
                raise
            first_line = str(exc).splitlines()[0]
            progress(f"{peer.name} did not start (attempt {attempt} of {peer.start_attempts}: {first_line}); retrying")
            continue
        with stack:
            listening = check_loopback_only(peer.name, process)
            yield RunningPeer(launch.target, listening, attempt)
        return
