"""The composition root: builds the gRPC server and owns its lifecycle.

Start: bind the port (liveness answers at once), load the models in
background threads, then report SERVING; in poll mode a task owned here
rescans the repository every ``repository_poll_seconds``. Stop (SIGTERM,
Ctrl-C): health goes NOT_SERVING, polling stops, stateful models start no
new sequences, the live ones may finish, the port stops accepting, queued and
running requests finish within the grace period, shadow calls are dropped,
then batchers drain and sessions close — in that order.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Literal

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc
from infergate._proto import model_config_pb2 as mc
from infergate.audit import AuditLog
from infergate.config import ServerConfig
from infergate.eventloop import describe as describe_loop
from infergate.heap import FrozenHeap
from infergate.models.cpus import model_cpus, usable_cpus
from infergate.models.response_cache import ResponseCache
from infergate.models.sequence import SequenceScheduler
from infergate.models.version import ModelVersion
from infergate.monitoring.metrics import DriftReadings
from infergate.netaddr import host_port
from infergate.repository.loader import ModelRepository
from infergate.routing.shadow import ShadowQueue
from infergate.security.auth import TokenVerifier
from infergate.security.interceptor import AuthInterceptor
from infergate.security.keys import KeyStore, build_key_store
from infergate.security.tls import server_credentials
from infergate.serving.admin import ADMIN_SERVICE_NAME, AdminServicer
from infergate.serving.admin_audit import AdminAudit
from infergate.serving.admission import Admission
from infergate.serving.control import LocalModelControl, ModelControl
from infergate.serving.handler import InferenceHandler
from infergate.serving.health_port import HealthPort
from infergate.serving.health_watch import HealthServicer
from infergate.serving.interceptors import CallPipeline
from infergate.serving.log_settings import LocalLogSettings
from infergate.serving.request import RequestLimits
from infergate.serving.servicer import InferenceServicer, Readiness
from infergate.serving.shared_memory import SystemSharedMemory
from infergate.serving.trace_settings import LocalTraceSettings
from infergate.telemetry import Telemetry
from infergate.telemetry.logs import HEALTH, LISTENING, METRICS, LogControl, LogLevels, announcement
from infergate.telemetry.triton import TritonRow
from infergate.workers.control import WorkerControl, WorkerRole
from infergate.workers.scope import WorkerScopeInterceptor

__all__ = ["SERVICE_NAME", "InferGateServer"]

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the whole server
# The part of the grace that live sequences may take to end; the rest stays for the calls admitted last.
SEQUENCES_SHARE = 0.5


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """One pool holding every served service: ours live in a private pool (see _proto)."""
    pool = descriptor_pool.DescriptorPool()
    files: list[FileDescriptor] = [
        mc.DESCRIPTOR,
        pb.DESCRIPTOR,
        apb.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
    ]
    for file in files:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool


class GenericHandlersOnly:
    """Registers services on ``server`` through generic handlers only, never as "registered methods".

    Why: grpc.aio keeps one pending accept per registered method and waits on all
    of them with ``asyncio.wait`` for every call it accepts, so each call costs the
    event loop work in proportion to the number of methods served (about 30 here);
    with generic handlers alone there is one pending accept, and a method is found
    with one dictionary lookup. BENCHMARKS.md ("Where the time goes") has the figures.
    """

    def __init__(self, server: grpc.aio.Server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Ignored: the same handlers arrive through ``add_generic_rpc_handlers``."""


class InferGateServer:
    """An infergate server over one model repository."""

    def __init__(
        self,
        config: ServerConfig,
        telemetry: Telemetry | None = None,
        *,
        worker: WorkerRole | None = None,
        freeze_heap: bool = False,
        logs: LogControl | None = None,
    ):
        """``worker``: this process is one worker of ``--workers N`` (model control goes through the supervisor).
        ``freeze_heap``: the process is this server alone; freeze its heap once the models are loaded
        (``heap.py``). ``logs``: the process's logging, which this server may change (LogSettings)."""
        if config.model_repository is None:
            raise ValueError("a model repository is required")
        self.config = config
        self.telemetry = telemetry or Telemetry.from_config(config.telemetry, access_log=config.log_level == "debug")
        # Lifecycle events (docs/governance.md): the repository (with its routers and drift monitors), the
        # shadows and the admin audit interceptor write to it.
        self.audit = AuditLog(config.audit_log)
        self._heap = FrozenHeap() if freeze_heap else None
        limits = config.limits
        metrics = self.telemetry.metrics
        self.admission = Admission(
            limits.max_inference_calls, metrics.record_admission_refusal if metrics is not None else None
        )
        self.repository = ModelRepository(
            Path(config.model_repository),
            self.telemetry.observer,
            drain_timeout=config.shutdown_grace_seconds,
            explicit=config.model_control_mode == "explicit",
            audit=self.audit,  # loads, swaps, routing changes; and through it canary steps and drift alerts
            calls_in_progress=self.admission.calls_in_progress,  # batches gather only while calls may arrive
            on_retired=self._heap.retired if self._heap is not None else None,  # frozen versions need a collection
            model_cpus=_worker_cpus(worker),
            workers=worker.count if worker is not None else 1,  # stateful models need one process
        )
        self.readiness = Readiness()
        self.shadows = ShadowQueue(
            recorder=metrics.record_shadow if metrics is not None else None,
            events=self.audit,
            spans=self.telemetry.shadow_spans(),
        )
        handler = InferenceHandler(
            self.repository.catalog,
            RequestLimits(limits.max_elements_per_tensor, limits.max_batch_rows, limits.max_inputs_per_request),
            self.shadows,
            ResponseCache(config.response_cache.max_bytes) if config.response_cache.max_bytes else None,
        )
        if metrics is not None:
            metrics.watch_drift(DriftReadings(self.repository.catalog.served))
            metrics.watch_canaries(self._canaries)
        self.telemetry.serve_triton_metrics(self._triton_rows)
        # Explicit mode, strict readiness: the start-up models that failed, until each loads or is unloaded.
        self._awaited: set[str] | None = None
        local = LocalModelControl(self.repository, self._model_control_applied)
        local_logs = LocalLogSettings(logs, self._log_levels_changed) if logs is not None else None
        sampler = self.telemetry.trace_sampler
        local_traces = LocalTraceSettings(sampler) if sampler is not None else None
        self._worker_control = (
            WorkerControl(worker, local, logs=local_logs, traces=local_traces) if worker is not None else None
        )
        control: ModelControl = self._worker_control or local
        self._poller: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None  # a worker's SERVING, once every worker listens
        self._health = HealthServicer()
        self._keys: KeyStore | None = build_key_store(config.auth) if config.auth.enabled else None
        auth = None
        if self._keys is not None:
            refusals = metrics.record_auth_refusal if metrics else None
            auth = AuthInterceptor(TokenVerifier(config.auth, self._keys), config.auth.exempt_methods, refusals)
        shm = config.shared_memory.system
        # Clients' shared-memory regions (Triton's extension); unmapped at stop.
        self.shared_memory = SystemSharedMemory(shm.max_regions, shm.max_bytes) if shm.enabled else None
        observers = self.telemetry.interceptors()
        if worker is not None:
            observers.append(WorkerScopeInterceptor(worker.index, worker.count))
        self._pipeline = CallPipeline(self.admission, observers, AdminAudit(self.audit), auth)
        self._server = grpc.aio.server(
            interceptors=[self._pipeline],
            options=[
                ("grpc.max_receive_message_length", config.max_receive_message_bytes),
                ("grpc.max_send_message_length", config.max_send_message_bytes),
                ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
                # Share the port only among --workers; never by accident with another server.
                ("grpc.so_reuseport", 1 if config.reuse_port else 0),
                # gRPC's own defaults (1,000 and 3,000) let a backlog of seconds build up at a few
                # thousand calls a second: every call then expired in the queue (docs/deploy.md, Overload).
                ("grpc.server.max_pending_requests", limits.max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", 2 * limits.max_pending_calls),
                *config.connections.grpc_options(),
            ],
        )
        servicer = InferenceServicer(
            self.repository,
            handler,
            self.readiness,
            config.model_control_mode,
            on_stream_pause=metrics.stream_paused if metrics is not None else None,
            closing=self.admission.closing,
            control=control,
            shared_memory=self.shared_memory,
            logs=self._worker_control.log_settings if self._worker_control is not None else local_logs,
            traces=self._worker_control.trace_settings if self._worker_control is not None else local_traces,
        )
        services_only = GenericHandlersOnly(self._server)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, services_only)  # type: ignore[no-untyped-call]
        admin = AdminServicer(self.repository.catalog)
        apb_grpc.add_InferGateAdminServicer_to_server(admin, services_only)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, services_only)
        self._health_port = (
            HealthPort(self._health, reuse_port=config.reuse_port) if config.health_port is not None else None
        )
        services = (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        # Reflection picks its aio servicer by the server's type, so it gets the server itself (two methods).
        reflection.enable_server_reflection(services, self._server, pool=_reflection_pool())
        self.port = 0
        self.health_port: int | None = None

    async def start(self) -> int:
        """Bind and start serving; models load afterwards (see ``load_models``). Returns the port."""
        await self.prepare()
        return await self.listen()

    async def prepare(self) -> None:
        """What must happen before models load or the port opens: the repository's index, the audit log, keys."""
        self.repository.discover()
        self.audit.start()  # before the port opens: an audit log that cannot be written stops the start
        if self._keys is not None:
            await self._keys.start()  # a JWKS URL's first fetch (off the loop), then its refresh schedule
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)  # until load_models says otherwise

    async def listen(self) -> int:
        """Bind and start serving (after ``prepare``; before or after ``load_models``). Returns the port."""
        address = host_port(self.config.host, self.config.port)
        tls = self.config.tls
        if tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, server_credentials(tls))
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        if self._health_port is not None and self.config.health_port is not None:
            host = self.config.health_host or self.config.host
            self.health_port = await self._health_port.start(host, self.config.health_port)
            log.info("health on %s (plaintext, grpc.health.v1 only)", host_port(host, self.health_port))
        self.shadows.start()
        self.telemetry.start()
        await self._server.start()
        log.info("listening on %s%s", host_port(self.config.host, self.port), " (TLS)" if tls else "")
        log.info("event loop: %s", describe_loop(asyncio.get_running_loop()))
        self.audit.server_started(host_port(self.config.host, self.port), str(self.config.model_repository))
        return self.port

    async def load_models(self) -> bool:
        """Load the models; report SERVING when all loaded (or, not strict, when done).

        Explicit mode loads only ``load_models`` ("*": all) and is ready without models; one of
        them that does not serve (or has no directory) counts as a failed model does in the other modes.
        A worker of ``--workers N`` reports only once every worker listens (``WorkerControl.all_listen``).
        """
        await self.repository.load_all(self._startup_models(), source="startup")
        # A worker first applies what was loaded and unloaded through the API since the start.
        if self._worker_control is not None and not await self._worker_control.join():
            return False  # the supervisor is gone: this worker is stopping
        if self._heap is not None:
            log.info("start-up heap frozen: %d objects the garbage collector will not walk again", self._heap.freeze())
        failed = self._not_serving_at_start()
        ready = not failed or not self.config.strict_readiness
        if not ready and self.config.model_control_mode == "explicit":
            self._awaited = set(failed)
        if self._worker_control is None or self._worker_control.all_listen.is_set():
            await self._report(ready, failed)
        else:  # this worker listens next; the others may not yet
            self._reporter = asyncio.create_task(self._report_once_all_listen(ready, failed), name="readiness")
        if self.config.model_control_mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="repository poll")
        return ready

    async def _report(self, ready: bool, failed: list[str]) -> None:
        self.readiness.ready = ready
        # The inference service answers for the models that loaded, whatever failed: clients that
        # balance on its health (the SDK) keep their calls to them. "" is readiness, strict or not.
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if ready:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "%d model(s) ready%s; server %s",
            len(self.repository.catalog.names()) - len(self.repository.catalog.not_ready()),  # loaded and serving
            f", failed: {', '.join(failed)}" if failed else "",
            "ready" if ready else "NOT ready (strict readiness)",
        )

    async def _report_once_all_listen(self, ready: bool, failed: list[str]) -> None:
        assert self._worker_control is not None
        await self._worker_control.all_listen.wait()
        if self._awaited is not None and not self._awaited:  # mended through model control meanwhile
            ready, failed = True, []
        await self._report(ready, failed)

    def _not_serving_at_start(self) -> list[str]:
        """The start-up models that do not serve: every model in the repository, or in explicit mode the
        ones ``load_models`` names (a name with no model directory among them: it was asked for)."""
        catalog = self.repository.catalog
        named = self._startup_models()
        if named is None:
            return catalog.not_ready()
        serving = set(catalog.names()) - set(catalog.not_ready())
        return [name for name in dict.fromkeys(named) if name not in serving]

    async def _model_control_applied(self, name: str, op: Literal["load", "unload"]) -> None:
        """Strict readiness in explicit mode: a server that started with a model it could not load becomes
        ready once each such model serves (loaded through RepositoryModelLoad) or was unloaded, as Triton's
        strict readiness counts every model except the unloaded ones. Only this way, as in poll mode: a
        load that fails later never makes a ready server not ready."""
        awaited = self._awaited
        if awaited is None:
            return
        if op == "unload":
            awaited.discard(name)
        catalog = self.repository.catalog
        awaited.difference_update(set(catalog.names()) - set(catalog.not_ready()))
        if awaited or self.readiness.ready or self.readiness.draining:
            return
        if self._reporter is not None and not self._reporter.done():
            return  # a worker whose first report waits for the other workers to listen: it reports ready
        await self._report(True, [])

    def _canaries(self) -> list[tuple[str, int, float, str]]:
        """Each model's canary as the metrics report it (read on the scrape thread: lookups only)."""
        statuses = ((name, router.canary) for name, router in self.repository.catalog.routers())
        return [(name, c.version, c.weight, c.state) for name, c in statuses if c is not None]

    def _log_levels_changed(self, levels: LogLevels) -> None:
        """LogSettings changed the levels: per-call access lines while verbose, as at ``log_level: debug``."""
        self._pipeline.observe_also(self.telemetry.access_log_when(levels.verbose > 0))

    def _startup_models(self) -> list[str] | None:
        if self.config.model_control_mode != "explicit" or "*" in self.config.load_models:
            return None
        return self.config.load_models

    async def _poll(self) -> None:
        """Rescan the repository now and then; a failing scan is logged and retried next time."""
        while True:
            await asyncio.sleep(self.config.repository_poll_seconds)
            try:
                present = await self.repository.rescan(source="poll")
            except Exception:
                log.exception("repository poll failed")
                continue
            await self._ready_once_every_model_serves(present)

    async def _ready_once_every_model_serves(self, present: list[str]) -> None:
        """Strict readiness in poll mode: a server that started with a model it could not load becomes
        ready once a poll has loaded every model in the repository (fixed in place, or removed). Without
        this, a pod started while a model was still being copied stayed out of its Service for good,
        its liveness passing. Only this way: a model broken later keeps its version serving (loader.py).
        """
        if self.readiness.ready or self.readiness.draining:
            return
        if self._reporter is not None and not self._reporter.done():
            return  # a worker whose first report waits for the other workers to listen
        failed = set(self.repository.catalog.not_ready()) & set(present)
        if not failed:
            await self._report(True, [])

    def _triton_rows(self) -> list[TritonRow]:
        """Every loaded version for Triton's metrics (read on the scrape thread: lookups only)."""
        loaded = self.repository.catalog.statistics("", "")
        return [TritonRow(m.name, m.version, m.stats, m.queue_depth) for m in loaded]

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self._health.set(service, status)

    async def stop(self, grace: float | None = None, *, close_port: bool = True) -> None:
        """Drain and stop, losing no call the server took on.

        1. Health says NOT_SERVING, so clients that watch it send new calls elsewhere;
           for ``shutdown_delay_seconds`` the server keeps serving as before. Stateful
           models start no new sequences: a start, and one waiting for a slot, is
           answered UNAVAILABLE at once (``SequenceScheduler.drain``).
        2. While sequences are live, the server keeps serving, for ``SEQUENCES_SHARE``
           of ``grace`` at most, so that they can end.
        3. Admission closes: every new inference call is answered UNAVAILABLE at once
           (which clients retry), never left to be cut off; open streams answer
           what they read and end with UNAVAILABLE.
        4. Every inference call admitted before that is answered (within ``grace``).
        5. Then the port closes (unless ``close_port`` is False: see ``cli.py``), the
           batchers drain and the sessions close.
        6. Telemetry flushes, for ``FLUSH_BUDGET_SECONDS`` at most; the audit trail's
           ``server_stopped`` line is written last.
        """
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        log.info("draining (grace %.1fs)", grace)
        self.readiness.draining = True
        sequences = self._sequence_schedulers()
        for scheduler in sequences:
            scheduler.drain()
        await self._health.enter_graceful_shutdown()
        if self._worker_control is not None:
            await self._worker_control.aclose()  # leave model control before the supervisor notices
        for task in (self._reporter, self._poller):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.config.shutdown_delay_seconds > 0:
            log.info("NOT_SERVING; still serving for %.1fs", self.config.shutdown_delay_seconds)
            await asyncio.sleep(self.config.shutdown_delay_seconds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await _let_sequences_end(sequences, grace * SEQUENCES_SHARE)
        self.admission.close()
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                await self.admission.drained()
        except TimeoutError:
            log.warning("%d inference call(s) still running after %.1fs", self.admission.in_progress, grace)
        if close_port:
            await self._server.stop(max(deadline - loop.time(), 0.0))
            if self._health_port is not None:
                await self._health_port.stop(0)  # probes saw NOT_SERVING for the whole drain
        await self.shadows.aclose()
        await self.repository.aclose(timeout=max(deadline - loop.time(), 0.0))
        if self.shared_memory is not None:
            self.shared_memory.close()  # after the batchers: no request reads a region any more
        if self._keys is not None:
            await self._keys.aclose()
        # Flushes what is still queued for export; a collector that is down costs FLUSH_BUDGET_SECONDS at most
        # (telemetry/flush.py: the flush's own threads, not this executor's, are what may be left running).
        await asyncio.to_thread(self.telemetry.shutdown)
        self.audit.server_stopped()
        await self.audit.aclose()
        log.info("stopped")

    def _sequence_schedulers(self) -> list[SequenceScheduler]:
        """The sequences of every version served now (an ensemble's stateful steps are versions too)."""
        served = self.repository.catalog.served()
        return [v.sequences for v in served if isinstance(v, ModelVersion) and v.sequences is not None]


async def _let_sequences_end(schedulers: list[SequenceScheduler], limit: float) -> None:
    """Keep serving until every live sequence has ended or gone idle, for ``limit`` seconds at most.

    Their next requests come on connections the server holds open, from clients that keep a
    sequence on one server (they must); Triton too serves its in-flight sequences while it stops.
    """
    live = sum(s.active for s in schedulers)
    if not live:
        return
    log.info("%d sequence(s) live: serving on until they end (%.1fs at most); none starts", live, limit)
    try:
        async with asyncio.timeout(limit):
            await asyncio.gather(*(s.finished() for s in schedulers))
    except TimeoutError:
        left = sum(s.active for s in schedulers)
        log.warning("%d sequence(s) still live after %.1fs: their next requests are refused", left, limit)


async def run_until_signalled(
    server: InferGateServer, stop: asyncio.Event, *, close_port: bool = True, load_first: bool = False
) -> None:
    """Start, load, serve until ``stop`` is set, then drain (see ``InferGateServer.stop``).

    By default the port opens first, so that health answers (NOT_SERVING) while the models load.
    ``load_first`` opens it only once the start-up load is done: a worker of ``--workers N`` shares
    its port with the others (SO_REUSEPORT), and the kernel would hand a loading worker its share
    of new connections, whose calls it could only refuse.
    """
    if load_first:
        await server.prepare()
        loader = asyncio.create_task(server.load_models())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait((loader, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stop.is_set():
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await server.stop(close_port=close_port)
            return
        loader.result()  # a load that raised ends the start, as it would a single server's
        await server.listen()
    else:
        await server.start()
        loader = asyncio.create_task(server.load_models())
    _announce(server)
    await stop.wait()
    if not loader.done():
        loader.cancel()
    await server.stop(close_port=close_port)


def _announce(server: InferGateServer) -> None:
    """The "listening on" line (and the metrics and health ports' lines) that scripts and the supervisor read."""
    fmt = server.config.logging.format
    address = host_port(server.config.host, server.port)
    print(announcement(LISTENING + address, fmt, address=address), flush=True)
    if server.telemetry.metrics_port is not None:
        url = f"http://{host_port(server.config.telemetry.metrics_host, server.telemetry.metrics_port)}/metrics"
        print(announcement(METRICS + url, fmt, url=url), flush=True)
    if server.health_port is not None:
        health_address = host_port(server.config.health_host or server.config.host, server.health_port)
        print(announcement(HEALTH + health_address, fmt, address=health_address), flush=True)


def _worker_cpus(worker: WorkerRole | None) -> int | None:
    """The CPUs a worker's models share: an Nth of the process's, for N workers on the same CPUs."""
    if worker is None or worker.count <= 1:
        return None
    cpus = model_cpus(worker.count)
    log.info(
        "worker %d of %d: its models' onnxruntime threads share %s of the %d CPU(s) this process may use",
        worker.index, worker.count, cpus if cpus is not None else "all", usable_cpus(),
    )  # fmt: skip
    return cpus
