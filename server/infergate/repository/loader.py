"""The write side of the model repository: ``ROOT/<model>/<version>/model.onnx`` plus ``ROOT/<model>/config.yaml``.

Each model's ``version_policy`` picks the versions to serve out of its version
directories. :meth:`ModelRepository.reconcile` brings one model in line with
the disk — at start, on every poll, or when an operator asks — and does it
**load before unload**: new or changed versions load and warm up in threads
while the old ones keep serving; then one assignment switches versions and
router together; replaced versions drain their queue and close in the
background after their last request. A version that fails to load never
replaces a good one: the failure shows in the index with its reason.
:meth:`ModelRepository.load` is the same for RepositoryModelLoad, which may
bring a config (and the model's files) of its own for that one load.

Every change is written to the audit log (``infergate.audit``): each version
loaded or failed, swapped in or retired, a model unloaded, a routing block
applied or rejected, with its ``source`` — ``startup`` for the initial load,
``poll`` for a rescan, ``api`` for RepositoryModelLoad/Unload. A poll that
meets the same failure again does not write it again. Routers get the audit log
for their canary's steps, and each version's drift monitor for its alerts.

The read side — every lookup the request path and the read-only RPCs make —
is :class:`~infergate.repository.catalog.ModelCatalog` (``repository.catalog``),
which reads the table this module writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import NoReturn

from infergate.audit import AuditLog, Source
from infergate.configfile import ConfigError
from infergate.errors import FailedPrecondition, InvalidArgument, NotFound
from infergate.heap import in_thread
from infergate.models.config import ModelConfig
from infergate.models.config_files import CONFIG_PBTXT, CONFIG_YAML, config_file, read_model_config
from infergate.models.ensemble import check_steps, load_ensemble_version, load_order
from infergate.models.overrides import FILE_PREFIX, LoadOverride, PollFailed, stage_files
from infergate.models.runner import ModelLoadError
from infergate.models.stats import ModelObserver, RepositoryObserver
from infergate.models.version import load_model_version
from infergate.repository.catalog import (
    Fingerprint,
    ModelCatalog,
    ModelEntry,
    ModelState,
    Rejected,
    ServedVersion,
    unknown_model,
    version_clashes,
    version_dirs,
)
from infergate.routing.config import Routing
from infergate.routing.router import Router, RoutingError
from infergate.routing.shadow import ShadowStats

__all__ = ["ModelRepository", "is_model_name", "model_directories"]

log = logging.getLogger(__name__)

_NAME_MAX = 255  # bytes in a file name (NAME_MAX on Linux and macOS)
# The ensembles whose loads, in this task, are loading their step models first (see _load_step_models).
_ENSEMBLE_LOADS: ContextVar[frozenset[str]] = ContextVar("infergate_ensemble_loads", default=frozenset())


class ModelRepository:
    """Finds, loads, reloads, looks up and closes the models under ``root``."""

    def __init__(
        self,
        root: Path,
        observer: RepositoryObserver | None = None,
        *,
        drain_timeout: float | None = 30.0,
        parallel: int = 4,
        explicit: bool = False,
        audit: AuditLog | None = None,
        calls_in_progress: Callable[[], int] | None = None,
        on_retired: Callable[[], None] | None = None,
        model_cpus: int | None = None,
        workers: int = 1,
    ):
        """``audit``: where lifecycle events go (default: an :class:`AuditLog` writing to the server log);
        ``calls_in_progress``: the server's admission count, which every version's batcher reads;
        ``on_retired``: called on the event loop each time a retired version has closed;
        ``model_cpus``: the CPUs each version's sessions share (None: this process's, models/cpus.py);
        ``workers``: the server's processes (``--workers``), which stateful models refuse when several."""
        self.root = root
        self._observer = observer  # telemetry: load events and each version's observer
        self._audit = audit if audit is not None else AuditLog()
        self._explicit = explicit  # models wait for a load request instead of loading when found
        self._entries: dict[str, ModelEntry] = {}
        self.catalog = ModelCatalog(self._entries)  # the read side, over the same table
        self._drain_timeout = drain_timeout
        self._parallel = parallel
        self._retiring: set[asyncio.Task[None]] = set()
        self._calls_in_progress = calls_in_progress
        self._on_retired = on_retired
        self._model_cpus = model_cpus
        self._workers = workers
        self._skipped: set[str] = set()  # directories discover() warned of: not model names

    def discover(self) -> list[str]:
        """Model directory names under root (hidden ones skipped); new ones get an entry.

        A directory whose name no request could name (a backslash in it: ``is_model_name``) is skipped,
        with a warning the first time it is seen: loading it would fail, and must not fail the others.
        """
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        names, unnamed = model_directories(self.root)
        for name in [n for n in unnamed if n not in self._skipped]:
            log.warning("model repository: directory %r is not a model name (a path separator in it): skipped", name)
            self._skipped.add(name)
        for name in names:
            if name not in self._entries:
                self._entries[name] = self._new_entry(name)
        return names

    def _new_entry(self, name: str) -> ModelEntry:
        if self._explicit:
            return ModelEntry(name, ModelState.UNAVAILABLE, "not loaded (explicit model control mode)")
        return ModelEntry(name)

    async def load_all(self, names: list[str] | None = None, *, source: Source = "startup") -> None:
        """Reconcile ``names`` (default: every discovered model), ``parallel`` at a time; ensembles
        after the rest, since each is checked against the models its steps run."""
        limit = asyncio.Semaphore(self._parallel)

        async def one(name: str) -> None:
            async with limit:
                await self._reconcile_quietly(name, source)

        names = self.discover() if names is None else names
        pipelines = await asyncio.to_thread(self._ensembles, names)
        await asyncio.gather(*(one(n) for n in names if n not in pipelines))
        for layer in load_order(pipelines):  # an ensemble that runs another loads after it
            await asyncio.gather(*(one(n) for n in layer))

    def _ensembles(self, names: list[str]) -> dict[str, set[str]]:
        """The models whose config.yaml looks like an ensemble's, with the models their steps name
        (a guess for ordering only: loading reads and checks the file).

        Only regular files are read: a config that is a pipe (or a device) would be consumed by this look.
        """
        found: dict[str, set[str]] = {}
        for name in names:
            path = config_file(self.root / name)  # config.yaml or config.pbtxt
            try:
                if not path.is_file():
                    continue
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if "ensemble_scheduling" in text:
                try:
                    found[name] = set(read_model_config(path.parent).step_models)
                except ConfigError:
                    found[name] = set()  # its load will say what is wrong
        return found

    async def rescan(self, *, source: Source = "poll") -> list[str]:
        """One poll: new model directories load, removed ones unload, changed ones reload. Returns the
        models in the repository now."""
        present = set(self.discover())
        for name in set(self._entries) - present:
            entry = self._entries[name]
            if entry.versions:
                async with entry.lock:
                    self._unload(entry, "removed from the repository", source)
                log.info("model %s removed from the repository: unloading", name)
        await self.load_all(sorted(present), source=source)
        return sorted(present)

    async def _reconcile_quietly(self, name: str, source: Source) -> None:
        try:
            await self.reconcile(name, source=source)
        except (FailedPrecondition, NotFound) as exc:
            log.error("%s", exc)

    async def reconcile(self, name: str, *, source: Source = "api") -> None:
        """Bring model ``name`` in line with its directory. Raises FailedPrecondition when
        something could not be applied (what serves keeps serving) and NotFound when the
        model has no directory; messages start with Triton's ``failed to load '<name>'``.
        ``source``: what asked, for the audit log."""
        directory = self._directory(name)
        entry = self._entries.setdefault(name, self._new_entry(name))
        async with entry.lock:
            if not entry.versions and source != "poll":  # a poll shows LOADING once it loads something (_apply)
                entry.state = ModelState.LOADING
            config = await self._read_config(entry, directory, source)
            await self._apply(entry, directory, config, source)

    async def load(self, name: str, override: LoadOverride, *, source: Source = "api") -> None:
        """Load ``name`` now, as RepositoryModelLoad asks: load before unload, as :meth:`reconcile`.

        ``override.config`` replaces config.yaml for this load; ``override.files``
        (which come with a config) replace the model's directory: they are written
        to a temporary directory, loaded from there, and removed once loaded (every
        file a version needs is read at load). A model loaded from files need not be
        in the repository. Raises as :meth:`reconcile` does.
        """
        config = override.config
        if config is None:
            await self.reconcile(name, source=source)
            return
        # Files need no directory in the repository, but the name must still be one: it names an entry.
        directory = self._directory(name) if not override.files else None
        entry = self._entries.setdefault(_checked_name(name), self._new_entry(name))
        async with entry.lock:
            if not entry.versions:
                entry.state = ModelState.LOADING
            if directory is not None:
                await self._apply(entry, directory, config, source)
                return
            staged = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"infergate-{name[:64]}-"))
            try:
                await self._stage(entry, override, staged, source)
                await self._apply(entry, staged, config, source)
            except FailedPrecondition as exc:
                raise FailedPrecondition(_as_sent(exc.message, staged)) from None
            finally:
                _forget_staging(entry, staged)
                await asyncio.to_thread(shutil.rmtree, staged, True)

    async def _stage(self, entry: ModelEntry, override: LoadOverride, directory: Path, source: Source) -> None:
        try:
            await asyncio.to_thread(stage_files, override, directory)
        except OSError as exc:
            self._fail(entry, f"file overrides not written: {exc.strerror}", source)
            raise PollFailed(
                f"{_failed_to_load(entry.name)}, failed to poll from model repository: "
                f"the override files could not be written ({exc.strerror})"
            ) from None

    def _directory(self, name: str) -> Path:
        """The model's directory; NotFound (without the server's path) when the repository has none."""
        directory = self.root / _checked_name(name)
        if not directory.is_dir():
            raise NotFound(
                f"{_failed_to_load(name)}, failed to poll from model repository: "
                "the repository has no model directory of that name"
            )
        return directory

    async def _read_config(self, entry: ModelEntry, directory: Path, source: Source) -> ModelConfig:
        try:
            return await asyncio.to_thread(read_model_config, directory)
        except ConfigError as exc:
            self._fail(entry, f"config not applied: {exc}", source)
            raise FailedPrecondition(f"{_failed_to_load(entry.name)}: {exc}") from None

    async def _apply(self, entry: ModelEntry, directory: Path, config: ModelConfig, source: Source) -> None:
        if config.is_ensemble and self._explicit and source != "poll":
            await self._load_step_models(entry.name, config, source)
        directories = await self._version_directories(entry, directory, source)
        on_disk = await asyncio.to_thread(_scan, directory, directories)
        # Nothing changed since it was refused: a poll refuses it again, unloaded; a load request tries again.
        if source == "poll" and entry.rejected == (config, on_disk):
            raise FailedPrecondition(f"{_failed_to_load(entry.name)}: {entry.reason}")
        entry.failed = {v: f for v, f in entry.failed.items() if v in on_disk}
        wanted = config.version_policy.select(list(on_disk))
        reload_all = entry.config is None or entry.config.without_routing() != config.without_routing()
        # A failed version is tried again by a load request or a restart, whatever failed (a file, or a
        # passing cause); a poll tries it again once one of the files its load reads changed, not before
        # (a failure is written once, not per poll). An ensemble fails for want of its step models, which
        # may have loaded since: a poll tries it again when they changed.
        if source != "poll" or reload_all:
            entry.failed.clear()
        if config.is_ensemble:
            steps_seen, entry.steps_seen = entry.steps_seen, self._steps_now(config)
            if steps_seen != entry.steps_seen:
                entry.failed.clear()
        to_load = [v for v in wanted if reload_all or entry.files.get(v) != on_disk[v]]
        to_load = [v for v in to_load if entry.failed.get(v, (None,))[0] != on_disk[v]]
        if to_load and not entry.versions:
            entry.state = ModelState.LOADING
        loaded, failures = await self._load_versions(entry, directories, config, to_load, on_disk, source)
        serving = {v: entry.versions[v] for v in wanted if v in entry.versions and v not in loaded}
        serving.update(loaded)
        if failures or any(v in entry.failed for v in wanted):  # keep the good versions that would have gone
            serving.update({v: m for v, m in entry.versions.items() if v not in serving and v in on_disk})
        if not wanted:
            none = f"no version directory matches the version policy (found: {sorted(on_disk) or 'none'})"
            failures.append(none)
            if not self._repeated(entry, none, source):
                self._audit.load_failed(entry.name, None, none, source=source)
        router, routing_error = self._router(entry, config, serving, directory) if serving else (None, "")
        if serving and router is None:  # no routing fits what would serve: apply nothing
            self._reject(entry, loaded, (config, on_disk), [*failures, routing_error], source)
        if routing_error and not self._repeated(entry, routing_error, source):
            self._audit.routing_rejected(entry.name, f"{routing_error}; the previous routing stays", source=source)
        self._switch(entry, serving, router, config, on_disk, source)
        problems = failures + ([routing_error] if routing_error else [])
        entry.reason = "; ".join(problems)
        if problems:
            raise FailedPrecondition(f"{_failed_to_load(entry.name)}: {entry.reason}")

    def _steps_now(self, config: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The ensemble's step models and the version objects they serve now (a reload makes new ones)."""
        entries = [(name, self._entries.get(name)) for name in config.step_models]
        return tuple((name, tuple(id(v) for v in e.versions.values()) if e else ()) for name, e in entries)

    async def _version_directories(self, entry: ModelEntry, directory: Path, source: Source) -> dict[int, Path]:
        """Each version's directory as found on disk (``01/`` is version 1, as Triton reads it).

        Two directories naming one version (``1/`` and ``01/``) refuse the model's load, since which
        one serves would depend on the order of a directory listing; what serves keeps serving.
        """
        found = await asyncio.to_thread(version_dirs, directory)
        clashes = version_clashes(found)
        if clashes:
            reason = "; ".join(clashes)
            self._fail(entry, reason, source)
            raise FailedPrecondition(f"{_failed_to_load(entry.name)}: {reason}")
        return {version: paths[0] for version, paths in found.items()}

    async def _load_step_models(self, name: str, config: ModelConfig, source: Source) -> None:
        """Explicit model control: an ensemble's load first loads the models its steps run that serve
        nothing, as Triton's does. One whose load fails is named by the ensemble's own check.

        Skipped: a model already on this chain of ensemble loads (a cycle, which the check refuses), and one
        whose load another request holds (waiting on it could deadlock two loads of ensembles that run
        each other; that load decides).
        """
        chain = _ENSEMBLE_LOADS.get() | {name}
        token = _ENSEMBLE_LOADS.set(chain)
        try:
            for step in config.step_models:
                entry = self._entries.get(step)
                if step in chain or (entry is not None and (entry.versions or entry.lock.locked())):
                    continue
                try:
                    await self.reconcile(step, source=source)
                except (FailedPrecondition, NotFound, InvalidArgument) as exc:
                    log.error("model %s, a step of ensemble %s: %s", step, name, exc)
        finally:
            _ENSEMBLE_LOADS.reset(token)

    async def _load_versions(
        self,
        entry: ModelEntry,
        directories: dict[int, Path],
        config: ModelConfig,
        versions: list[int],
        contents: dict[int, Fingerprint],
        source: Source,
    ) -> tuple[dict[int, ServedVersion], list[str]]:
        """Load ``versions``, each from its directory in ``directories``; a failure is remembered with
        the version's ``contents`` (what a poll compares before trying it again)."""

        async def one(version: int) -> ServedVersion | str:
            try:
                if config.is_ensemble:  # no file to read: its steps are checked against the models they run
                    ensemble = await in_thread(
                        load_ensemble_version, directories[version], entry.name, version, config, entry.turns
                    )
                    check_steps(ensemble, self.catalog.answering)
                    return ensemble
                # not asyncio.to_thread: the pool would hold the version a moment (heap.py)
                return await in_thread(
                    load_model_version,
                    directories[version],
                    entry.name,
                    version,
                    config,
                    self._model_cpus,
                    self._workers,
                )
            except (ModelLoadError, FileNotFoundError) as exc:
                return str(exc)
            except Exception as exc:  # a bug or an unexpected runtime error: keep serving the rest
                log.exception("model %s version %d failed to load", entry.name, version)
                return f"unexpected error: {exc}"

        results = await asyncio.gather(*(one(v) for v in versions))
        loaded: dict[int, ServedVersion] = {}
        failures: list[str] = []
        for version, result in zip(versions, results, strict=True):
            self._loaded(entry.name, ok=not isinstance(result, str))
            if not isinstance(result, str):
                loaded[version] = result
                entry.failed.pop(version, None)
                self._audit.loaded(entry.name, version, source=source)
            else:  # not retried by a poll (so not written again) until one of its files changes
                entry.failed[version] = (contents[version], result)
                failures.append(f"version {version}: {result}")
                log.error("model %s version %d failed to load: %s", entry.name, version, result)
                self._audit.load_failed(entry.name, version, result, source=source)
        return loaded, failures

    def _router(
        self, entry: ModelEntry, config: ModelConfig, serving: dict[int, ServedVersion], directory: Path
    ) -> tuple[Router | None, str]:
        """A router for ``serving`` and the routing error, if any; None when no routing fits.

        A routing block that does not fit keeps the previous one when that still
        fits. It is never replaced by "the newest version takes everything": a
        canary or a shadow could be the newest.
        """
        old = entry.router
        if old is not None and old.routing == (config.routing or Routing()) and serving == entry.versions:
            return old, ""  # nothing changed: keep the canary's progress
        try:
            router = Router(entry.name, config.routing, list(serving), events=self._audit)
        except RoutingError as exc:
            error = f"{config_file(directory)}: {exc}"
        else:
            if old is not None:
                router.carry_canary(old)
            return router, ""
        if old is not None and serving == entry.versions:
            # The refused block stays in the config, so every poll refuses it again: a fresh router each
            # time would restart a canary at its first step, or bring back one that was rolled back.
            log.error("model %s: routing not applied, keeping the one in force: %s", entry.name, error)
            return old, error
        if old is not None:
            try:
                router = Router(entry.name, old.routing, list(serving), events=self._audit)
            except RoutingError:
                pass
            else:
                router.carry_canary(old)
                log.error("model %s: routing not applied, keeping the previous one: %s", entry.name, error)
                return router, error
        return None, error

    def _reject(
        self,
        entry: ModelEntry,
        loaded: dict[int, ServedVersion],
        attempt: Rejected,
        problems: list[str],
        source: Source,
    ) -> NoReturn:
        """Apply nothing of ``attempt``: what served keeps serving (or the model stays not ready).

        Not written again by polls: an attempt once rejected is refused unread until something changes.
        """
        entry.rejected = attempt
        entry.reason = "config not applied: " + "; ".join(problems)
        self._audit.routing_rejected(entry.name, entry.reason, source=source)
        for model in loaded.values():  # loaded for this attempt, never served
            self._audit.version_retired(entry.name, model.version, source=source, reason="discarded: " + entry.reason)
            self._retire(model)
        if not entry.versions:
            entry.state = ModelState.UNAVAILABLE
        keeps = "; previous versions and routing keep serving" if entry.versions else "; the model is not ready"
        log.error("model %s: %s%s", entry.name, entry.reason, keeps)
        raise FailedPrecondition(f"{_failed_to_load(entry.name)}: {entry.reason}")

    def _switch(
        self,
        entry: ModelEntry,
        serving: dict[int, ServedVersion],
        router: Router | None,
        config: ModelConfig,
        on_disk: dict[int, Fingerprint],
        source: Source,
    ) -> None:
        """Start the new versions, swap them in, and retire the ones no longer served."""
        started = [m for m in serving.values() if entry.versions.get(m.version) is not m]
        for model in started:
            if model.monitor is not None:
                model.monitor.report_alerts_to(self._audit)
            model.start(self._model_observer(model), self._calls_in_progress)
        shadow = router.routing.shadow if router is not None else None
        for version, model in serving.items():  # a shadow computes only with the CPU the others leave
            model.set_background(shadow is not None and version == shadow.version)
        if shadow is not None:  # its comparisons are counted across reloads
            entry.shadows.setdefault(shadow.version, ShadowStats(shadow.version, entry.name))
        retired = [m for v, m in entry.versions.items() if serving.get(v) is not m]
        old_routing = entry.router.routing if entry.router is not None else Routing()
        entry.versions, entry.router = serving, router
        entry.config, entry.rejected = config, None
        entry.files = {v: on_disk[v] if m in started else entry.files.get(v, on_disk[v]) for v, m in serving.items()}
        entry.state = ModelState.READY if serving else ModelState.UNAVAILABLE
        for model in started:
            self._audit.version_swapped_in(entry.name, model.version, source=source)
        for model in retired:
            reason = _retired_because(model.version, serving, on_disk)
            self._audit.version_retired(entry.name, model.version, source=source, reason=reason)
            self._retire(model)
        if router is not None and router.routing != old_routing:
            self._audit.routing_applied(entry.name, router.routing.model_dump(mode="json"), source=source)
        if started or retired:
            log.info(
                "model %s serving version(s): %s", entry.name, ", ".join(str(v) for v in sorted(serving)) or "none"
            )

    def _loaded(self, name: str, ok: bool) -> None:
        if self._observer is not None:
            self._observer.model_loaded(name, ok)

    def _model_observer(self, model: ServedVersion) -> ModelObserver | None:
        if self._observer is None:
            return None
        return self._observer.for_model(model.name, model.version, lambda: model.queue_depth, model)

    def _fail(self, entry: ModelEntry, reason: str, source: Source) -> None:
        """The model's config (or its files) could not be used: nothing of it is applied."""
        if not self._repeated(entry, reason, source):
            self._audit.load_failed(entry.name, None, reason, source=source)
        entry.reason = reason
        if not entry.versions:
            entry.state = ModelState.UNAVAILABLE
        log.error("model %s: %s%s", entry.name, reason, "; previous versions keep serving" if entry.versions else "")

    @staticmethod
    def _repeated(entry: ModelEntry, problem: str, source: Source) -> bool:
        """A poll meeting a problem that the model's last reload already met (and the audit log has)."""
        return source == "poll" and problem in entry.reason

    def _unload(self, entry: ModelEntry, reason: str, source: Source) -> None:
        for model in entry.versions.values():
            self._audit.version_retired(entry.name, model.version, source=source, reason=reason)
            self._retire(model)
        entry.versions, entry.router, entry.config, entry.files = {}, None, None, {}
        entry.state, entry.reason = ModelState.UNAVAILABLE, reason
        self._audit.unloaded(entry.name, source=source, reason=reason)

    def _retire(self, model: ServedVersion) -> None:
        """Close ``model`` in the background once its queue has drained."""
        if self._observer is not None:
            self._observer.forget(model.name, model.version, model)  # its series leave the scrape now
        task = asyncio.create_task(model.aclose(self._drain_timeout), name=f"retire {model.name}:{model.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        if self._on_retired is not None:
            on_retired = self._on_retired
            task.add_done_callback(lambda _: on_retired())

    async def unload(self, name: str, *, source: Source = "api") -> None:
        """Stop serving ``name``; in-flight requests finish. Raises NotFound."""
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(unknown_model(name))
        async with entry.lock:
            self._unload(entry, "unloaded", source)

    async def aclose(self, timeout: float | None = None) -> None:
        """Drain and close every loaded version (and wait for the ones being retired)."""
        models = [m for e in self._entries.values() for m in e.versions.values()]
        await asyncio.gather(*(m.aclose(timeout) for m in models), *self._retiring)
        for entry in self._entries.values():
            entry.versions, entry.router = {}, None
            entry.state = ModelState.UNAVAILABLE
            entry.reason = "server stopped"


def _checked_name(name: str) -> str:
    """``name`` when it is a model name (:func:`is_model_name`); InvalidArgument otherwise."""
    if not is_model_name(name):
        raise InvalidArgument(
            f"{_failed_to_load(name)}: {name!r} is not a model name (a directory name directly under the repository)"
        )
    return name


def _as_sent(text: str, staged: Path) -> str:
    """``text`` naming the override files as the request did (``file:1/model.onnx``), not where they were staged."""
    return text.replace(f"{staged}/", FILE_PREFIX).replace(str(staged), FILE_PREFIX)


def _retired_because(version: int, serving: dict[int, ServedVersion], on_disk: dict[int, Fingerprint]) -> str:
    if version in serving:
        return "replaced by a reload of the same version"
    if version not in on_disk:
        return "removed from the repository"
    return "no longer selected by the version policy"


def _forget_staging(entry: ModelEntry, staged: Path) -> None:
    """The reasons the index shows never name the temporary directory the files were loaded from."""
    entry.reason = _as_sent(entry.reason, staged)
    entry.failed = {v: (f, _as_sent(reason, staged)) for v, (f, reason) in entry.failed.items()}


def _failed_to_load(name: str) -> str:
    return f"failed to load '{name}'"  # Triton's words: its clients look for them


def model_directories(root: Path) -> tuple[list[str], list[str]]:
    """The model directories under ``root`` (hidden ones left out), sorted: those a request can name, and
    those it cannot (``is_model_name``), which the server skips. ``infergate check`` lists them the same way."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [n for n in names if is_model_name(n)], [n for n in names if not is_model_name(n)]


def is_model_name(text: str) -> bool:
    """A name that can only mean a directory right under the repository root (no paths, no hidden files,
    no longer than a file name may be: asking the file system about a longer one is an error, not a miss)."""
    if not text or len(text.encode(errors="replace")) > _NAME_MAX:
        return False
    return "/" not in text and "\\" not in text and "\x00" not in text and not text.startswith(".")


def _scan(directory: Path, directories: dict[int, Path]) -> dict[int, Fingerprint]:
    """Each version's files as a load reads them, read off the event loop in one trip: every file of its
    directory (the model file, external weights, metadata.yaml, a drift profile) and the model directory's
    own files that every version reads (labels, warmup/, initial_state/). A change to any of them reloads
    a serving version, as Triton's poll reloads a model any of whose files changed, and is worth a new
    attempt at a version that failed. Not the config file: what it says is compared field by field (a
    change of routing alone reloads nothing). Each is a digest of the files' names, modification times
    and sizes, and their total size.
    """
    configs = {directory / CONFIG_YAML, directory / CONFIG_PBTXT}
    shared = _file_stats(directory, skip=configs | set(directories.values()))
    return {version: _digest(shared + _file_stats(path, skip=set())) for version, path in directories.items()}


_FileStat = tuple[str, int, int]  # path, mtime_ns, size (-1: could not be read)


def _file_stats(top: Path, skip: set[Path]) -> list[_FileStat]:
    """Every file under ``top``, recursively, except the files and directories in ``skip`` and hidden ones
    (a version staged as ``.staging`` before its ``mv``, an editor's swap file): no load reads them.

    Symbolic links to files count as their targets; links to directories are not followed (a loop).
    """
    stats: list[_FileStat] = []
    for folder, subdirs, files in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and Path(folder, d) not in skip)
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.startswith(".") or Path(path) in skip:
                continue
            try:
                stat = os.stat(path)
                stats.append((path, stat.st_mtime_ns, stat.st_size))
            except OSError:
                stats.append((path, 0, -1))
    return stats


def _digest(stats: list[_FileStat]) -> Fingerprint:
    digest = hashlib.blake2b(repr(stats).encode(errors="backslashreplace"), digest_size=8).digest()
    return int.from_bytes(digest), sum(size for _, _, size in stats)
