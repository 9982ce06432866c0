"""The read side of the model repository: what the request path and the read-only RPCs look up.

:class:`ModelCatalog` reads the table of :class:`ModelEntry` that the loader
(``loader.py``, the write side) keeps in line with the disk. Lookups are
dictionary reads on the event loop. The loader switches a model's versions
and router in one assignment, and a request looks its version up and queues
on its batcher in one synchronous step, so a version switched out cannot
receive new work.

Refusals use Triton's words (its clients match on them) and then say more:
an unknown model is ``Request for unknown model: '<name>' is not found``, a
version string that is not a number ``failed to get model version from
specified version string '<s>'``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from infergate.errors import InvalidArgument, NotFound, Unavailable
from infergate.models.config import ModelConfig
from infergate.models.ensemble import EnsembleVersion, SequenceTurns
from infergate.models.version import ModelVersion
from infergate.routing.config import ShadowRouting
from infergate.routing.router import Decision, Router
from infergate.routing.shadow import ShadowStats

__all__ = [
    "IndexRow",
    "ModelCatalog",
    "ModelEntry",
    "ModelState",
    "Routed",
    "RoutingView",
    "ServedModel",
    "ServedVersion",
    "ShadowTarget",
    "is_version_name",
    "unknown_model",
    "version_clashes",
    "version_directory",
    "version_dirs",
]

ServedVersion = ModelVersion | EnsembleVersion  # a version of a model, or of an ensemble of models
Fingerprint = tuple[int, int]  # (mtime_ns, size) of a version's model file, or (digest, size) of all its files
Rejected = tuple[ModelConfig, dict[int, Fingerprint]]  # a config and the files it was refused with


class ModelState(Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelEntry:
    """A model directory and what became of it (written by the loader only)."""

    name: str
    state: ModelState = ModelState.LOADING
    reason: str = ""
    versions: dict[int, ServedVersion] = field(default_factory=dict)  # serving; replaced, never mutated
    router: Router | None = None
    config: ModelConfig | None = None
    files: dict[int, Fingerprint] = field(default_factory=dict)  # of the serving versions
    failed: dict[int, tuple[Fingerprint, str]] = field(default_factory=dict)  # a poll retries once its files change
    shadows: dict[int, ShadowStats] = field(default_factory=dict)  # kept across reloads, by shadow version
    rejected: Rejected | None = None  # not retried until the config or a version's file changes
    # An ensemble's step models as its last load saw them (by version object): a poll tries a failed
    # ensemble again once they changed.
    steps_seen: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # An ensemble's sequences in progress, in order: every version it loads shares them.
    turns: SequenceTurns = field(default_factory=SequenceTurns)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class IndexRow:
    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class ShadowTarget:
    """Where a mirrored copy of a request goes, and where its comparison is counted."""

    model: ModelVersion
    stats: ShadowStats
    spec: ShadowRouting


@dataclass(frozen=True, slots=True)
class Routed:
    """Where one inference request goes: the version, the decision, the router that made it
    (fed the outcome, for the canary) and the shadow copy's target when the decision mirrors it."""

    model: ServedVersion
    decision: Decision
    router: Router
    shadow: ShadowTarget | None = None


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model and the versions it serves now."""

    name: str
    versions: Mapping[int, ServedVersion]


@dataclass(frozen=True, slots=True)
class RoutingView:
    """One model's routing as the admin API shows it."""

    name: str
    versions: tuple[int, ...]
    router: Router
    shadow: ShadowStats | None


class RoutingKeySource(Protocol):
    def routing_key(self, header: str | None, parameter: str | None) -> str | None: ...


class ModelCatalog:
    """Lookups over the loader's model table; raises NotFound or Unavailable for what does not serve."""

    def __init__(self, entries: Mapping[str, ModelEntry]):
        self._entries = entries

    def _entry(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(unknown_model(name))
        if not entry.versions:
            detail = f": {entry.reason}" if entry.reason else ""
            raise Unavailable(
                f"Request for unknown model: '{name}' has no available versions ({entry.state.value}){detail}"
            )
        return entry

    def serves(self, model: ServedVersion) -> bool:
        """Whether ``model`` is still the version its number names: false once a reload or an unload
        switched it out (a request that awaited between routing and queueing must route again)."""
        entry = self._entries.get(model.name)
        return entry is not None and entry.versions.get(model.version) is model

    def get(self, name: str, version: str = "") -> ServedVersion:
        """The model version a request names; with none, the router's primary (never a shadow or canary)."""
        return self.answering(name, version)[0]

    def answering(self, name: str, version: str = "") -> list[ServedVersion]:
        """The versions that may answer a request naming ``version``: that one, or (naming none) each
        version the model's routing may choose, its primary first."""
        entry = self._entry(name)
        if version:
            return [_named_version(entry, version)]
        if entry.router is None:
            return [entry.versions[max(entry.versions)]]
        return [entry.versions[v] for v in entry.router.answering]

    def route(self, name: str, version: str, request: RoutingKeySource) -> Routed:
        """The version that serves one inference request; ``request`` gives its sticky key when asked."""
        entry = self._entry(name)
        router = entry.router
        assert router is not None  # set whenever versions are
        if version:
            model = _named_version(entry, version)
            return Routed(model, Decision(model.version, "requested"), router)
        decision = router.route(None, request.routing_key(router.sticky_header, router.sticky_parameter))
        model = entry.versions[decision.version]
        if decision.shadow is None:
            return Routed(model, decision, router)
        return Routed(model, decision, router, _shadow_target(entry, router, decision.shadow))

    def versions(self, name: str) -> list[ServedVersion]:
        """Every loaded version of a model, oldest first."""
        entry = self._entry(name)
        return [entry.versions[v] for v in sorted(entry.versions)]

    def statistics(self, name: str, version: str) -> list[ServedVersion]:
        """The versions ModelStatistics reports: one, every version of a model, or every loaded version."""
        if name:
            return [self.get(name, version)] if version else self.versions(name)
        return [e.versions[v] for _, e in sorted(self._entries.items()) for v in sorted(e.versions)]

    def routing(self, name: str) -> list[RoutingView]:
        """The routing of model ``name`` (every serving model when empty)."""
        if name and name not in self._entries:
            raise NotFound(unknown_model(name))
        names = [name] if name else sorted(self._entries)
        views = []
        for entry in (self._entries[n] for n in names):
            if entry.router is None:
                continue
            shadow = entry.router.routing.shadow
            stats = entry.shadows.get(shadow.version) if shadow is not None else None
            if shadow is not None and stats is None:
                stats = ShadowStats(shadow.version, entry.name)
            views.append(RoutingView(entry.name, tuple(sorted(entry.versions)), entry.router, stats))
        return views

    def index(self, ready_only: bool = False) -> list[IndexRow]:
        """Every model and version known, with its state and the reason it is not ready."""
        rows: list[IndexRow] = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            for version in sorted(set(entry.versions) | set(entry.failed)):
                if version in entry.versions:
                    # A serving version carries the model's last problem (say, a config not applied).
                    rows.append(IndexRow(name, str(version), ModelState.READY.value, entry.reason))
                elif not ready_only:
                    rows.append(IndexRow(name, str(version), ModelState.UNAVAILABLE.value, entry.failed[version][1]))
            if not entry.versions and not entry.failed and not ready_only:
                rows.append(IndexRow(name, "", entry.state.value, entry.reason))
        return rows

    def names(self) -> list[str]:
        return sorted(self._entries)

    def models(self, name: str = "") -> list[ServedModel]:
        """Model ``name`` (every model when empty) with the versions it serves; raises NotFound."""
        if name and name not in self._entries:
            raise NotFound(f"unknown model {name!r}")
        names = [name] if name else sorted(self._entries)
        return [ServedModel(n, self._entries[n].versions) for n in names]

    def served(self) -> list[ServedVersion]:
        """Every version served now; safe to call from another thread (a metrics reader's).

        The loop replaces an entry's ``versions`` map, never mutates it, so copying
        the table and each map in one step each sees a consistent set.
        """
        return [m for entry in list(self._entries.values()) for m in list(entry.versions.values())]

    def routers(self) -> list[tuple[str, Router]]:
        """Each model's router now, by model name; safe to call from another thread, like ``served``."""
        return [(entry.name, router) for entry in list(self._entries.values()) if (router := entry.router) is not None]

    def dependents(self, name: str) -> list[str]:
        """The ensembles served now that run ``name`` in a step, directly or through other ensembles,
        outermost first (Triton's ``unload_dependents`` unloads them with it)."""
        found: list[str] = []
        frontier = [name]
        while frontier:
            step = frontier.pop()
            for entry in self._entries.values():
                if entry.name in found or entry.name == name:
                    continue
                for version in entry.versions.values():
                    if isinstance(version, EnsembleVersion) and any(s.model == step for s in version.steps):
                        found.append(entry.name)
                        frontier.append(entry.name)
                        break
        return found[::-1]

    def not_ready(self) -> list[str]:
        """Names of the models that are not serving (failed, or still loading)."""
        return [e.name for e in self._entries.values() if e.state is not ModelState.READY]


def _shadow_target(entry: ModelEntry, router: Router, version: int) -> ShadowTarget | None:
    spec = router.routing.shadow
    model = entry.versions.get(version)
    stats = entry.shadows.get(version)
    if spec is None or not isinstance(model, ModelVersion) or stats is None:  # ensembles take no routing
        return None
    return ShadowTarget(model, stats, spec)


def is_version_name(text: str) -> bool:
    """A version directory's name: ASCII digits only (str.isdigit() also accepts '²', which int() refuses)."""
    return text.isascii() and text.isdecimal()


def version_directory(directory: Path, version: int) -> Path:
    """The directory of ``version`` under the model ``directory`` as found on disk (``01/`` for
    version 1, as the loader reads it); ``directory/<version>`` when there is none."""
    found = version_dirs(directory).get(version) if directory.is_dir() else None
    return found[0] if found else directory / str(version)


def version_dirs(directory: Path) -> dict[int, list[Path]]:
    """The version directories under ``directory`` by the integer value of their names, in name order."""
    found: dict[int, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        if path.is_dir() and is_version_name(path.name):
            found.setdefault(int(path.name), []).append(path)
    return found


def version_clashes(found: dict[int, list[Path]]) -> list[str]:
    """Each version that several directories name (``1/`` and ``01/``), naming them: the loader refuses
    such a model, since which one serves would depend on the order of a directory listing."""
    return [
        f"version {version} is named by {len(paths)} directories: {', '.join(str(p) for p in paths)}"
        for version, paths in sorted(found.items())
        if len(paths) > 1
    ]


def unknown_model(name: str) -> str:
    """Triton's words for a model the repository does not have."""
    return f"Request for unknown model: '{name}' is not found"


def _named_version(entry: ModelEntry, version: str) -> ServedVersion:
    loaded = ", ".join(str(v) for v in sorted(entry.versions))
    if not is_version_name(version):
        raise InvalidArgument(
            f"failed to get model version from specified version string '{version}': "
            f"version should be an integral value > 0 (model '{entry.name}' serves version(s) {loaded})"
        )
    model = entry.versions.get(int(version))
    if model is None:
        failed = entry.failed.get(int(version))
        if failed is not None:  # on disk but refused at load: say why (a checksum mismatch names both digests)
            raise Unavailable(f"model '{entry.name}' version {version} is not ready: it failed to load: {failed[1]}")
        raise NotFound(f"Request for unknown model: '{entry.name}' version {version} is not found (loaded: {loaded})")
    return model
