"""Per model version: the drift monitor, the payload log, and ``load_monitor`` that builds them at load.

The request path's only contact is :meth:`ModelMonitor.record` (or
:meth:`DriftMonitor.observe` / :meth:`PayloadLog.offer` directly), called on
the event loop once a request's outputs are ready. It samples with an
injected RNG and hands references to the arrays to a bounded background
accumulator; it never copies a tensor, never blocks and never raises.

On the accumulator's thread, :class:`DriftMonitor` appends sampled rows to
its sliding window and recomputes every feature's score after
``update_every`` sampled requests or ``update_interval_seconds``, whichever
comes first. Each computation publishes an immutable :class:`DriftSnapshot`
(read by the metrics reader and the admin RPC without locks) and logs one
structured line when the version enters or leaves alert; it also tells
:class:`DriftEvents` (the audit log), when one was connected with
:meth:`ModelMonitor.report_alerts_to` before the version started.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

from infergate.configfile import ConfigError
from infergate.models.config import ModelConfig
from infergate.models.runner import ModelLoadError
from infergate.models.spec import ModelSpec
from infergate.monitoring.accumulator import QUEUE_BYTES, Accumulator, Sampler, kept_inputs, tensor_bytes
from infergate.monitoring.config import DriftConfig
from infergate.monitoring.payload_log import PayloadLog, open_payload_log
from infergate.monitoring.profile import ReferenceProfile, check_profile, read_profile
from infergate.monitoring.window import DriftWindow, FeatureScore

__all__ = ["DriftEvents", "DriftMonitor", "DriftSnapshot", "ModelMonitor", "load_monitor"]

log = logging.getLogger("infergate.drift")

Tensors = dict[str, npt.NDArray[Any]]
_TOP_IN_LOG = 5


class DriftEvents(Protocol):
    """Told when a version enters or leaves drift alert (the audit log).

    Called on the drift monitor's own thread, so it must be thread-safe, cheap, and never raise.
    """

    def drift_alert_entered(
        self, model: str, version: int | str | None, reason: str, detail: Mapping[str, Any] | None = None
    ) -> None: ...

    def drift_alert_left(
        self, model: str, version: int | str | None, reason: str = "", detail: Mapping[str, Any] | None = None
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class DriftSnapshot:
    """What the last computation found: ``scores`` over the window as it was when ``scored_rows`` rows had
    been added, at ``updated_at`` (Unix time; None: no score yet). ``fill`` and ``rows`` are current."""

    scores: tuple[FeatureScore, ...] = ()
    fill: int = 0
    rows: int = 0
    scored_rows: int = 0
    updated_at: float | None = None
    alert: bool = False
    updates: int = 0

    def top(self, count: int) -> list[FeatureScore]:
        """The ``count`` highest scores, highest first."""
        return sorted(self.scores, key=lambda s: s.score, reverse=True)[:count]


class DriftMonitor:
    """Compares a sample of one version's live traffic with its reference profile, in the background."""

    def __init__(
        self,
        model: str,
        version: int,
        profile: ReferenceProfile,
        config: DriftConfig,
        *,
        batches: bool,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.model, self.version, self.config = model, version, config
        self._sampler = Sampler(config.sample_fraction, rng)
        self.rejected = 0  # sampled requests whose tensors did not fit the profile
        self.events: DriftEvents | None = None  # set before start (ModelMonitor.report_alerts_to); read on the thread
        self._clock, self._wall_clock = clock, wall_clock
        self._window = DriftWindow(profile, config.window, batches)
        self._snapshot = DriftSnapshot()
        self._pending = 0  # sampled requests since the last computation
        self._last = clock()
        self._accumulator: Accumulator[tuple[Tensors, Tensors]] = Accumulator(
            f"drift {model}:{version}",
            self._process,
            capacity=config.queue_size,
            max_bytes=QUEUE_BYTES,
            tick=self._tick,
            tick_seconds=min(config.update_interval_seconds, 1.0),
        )

    @property
    def requests(self) -> int:
        return self._sampler.requests

    @property
    def sampled(self) -> int:
        return self._sampler.sampled

    @property
    def dropped(self) -> int:
        """Sampled requests dropped because the accumulator's queue was full."""
        return self._accumulator.dropped

    def snapshot(self) -> DriftSnapshot:
        return self._snapshot

    # --- the event loop ----------------------------------------------------------------------

    def observe(self, inputs: Tensors, outputs: Tensors) -> None:
        """One answered request (all of its inputs and outputs): sampled, then queued, its inputs copied
        (``kept_inputs``); everything else happens on the monitor's thread."""
        try:
            if not self._sampler.draw():
                return
            kept = kept_inputs(inputs)
            self._accumulator.offer((kept, outputs), tensor_bytes(kept, outputs))
        except Exception:  # pragma: no cover - nothing above raises; the caller must never see it if it did
            log.debug("drift observe failed", exc_info=True)

    def start(self) -> None:
        self._accumulator.start()

    async def aclose(self) -> None:
        await self._accumulator.aclose()

    # --- the accumulator's thread ------------------------------------------------------------

    def _process(self, items: list[tuple[Tensors, Tensors]]) -> None:
        rows = 0
        for inputs, outputs in items:
            try:
                rows += self._window.add(inputs, outputs)
            except Exception as exc:  # one odd request costs its own sample, never the batch or the thread
                self.rejected += 1
                if self.rejected == 1:
                    log.warning("model %s version %d: a sampled request does not fit the profile: %s",
                                self.model, self.version, exc)  # fmt: skip
        self._pending += len(items)
        due = self._pending >= self.config.update_every
        if due or self._clock() - self._last >= self.config.update_interval_seconds:
            self._score(rows)
        else:
            self._snapshot = replace(self._snapshot, fill=self._window.fill, rows=self._snapshot.rows + rows)

    def _tick(self) -> None:
        if self._pending and self._clock() - self._last >= self.config.update_interval_seconds:
            self._score(0)

    def _score(self, new_rows: int) -> None:
        self._pending, self._last = 0, self._clock()
        before = self._snapshot
        fill = self._window.fill
        rows = before.rows + new_rows
        if fill < self.config.effective_min_rows:
            self._snapshot = replace(before, fill=fill, rows=rows)
            return
        scores = self._window.scores(self.config.method, self.config.threshold)
        alert = any(s.alert for s in scores)
        self._snapshot = DriftSnapshot(scores, fill, rows, rows, self._wall_clock(), alert, before.updates + 1)
        if alert != before.alert:
            self._log_transition(alert, scores)

    def _log_transition(self, alert: bool, scores: tuple[FeatureScore, ...]) -> None:
        drifting = sorted((s for s in scores if s.alert), key=lambda s: s.score, reverse=True)
        listed = ", ".join(f"{s.io} {s.tensor}[{s.feature}] {s.method}={s.score:.3f}" for s in drifting[:_TOP_IN_LOG])
        fields = {
            "event": "drift_alert",
            "alert": alert,
            "model": self.model,
            "model_version": str(self.version),
            "threshold": self.config.threshold,
            "drifting_features": len(drifting),
            "features": listed,
        }
        name, version, threshold = self.model, self.version, self.config.threshold
        if alert:
            message = "model %s version %d entered drift alert: %d feature(s) above %g: %s"
            log.warning(message, name, version, len(drifting), threshold, listed, extra=fields)
        else:
            message = "model %s version %d left drift alert: every feature at or below %g"
            log.info(message, name, version, threshold, extra=fields)
        if self.events is not None:
            detail = {"threshold": threshold, "method": self.config.method, "drifting_features": len(drifting)}
            if alert:
                reason = f"{len(drifting)} feature(s) above {threshold:g}: {listed}"
                self.events.drift_alert_entered(name, version, reason, detail)
            else:
                self.events.drift_alert_left(name, version, f"every feature at or below {threshold:g}", detail)


class ModelMonitor:
    """What one model version watches. The inference handler calls :meth:`record` per answered request."""

    def __init__(self, drift: DriftMonitor | None, payloads: PayloadLog | None):
        self.drift = drift
        self.payloads = payloads

    def record(self, inputs: Tensors, outputs: Tensors, *, request_id: str = "", route: str = "") -> None:
        """Offer one answered request to the drift monitor and the payload log; O(1), never raises."""
        if self.drift is not None:
            self.drift.observe(inputs, outputs)
        if self.payloads is not None:
            self.payloads.offer(inputs, outputs, request_id=request_id, route=route)

    def report_alerts_to(self, events: DriftEvents) -> None:
        """Tell ``events`` when this version enters or leaves drift alert; call before :meth:`start`."""
        if self.drift is not None:
            self.drift.events = events

    def start(self) -> None:
        """Start the background threads (on the event loop, when the version starts serving)."""
        if self.drift is not None:
            self.drift.start()
        if self.payloads is not None:
            self.payloads.start()

    async def aclose(self) -> None:
        """Stop the threads; the payload log writes what was queued first."""
        if self.drift is not None:
            await self.drift.aclose()
        if self.payloads is not None:
            await self.payloads.aclose()


def load_monitor(directory: Path, config: ModelConfig, spec: ModelSpec) -> ModelMonitor | None:
    """The monitor for the version in ``directory`` (blocking: call from the loading thread), or None.

    Raises ModelLoadError naming the file and field when ``monitoring.drift``
    is set but the reference profile is missing or does not fit the model, or
    when ``monitoring.payload_log`` names a tensor that is neither an input nor
    an output of the model, needs a salt that is not set, or cannot open its file.
    """
    monitoring = config.monitoring
    if monitoring.drift is None and monitoring.payload_log is None:
        return None
    config_path = directory.parent / "config.yaml"
    drift = _drift_monitor(directory, config_path, monitoring.drift, spec) if monitoring.drift else None
    payloads = None
    if monitoring.payload_log is not None:
        try:
            payloads = open_payload_log(monitoring.payload_log, spec, config_path)
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from None
    return ModelMonitor(drift, payloads)


def _drift_monitor(directory: Path, config_path: Path, config: DriftConfig, spec: ModelSpec) -> DriftMonitor:
    path = directory / config.profile
    if not path.is_file():
        raise ModelLoadError(
            f"{config_path}: monitoring.drift: version {spec.version} has no reference profile {path}; write it with "
            f"`infergate profile --model-repository {directory.parent.parent} --model {spec.name} "
            f"--version {spec.version} --data SAMPLE`"
        )
    try:
        profile = read_profile(path)
        check_profile(profile, spec, path)
    except ConfigError as exc:
        raise ModelLoadError(f"monitoring.drift: {exc}") from None
    return DriftMonitor(spec.name, spec.version, profile, config, batches=spec.batches)
