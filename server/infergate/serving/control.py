"""Model control (RepositoryModelLoad/Unload): the one seam the servicer calls.

The composition root (``server.py``) chooses the implementation: in one
process, :class:`LocalModelControl` acts on this process's repository; a worker
of ``--workers N`` gets :class:`~infergate.workers.control.WorkerControl`,
which has the supervisor apply the call in every worker before it returns.
"""

from __future__ import annotations

from typing import Protocol

from infergate.models.overrides import LoadOverride
from infergate.repository.loader import ModelRepository

__all__ = ["LocalModelControl", "ModelControl"]


class ModelControl(Protocol):
    """Loads and unloads models on behalf of a client; both return once the change is in effect.

    Errors are :class:`~infergate.errors.InferGateError` subclasses: InvalidArgument
    (not a model name), NotFound (no such model), FailedPrecondition (it could not be
    loaded; what served keeps serving).
    """

    async def load(self, name: str, override: LoadOverride | None = None) -> None:
        """Load ``name`` (or bring it in line with its directory when it is loaded); ``override``
        replaces its config.yaml or files for this load (RepositoryModelLoad's parameters)."""

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; requests in flight finish."""


class LocalModelControl:
    """Model control over this process's repository."""

    def __init__(self, repository: ModelRepository):
        self._repository = repository

    async def load(self, name: str, override: LoadOverride | None = None) -> None:
        await self._repository.load(name, override or LoadOverride())

    async def unload(self, name: str) -> None:
        await self._repository.unload(name)
