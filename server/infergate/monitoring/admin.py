"""The ``DriftStatus`` admin RPC's response, built from the served model versions.

``serving/admin.py`` owns the servicer; its ``DriftStatus`` method passes the
request and the repository's entries to :func:`drift_status_response` and
turns the InferGateError it may raise into a status, as ``RoutingStatus`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from infergate._proto import infergate_admin_pb2 as apb
from infergate.errors import FailedPrecondition, NotFound
from infergate.monitoring.metrics import HasMonitor
from infergate.monitoring.monitor import DriftMonitor
from infergate.monitoring.window import FeatureScore

__all__ = ["DEFAULT_TOP", "ModelVersions", "drift_status_response"]

DEFAULT_TOP = 5


class ModelVersions(Protocol):
    """A model and its served versions (the repository's ``ModelEntry``)."""

    @property
    def name(self) -> str: ...

    @property
    def versions(self) -> Mapping[int, HasMonitor]: ...


def drift_status_response(request: apb.DriftStatusRequest, entries: Iterable[ModelVersions]) -> apb.DriftStatusResponse:
    """Every monitored version of ``entries`` that the request selects.

    ``entries`` are the models the request names (all, or the one in
    ``request.name``; an unknown name is the caller's NotFound). Raises
    NotFound when ``request.version`` is not served, and FailedPrecondition
    when a model named in the request has no drift monitoring.
    """
    top = request.top or DEFAULT_TOP
    models: list[apb.ModelDrift] = []
    for entry in entries:
        versions = _selected(entry, request.version)
        monitors = [(v, m) for v, m in versions if m is not None]
        if request.name and not monitors:
            raise FailedPrecondition(
                f"model {entry.name!r} has no drift monitoring (add monitoring.drift to its config.yaml "
                "and a reference profile to the version)"
            )
        models.extend(_model_drift(entry.name, monitor, top) for _, monitor in monitors)
    return apb.DriftStatusResponse(models=models)


def _selected(entry: ModelVersions, version: str) -> list[tuple[int, DriftMonitor | None]]:
    served = entry.versions
    if version:
        number = int(version) if version.isascii() and version.isdecimal() else None
        if number is None or number not in served:
            loaded = ", ".join(str(v) for v in sorted(served))
            raise NotFound(f"model {entry.name!r} has no version {version!r} (loaded: {loaded})")
        chosen = [number]
    else:
        chosen = sorted(served)
    out: list[tuple[int, DriftMonitor | None]] = []
    for number in chosen:
        monitor = served[number].monitor
        out.append((number, monitor.drift if monitor is not None else None))
    return out


def _model_drift(name: str, drift: DriftMonitor, top: int) -> apb.ModelDrift:
    snapshot = drift.snapshot()
    config = drift.config
    return apb.ModelDrift(
        name=name,
        version=str(drift.version),
        method=config.method,
        threshold=config.threshold,
        window=config.window,
        window_fill=snapshot.fill,
        min_rows=config.effective_min_rows,
        sample_fraction=config.sample_fraction,
        alert=snapshot.alert,
        last_update_unix_seconds=snapshot.updated_at or 0.0,
        requests=drift.requests,
        sampled=drift.sampled,
        dropped=drift.dropped,
        rows=snapshot.rows,
        scored_rows=snapshot.scored_rows,
        features=[_feature(s) for s in snapshot.scores],
        top=[_feature(s) for s in snapshot.top(top)],
    )


def _feature(score: FeatureScore) -> apb.FeatureDrift:
    return apb.FeatureDrift(
        io=score.io,
        tensor=score.tensor,
        feature=score.feature,
        method=score.method,
        score=score.score,
        alert=score.alert,
    )
