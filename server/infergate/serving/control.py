"""Model control (RepositoryModelLoad/Unload): the one seam the servicer calls.

The composition root (``server.py``) chooses the implementation: in one
process, :class:`LocalModelControl` acts on this process's repository; a worker
of ``--workers N`` gets :class:`~infergate.workers.control.WorkerControl`,
which has the supervisor apply the call in every worker before it returns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from infergate.models.overrides import LoadOverride
from infergate.repository.loader import ModelRepository

__all__ = ["Applied", "LocalModelControl", "ModelControl"]

# Told of each load or unload this process applied: the model's name and which it was.
Applied = Callable[[str, Literal["load", "unload"]], Awaitable[None]]


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
    """Model control over this process's repository; ``applied`` is awaited after each load or
    unload that succeeded (the composition root's readiness: ``server.py``)."""

    def __init__(self, repository: ModelRepository, applied: Applied | None = None):
        self._repository = repository
        self._applied = applied

    async def load(self, name: str, override: LoadOverride | None = None) -> None:
        await self._repository.load(name, override or LoadOverride())
        if self._applied is not None:
            await self._applied(name, "load")

    async def unload(self, name: str) -> None:
        await self._repository.unload(name)
        if self._applied is not None:
            await self._applied(name, "unload")
