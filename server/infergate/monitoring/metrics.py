"""Drift scores and alerts for the telemetry gauges ``infergate_drift_score`` and ``infergate_drift_alert``.

:class:`DriftReadings` is the :class:`~infergate.telemetry.metrics.DriftSource`
the composition root hands to ``ServerMetrics.watch_drift``. At each
collection it asks ``versions()`` for the versions served *now* and reads
their latest published snapshots. It holds no reference to any version, so a
version that is unloaded stops being reported (and can be freed) at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from infergate.monitoring.monitor import DriftMonitor, ModelMonitor

__all__ = ["DriftReadings", "HasMonitor", "drift_monitors"]


class HasMonitor(Protocol):
    """A served model version (``ModelVersion``): all that is read of it is its monitor."""

    @property
    def monitor(self) -> ModelMonitor | None: ...


def drift_monitors(versions: Iterable[HasMonitor]) -> Iterator[DriftMonitor]:
    """The drift monitors of ``versions`` that have one."""
    for version in versions:
        monitor = version.monitor
        if monitor is not None and monitor.drift is not None:
            yield monitor.drift


class DriftReadings:
    """Scores (``model, version, input, feature, method, io``) and alerts (``model, version``) of ``versions()``."""

    def __init__(self, versions: Callable[[], Iterable[HasMonitor]]):
        self._versions = versions

    def scores(self) -> Iterable[tuple[float, Mapping[str, str]]]:
        out: list[tuple[float, Mapping[str, str]]] = []
        for drift in drift_monitors(self._versions()):
            model, version = drift.model, str(drift.version)
            for s in drift.snapshot().scores:
                labels = {"model": model, "version": version, "input": s.tensor, "feature": s.feature}
                out.append((s.score, labels | {"method": s.method, "io": s.io}))
        return out

    def alerts(self) -> Iterable[tuple[int, Mapping[str, str]]]:
        """1 while a version is in alert, else 0 (also before its first score)."""
        return [
            (int(drift.snapshot().alert), {"model": drift.model, "version": str(drift.version)})
            for drift in drift_monitors(self._versions())
        ]
