"""onnxruntime execution: sessions, providers, warm-up, and running one batch.

``session.run`` never runs on the event loop: each model version owns one
thread per instance (``instance_group.count``), each with its own session, so
instances run batches in parallel while the loop keeps serving.
Collating inputs and splitting outputs happen on that thread too, so a batch
costs the loop a single hop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from infergate.errors import ModelExecutionError
from infergate.models.config import PROVIDERS, ModelConfig
from infergate.models.spec import ModelSpec, Tensors, spec_from_graph
from infergate.models.stats import BatchTimings
from infergate.models.warmup import describe_feeds, valid_inputs, warmup_runs

__all__ = ["ModelLoadError", "OnnxRunner", "collate", "split", "zero_inputs"]

log = logging.getLogger(__name__)

# Niceness of a background (shadow) version's instance threads: the lowest CPU priority.
BACKGROUND_NICE = 19


_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelLoadError(Exception):
    """A model version could not be loaded; the message says why."""


def collate(payloads: Sequence[Tensors]) -> Tensors:
    """Stack the requests of a batch along the first dimension (one request: no copy)."""
    if len(payloads) == 1:
        return payloads[0]
    return {name: np.concatenate([p[name] for p in payloads]) for name in payloads[0]}


def split(names: Sequence[str], outputs: Sequence[npt.NDArray[Any]], rows: Sequence[int]) -> list[Tensors]:
    """Cut batched outputs back into one dict per request (views, no copy)."""
    if len(rows) == 1:
        return [dict(zip(names, outputs, strict=True))]
    results: list[Tensors] = []
    start = 0
    for count in rows:
        stop = start + count
        results.append({n: o[start:stop] for n, o in zip(names, outputs, strict=True)})
        start = stop
    return results


def zero_inputs(spec: ModelSpec, rows: int) -> Tensors:
    """Zeros valid for each input's datatype (BYTES: ``"0"``), ``rows`` rows, 1 for other variable dims."""
    return valid_inputs(spec, rows)


def _warm_up(sessions: list[ort.InferenceSession], spec: ModelSpec, config: ModelConfig, model_dir: Path) -> None:
    """Run the warm-up requests on every session; a failure names the run and each input's value."""
    try:
        runs = warmup_runs(spec, config, model_dir)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    for run in runs:
        for session in sessions:
            for _ in range(run.count):
                try:
                    session.run(None, run.feeds)
                except Exception as exc:
                    raise ModelLoadError(
                        f"warm-up {run.name} failed: {_first_line(exc)}; it fed {describe_feeds(run.feeds)}"
                    ) from exc


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
            chosen.append((ort_name, {k: str(v) for k, v in provider.options.items()}))
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


class OnnxRunner:
    """``instance_count`` onnxruntime sessions of one model file and the threads that run them."""

    def __init__(self, sessions: list[ort.InferenceSession], spec: ModelSpec):
        self.spec = spec
        self._output_names = [o.name for o in sessions[0].get_outputs()]
        self.providers: list[str] = sessions[0].get_providers()
        self._instances = _InstanceThreads(sessions, self._run_sync, name=f"ort-{spec.name}")

    @classmethod
    def load(cls, path: Path, config: ModelConfig, name: str, version: int) -> OnnxRunner:
        """Create the sessions (blocking: call from a thread) and warm them up."""
        providers = _providers(config, name)
        options = _session_options(config)
        try:
            sessions = [
                ort.InferenceSession(str(path), sess_options=options, providers=providers)
                for _ in range(config.instance_group.count)
            ]
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from exc
        actual = sessions[0].get_providers()[0]
        if actual not in [p for p, _ in providers]:
            raise ModelLoadError(f"onnxruntime fell back to {actual}, which the config does not list")
        try:
            spec = spec_from_graph(
                name, version, sessions[0].get_inputs(), sessions[0].get_outputs(), config.max_batch_size
            )
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        # Before any thread starts: a failure leaves nothing behind. The repository keeps a
        # version's files in <model>/<version>/, so <model>/warmup/ is two levels up.
        _warm_up(sessions, spec, config, path.parent.parent)
        return cls(sessions, spec)

    def start(self, payloads: list[Tensors], rows: list[int], callback: Callback) -> None:
        """Run one batch on a free instance, off the event loop.

        ``callback`` gets ``(results, timings)`` or the exception, on the event loop.
        """
        self._instances.submit(payloads, rows, callback)

    def set_background(self, background: bool) -> None:
        """Run later batches at the lowest CPU priority (a shadow's), or back at normal priority."""
        self._instances.nice = BACKGROUND_NICE if background else 0

    def _run_sync(
        self, session: ort.InferenceSession, payloads: list[Tensors], rows: list[int]
    ) -> tuple[list[Tensors | Exception], BatchTimings]:
        t0 = time.perf_counter_ns()
        feeds = collate(payloads)
        t1 = time.perf_counter_ns()
        try:
            outputs = session.run(self._output_names, feeds)
        except Exception as exc:
            results = self._isolate(session, payloads, exc)
            t2 = time.perf_counter_ns()
            return results, BatchTimings(t1 - t0, t2 - t1, 0)
        t2 = time.perf_counter_ns()
        results_ok: list[Tensors | Exception] = list(split(self._output_names, outputs, rows))
        t3 = time.perf_counter_ns()
        return results_ok, BatchTimings(t1 - t0, t2 - t1, t3 - t2)

    def _isolate(
        self, session: ort.InferenceSession, payloads: list[Tensors], error: Exception
    ) -> list[Tensors | Exception]:
        """After a failed batch, run each request alone so only the ones that fail get an error."""
        if len(payloads) == 1:
            return [self._execution_error(error)]
        log.warning("model %s: a batch of %d failed; retrying one by one", self.spec.name, len(payloads))
        results: list[Tensors | Exception] = []
        for payload in payloads:
            try:
                outputs = session.run(self._output_names, payload)
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
        """Stop the threads (after the batcher drained) and drop the sessions."""
        self._instances.close()


BatchOutcome = tuple[list[Tensors | Exception], BatchTimings]
RunBatch = Callable[[ort.InferenceSession, list[Tensors], list[int]], BatchOutcome]
Callback = Callable[[BatchOutcome | BaseException], None]
Job = tuple[asyncio.AbstractEventLoop, Callback, list[Tensors], list[int]]


class _InstanceThreads:
    """One thread per instance, each owning its session, fed from one job queue.

    Written instead of ``loop.run_in_executor``: for small models the
    concurrent.futures chain (submit lock, wrapped future, two callbacks) was a
    measurable share of the event loop's time per batch (see BENCHMARKS.md).
    Here a job costs the loop one ``SimpleQueue.put`` and one callback.
    """

    def __init__(self, sessions: list[ort.InferenceSession], run: RunBatch, name: str):
        self._run = run
        self.nice = 0  # wanted niceness of the instance threads; each applies it before its next batch
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, args=(session,), name=f"{name}-{i}", daemon=True)
            for i, session in enumerate(sessions)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, payloads: list[Tensors], rows: list[int], callback: Callback) -> None:
        self._jobs.put((asyncio.get_running_loop(), callback, payloads, rows))

    def _serve(self, session: ort.InferenceSession) -> None:
        nice = 0
        while (job := self._jobs.get()) is not None:
            if self.nice != nice:
                nice = self.nice
                _set_thread_nice(nice)
            loop, callback, payloads, rows = job
            outcome: BatchOutcome | BaseException
            try:
                outcome = self._run(session, payloads, rows)
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
