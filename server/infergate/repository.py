"""The model repository: ``ROOT/<model>/<version>/model.onnx`` plus ``ROOT/<model>/config.yaml``.

At start every model directory is read and its newest version directory (the
largest integer name) is loaded, in parallel threads. A model that fails to
load is kept with its reason (ModelReady false, the reason logged) and never
stops the others. Lookups by name and version happen on every request and are
plain dictionary reads.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .config import ConfigError, load_model_config
from .errors import NotFound, Unavailable
from .model import ModelVersion, load_model_version
from .runner import ModelLoadError
from .stats import RepositoryObserver

__all__ = ["ModelEntry", "ModelRepository", "ModelState", "is_version_name"]

log = logging.getLogger(__name__)


class ModelState(Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelEntry:
    """A model directory and what became of it."""

    name: str
    state: ModelState = ModelState.LOADING
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    default: ModelVersion | None = None  # the version served when a request names none


class ModelRepository:
    """Finds, loads, looks up and closes the models under ``root``."""

    def __init__(self, root: Path, observer: RepositoryObserver | None = None):
        self.root = root
        self._observer = observer  # telemetry: load events and each version's observer
        self._entries: dict[str, ModelEntry] = {}

    @property
    def entries(self) -> dict[str, ModelEntry]:
        return self._entries

    def not_ready(self) -> list[str]:
        """Names of the models that are not serving (failed, or still loading)."""
        return [e.name for e in self._entries.values() if e.state is not ModelState.READY]

    def discover(self) -> list[str]:
        """Model directory names under root (hidden ones skipped)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for name in names:
            self._entries.setdefault(name, ModelEntry(name))
        return names

    async def load_all(self, parallel: int = 4) -> None:
        """Load every discovered model, ``parallel`` at a time, off the event loop."""
        limit = asyncio.Semaphore(parallel)

        async def load(entry: ModelEntry) -> None:
            async with limit:
                await self._load(entry)

        await asyncio.gather(*(load(e) for e in self._entries.values()))

    async def _load(self, entry: ModelEntry) -> None:
        directory = self.root / entry.name
        try:
            model = await asyncio.to_thread(_load_latest, directory, entry.name)
        except (ConfigError, ModelLoadError, FileNotFoundError) as exc:
            entry.state, entry.reason = ModelState.UNAVAILABLE, str(exc)
            log.error("model %s failed to load: %s", entry.name, exc)
            self._loaded(entry.name, ok=False)
            return
        except Exception as exc:  # a bug or an unexpected runtime error: keep serving the rest
            entry.state, entry.reason = ModelState.UNAVAILABLE, f"unexpected error: {exc}"
            log.exception("model %s failed to load", entry.name)
            self._loaded(entry.name, ok=False)
            return
        observer = self._observer
        model.start(observer.for_model(entry.name, model.version, lambda: model.batcher.depth) if observer else None)
        self._loaded(entry.name, ok=True)
        entry.versions[model.version] = model
        entry.default = model
        entry.state, entry.reason = ModelState.READY, ""

    def _loaded(self, name: str, ok: bool) -> None:
        if self._observer is not None:
            self._observer.model_loaded(name, ok)

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The model version a request asks for. Raises NotFound or Unavailable."""
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"unknown model {name!r}")
        if entry.state is not ModelState.READY or entry.default is None:
            detail = f": {entry.reason}" if entry.reason else ""
            raise Unavailable(f"model {name!r} is not ready ({entry.state.value}){detail}")
        if not version:
            return entry.default
        model = entry.versions.get(int(version)) if is_version_name(version) else None
        if model is None:
            loaded = ", ".join(str(v) for v in sorted(entry.versions))
            raise NotFound(f"model {name!r} has no version {version!r} (loaded: {loaded})")
        return model

    def versions(self, name: str) -> list[ModelVersion]:
        """Every loaded version of a model, oldest first. Raises NotFound or Unavailable."""
        self.get(name)
        entry = self._entries[name]
        return [entry.versions[v] for v in sorted(entry.versions)]

    async def aclose(self, timeout: float | None = None) -> None:
        """Drain and close every loaded version."""
        models = [m for e in self._entries.values() for m in e.versions.values()]
        await asyncio.gather(*(m.aclose(timeout) for m in models))
        for entry in self._entries.values():
            entry.versions.clear()
            entry.default = None
            entry.state = ModelState.UNAVAILABLE
            entry.reason = "server stopped"


def is_version_name(text: str) -> bool:
    """A version directory's name: ASCII digits only (str.isdigit() also accepts '²', which int() refuses)."""
    return text.isascii() and text.isdecimal()


def _load_latest(directory: Path, name: str) -> ModelVersion:
    """Read the config, pick the newest version and load it (blocking: file I/O and onnxruntime)."""
    config = load_model_config(directory / "config.yaml")
    version = _latest_version(directory)
    return load_model_version(directory / str(version), name, version, config)


def _latest_version(directory: Path) -> int:
    versions = [int(p.name) for p in directory.iterdir() if p.is_dir() and is_version_name(p.name)]
    if not versions:
        raise ModelLoadError(f"{directory} has no version directory (expected {directory}/1/model.onnx)")
    return max(versions)
