"""Ensembles: Triton's pipelines of models (``platform: ensemble`` with ``ensemble_scheduling``).

An ensemble has no model file, runner or batcher of its own. Each request's
steps run on the models they name, through the same path a request to that
model takes (routing, its batcher, its statistics, its canary and shadow): the
handler does it (serving/handler.py). So a step model batches the rows of
ensemble requests with its own callers' rows, and the tensors passed between
steps never leave the process.

Checked once, at load: the config forms a pipeline (``config.py``), and each
step's model is loaded and fits (:func:`check_steps`): it is no ensemble
whose steps lead back to this one; its every input is fed, the datatypes
and shapes of the tensors that link the steps agree, and it takes at least
as many rows as the ensemble does. An ensemble may be a
step of another (Triton's nesting), up to :data:`MAX_NESTING` deep. The
handler still checks each step's tensors against the version that runs it
(:func:`step_request`): a step model reloaded with other tensors answers
FAILED_PRECONDITION naming the step, not a wrong answer.

A step may run a stateful model (``sequence_batching``): the request's
sequence parameters go to it, as in Triton, and the requests of one sequence
go through the ensemble one at a time, in the order they came
(:meth:`SequenceTurns.in_turn`, shared by the ensemble's versions, so a
reload does not reorder them either), so the steps before the stateful one
cannot reorder them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from infergate.errors import FailedPrecondition, InferGateError, InvalidArgument
from infergate.models.config import Metadata, ModelConfig, dependency_layers, ensemble_plan
from infergate.models.datatypes import Datatype, from_triton_type
from infergate.models.governance import resolve_metadata
from infergate.models.runner import ModelLoadError
from infergate.models.sequence import CorrelationId
from infergate.models.spec import ModelSpec, Tensors, TensorSpec, dims_match
from infergate.models.stats import ModelObserver, ModelStats

__all__ = [
    "MAX_NESTING",
    "EnsembleStep",
    "EnsembleVersion",
    "SequenceTurns",
    "StepModel",
    "check_steps",
    "load_ensemble_version",
    "load_order",
    "step_request",
    "takes_sequences",
]

ENSEMBLE_PLATFORM = "ensemble"
MAX_NESTING = 8  # ensembles inside ensembles; deeper is refused at load and, after reloads, per request


@dataclass(frozen=True, slots=True)
class EnsembleStep:
    """One step: run ``model`` (``version``; empty: its router chooses) on ensemble tensors."""

    index: int
    model: str
    version: str
    inputs: tuple[tuple[str, str], ...]  # (the step model's input, the ensemble tensor it reads)
    outputs: tuple[tuple[str, str], ...]  # (the step model's output, the ensemble tensor it becomes)

    @property
    def where(self) -> str:
        return f"step {self.index} ({self.model})"


class SequenceTurns:
    """The order of each sequence in progress through one ensemble, across its versions and reloads.

    Held by the ensemble's catalog entry and handed to each version it loads, so a request that reaches a
    reloaded version still waits for its sequence's earlier requests in the version before.
    """

    def __init__(self) -> None:
        # Per sequence in progress: its lock, and how many requests hold or wait for it.
        self._turns: dict[CorrelationId, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def in_turn(self, sequence: CorrelationId) -> AsyncIterator[None]:
        """Run the block when the requests of ``sequence`` that came before have gone through.

        Entered in the order requests arrive (nothing awaits before it), so a sequence's requests
        reach its stateful step in that order. The lock is dropped with its last user.
        """
        lock, users = self._turns.get(sequence, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._turns[sequence] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            _, users = self._turns[sequence]
            if users == 1:
                del self._turns[sequence]
            else:
                self._turns[sequence] = (lock, users - 1)


class EnsembleVersion:
    """One version of an ensemble: its tensors, its steps in waves, and its own statistics.

    It has what the loader, the protocol and the handler read of any served
    version (``spec``, ``stats``, ``config``, ``metadata``, ``labels``…);
    what belongs to a model that runs (a monitor, sequences, a queue) is
    absent. The handler never runs an ensemble as a model (no batcher, no
    cache, no timeout or priority of its own): it runs its steps.
    """

    monitor = None
    sequences = None
    queue_depth = 0

    # Set by check_steps: some step runs a stateful model (or a stateful ensemble), which takes the
    # request's sequence parameters.
    stateful = False

    def __init__(self, spec: ModelSpec, config: ModelConfig, metadata: Metadata, turns: SequenceTurns):
        """``turns``: where the ensemble's sequences keep their order (every version shares one)."""
        assert config.ensemble_scheduling is not None
        self.spec = spec
        self.config = config
        self.metadata = metadata
        self.labels: dict[str, tuple[str, ...]] = {}
        self.stats = ModelStats()
        configured = config.ensemble_scheduling.step
        self.steps = tuple(
            EnsembleStep(
                i,
                step.model_name,
                "" if step.model_version < 0 else str(step.model_version),
                tuple(step.input_map.items()),
                tuple(step.output_map.items()),
            )
            for i, step in enumerate(configured)
        )
        self.waves = tuple(tuple(self.steps[i] for i in wave) for wave in ensemble_plan(configured))
        self._observer: ModelObserver | None = None
        self.turns = turns

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.spec.version

    def start(self, observer: ModelObserver | None = None, calls_in_progress: Callable[[], int] | None = None) -> None:
        self._observer = observer  # kept so that telemetry's series for this version live as long as it does

    def set_background(self, background: bool) -> None:
        """Nothing runs here to lower; an ensemble takes no routing, so it is never a shadow anyway."""

    async def aclose(self, timeout: float | None = None) -> None:
        """Nothing to drain: requests in flight finish on the step models."""


def load_order(pipelines: dict[str, set[str]]) -> list[list[str]]:
    """Ensembles (by name, with the models their steps run) in the order to load them: each layer runs
    no ensemble of its own layer or later. Ensembles that run each other end up in the last layer,
    where their loads say so."""
    layers, stuck = dependency_layers({name: steps & pipelines.keys() for name, steps in pipelines.items()})
    return [*layers, stuck] if stuck else layers


def ensemble_spec(name: str, version: int, config: ModelConfig) -> ModelSpec:
    """What clients send and get: the config's tensors, with the batch dimension when it batches."""
    batches = bool(config.max_batch_size)

    def tensor(entry_name: str, data_type: str | None, dims: list[int] | None) -> TensorSpec:
        assert data_type is not None and dims is not None  # config.py requires both for an ensemble
        return TensorSpec(entry_name, from_triton_type(data_type), ((-1,) if batches else ()) + tuple(dims))

    return ModelSpec(
        name=name,
        version=version,
        inputs=tuple(tensor(t.name, t.data_type, t.dims) for t in config.input),
        outputs=tuple(tensor(t.name, t.data_type, t.dims) for t in config.output),
        max_batch_size=config.max_batch_size or 0,
        platform=ENSEMBLE_PLATFORM,
    )


def load_ensemble_version(
    directory: Path, name: str, version: int, config: ModelConfig, turns: SequenceTurns
) -> EnsembleVersion:
    """Version ``version`` of ensemble ``name`` (its version directory holds no model file; it may hold
    a metadata.yaml), keeping its sequences' order in ``turns``. Raises ModelLoadError."""
    if not directory.is_dir():
        raise ModelLoadError(f"{directory} does not exist")
    metadata = resolve_metadata(directory, config)
    return EnsembleVersion(ensemble_spec(name, version, config), config, metadata, turns)


class StepModel(Protocol):
    """What the load-time check reads of a step's model (a served version; an EnsembleVersion is one)."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def sequences(self) -> object | None: ...


# The versions of model ``name`` that may run a step naming ``version`` (empty: each its routing may
# choose), the primary first; raises InferGateError when it serves none.
Served = Callable[[str, str], Sequence[StepModel]]


def check_steps(ensemble: EnsembleVersion, served: Served) -> None:
    """Check every step against the model it runs now, each version its routing may choose included;
    raises ModelLoadError listing what does not fit."""
    known: dict[str, tuple[Datatype, tuple[int, ...], str]] = {
        t.name: (t.datatype, t.shape, "the ensemble input") for t in ensemble.spec.inputs
    }
    problems: list[str] = []
    stateful: list[bool] = []
    for wave in ensemble.waves:
        for step in wave:
            problems += _check_step(ensemble.spec, step, served, known, stateful)
    for t in ensemble.spec.outputs:
        written = known.get(t.name)
        if written is not None:
            problems += _link(f"ensemble output {t.name!r}", (t.datatype, t.shape), written)
    if problems:
        raise ModelLoadError("; ".join(problems))
    ensemble.stateful = any(stateful)


def _check_step(
    ensemble: ModelSpec,
    step: EnsembleStep,
    served: Served,
    known: dict[str, tuple[Datatype, tuple[int, ...], str]],
    stateful: list[bool],
) -> list[str]:
    """Problems with ``step`` as its model is served now; adds to ``known`` the tensors it writes, and
    to ``stateful`` whether it runs a stateful model.

    When the step names no version, each version the model's routing may choose (a split, a canary)
    must fit as the primary does and give the same outputs: a request may reach any of them.
    """
    try:
        model, *others = served(step.model, step.version)
    except InferGateError as exc:
        return [f"{step.where}: {exc.message}"]
    if isinstance(model, EnsembleVersion):
        nesting = _nesting(ensemble.name, model, served)
        if nesting:
            return [f"{step.where}: {nesting}"]
    stateful.append(takes_sequences(model))
    problems = _step_fits(ensemble, step, model.spec, known, step.where)
    for other in others:
        where = f"{step.where} on version {other.spec.version} (its routing may choose it)"
        problems += _step_fits(ensemble, step, other.spec, known, where)
        problems += _same_outputs(step, other.spec, model.spec, where)
    for inner, outer in step.outputs:
        tensor = model.spec.output_by_name.get(inner)
        if tensor is not None:
            known[outer] = (tensor.datatype, tensor.shape, f"{step.where} output {inner!r}")
    return problems


def _step_fits(
    ensemble: ModelSpec,
    step: EnsembleStep,
    spec: ModelSpec,
    known: dict[str, tuple[Datatype, tuple[int, ...], str]],
    where: str,
) -> list[str]:
    """Problems with the step's maps and the tensors it reads, against the model version ``spec``."""
    problems: list[str] = []
    if ensemble.batches and spec.max_batch_size < ensemble.max_batch_size:
        problems.append(
            f"{where}: the model takes at most {spec.max_batch_size} rows a request, the ensemble "
            f"{ensemble.max_batch_size} (max_batch_size)"
        )
    unfed = sorted(set(spec.input_by_name) - {inner for inner, _ in step.inputs})
    if unfed:
        problems.append(f"{where}: input_map leaves the model's inputs {unfed} unfed")
    for inner, outer in step.inputs:
        tensor = spec.input_by_name.get(inner)
        if tensor is None:
            problems.append(f"{where}: input_map names {inner!r}; the model's inputs are {sorted(spec.input_by_name)}")
        elif outer in known:
            problems += _link(f"{where} input {inner!r}", (tensor.datatype, tensor.shape), known[outer])
    for inner, _ in step.outputs:
        if inner not in spec.output_by_name:
            outputs = sorted(spec.output_by_name)
            problems.append(f"{where}: output_map names {inner!r}; the model's outputs are {outputs}")
    return problems


def _same_outputs(step: EnsembleStep, spec: ModelSpec, primary: ModelSpec, where: str) -> list[str]:
    """Problems with version ``spec`` giving the step's outputs otherwise than the primary does."""
    problems: list[str] = []
    for inner, _ in step.outputs:
        tensor, wanted = spec.output_by_name.get(inner), primary.output_by_name.get(inner)
        if tensor is not None and wanted is not None:
            given = (wanted.datatype, wanted.shape, f"version {primary.version}'s")
            problems += _link(f"{where} output {inner!r}", (tensor.datatype, tensor.shape), given)
    return problems


def takes_sequences(model: object) -> bool:
    """Whether a served version takes a request's sequence parameters: a stateful model, or an ensemble
    with a stateful step."""
    return getattr(model, "sequences", None) is not None or (isinstance(model, EnsembleVersion) and model.stateful)


def _nesting(name: str, inner: EnsembleVersion, served: Served) -> str:
    """What is wrong with running ensemble ``inner`` as a step of ensemble ``name`` ("" if nothing):
    a path of steps that leads back to ``name`` (a cycle), or ensembles nested too deep."""
    level = [(inner, [inner.name])]
    for _ in range(MAX_NESTING):
        below = []
        for ensemble, path in level:
            for step in ensemble.steps:
                if step.model == name:
                    return f"its steps lead back to ensemble '{name}' ({' -> '.join([name, *path, name])}): a cycle"
                try:
                    model = served(step.model, step.version)[0]
                except InferGateError:
                    continue  # the inner ensemble fails on its own; not this load's concern
                if isinstance(model, EnsembleVersion):
                    below.append((model, [*path, model.name]))
        if not below:
            return ""
        level = below
    return f"ensembles nest more than {MAX_NESTING} deep below it"


def _link(
    reader: str, wanted: tuple[Datatype, tuple[int, ...]], given: tuple[Datatype, tuple[int, ...], str]
) -> list[str]:
    """Problems with ``reader`` taking the tensor ``given`` describes (datatype, full shape, source).

    Full shapes, the batch dimension included (-1 in a model that batches), so an ensemble that
    does not batch may feed a model that does: its [1, 4] fits the model's [-1, 4].
    """
    (datatype, shape), (given_type, given_shape, source) = wanted, given
    if datatype is not given_type:
        return [f"{reader} is {datatype.name}, {source} {given_type.name}"]
    return [] if dims_match(shape, given_shape) else [f"{reader} has shape {list(shape)}, {source} {list(given_shape)}"]


@dataclass(frozen=True, slots=True)
class StepRequest:
    """A step's tensors as the step model's request: what the handler's run path needs."""

    inputs: Tensors
    rows: int
    group: Hashable


def step_request(ensemble: str, step: EnsembleStep, spec: ModelSpec, tensors: Tensors) -> StepRequest:
    """The step's inputs, read from ``tensors`` and checked against the version that runs the step.

    The load-time check makes a mismatch a changed step model, not the caller's
    doing: FailedPrecondition naming ensemble and step. Too many rows is the caller's: InvalidArgument.
    """
    inputs: Tensors = {}
    for inner, outer in step.inputs:
        array = tensors[outer]
        tensor = spec.input_by_name.get(inner)
        if tensor is None or array.dtype != tensor.datatype.numpy or not _fits(array.shape, tensor.shape):
            wanted = "no such input" if tensor is None else f"{tensor.datatype.name} {list(tensor.shape)}"
            raise FailedPrecondition(
                f"ensemble '{ensemble}' {step.where}: input {inner!r} takes {wanted}, the pipeline gives "
                f"{array.dtype} {list(array.shape)}; was the model changed? (reload the ensemble to check it)"
            )
        inputs[inner] = array
    first = next(iter(inputs.values()))
    rows = first.shape[0] if spec.batches and first.ndim else 1
    if spec.batches:  # as the codec checks a request's: a batch would otherwise mix rows across requests
        for inner, array in inputs.items():
            if array.ndim == 0 or array.shape[0] != rows:
                raise InvalidArgument(
                    f"ensemble '{ensemble}' {step.where}: input {inner!r} has {array.shape[0] if array.ndim else 0} "
                    f"rows and the step's other inputs {rows}; a batching model's inputs share their first dimension"
                )
    if spec.batches and rows > spec.max_batch_size:
        raise InvalidArgument(
            f"ensemble '{ensemble}' {step.where}: batch of {rows} rows; the model takes 1 to {spec.max_batch_size}"
        )
    return StepRequest(inputs, rows, spec.batch_group(inputs))


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(shape) == len(expected) and all(e < 0 or d == e for d, e in zip(shape, expected, strict=True))
