"""Model control, log settings and trace settings across ``--workers N``: the supervisor is the one control point.

A client's RepositoryModelLoad/Unload lands on whichever worker got its
connection. That worker does not act alone: :class:`WorkerControl` (its
:class:`~infergate.serving.control.ModelControl`) asks the supervisor's
:class:`ControlHub`, which applies the call in **every** worker, one call at a
time, and answers once all of them have answered. So after the call returns,
every connection sees the same models.

Wire: JSON lines over Unix sockets in a directory only the supervisor's user
can open (``mkdtemp``, mode 0700); nothing listens on a network port.

* Each worker, once its start-up models are loaded, connects and says
  ``{"hello": INDEX}``. The hub replays every control call made so far (the
  last one per model), then ``{"joined": true}``: a worker restarted after a
  crash serves the same models as the others before it reports ready. From
  then on the hub sends ``{"op": "load"|"unload", "model": NAME}`` on that
  connection and the worker answers ``{"ok": true}`` or
  ``{"ok": false, "status": "NOT_FOUND", "message": "..."}``.
* **Readiness is the server's, not one worker's.** A worker listens once it
  joined, but reports SERVING (health, ServerReady) only when the hub says that
  every worker listens: ``{"op": "serve"}``, sent once the supervisor read
  every worker's "listening on" line, or ``"serve": true`` in the ``joined``
  message of a worker that joins after that (a restart). Otherwise the first
  worker up would pass a readiness probe while the kernel still gave it every
  new connection, and long-lived connections would stay on it.
* A worker serving a control call opens a short connection, sends
  ``{"call": "load"|"unload", "model": NAME}`` and relays the hub's answer.
* LogSettings goes the same way: ``{"call": "log", "settings": {...}}`` from
  the worker that took the call (which checked it), ``{"op": "log", "settings":
  {...}}`` to every worker, and the last settings are replayed to a worker that
  joins, so every worker logs alike. TraceSetting too, as ``"trace"`` with a
  change: the changes of each scope (server-wide, a model) are kept merged
  into one and replayed.

One lock in the hub orders calls and joins, so every worker applies the same
calls in the same order. A call that fails in some workers only (a worker out
of memory) is reported with the workers it failed in; retrying it is safe.

**A stop cuts calls short, and says so.** A worker that is stopping leaves
model control: a call it is applying is cancelled, and it answers
``{"ok": false, "status": "UNAVAILABLE", "stopping": true, ...}`` instead.
While the supervisor is not stopping, such a worker (like one that crashed)
is counted out: it is restarted and replays the call. Once the supervisor is
stopping, none comes back: the call is answered UNAVAILABLE, "the server is
stopping", naming the workers that applied it, if any (a single server's
caller gets UNAVAILABLE too, its connection closed). A call no worker applied
is never answered OK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infergate.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InferGateError,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from infergate.models.overrides import LoadOverride
from infergate.serving.control import ModelControl
from infergate.serving.log_settings import LogSettings, LogSettingsChange
from infergate.serving.trace_settings import TraceChange, TraceSettings
from infergate.telemetry.sampling import TraceRule

__all__ = ["ControlHub", "WorkerControl", "WorkerRole"]

log = logging.getLogger(__name__)

OPS = ("load", "unload")
LOG = "log"  # the op and call that carry log settings
TRACE = "trace"  # and trace settings
SERVE = "serve"  # every worker listens: report SERVING
STOPPING = "stopping"  # in a reply: the worker stopped before it applied the op (it leaves model control)
# Replies that mean the call changed nothing anywhere (no such model): such a call is not replayed.
_NAMED_NOTHING = frozenset({"NOT_FOUND", "INVALID_ARGUMENT"})
_ERRORS: dict[str, type[InferGateError]] = {
    cls.status.name: cls
    for cls in (InvalidArgument, NotFound, Unavailable, DeadlineExceeded, Cancelled, Unimplemented, FailedPrecondition)
}


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process of ``--workers N`` knows of its place: index, count, the hub's socket."""

    index: int
    count: int
    socket: Path


Message = dict[str, Any]


async def _send(writer: asyncio.StreamWriter, message: Message) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def _receive(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None when the other side has gone (or broke the protocol: then it is logged)."""
    try:
        line = await reader.readline()
    except (ConnectionError, ValueError):  # ValueError: a line over the reader's limit
        return None
    if not line:
        return None
    try:
        message = json.loads(line)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        log.error("model control: not a JSON object: %.200r", line)
        return None
    return message


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


# --------------------------------------------------------------------------- the supervisor's side


@dataclass(eq=False)
class _Agent:
    """The connection to one joined worker; the hub's lock serialises its use."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def ask(self, request: Message) -> Message | None:
        """Have the worker apply ``request`` (an op); its reply, or None when it has gone (it replays on its return)."""
        try:
            await _send(self.writer, request)
            reply = await _receive(self.reader)
        except ConnectionError:
            reply = None
        if reply is None:
            self.close()
        return reply

    def close(self) -> None:
        _close(self.writer)
        self.closed.set()


class ControlHub:
    """The supervisor's control point: applies each load/unload in every joined worker.

    ``stopping``: the supervisor's stop, once set (before any worker is told to stop): a worker that
    leaves from then on is not restarted, so a call it did not apply is not applied there at all.
    """

    def __init__(self, path: Path, stopping: asyncio.Event | None = None):
        self.path = path
        self._stopping = stopping if stopping is not None else asyncio.Event()
        self._lock = asyncio.Lock()
        self._agents: dict[int, _Agent] = {}
        self._calls: dict[str, str] = {}  # model -> the last op asked for it, in the order asked
        self._log_settings: Message | None = None  # the last LogSettings change, for workers that join later
        self._trace_changes: dict[str, TraceChange] = {}  # per scope, every TraceSetting change merged
        self._all_listen = False  # once set, a worker that joins reports SERVING at once
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connected, path=str(self.path))

    async def aclose(self) -> None:
        """Stop listening and close the workers' connections (after they have exited)."""
        if self._server is not None:
            self._server.close()
        for agent in list(self._agents.values()):
            agent.close()
        if self._server is not None:
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            message = await _receive(reader)
            if message is None:
                return
            if isinstance(message.get("hello"), int):
                await self._join(_Agent(message["hello"], reader, writer))
            elif message.get("call") in OPS and isinstance(message.get("model"), str):
                await _send(writer, await self.apply(message["call"], message["model"]))
            elif message.get("call") == LOG and isinstance(message.get("settings"), dict):
                await _send(writer, await self.apply_log_settings(message["settings"]))
            elif message.get("call") == TRACE and isinstance(message.get("change"), dict):
                try:
                    change = TraceChange.from_message(message["change"])
                except InvalidArgument as exc:
                    await _send(writer, {"ok": False, "status": exc.status.name, "message": exc.message})
                    return
                await _send(writer, await self.apply_trace_change(change))
            else:
                log.error("control: unexpected message %r", message)
        except ConnectionError as exc:
            log.warning("model control connection failed: %s", exc)
        finally:
            _close(writer)

    async def _join(self, agent: _Agent) -> None:
        """Replay the calls so far to a worker that (re)started, then count it in until it goes."""
        async with self._lock:
            replay: list[tuple[Message, str]] = [({"op": op, "model": m}, f"{op} {m}") for m, op in self._calls.items()]
            if self._log_settings is not None:
                replay.append(({"op": LOG, "settings": self._log_settings}, "log settings"))
            for scope, change in self._trace_changes.items():
                replay.append(
                    ({"op": TRACE, "change": change.as_message()}, f"trace settings of {scope or 'the server'}")
                )
            for request, what in replay:
                reply = await agent.ask(request)
                if reply is None:
                    return
                if not reply.get("ok"):
                    log.warning("worker %d: %s on joining: %s", agent.index, what, reply.get("message"))
            await _send(agent.writer, {"joined": True, SERVE: self._all_listen})
            previous = self._agents.pop(agent.index, None)
            if previous is not None:
                previous.close()
            self._agents[agent.index] = agent
        log.info("worker %d joined model control (%d call(s) replayed)", agent.index, len(self._calls))
        await agent.closed.wait()  # the connection stays open while the worker lives

    async def all_listen(self) -> None:
        """Every worker listens on the port: have each report SERVING (one that joins later does so at once)."""
        async with self._lock:
            self._all_listen = True
            replies = await self._ask_all({"op": SERVE})
        log.info("every worker listens: %d worker(s) report SERVING", len(_answered(replies)))

    async def apply(self, op: str, model: str) -> Message:
        """Apply ``op`` to ``model`` in every joined worker; one reply for the caller."""
        async with self._lock:
            replies = await self._ask_all({"op": op, "model": model})
            answered = _answered(replies)
            if not answered or not all(r.get("status") in _NAMED_NOTHING for _, r in answered):
                self._calls.pop(model, None)  # kept for workers that join later, in the order asked
                self._calls[model] = op
        return self._answer(f"{op} {model}", replies)

    async def apply_log_settings(self, settings: Message) -> Message:
        """Apply LogSettings' ``settings`` (checked by the worker that took the call) in every joined worker."""
        async with self._lock:
            replies = await self._ask_all({"op": LOG, "settings": settings})
            self._log_settings = settings  # for workers that join later
        return self._answer("log settings", replies)

    async def apply_trace_change(self, change: TraceChange) -> Message:
        """Apply a TraceSetting change (checked by the worker that took the call) in every joined worker."""
        async with self._lock:
            replies = await self._ask_all({"op": TRACE, "change": change.as_message()})
            before = self._trace_changes.get(change.model)
            self._trace_changes[change.model] = before.then(change) if before is not None else change
        return self._answer(f"trace settings of {change.model or 'the server'}", replies)

    async def _ask_all(self, request: Message) -> list[tuple[int, Message | None]]:
        """Every joined worker's reply to ``request`` (under the lock), by worker index: None for a worker
        that went away, a ``stopping`` reply for one that left while applying it. Either leaves the hub."""
        agents = sorted(self._agents.values(), key=lambda a: a.index)
        replies = await asyncio.gather(*(a.ask(request) for a in agents))
        for agent, reply in zip(agents, replies, strict=True):
            if reply is None or reply.get(STOPPING):
                agent.close()
                if self._agents.get(agent.index) is agent:
                    del self._agents[agent.index]
        return [(a.index, r) for a, r in zip(agents, replies, strict=True)]

    def _answer(self, what: str, replies: list[tuple[int, Message | None]]) -> Message:
        """The caller's answer to ``what``, logged.

        A worker that did not answer (gone, or stopping) is counted out while the supervisor serves on: it
        is restarted and replays the call. Once the supervisor is stopping it is not, and the call is
        answered UNAVAILABLE saying where it was applied, if anywhere; never OK for a call no worker applied.
        """
        answered = _answered(replies)
        left = [index for index, reply in replies if reply is None or reply.get(STOPPING)]
        applied = [index for index, reply in answered if reply.get("ok")]
        if left and self._stopping.is_set():
            where = _indices(left)
            message = (
                f"the server is stopping: {what} was applied in worker(s) {_indices(applied)} only; worker(s) "
                f"{where} stopped before applying it"
                if applied
                else f"the server is stopping: {what} was not applied in any worker (worker(s) {where} stopped "
                "before applying it)"
            )
            failed = [(index, reply) for index, reply in answered if not reply.get("ok")]
            message += "".join(f"; worker {index}: {reply.get('message')}" for index, reply in failed)
        elif not answered:
            # No worker to apply it (every one crashed at once): those restarting replay it, but not yet.
            message = f"{what} was not applied: no worker answered"
        else:
            answer = _combine(answered)
            if answer.get("ok"):
                log.info("%s: applied in %d worker(s)", what, len(answered))
            else:
                log.info("%s: %s", what, answer.get("message"))
            return answer
        log.warning("model control: %s", message)
        return {"ok": False, "status": "UNAVAILABLE", "message": message}


def _answered(replies: list[tuple[int, Message | None]]) -> list[tuple[int, Message]]:
    """The replies of workers that applied the call or failed to: not of those gone or stopping."""
    return [(index, reply) for index, reply in replies if reply is not None and not reply.get(STOPPING)]


def _indices(indices: list[int]) -> str:
    return ", ".join(str(index) for index in indices)


def _combine(replies: list[tuple[int, Message]]) -> Message:
    """One reply for the caller from every worker's: ok, or what failed and where."""
    failed = [(index, reply) for index, reply in replies if not reply.get("ok")]
    if not failed:
        return {"ok": True}
    messages = {str(reply.get("message")) for _, reply in failed}
    if len(messages) == 1:
        message = messages.pop()
        if len(failed) < len(replies):
            where = ", ".join(str(index) for index, _ in failed)
            message += f" (in worker(s) {where}; the other workers applied it; retrying is safe)"
    else:
        message = "; ".join(f"worker {index}: {reply.get('message')}" for index, reply in failed)
    return {"ok": False, "status": failed[0][1].get("status", "INTERNAL"), "message": message}


# --------------------------------------------------------------------------- a worker's side


def _stop_this_process() -> None:
    signal.raise_signal(signal.SIGTERM)  # the serve loop's handler drains and exits


class WorkerControl:
    """A worker's :class:`~infergate.serving.control.ModelControl`: every call goes through the hub.

    ``local`` applies what the hub sends. :meth:`join` (after the start-up
    models loaded, before the worker listens) catches up with the calls made
    so far; ``all_listen`` is set once every worker listens, and the worker
    reports SERVING only then. If the hub's connection drops while the worker serves, the
    supervisor is gone: ``on_lost`` runs (by default SIGTERM to this process,
    so an orphaned worker drains and exits instead of serving on alone).
    """

    def __init__(
        self,
        role: WorkerRole,
        local: ModelControl,
        on_lost: Callable[[], None] = _stop_this_process,
        logs: LogSettings | None = None,
        traces: TraceSettings | None = None,
    ):
        """``logs``, ``traces``: this worker's own log and trace settings, which the hub's ops change."""
        self.role = role
        self._local = local
        self._on_lost = on_lost
        self._logs = logs
        self._traces = traces
        # What LogSettings and TraceSetting call in this worker: read here, changed in every worker by the hub.
        self.log_settings: LogSettings | None = _SharedLogSettings(self, logs) if logs is not None else None
        self.trace_settings: TraceSettings | None = _SharedTraceSettings(self, traces) if traces is not None else None
        self.all_listen = asyncio.Event()  # the hub said every worker listens on the port
        self._follower: asyncio.Task[None] | None = None
        self._closing = False

    async def load(self, name: str, override: LoadOverride | None = None) -> None:
        if override is not None and (override.config is not None or override.files):
            # Every worker must load the same thing, and the supervisor replays loads to restarted workers:
            # an override would have to travel to (and be kept by) the supervisor. Refused, and documented.
            raise FailedPrecondition(
                f"failed to load '{name}': a config or file override is not supported with --workers; "
                "put the config and files in the model repository instead"
            )
        await self._ask({"call": "load", "model": name})

    async def unload(self, name: str) -> None:
        await self._ask({"call": "unload", "model": name})

    async def change_log_settings(self, change: LogSettingsChange) -> None:
        await self._ask({"call": LOG, "settings": change.as_message()})

    async def change_trace_settings(self, change: TraceChange) -> None:
        await self._ask({"call": TRACE, "change": change.as_message()})

    async def _ask(self, call: Message) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.role.socket))
        except OSError as exc:
            raise Unavailable(f"model control: the supervisor cannot be reached ({exc})") from exc
        try:
            await _send(writer, call)
            reply = await _receive(reader)
        finally:
            _close(writer)
        if reply is None:
            raise Unavailable("model control: the supervisor closed the connection before answering")
        if not reply.get("ok"):
            error = _ERRORS.get(str(reply.get("status")), InferGateError)
            raise error(str(reply.get("message")))

    async def join(self) -> bool:
        """Connect to the hub and apply the calls made so far; then follow the ones to come.

        False when the hub cannot be reached: ``on_lost`` has then been called.
        """
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.role.socket))
            await _send(writer, {"hello": self.role.index})
            while (message := await _receive(reader)) is not None and not message.get("joined"):
                await self._apply(message, writer)
        except OSError as exc:
            log.error("cannot join model control at %s (%s); stopping this worker", self.role.socket, exc)
            self._on_lost()
            return False
        if message is None:
            _close(writer)
            log.error("the supervisor closed model control while this worker joined; stopping it")
            self._on_lost()
            return False
        if message.get(SERVE):
            self.all_listen.set()
        self._follower = asyncio.create_task(self._follow(reader, writer), name="model control")
        return True

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (message := await _receive(reader)) is not None:
                await self._apply(message, writer)
        except ConnectionError:
            pass
        finally:
            _close(writer)
        if not self._closing:
            log.error("the supervisor is gone (model control closed); stopping this worker")
            self._on_lost()

    async def _apply(self, message: Message, writer: asyncio.StreamWriter) -> None:
        op, model = message.get("op"), message.get("model")
        reply: Message
        try:
            if op == SERVE:
                self.all_listen.set()
            elif op == LOG and self._logs is not None and isinstance(message.get("settings"), dict):
                await self._logs.change(LogSettingsChange.from_message(message["settings"]))
            elif op == TRACE and self._traces is not None and isinstance(message.get("change"), dict):
                await self._traces.change(TraceChange.from_message(message["change"]))
            elif op not in OPS or not isinstance(model, str):
                raise InvalidArgument(f"model control: unknown request {message!r}")
            else:
                log.info("%s %s: applying in this worker (model control)", op, model)
                await (self._local.load(model) if op == "load" else self._local.unload(model))
            reply = {"ok": True}
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # aclose: this worker is stopping. Its op did not finish (a load, say, may be half done), and the
            # hub must not count it as applied: say so before leaving.
            what = f"{op} {model}" if op in OPS else str(op)
            reply = {"ok": False, "status": "UNAVAILABLE", STOPPING: True,
                     "message": f"worker {self.role.index} stopped before {what} finished"}  # fmt: skip
            with contextlib.suppress(ConnectionError):
                await _send(writer, reply)
            raise
        except InferGateError as exc:
            reply = {"ok": False, "status": exc.status.name, "message": exc.message}
        except Exception:
            log.exception("model control: %s %s failed", op, model)
            reply = {"ok": False, "status": "INTERNAL", "message": f"{op} {model}: internal error (see the log)"}
        await _send(writer, reply)
        if reply.get("ok") and op in OPS:  # the hub has its answer: the op is applied here, whatever comes next
            log.info("%s %s: applied in this worker (model control)", op, model)

    async def aclose(self) -> None:
        """Leave model control (the server is stopping)."""
        self._closing = True
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)


class _SharedLogSettings:
    """LogSettings in a worker: read from this worker, changed in every worker by the hub."""

    def __init__(self, control: WorkerControl, local: LogSettings):
        self._control = control
        self._local = local

    @property
    def current(self) -> LogSettingsChange:
        return self._local.current

    async def change(self, change: LogSettingsChange) -> None:
        await self._control.change_log_settings(change)


class _SharedTraceSettings:
    """TraceSetting in a worker: read from this worker, changed in every worker by the hub."""

    def __init__(self, control: WorkerControl, local: TraceSettings):
        self._control = control
        self._local = local

    def rule(self, model: str) -> TraceRule:
        return self._local.rule(model)

    async def change(self, change: TraceChange) -> None:
        await self._control.change_trace_settings(change)
