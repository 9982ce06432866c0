"""onnxruntime execution: sessions, providers, warm-up, and running one batch.

``session.run`` never runs on the event loop: each model version owns one
thread per instance (``instance_group.count``; ``auto``: see ``AUTO_CPU_INSTANCES``), each with its own session, so
instances run batches in parallel while the loop keeps serving.
Collating inputs and splitting outputs happen on that thread too, so a batch
costs the loop a single hop.

With ``device_execution`` (IO binding, CUDA graphs) each instance also owns a
:class:`~infergate.models.binding.BoundSession`, and batches run through it
instead of ``session.run``; see binding.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from infergate import threadnames
from infergate.errors import ModelExecutionError
from infergate.models.binding import (
    DEVICE_OF_PROVIDER,
    BindingPlan,
    BoundSession,
    plan_binding,
    skip_graph_run_options,
)
from infergate.models.config import PROVIDERS, ModelConfig
from infergate.models.cpus import affinity_cpus, model_cpus
from infergate.models.device_gate import CUDA_GATE, CudaGate
from infergate.models.spec import ModelSpec, Tensors, spec_from_graph
from infergate.models.stats import BatchTimings
from infergate.models.warmup import WarmupRun, describe_feeds, valid_inputs, warmup_runs

__all__ = [
    "AUTO_CPU_INSTANCES",
    "Instance",
    "ModelFile",
    "ModelLoadError",
    "OnnxRunner",
    "collate",
    "intra_op_threads",
    "split",
    "zero_inputs",
]

log = logging.getLogger(__name__)

# Niceness of a background (shadow) version's instance threads: the lowest CPU priority.
BACKGROUND_NICE = 19
# _batch_cost_us gives up on inline execution after one run this many times over the limit: the first
# (untimed: it pays allocations) or any later one.
_FIRST_RUN_FACTOR = 1000
_RUN_FACTOR = 10
# Inline batches judged at a time (OnnxRunner._judge_inline): enough that a median ignores the outliers.
INLINE_WINDOW = 32


_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelLoadError(Exception):
    """A model version could not be loaded; the message says why."""


@dataclass(frozen=True)
class ModelFile:
    """A model as onnxruntime opens it: ``path``, the file as named (for messages; its directory is the
    version's); ``source``, what each session reads: that path, the ``/proc/self/fd/N`` of a descriptor open
    on it, or its bytes; ``external_folder``, where each session reads the external data files the graph
    names, when not beside ``source`` (governance.py: the directory the files were hashed in)."""

    path: Path
    source: str | bytes
    external_folder: str | None = None

    def prepare(self, options: ort.SessionOptions) -> None:
        """Set what opening ``source`` takes on the options every session of the model is opened with."""
        if self.external_folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             self.external_folder)  # fmt: skip
        if self.path.suffix == ".ort":  # onnxruntime tells its own format by the name's suffix, which /proc/… has not
            options.add_session_config_entry("session.load_model_format", "ORT")

    def failure(self, exc: BaseException) -> str:
        """onnxruntime's reason for refusing the model, naming the file as named."""
        reason = _first_line(exc)
        return reason.replace(self.source, str(self.path)) if isinstance(self.source, str) else reason


def collate(payloads: Sequence[Tensors]) -> Tensors:
    """Stack the requests of a batch along the first dimension (one request: no copy)."""
    if len(payloads) == 1:
        return payloads[0]
    return {name: np.concatenate([p[name] for p in payloads]) for name in payloads[0]}


class UnbatchedOutput(Exception):
    """A batch's output whose first dimension is not the batch's rows: it cannot be cut per request."""


def split(
    names: Sequence[str], outputs: Sequence[npt.NDArray[Any]], rows: Sequence[int], *, padded: bool = False
) -> list[Tensors]:
    """Cut batched outputs back into one dict per request (views, no copy).

    Raises UnbatchedOutput when an output does not have the batch's rows first (``padded``: at least
    them): a graph whose symbolic first dimensions made it look batchable (a transpose, a count that
    depends on the data) would otherwise hand one request rows of another's.
    """
    if len(rows) == 1:
        return [dict(zip(names, outputs, strict=True))]
    total = sum(rows)
    for name, output in zip(names, outputs, strict=True):
        first = output.shape[0] if output.ndim else -1
        if first < total or (first != total and not padded):
            raise UnbatchedOutput(f"output {name!r} has {first} rows for a batch of {total}")
    results: list[Tensors] = []
    start = 0
    for count in rows:
        stop = start + count
        results.append({n: o[start:stop] for n, o in zip(names, outputs, strict=True)})
        start = stop
    return results


def _unbatched_outputs(session: ort.InferenceSession, spec: ModelSpec, run_options: Any = None) -> dict[str, str]:
    """The outputs whose first dimension is not the batch, each with what showed it; {} when none is.

    A graph batches when all its first dimensions are symbolic (or when its config sets
    ``max_batch_size``); but an output's need not be the batch (a transpose, a count that depends on
    the data), and batching such a model would hand requests each other's rows, or, bound to
    ``[rows, ...]`` buffers (IO binding), fail every batch. Two small batches of valid inputs tell.
    A graph that cannot run them gives {} (``split`` still checks every batch).
    """
    names = [o.name for o in session.get_outputs()]
    for rows in (2, 3):
        try:
            outputs = session.run(names, valid_inputs(spec, rows), run_options)
        except Exception:  # zeros do not suit every model
            return {}
        found = {
            name: f"{output.shape[0] if output.ndim else 'no'} rows for a batch of {rows}"
            for name, output in zip(names, outputs, strict=True)
            if output.ndim == 0 or output.shape[0] != rows
        }
        if found:
            return found
    return {}


def zero_inputs(spec: ModelSpec, rows: int) -> Tensors:
    """Zeros valid for each input's datatype (BYTES: ``"0"``), ``rows`` rows, 1 for other variable dims."""
    return valid_inputs(spec, rows)


def _warm_up(sessions: list[ort.InferenceSession], spec: ModelSpec, config: ModelConfig, model_dir: Path) -> None:
    """Run the warm-up requests on every session."""
    runs = _configured_warmup(spec, config, model_dir)
    for session in sessions:
        _run_warmup(functools.partial(session.run, None), runs)


def _configured_warmup(spec: ModelSpec, config: ModelConfig, model_dir: Path) -> list[WarmupRun]:
    try:
        return warmup_runs(spec, config, model_dir)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def _run_warmup(run_batch: Callable[[Tensors], object], runs: Sequence[WarmupRun], how: str = "") -> None:
    """Each of ``runs``, ``count`` times, through ``run_batch``; a failure names the run (and ``how`` it
    ran) and each input's value."""
    for run in runs:
        for _ in range(run.count):
            try:
                run_batch(run.feeds)
            except Exception as exc:
                raise ModelLoadError(
                    f"warm-up {run.name} failed{how}: {_first_line(exc)}; it fed {describe_feeds(run.feeds)}"
                ) from exc


Providers = list[tuple[str, dict[str, str]]]  # onnxruntime's names and their options, in order


def _new_session(model: str | bytes, options: ort.SessionOptions, providers: Providers) -> ort.InferenceSession:
    """An onnxruntime session without its Python wrapper's provider fallback.

    That fallback, on by default, re-creates a session whose provider raised at creation on the CPU (or
    TensorRT's on CUDA, device 0), without the providers' options and only printing why; and on an
    EPFail in ``run`` it re-creates the C session on them, under every IO binding made from the old one.
    Off, the error reaches the load (:func:`_first_session`) or the batch.
    """
    session = ort.InferenceSession(model, sess_options=options, providers=providers, enable_fallback=0)
    session.disable_fallback()  # the run-time half (enable_fallback=0 sets it too, in the versions that read it)
    return session


def _sessions(
    model: ModelFile, options: ort.SessionOptions, providers: Providers, count: int
) -> list[ort.InferenceSession]:
    try:
        return [_new_session(model.source, options, providers) for _ in range(count)]
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise ModelLoadError(f"onnxruntime cannot load {model.path}: {model.failure(exc)}") from exc


def _first_session(
    model: ModelFile, options: ort.SessionOptions, providers: Providers, config: ModelConfig, name: str
) -> tuple[ort.InferenceSession, Providers]:
    """The first session and the providers it came up with: a configured one that did not come up
    (it raised, or onnxruntime left it out of the session) fails the load, naming its field
    ``execution_providers.N`` and onnxruntime's reason; where the config lists ``cpu`` after it,
    a warning says so and the session is opened on the providers after it."""
    remaining = list(providers)
    while True:
        try:
            session = _new_session(model.source, options, remaining)
        except Exception as exc:  # onnxruntime raises several unrelated types
            failed = next((p for p, _ in remaining if p != "CPUExecutionProvider"), None)
            if failed is None or not _opens_on_cpu(model, options):  # the model's fault, not a provider's
                raise ModelLoadError(f"onnxruntime cannot load {model.path}: {model.failure(exc)}") from exc
            reason = model.failure(exc)
        else:
            came_up = session.get_providers()
            failed = next((p for p, _ in remaining if p not in came_up), None)
            if failed is None:
                return session, remaining
            del session
            reason = "onnxruntime left it out of the session (its log may say why)"
        index = _config_index(config, failed)
        field_name = f"execution_providers.{index} ({config.execution_providers[index].name})"
        if not any(p.name == "cpu" for p in config.execution_providers[index + 1 :]):
            raise ModelLoadError(f"{field_name} did not come up: {reason}")
        remaining = [(p, o) for p, o in remaining if p != failed]
        log.warning("model %s: %s did not come up: %s; running on %s, listed after it", name, field_name, reason,
                    remaining[0][0] if remaining else "CPUExecutionProvider")  # fmt: skip


def _opens_on_cpu(model: ModelFile, options: ort.SessionOptions) -> bool:
    try:
        _new_session(model.source, options, [("CPUExecutionProvider", {})])
    except Exception:
        return False
    return True


def _config_index(config: ModelConfig, ort_name: str) -> int:
    return next(i for i, p in enumerate(config.execution_providers) if PROVIDERS[p.name] == ort_name)


def _cpu_instances(
    model: ModelFile,
    options: ort.SessionOptions,
    providers: list[tuple[str, dict[str, str]]],
    spec: ModelSpec,
    config: ModelConfig,
    probe: list[ort.InferenceSession],
    cpus: int | None,
) -> list[ort.InferenceSession]:
    """The sessions of a CPU model with ``instance_group.count: auto``: ``AUTO_CPU_INSTANCES``, warmed up.

    ``probe`` holds the warmed-up session the load measured (it is emptied). Opened with an
    instance's threads, it becomes the first instance; otherwise it is freed before the others load
    (a large model's memory is not held twice over).
    """
    threads = intra_op_threads(config.session_options.intra_op_num_threads, AUTO_CPU_INSTANCES, True, cpus)
    kept = [s for s in probe if s.get_session_options().intra_op_num_threads == threads][:1]
    probe.clear()
    options.intra_op_num_threads = threads
    added = _sessions(model, options, providers, AUTO_CPU_INSTANCES - len(kept))
    _warm_up(added, spec, config, model.path.parent.parent)
    sessions = kept + added
    log.info("model %s version %d: %d instances, %d intra-op thread(s) each (instance_group.count auto)",
             spec.name, spec.version, AUTO_CPU_INSTANCES, threads)  # fmt: skip
    return sessions


def intra_op_threads(configured: int, instances: int, on_cpu: bool, cpus: int | None) -> int:
    """Each session's intra-op threads: as configured; unset (0) on the CPU, the models' CPUs (``cpus``,
    see cpus.py; None: every CPU the process may run on) shared out among the instances. One instance
    with every CPU keeps onnxruntime's own choice; several would fight over the cores with it."""
    if configured or not on_cpu:
        return configured
    if cpus is None:
        return 0 if instances == 1 else max(1, affinity_cpus() // instances)
    return max(1, cpus // instances)


def _session_options(config: ModelConfig) -> ort.SessionOptions:
    opts = config.session_options
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_num_threads
    so.inter_op_num_threads = opts.inter_op_num_threads
    so.graph_optimization_level = _OPT_LEVELS[opts.graph_optimization_level]
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if opts.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    spin = "1" if opts.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.log_severity_level = 3  # errors only; infergate logs what matters
    return so


def _providers(config: ModelConfig, name: str) -> list[tuple[str, dict[str, str]]]:
    """The configured providers this onnxruntime has, in order; fails if none is."""
    available = set(ort.get_available_providers())
    chosen = []
    missing = []
    for provider in config.execution_providers:
        ort_name = PROVIDERS[provider.name]
        if ort_name in available:
            options = {k: str(v) for k, v in provider.options.items()}
            if provider.name == "cuda" and config.device_execution.graphs:
                options["enable_cuda_graph"] = "1"  # replayed only through binding.BoundSession's buckets
            chosen.append((ort_name, options))
        else:
            missing.append(provider.name)
    if not chosen:
        raise ModelLoadError(
            f"execution providers {missing} are not available in this onnxruntime "
            f"(it has {sorted(available)}); install the matching onnxruntime build "
            "(e.g. the `gpu` extra) or list a fallback such as `cpu`"
        )
    if missing:
        log.warning("model %s: providers %s unavailable, using %s", name, missing, chosen[0][0])
    return chosen


Run = Callable[[list[str], Tensors, Any], list[Any]]  # (output names, feeds, run options or None): outputs


def plain_run(session: ort.InferenceSession) -> Run:
    """How a batch calls ``session``: its ``run``, or on a CPU-only session the binding underneath.

    Why not always ``session.run``: its Python wrapper checks the feed's names (the request's decode
    did, and onnxruntime's C++ checks them again) and catches EPFail (its fallback, off: see
    :func:`_new_session`). On a tiny model that doubles the call: about 10 µs against
    4 µs in a warm loop, 46 to 70 against 32 to 37 µs with cold caches, as one request in flight runs.
    Sessions with any other provider keep the wrapper.
    """
    inner = getattr(session, "_sess", None)
    if inner is None or session.get_providers() != ["CPUExecutionProvider"]:
        return session.run  # type: ignore[no-any-return]
    return inner.run  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Instance:
    """What one instance thread owns: a session, how to run it, and with IO binding, its bound buffers."""

    session: ort.InferenceSession
    bound: BoundSession | None = None
    run: Run = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", plain_run(self.session))


# Instances of a CPU model with ``instance_group.count: auto`` (Triton's default for onnxruntime models).
AUTO_CPU_INSTANCES = 2


class OnnxRunner:
    """``instance_count`` onnxruntime sessions of one model file and the threads that run them."""

    def __init__(self, sessions: list[ort.InferenceSession], spec: ModelSpec, bound: list[BoundSession] | None = None):
        self.spec = spec
        self._output_names = [o.name for o in sessions[0].get_outputs()]
        self.providers: list[str] = sessions[0].get_providers()
        instances = [Instance(s, bound[i] if bound else None) for i, s in enumerate(sessions)]
        # How batches run, for logs and checks: "session.run" or BindingPlan.describe().
        self.execution = bound[0].plan.describe() if bound else "session.run"
        # On a CUDA device, batches keep clear of graph captures (device_gate.py); on the CPU, no gate.
        self._gate: CudaGate | None = CUDA_GATE if self.providers[0] in DEVICE_OF_PROVIDER else None
        self._instances = _InstanceThreads(instances, self._run_sync, name=f"ort-{spec.name}")
        self._inline: Instance | None = None  # set by run_inline_below: batches run on the caller's thread
        self._inline_limit_ns = 0
        self._inline_elements: dict[str, int] = {}  # per input, the most elements of a batch run inline
        self._inline_times: list[int] = []  # the runtime's ns for each inline batch of the current window
        self._unbatched = False  # an output was found not to follow the batch (see _one_by_one)

    @classmethod
    def load(
        cls, model: Path | ModelFile, config: ModelConfig, name: str, version: int, cpus: int | None = None
    ) -> OnnxRunner:
        """Create the sessions (blocking: call from a thread) and warm them up.

        ``model``: a file's path, which every session opens by name, or what ``governance.open_verified``
        hashed, which every session reads through what it holds open (the file, its directory).

        ``cpus``: how many CPUs the sessions' threads share when the config leaves their number to the
        server (``intra_op_num_threads`` 0); None: :func:`~infergate.models.cpus.model_cpus` of this
        process. The calling thread is called ``ort-<model>`` meanwhile, so that the threads
        onnxruntime starts for the sessions carry that name (see threadnames.py).
        """
        if cpus is None:
            cpus = model_cpus()
        if isinstance(model, Path):
            model = ModelFile(model, str(model))
        providers = _providers(config, name)
        # A model whose first provider is a CUDA device loads in turn with the others there (device_gate.py).
        on_device = providers[0][0] in DEVICE_OF_PROVIDER
        with threadnames.named(f"ort-{name}"), CUDA_GATE.loading() if on_device else contextlib.nullcontext():
            try:
                return cls._load(model, config, name, version, providers, cpus)
            except BaseException as exc:
                # The failed load's sessions live on in the traceback's frames: destroy them now, in turn.
                traceback.clear_frames(exc.__traceback__)
                raise

    @classmethod
    def _load(
        cls,
        model: ModelFile,
        config: ModelConfig,
        name: str,
        version: int,
        providers: list[tuple[str, dict[str, str]]],
        cpus: int | None,
    ) -> OnnxRunner:
        options = _session_options(config)
        model.prepare(options)
        requested = None if config.instance_group.count == "auto" else config.instance_group.count
        on_cpu = providers[0][0] == "CPUExecutionProvider"
        count = requested or 1  # auto: one session first; a CPU model that proves not tiny gets more (below)
        # One that may end as several instances opens its first with an instance's share of the CPUs, so
        # that it can stay as the first instance: a model that is not tiny then loads each session once.
        # On one CPU a second instance would only hold the weights twice.
        may_grow = (
            requested is None
            and config.sequence_batching is None
            and config.device_execution.io_binding is not True
            and (cpus if cpus is not None else affinity_cpus()) >= AUTO_CPU_INSTANCES
        )
        configured = config.session_options.intra_op_num_threads
        instances = AUTO_CPU_INSTANCES if may_grow else count
        options.intra_op_num_threads = intra_op_threads(configured, instances, on_cpu, cpus)
        first, providers = _first_session(model, options, providers, config, name)
        sessions = [first, *_sessions(model, options, providers, count - 1)]
        actual = sessions[0].get_providers()[0]  # one of ``providers``: _first_session saw each come up
        unbatched: dict[str, str] = {}
        try:
            spec = spec_from_graph(
                name, version, sessions[0].get_inputs(), sessions[0].get_outputs(), config.max_batch_size
            )
            plan = plan_binding(config.device_execution, actual, dict(providers)[actual], spec)
            # Probed where the config leaves batching to the graph, or where batches bind their outputs.
            if spec.batches and (config.max_batch_size is None or plan is not None):
                # A session with CUDA graphs must not run outside its buckets: session.run would capture a
                # graph on buffers that change.
                run_options = skip_graph_run_options() if plan is not None and plan.graph_sizes else None
                unbatched = _unbatched_outputs(sessions[0], spec, run_options)
            if unbatched and config.max_batch_size is None:
                output, seen = next(iter(unbatched.items()))
                log.warning("model %s: output %r has %s: its first dimension is not the batch, so it is served "
                            "without batching (set max_batch_size in config.yaml to say otherwise)", name, output,
                            seen)  # fmt: skip
                spec = dataclasses.replace(spec, max_batch_size=0)
                unbatched = {}
                plan = plan_binding(config.device_execution, actual, dict(providers)[actual], spec)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        # The repository keeps a version's files in <model>/<version>/, so <model>/warmup/ is two levels up.
        model_dir = model.path.parent.parent
        if plan is None:
            # Before any thread starts: a failure leaves nothing behind.
            _warm_up(sessions, spec, config, model_dir)
        bound = _bind(sessions, spec, plan, config, model_dir, set(unbatched)) if plan is not None else None
        if plan is not None:
            log.info("model %s version %d: %s", name, version, plan.describe())
        limit_us = config.instance_group.inline_max_microseconds
        if limit_us and len(sessions) == 1 and actual == "CPUExecutionProvider" and bound is None:
            threads = options.intra_op_num_threads
            chosen = configured == 0  # threads chosen by onnxruntime or by the share above, not by the config
            # Threads not set in the config: on the event loop a tiny model runs on one thread, since waiting
            # for a pool thread to wake up would hold the loop longer than the whole product takes. The calling
            # thread's share of the work screens out the models that are not tiny before another session.
            if chosen and threads != 1:
                if _batch_cost_us(sessions[0], spec, limit_us, thread_cpu=True) <= limit_us:
                    options.intra_op_num_threads = threads = 1
                    sessions = _sessions(model, options, providers, 1)
                    _warm_up(sessions, spec, config, model_dir)
            measured = threads == 1 or not chosen
            cost_us = _batch_cost_us(sessions[0], spec, limit_us, thread_cpu=threads == 1) if measured else math.inf
            if cost_us <= limit_us:
                runner = cls(sessions, spec, bound)
                runner.run_inline_below(limit_us, {n: a.size for n, a in _timed_batch(spec).items()})
                log.info("model %s version %d: batches run on the event loop (%.0f µs each)", name, version,
                         cost_us)  # fmt: skip
                return runner
            log.info("model %s version %d: batches run on a thread (largest batch over %d µs)", name, version,
                     limit_us)  # fmt: skip
        if may_grow and actual == "CPUExecutionProvider" and plan is None:
            sessions = _cpu_instances(model, options, providers, spec, config, probe=sessions, cpus=cpus)
        return cls(sessions, spec, bound)

    @property
    def instance_count(self) -> int:
        """Sessions running batches in parallel: ``instance_group.count``, or what ``auto`` came to."""
        return len(self._instances.instances)

    def start(self, payloads: list[Tensors], rows: list[int], callback: Callback) -> None:
        """Run one batch on a free instance, off the event loop (an inline model's, when no larger than
        the batch timed at load: right here).

        ``callback`` gets ``(results, timings)`` or the exception, on the event loop.
        """
        inline = self._inline
        if inline is None or not self._within_timed(payloads):
            self._instances.submit(payloads, rows, callback)
            return
        outcome: BatchOutcome | BaseException
        try:
            outcome = self._run_sync(inline, payloads, rows)
        except Exception as exc:
            outcome = exc
        else:
            self._judge_inline(outcome[1].infer_ns)
        callback(outcome)

    def _within_timed(self, payloads: list[Tensors]) -> bool:
        """Whether no input of the batch has more elements than in the batch timed at load.

        Why: the load times one batch (``_timed_batch``: the largest, 64 rows at most, and 1 for every other
        variable dimension), and says nothing of a larger one. A request with a variable dimension can be
        millions of elements, and on the event loop its run would stop everything else the server does.
        Within those elements a batch's cost stays within the timed one's (the models' cost grows with their
        inputs); past them it goes to the instance thread, whatever it turns out to cost.
        """
        for name, most in self._inline_elements.items():
            elements = 0
            for payload in payloads:
                array = payload.get(name)
                if array is not None:
                    elements += array.size
            if elements > most:
                return False
        return True

    def _judge_inline(self, infer_ns: int) -> None:
        """Back to the thread when the median batch of a window of ``INLINE_WINDOW`` took too long.

        The median, not a mean: when ``session.run`` releases the GIL, another thread
        may hold it for a whole switch interval (5 ms) before the loop gets it back.
        Such batches are rare but would push any average over the limit on their own,
        and one-way, for a model that is tiny on every other batch.
        """
        times = self._inline_times
        times.append(infer_ns)
        if len(times) < INLINE_WINDOW:
            return
        median_ns = sorted(times)[INLINE_WINDOW // 2]
        times.clear()
        if median_ns > self._inline_limit_ns:
            self._inline = None  # slower than measured (bigger inputs, a busy machine): back to its thread
            log.warning("model %s: batches took %.0f µs on the event loop; they run on a thread from now",
                        self.spec.name, median_ns / 1e3)  # fmt: skip

    def run_inline_below(self, limit_us: int, elements: dict[str, int]) -> None:
        """Run batches on the caller's thread (the event loop) until they take 4 times ``limit_us`` (median);
        only those with at most ``elements`` in each input (the batch timed at load), the others on the thread.

        Why: for a model whose batches take microseconds, handing each batch to a
        thread and its answer back (a queue put that wakes the thread, the GIL
        passed back and forth, a self-pipe write that wakes the loop) costs the
        event loop more than running it; measured in BENCHMARKS.md. Only for one
        instance: several instances exist to run in parallel.
        """
        self._inline = self._instances.instances[0]
        self._inline_limit_ns = 4 * limit_us * 1000
        self._inline_elements = dict(elements)
        self._inline_times.clear()

    @property
    def inline(self) -> bool:
        return self._inline is not None

    def set_background(self, background: bool) -> None:
        """Run later batches at the lowest CPU priority (a shadow's), or back at normal priority.

        A background version never runs on the event loop: it must not take time from the callers.
        """
        self._instances.nice = BACKGROUND_NICE if background else 0
        if background:
            self._inline = None

    def _run_sync(self, instance: Instance, payloads: list[Tensors], rows: list[int]) -> BatchOutcome:
        if self._gate is None:
            return self._run_batch(instance, payloads, rows)
        with self._gate.shared():
            return self._run_batch(instance, payloads, rows)

    def _run_batch(self, instance: Instance, payloads: list[Tensors], rows: list[int]) -> BatchOutcome:
        if instance.bound is not None:
            return self._run_bound(instance, instance.bound, payloads, rows)
        t0 = time.perf_counter_ns()
        feeds = collate(payloads)
        t1 = time.perf_counter_ns()
        try:
            outputs = instance.run(self._output_names, feeds, None)
        except Exception as exc:
            results = self._isolate(instance, payloads, exc)
            t2 = time.perf_counter_ns()
            return results, BatchTimings(t1 - t0, t2 - t1, 0)
        t2 = time.perf_counter_ns()
        try:
            results_ok: list[Tensors | Exception] = list(split(self._output_names, outputs, rows))
        except UnbatchedOutput as exc:
            results_ok = self._one_by_one(instance, payloads, exc)
        t3 = time.perf_counter_ns()
        return results_ok, BatchTimings(t1 - t0, t2 - t1, t3 - t2)

    def _run_bound(
        self, instance: Instance, bound: BoundSession, payloads: list[Tensors], rows: list[int]
    ) -> BatchOutcome:
        """Stage (collate, padded for a graph), copy once, run and split: see binding.py."""
        t0 = time.perf_counter_ns()
        try:
            staged = bound.stage(payloads, sum(rows))
            t1 = time.perf_counter_ns()
            outputs = bound.execute(staged)
        except Exception as exc:
            t1 = time.perf_counter_ns()
            results = self._isolate(instance, payloads, exc)
            return results, BatchTimings(t1 - t0, time.perf_counter_ns() - t1, 0)
        t2 = time.perf_counter_ns()
        try:
            # execute() cuts a graph's padding rows off: an output with more rows than the batch does not follow it.
            results_ok: list[Tensors | Exception] = list(split(self._output_names, outputs, rows))
        except UnbatchedOutput as exc:
            results_ok = self._one_by_one(instance, payloads, exc)
        t3 = time.perf_counter_ns()
        return results_ok, BatchTimings(t1 - t0, t2 - t1, t3 - t2)

    def _one_by_one(
        self, instance: Instance, payloads: list[Tensors], cause: UnbatchedOutput
    ) -> list[Tensors | Exception]:
        """The batch again, one request at a time: its outputs could not be cut per request."""
        if not self._unbatched:  # said once: every batch of several requests of this model is run so
            self._unbatched = True
            log.warning("model %s: %s, so its first dimension is not the batch; batches of several requests "
                        "run one request at a time (set max_batch_size: 0 in its config.yaml)", self.spec.name,
                        cause)  # fmt: skip
        return self._each_alone(instance, payloads)

    def _isolate(self, instance: Instance, payloads: list[Tensors], error: Exception) -> list[Tensors | Exception]:
        """After a failed batch, run each request alone so only the ones that fail get an error."""
        if len(payloads) == 1:
            return [self._execution_error(error)]
        log.warning("model %s: a batch of %d failed; retrying one by one", self.spec.name, len(payloads))
        return self._each_alone(instance, payloads)

    def _each_alone(self, instance: Instance, payloads: list[Tensors]) -> list[Tensors | Exception]:
        run_options = instance.bound.plain_run_options if instance.bound is not None else None
        results: list[Tensors | Exception] = []
        for payload in payloads:
            try:
                outputs = instance.session.run(self._output_names, payload, run_options)
                results.append(dict(zip(self._output_names, outputs, strict=True)))
            except Exception as exc:
                results.append(self._execution_error(exc))
        return results

    def _execution_error(self, cause: Exception) -> ModelExecutionError:
        log.error("model %s version %d failed to execute: %s", self.spec.name, self.spec.version, cause)
        error = ModelExecutionError(
            f"model {self.spec.name} version {self.spec.version} failed to execute the request "
            "(the server log has the cause)"
        )
        error.__cause__ = cause
        return error

    def close(self) -> None:
        """Stop the threads (after the batcher drained) and drop the sessions.

        On a CUDA device, in turn with loads: a session destroyed while another model captures
        a graph would abort the process (device_gate.py).
        """
        with self._gate.loading() if self._gate is not None else contextlib.nullcontext():
            self._instances.close()
            self._instances.instances.clear()  # the last references to a device's sessions: destroyed here


def _bind(
    sessions: list[ort.InferenceSession],
    spec: ModelSpec,
    plan: BindingPlan,
    config: ModelConfig,
    model_dir: Path,
    unbatched: set[str],
) -> list[BoundSession]:
    """Allocate each session's bound buffers, capture its CUDA graphs, and run the configured warm-up
    (``model_warmup``, else ``warmup``) through them, as batches run: a session with graphs must not run
    outside its buckets, and a binding that cannot work for this model fails here, not on a request."""
    runs = _configured_warmup(spec, config, model_dir)
    bound = []
    for session in sessions:
        try:
            instance = BoundSession(session, spec, plan, unbatched)
            instance.capture_graphs(lambda rows: zero_inputs(spec, rows))
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelLoadError(f"{plan.describe()} failed at load: {_first_line(exc)}") from exc
        _run_warmup(instance.run, runs, f" ({plan.describe()})")
        bound.append(instance)
    return bound


BatchOutcome = tuple[list[Tensors | Exception], BatchTimings]
RunBatch = Callable[[Instance, list[Tensors], list[int]], BatchOutcome]
Callback = Callable[[BatchOutcome | BaseException], None]
Job = tuple[asyncio.AbstractEventLoop, Callback, list[Tensors], list[int]]


class _InstanceThreads:
    """One thread per instance, each owning its session (and bound buffers), fed from one job queue.

    Written instead of ``loop.run_in_executor``: for small models the
    concurrent.futures chain (submit lock, wrapped future, two callbacks) was a
    measurable share of the event loop's time per batch (see BENCHMARKS.md).
    Here a job costs the loop one ``SimpleQueue.put`` and one callback.
    """

    def __init__(self, instances: list[Instance], run: RunBatch, name: str):
        self.instances = instances
        self._run = run
        self.nice = 0  # wanted niceness of the instance threads; each applies it before its next batch
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, args=(instance,), name=f"{name}-{i}", daemon=True)
            for i, instance in enumerate(instances)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, payloads: list[Tensors], rows: list[int], callback: Callback) -> None:
        self._jobs.put((asyncio.get_running_loop(), callback, payloads, rows))

    def _serve(self, instance: Instance) -> None:
        threadnames.name_after_python()
        nice = 0
        while (job := self._jobs.get()) is not None:
            if self.nice != nice:
                nice = self.nice
                _set_thread_nice(nice)
            loop, callback, payloads, rows = job
            outcome: BatchOutcome | BaseException
            try:
                outcome = self._run(instance, payloads, rows)
            except BaseException as exc:  # delivered to the event loop, like a result
                outcome = exc
            try:
                loop.call_soon_threadsafe(callback, outcome)
            except RuntimeError:  # the loop closed while the batch ran; nobody waits any more
                pass
            # Hold nothing of this batch while waiting for the next: its inputs may be views of a
            # client's shared memory, which stays mapped for as long as anything refers to it.
            del job, loop, callback, payloads, rows, outcome

    def close(self) -> None:
        """Finish queued jobs, then stop the threads."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


def _batch_cost_us(session: ort.InferenceSession, spec: ModelSpec, limit_us: int, thread_cpu: bool) -> float:
    """What the largest batch (64 rows at most) costs, in µs: the fastest of five runs, after one untimed run.

    On the thread's CPU clock, a model far over ``limit_us`` stops early, with the time of the run
    that showed it: an untimed run over ``_FIRST_RUN_FACTOR`` times the limit (a first run pays
    allocations, so the margin is wide), or a timed one over ``_RUN_FACTOR`` times. Five more runs
    of a large model's largest batch would add seconds to every load and reload, to learn what one
    run already said. (A wall-clock run can be slow because the machine is busy: no early stop.)

    The fastest, because models loading beside this one, each in its own thread,
    make some runs wait for the GIL or for a core and never make one faster.
    With ``thread_cpu`` the clock is the calling thread's CPU time, which counts
    no such wait (on a single-threaded session, all of the work): with the
    median of wall-clock times, the demo's ``matmul16`` (about 20 µs) stayed on
    its thread in some server starts and not in others. Should batches cost
    more on the event loop later, the runtime check (``OnnxRunner._judge_inline``)
    sends the model back.
    """
    feeds = _timed_batch(spec)
    clock = time.thread_time_ns if thread_cpu else time.perf_counter_ns
    times = []
    for run in range(6):
        started = clock()
        try:
            session.run(None, feeds)
        except Exception:  # zeros do not suit every model (warm-up has its own data): not inline then
            return float("inf")
        times.append(clock() - started)
        if thread_cpu and times[-1] / 1e3 > limit_us * (_FIRST_RUN_FACTOR if run == 0 else _RUN_FACTOR):
            return times[-1] / 1e3
    return min(times[1:]) / 1e3


def _timed_batch(spec: ModelSpec) -> Tensors:
    """The batch ``_batch_cost_us`` times: the largest, 64 rows at most, 1 for every other variable dimension."""
    return zero_inputs(spec, min(max(spec.max_batch_size, 1), 64))


def _set_thread_nice(nice: int) -> None:
    """Set the calling thread's niceness (on Linux it is per thread).

    Why: a shadow version must not take CPU from the versions that answer
    callers. At niceness 19 its thread only gets the cores the others leave
    idle. Raising niceness is always allowed; lowering it again (a shadow that
    becomes a primary) needs CAP_SYS_NICE, so without it the thread stays low.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError) as exc:  # no permission, or not Linux
        log.warning("cannot set thread niceness to %d: %s", nice, exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
