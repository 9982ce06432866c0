"""Where a batch run's requests go: the server's own ``ModelVersion`` in this process, or a remote server.

:class:`LocalExecutor` loads the version with ``load_model_version`` — the
config, execution providers, warm-up, dynamic batcher and instance threads the
server uses — starts it on the running loop and calls
``ModelVersion.infer`` directly: no gRPC, no copies beyond the batcher's.
:class:`RemoteExecutor` sends the same requests to an infergate (or any Open
Inference Protocol server) through the SDK, whose retry policy retries
UNAVAILABLE (a full queue, a restart) with backoff.

Both say which failures belong to the rows of a request (the model could not
compute them: the run isolates the bad rows) and which end the run (the server
went away).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from infergate.errors import InvalidArgument, ModelExecutionError
from infergate.models.config import InstanceGroup, ModelConfig
from infergate.models.config_files import read_model_config
from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, Tensors, TensorSpec
from infergate.models.version import ModelVersion, load_model_version
from infergate.offline.readers import InputError
from infergate.repository.catalog import is_version_name, version_directory
from infergate.routing.router import Router, RoutingError

__all__ = ["Executor", "LocalExecutor", "RemoteExecutor"]

_CLOSE_TIMEOUT_S = 30.0


class Executor(Protocol):
    spec: ModelSpec
    version: str  # the version that computes the rows; "" when the server picks per request
    digest: str | None  # its model file's sha256, as loading verified it; None when the server reports none
    batch_size: int  # rows per request
    in_flight: int  # requests to keep in flight so the model never waits for the next one

    async def infer(self, inputs: Tensors, rows: int) -> Tensors: ...

    def is_row_error(self, error: Exception) -> bool:
        """True when ``error`` means the model could not compute these rows (the run goes on without them)."""
        ...

    def explain(self, error: Exception) -> str: ...

    async def aclose(self) -> None: ...


def _need_batching(spec: ModelSpec) -> None:
    if not spec.batches:
        raise InputError(
            f"model {spec.name} does not batch (max_batch_size 0): a batch run needs a model whose first "
            "dimension is the batch"
        )


def _default_version(name: str, config: ModelConfig, found: list[int]) -> int:
    """The version that answers requests naming none: the routing's primary among those the policy serves."""
    serving = config.version_policy.select(found)
    if not serving:
        raise InputError(f"model {name}: no version directory matches its version policy (found: {found or 'none'})")
    try:
        return Router(name, config.routing, serving).primary
    except RoutingError:
        return max(serving)


class LocalExecutor:
    """The model version, loaded and served in this process (see the module docstring)."""

    def __init__(self, model: ModelVersion, batch_size: int) -> None:
        self.model = model
        self.spec = model.spec
        self.version = str(model.version)
        self.digest = model.metadata.sha256
        self.batch_size = batch_size
        # One request queued behind each busy instance, so an instance never waits for the loop;
        # never more than the model's queue holds beside the running ones (it would refuse them).
        count = model.runner.instance_count
        self.in_flight = min(2 * count, count + model.config.dynamic_batching.max_queue_size)

    @classmethod
    async def open(
        cls, repository: Path, name: str, version: int | None, batch_size: int | None, instances: int | None
    ) -> LocalExecutor:
        """Load ``repository/name``'s version (default: the one serving requests that name none).

        ``instances`` overrides ``instance_group.count``; a ``batch_size`` above the
        config's ``max_batch_size`` raises it for this run (the graph must batch).
        Raises InputError, or ModelLoadError when the version does not load.
        """
        directory = repository / name
        config, found = await asyncio.to_thread(_read_model, directory)
        if config.is_ensemble:
            raise InputError(
                f"model {name} is an ensemble: score it with --url against a server that serves it and its step models"
            )
        if version is None:
            version = _default_version(name, config, found)
        elif version not in found:
            raise InputError(f"model {name} has no version directory {version_directory(directory, version)}")
        overrides: dict[str, Any] = {}
        if instances is not None:
            overrides["instance_group"] = InstanceGroup(count=instances)
        if batch_size is not None and (config.max_batch_size is None or batch_size > config.max_batch_size):
            overrides["max_batch_size"] = batch_size
        config = config.model_copy(update=overrides)
        model = await asyncio.to_thread(
            load_model_version, version_directory(directory, version), name, version, config
        )
        try:
            _need_batching(model.spec)
        except InputError:
            await model.aclose()
            raise
        model.start()
        return cls(model, min(batch_size or model.spec.max_batch_size, model.spec.max_batch_size))

    async def infer(self, inputs: Tensors, rows: int) -> Tensors:
        return await self.model.infer(inputs, rows, self.spec.batch_group(inputs), deadline=None)

    def is_row_error(self, error: Exception) -> bool:
        return isinstance(error, ModelExecutionError | InvalidArgument)

    def explain(self, error: Exception) -> str:
        cause = error.__cause__
        text = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
        return f"the model failed: {text}" if text else str(error)

    async def aclose(self) -> None:
        await self.model.aclose(_CLOSE_TIMEOUT_S)


def _read_model(directory: Path) -> tuple[ModelConfig, list[int]]:
    if not directory.is_dir():
        raise InputError(f"no model directory {directory}")
    config = read_model_config(directory)
    return config, sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and is_version_name(p.name))


class RemoteExecutor:
    """A remote server, through the SDK's asyncio client (see the module docstring)."""

    def __init__(
        self, client: Any, spec: ModelSpec, version: str, digest: str | None, batch_size: int, concurrency: int
    ) -> None:
        self._client = client
        self.spec, self.version, self.digest = spec, version, digest
        self.batch_size, self.in_flight = batch_size, concurrency

    @classmethod
    async def open(
        cls,
        url: str,
        name: str,
        version: int | None,
        batch_size: int | None,
        concurrency: int,
        retries: int,
        timeout: float,
    ) -> RemoteExecutor:
        """Connect and read the model's metadata and config. Raises InputError (bad model) or the SDK's errors."""
        try:
            from infergate_client import AsyncClient, RetryBudget, RetryPolicy
            from infergate_client.errors import NotFound
        except ImportError:
            raise InputError("--url needs the infergate-client package (clients/python)") from None
        client = AsyncClient(
            url,
            timeout=timeout,
            retry=RetryPolicy(max_attempts=retries),
            # A batch run keeps many calls in flight: let each of them retry through a server restart.
            retry_budget=RetryBudget(max_tokens=10.0 * concurrency),
        )
        wanted = "" if version is None else str(version)
        try:
            metadata = await client.model_metadata(name, wanted)
            config = await client.model_config(name, wanted)
        except NotFound as exc:
            await client.close()
            raise InputError(f"{url}: {exc.details}") from None
        except BaseException:
            await client.close()
            raise
        spec = ModelSpec(
            name=name,
            version=version or 0,
            inputs=tuple(TensorSpec(t.name, DATATYPES[t.datatype], t.shape) for t in metadata.inputs),
            outputs=tuple(TensorSpec(t.name, DATATYPES[t.datatype], t.shape) for t in metadata.outputs),
            max_batch_size=config.max_batch_size,
        )
        _need_batching(spec)
        rows = min(batch_size or spec.max_batch_size, spec.max_batch_size)
        return cls(client, spec, wanted, _served_digest(config), rows, concurrency)

    async def infer(self, inputs: Tensors, rows: int) -> Tensors:
        result = await self._client.infer(self.spec.name, inputs, model_version=self.version or None)
        return dict(result)

    def is_row_error(self, error: Exception) -> bool:
        from infergate_client.errors import InvalidArgument as RemoteInvalidArgument
        from infergate_client.errors import ServerError

        return isinstance(error, RemoteInvalidArgument | ServerError)

    def explain(self, error: Exception) -> str:
        return str(error)

    async def aclose(self) -> None:
        await self._client.close()


def _served_digest(config: Any) -> str | None:
    """The sha256 an infergate serves in the version's ModelConfig parameters (Triton serves none).

    With no ``--version`` it is the digest of the version answering requests that name none, read once when
    the run starts: a server that routes some requests elsewhere, or loads other bytes mid-run, goes unseen.
    """
    if "sha256" not in config.parameters:
        return None
    return str(config.parameters["sha256"].string_value) or None
