"""Triton's sequence batcher for ONNX models: correlation ids, control inputs and implicit state.

A stateful model sees a stream of requests that share a correlation id
(``sequence_id``), the first flagged ``sequence_start`` and the last
``sequence_end``. onnxruntime keeps no state of its own, so the model takes its
state as inputs and returns the next state as outputs (``sequence_batching.state``);
the :class:`SequenceScheduler` keeps each sequence's state between requests and
fills the control inputs (START, READY, END, CORRID) the config names.

Semantics (Triton's, see ``docs/user_guide/model_configuration.md`` upstream):

* A sequence holds one of ``capacity`` slots from its start request until its
  end request, or until it has been idle longer than
  ``max_sequence_idle_microseconds``. Slots per instance are ``max_batch_size``
  (direct) or ``max_candidate_sequences`` (oldest); a start request that finds
  none free waits in a FIFO backlog.
* The requests of one sequence run one at a time, in the order ``infer`` was
  called: each needs the state the previous one produced. Requests of different
  sequences run concurrently, so the model version's batcher puts them in one
  batch, one row per sequence.
* Every row sent is ready (READY is always true): state lives here, not in an
  instance, so no slot needs padding and any instance may run any sequence.
* A non-start request for a sequence that is unknown, ended or expired is
  refused with Triton's words; so is a request with no correlation id.

Where the request path uses this module:

* load (``models/version.py``): ``check_sequence_config`` and
  ``load_initial_states``; the version owns a ``SequenceScheduler`` over its own
  ``infer`` and builds its batcher from ``batching_for_sequences``; its ``spec``
  is ``request_spec(...)`` (control and state tensors are the server's, not the client's).
* request: the codec reads ``sequence_params(request.parameters)``; the handler
  (``serving/handler.py``) awaits ``version.sequences.infer(...)``, or, for a
  model without ``sequence_batching``, calls ``refuse_sequence(name, params)``.
* shutdown (``server.py``): on SIGTERM the server calls ``drain()`` (no sequence
  starts any more) and awaits ``finished()`` (the live ones ended or went idle)
  before it stops taking calls.
* unload: ``ModelVersion.aclose`` calls ``scheduler.close()`` after the batcher drained.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from infergate.errors import DeadlineExceeded, InvalidArgument, QueueFull, Unavailable
from infergate.models.config import DynamicBatching, SequenceBatching, SequenceControl
from infergate.models.datatypes import BYTES, DATATYPES, Datatype, from_triton_type
from infergate.models.paths import named_file
from infergate.models.spec import ModelSpec, Tensors, TensorSpec
from infergate.models.stats import StepTimes
from infergate.models.warmup import read_raw_tensor

__all__ = [
    "SequenceParams",
    "SequenceScheduler",
    "batching_for_sequences",
    "check_sequence_config",
    "load_initial_states",
    "refuse_sequence",
    "request_spec",
    "sequence_params",
]

CorrelationId = int | str

START, READY, END, CORRID = (
    "CONTROL_SEQUENCE_START",
    "CONTROL_SEQUENCE_READY",
    "CONTROL_SEQUENCE_END",
    "CONTROL_SEQUENCE_CORRID",
)
_FLAG_TYPES = {"int32_false_true": "INT32", "fp32_false_true": "FP32", "bool_false_true": "BOOL"}
# Expired ids remembered so that a late request hears why its sequence is gone.
_REMEMBERED_EXPIRIES = 4096


class Timer(Protocol):
    """What ``call_later`` returns: ``asyncio.TimerHandle``, or a test's fake."""

    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Timer]


class Run(Protocol):
    """``ModelVersion.infer``: queue full inputs (controls and state included) and return all outputs."""

    def __call__(
        self,
        inputs: Tensors,
        rows: int,
        group: Hashable,
        deadline: float | None,
        watch: bool = True,
        *,
        accrue: StepTimes | None = None,
    ) -> Awaitable[Tensors]: ...


# --------------------------------------------------------------------------- request parameters


@dataclass(frozen=True, slots=True)
class SequenceParams:
    """A request's sequence parameters; a correlation id of 0 or "" means none was given."""

    correlation_id: CorrelationId = 0
    start: bool = False
    end: bool = False

    @property
    def in_sequence(self) -> bool:
        return self.correlation_id not in (0, "")


def sequence_params(parameters: Mapping[str, Any]) -> SequenceParams | None:
    """The ``sequence_id``/``sequence_start``/``sequence_end`` request parameters, or None if none is set.

    ``parameters`` maps names to ``InferParameter`` messages. Wrong value types are
    refused with Triton's messages. A negative int64 id is the uint64 it wraps to (-5 is
    2**64 - 5), as in Triton: a client that can send only int64 (tritonclient) reaches
    every uint64 id that way.
    """
    if not any(key in parameters for key in ("sequence_id", "sequence_start", "sequence_end")):
        return None
    correlation_id: CorrelationId = 0
    if "sequence_id" in parameters:
        param = parameters["sequence_id"]
        kind = param.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param", "string_param"):
            raise InvalidArgument(
                "invalid value type for 'sequence_id' parameter, expected int64_param or string_param."
            )
        correlation_id = getattr(param, kind)
        if isinstance(correlation_id, int) and correlation_id < 0:
            correlation_id += 2**64  # Triton reads an int64 id as the uint64 of the same bits
    return SequenceParams(correlation_id, _flag(parameters, "sequence_start"), _flag(parameters, "sequence_end"))


def _flag(parameters: Mapping[str, Any], name: str) -> bool:
    if name not in parameters:
        return False
    param = parameters[name]
    if param.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"invalid value type for '{name}' parameter, expected bool_param.")
    return bool(param.bool_param)


def refuse_sequence(model: str, params: SequenceParams | None) -> None:
    """For a model without ``sequence_batching``: refuse a request that claims to be part of a sequence."""
    if params is not None and (params.in_sequence or params.start or params.end):
        raise InvalidArgument(
            f"model '{model}' does not use sequence batching, so it cannot take sequence_id "
            f"{params.correlation_id!r} (sequence_start={params.start}, sequence_end={params.end}); "
            "add a sequence_batching block to its config.yaml or send the request without sequence parameters"
        )


# --------------------------------------------------------------------------- load-time checks


def request_spec(spec: ModelSpec, config: SequenceBatching) -> ModelSpec:
    """The spec clients see: without the control and state inputs the server fills, nor the state outputs."""
    hidden_inputs = {c.name for c in config.control_input} | {s.input_name for s in config.state}
    hidden_outputs = {s.output_name for s in config.state}
    return ModelSpec(
        name=spec.name,
        version=spec.version,
        inputs=tuple(t for t in spec.inputs if t.name not in hidden_inputs),
        outputs=tuple(t for t in spec.outputs if t.name not in hidden_outputs),
        max_batch_size=spec.max_batch_size,
        platform=spec.platform,
    )


def check_sequence_config(spec: ModelSpec, config: SequenceBatching) -> None:
    """Check the ``sequence_batching`` block against the graph; ValueError lists every mismatch."""
    problems: list[str] = []
    control_shape = (-1, 1) if spec.batches else (1,)
    for entry in config.control_input:
        control = entry.control[0]
        datatype = _control_datatype(control)
        where = f"sequence_batching.control_input {entry.name!r} ({control.kind})"
        problems += _tensor_problems(spec.input_by_name.get(entry.name), "input", where, datatype, control_shape)
    for state in config.state:
        datatype = from_triton_type(state.data_type)
        shape = (-1, *state.dims) if spec.batches else tuple(state.dims)
        where = "sequence_batching.state"
        problems += _tensor_problems(spec.input_by_name.get(state.input_name), "input", where, datatype, shape)
        problems += _tensor_problems(spec.output_by_name.get(state.output_name), "output", where, datatype, shape)
    if problems:
        raise ValueError("; ".join(problems))


def _tensor_problems(
    tensor: TensorSpec | None, kind: str, where: str, datatype: Datatype, shape: tuple[int, ...]
) -> list[str]:
    if tensor is None:
        return [f"{where}: the model has no {kind} of that name"]
    problems = []
    if tensor.datatype.name != datatype.name:
        problems.append(
            f"{where}: {kind} {tensor.name!r} is {tensor.datatype.name}, the config implies {datatype.name}"
        )
    fits = len(tensor.shape) == len(shape) and all(
        g == -1 or c == -1 or g == c for g, c in zip(tensor.shape, shape, strict=True)
    )
    if not fits:
        problems.append(
            f"{where}: {kind} {tensor.name!r} has shape {list(tensor.shape)}, the config implies {list(shape)}"
        )
    return problems


def _control_datatype(control: SequenceControl) -> Datatype:
    if control.kind == CORRID:
        assert control.data_type is not None  # the config requires it for CORRID
        return from_triton_type(control.data_type)
    field_name = next(n for n in _FLAG_TYPES if getattr(control, n) is not None)
    return DATATYPES[_FLAG_TYPES[field_name]]


def load_initial_states(config: SequenceBatching, model_dir: Path | None) -> dict[str, npt.NDArray[Any]]:
    """Each state input's value on a sequence's first request (without the batch dimension).

    ``initial_state`` gives zeros or the raw row-major contents of
    ``model_dir/initial_state/<data_file>``; without it the state starts as zeros
    with 1 for every variable dimension (Triton leaves it uninitialised).
    Raises ValueError naming the file when a data file is missing or the wrong size
    (or when there is a data file but no ``model_dir``).
    """
    states: dict[str, npt.NDArray[Any]] = {}
    for state in config.state:
        datatype = from_triton_type(state.data_type)
        if not state.initial_state:
            states[state.input_name] = _zeros(datatype, [1 if d < 0 else d for d in state.dims])
            continue
        initial = state.initial_state[0]
        if initial.zero_data is not None:
            states[state.input_name] = _zeros(datatype, initial.dims)
        else:
            assert initial.data_file is not None  # the config allows exactly one of the two
            if model_dir is None:
                raise ValueError(f"state {state.input_name!r}: initial_state.data_file needs the model directory")
            path = named_file(model_dir / "initial_state", initial.data_file, "initial_state data_file")
            states[state.input_name] = read_raw_tensor(path, datatype, initial.dims)
    return states


def _zeros(datatype: Datatype, dims: list[int]) -> npt.NDArray[Any]:
    if datatype.name == BYTES:
        return np.full(dims, "", dtype=object)
    return np.zeros(dims, dtype=datatype.numpy)


def batching_for_sequences(config: SequenceBatching, max_batch_size: int) -> DynamicBatching:
    """The batcher settings that carry the strategy's delay and preferred sizes across sequences.

    Direct: the delay applies only with ``minimum_slot_utilization`` > 0 (as in
    Triton), which then becomes the preferred batch size. Oldest: its delay and
    preferred sizes as given.
    """
    if config.oldest is not None:
        oldest = config.oldest
        preferred = [p for p in oldest.preferred_batch_size if p <= max(max_batch_size, 1)]
        return DynamicBatching(
            max_queue_delay_microseconds=oldest.max_queue_delay_microseconds, preferred_batch_size=preferred
        )
    direct = config.direct
    if direct is None or direct.minimum_slot_utilization == 0 or max_batch_size == 0:
        return DynamicBatching()
    target = max(1, math.ceil(direct.minimum_slot_utilization * max_batch_size))
    return DynamicBatching(
        max_queue_delay_microseconds=direct.max_queue_delay_microseconds, preferred_batch_size=[target]
    )


# --------------------------------------------------------------------------- the scheduler


@dataclass(eq=False)
class _Sequence:
    key: CorrelationId
    last_seen: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: int = 0  # requests running or waiting for the lock
    slot: int | None = None  # None: not started (or ended, or expired)
    state: Tensors = field(default_factory=dict)


@dataclass(frozen=True)
class _Flag:
    name: str
    false: npt.NDArray[Any]
    true: npt.NDArray[Any]


class SequenceScheduler:
    """The sequences of one model version: their slots, state, and order.

    ``run`` is the version's ``infer`` (batcher → runner); ``initial_states`` come
    from :func:`load_initial_states`; ``clock`` (seconds, monotonic) times idleness
    and ``call_later`` (the running loop's unless given) wakes the idle timer; tests
    replace both with a clock they move.
    """

    def __init__(
        self,
        spec: ModelSpec,
        config: SequenceBatching,
        run: Run,
        *,
        instances: int = 1,
        initial_states: Mapping[str, npt.NDArray[Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        call_later: CallLater | None = None,
    ) -> None:
        self._spec = spec
        self._config = config
        self._run = run
        self._clock = clock
        self._call_later = call_later
        slots = max(1, spec.max_batch_size)
        if config.oldest is not None and config.oldest.max_candidate_sequences > 0:
            slots = config.oldest.max_candidate_sequences
        self.capacity = slots * instances
        self._free = list(range(self.capacity))  # a heap: the lowest free slot goes first
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()
        self._table: collections.OrderedDict[CorrelationId, _Sequence] = collections.OrderedDict()
        self._expired: collections.OrderedDict[CorrelationId, None] = collections.OrderedDict()
        self._timer: Timer | None = None
        self._vacated = asyncio.Event()  # a slot went back to the free list
        self._draining = False
        self._closed = False
        self._initial = dict(load_initial_states(config, None) if initial_states is None else initial_states)
        self._states = [(s.input_name, s.output_name) for s in config.state]
        self._flags = {kind: self._make_flag(kind) for kind in (START, READY, END)}
        corrid = config.control(CORRID)
        self._corrid = (corrid[0], _control_datatype(corrid[1])) if corrid else None

    # ----------------------------------------------------------------- public surface

    @property
    def active(self) -> int:
        """Sequences holding a slot."""
        return self.capacity - len(self._free)

    @property
    def backlog(self) -> int:
        """Start requests waiting for a free slot."""
        return sum(1 for w in self._waiters if not w.done())

    async def infer(
        self,
        params: SequenceParams | None,
        inputs: Tensors,
        deadline: float | None = None,
        watch: bool = True,
        accrue: StepTimes | None = None,
    ) -> Tensors:
        """Run one request of a sequence; returns the model's outputs without the state outputs.

        ``inputs`` are the request's decoded inputs (see :func:`request_spec`),
        ``deadline``/``watch``/``accrue`` as for ``ModelVersion.infer``. Requests of one
        sequence run in the order of the calls: nothing here awaits before the
        request takes its place in the sequence's queue.
        """
        name = self._spec.name
        if self._closed:
            raise Unavailable(f"model {name} is unloading: its sequences were dropped; start them again")
        if params is None or not params.in_sequence:
            raise InvalidArgument(
                f"inference request to model '{name}' must specify a non-zero or non-empty correlation ID"
            )
        self._check_request(params, inputs)
        self.sweep()
        key = params.correlation_id
        seq = self._table.get(key)
        if seq is None:
            if not params.start:
                raise InvalidArgument(self._needs_start(key))
            seq = self._table[key] = _Sequence(key, self._clock())
            self._expired.pop(key, None)
        seq.pending += 1
        self._touch(seq)
        try:
            async with seq.lock:
                return await self._step(seq, params, inputs, deadline, watch, accrue)
        finally:
            seq.pending -= 1
            self._touch(seq)
            if seq.slot is None and seq.pending == 0 and self._table.get(key) is seq:
                del self._table[key]
            self._arm_timer()

    def sweep(self) -> int:
        """Free the sequences idle longer than ``max_sequence_idle_microseconds``; returns how many."""
        now = self._clock()
        limit = self._config.idle_seconds
        idle = []
        for key, seq in self._table.items():  # least recently seen first
            if now < seq.last_seen + limit:  # the expiry the idle timer is set for
                break
            if seq.pending == 0:
                idle.append(key)
        for key in idle:
            self._end(self._table.pop(key))
            self._expired[key] = None
            if len(self._expired) > _REMEMBERED_EXPIRIES:
                self._expired.popitem(last=False)
        return len(idle)

    def drain(self) -> None:
        """The server is shutting down: refuse the starts waiting for a slot, and every start from now on.

        Sequences already started go on until they end or go idle (:meth:`finished`), as Triton
        serves its in-flight sequences while it stops. A start would only hold the drain (waiting
        for a slot) or be cut off before its end: refused at once, it can go to another replica.
        """
        self._draining = True
        self._refuse_waiters(Unavailable(self._shutting_down()))

    async def finished(self) -> None:
        """Return once no sequence holds a slot (after :meth:`drain`: once each live one ended or went idle)."""
        while self.active and not self._closed:
            self._vacated.clear()
            await self._vacated.wait()

    def close(self) -> None:
        """Stop the idle timer, refuse the starts still waiting for a slot, drop every sequence.

        Call it after the version's batcher drained; requests that come later are refused.
        """
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._refuse_waiters(Unavailable(f"model {self._spec.name} is unloading"))
        for seq in self._table.values():
            seq.slot = None
            seq.state = {}
        self._table.clear()
        self._vacated.set()

    def _refuse_waiters(self, error: Unavailable) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    # ----------------------------------------------------------------- one request

    async def _step(
        self,
        seq: _Sequence,
        params: SequenceParams,
        inputs: Tensors,
        deadline: float | None,
        watch: bool,
        accrue: StepTimes | None,
    ) -> Tensors:
        if self._closed:
            raise Unavailable(f"model {self._spec.name} is unloading: its sequences were dropped; start them again")
        if params.start:
            if self._draining:
                raise Unavailable(self._shutting_down())
            if seq.slot is None:
                seq.slot = await self._acquire(deadline if watch else None)
            seq.state = dict(self._initial)  # a conflicting restart also starts over
        elif seq.slot is None:
            raise InvalidArgument(self._needs_start(seq.key))
        feeds = {**inputs, **self._controls(params), **self._batched(seq.state)}
        try:
            outputs = await self._run(feeds, 1, self._group(feeds), deadline, watch=watch, accrue=accrue)
        finally:
            if params.end:
                self._end(seq)
        if not params.end:
            # Copies: the outputs are views of the whole batch's arrays.
            seq.state = {i: np.array(outputs[o][0] if self._spec.batches else outputs[o]) for i, o in self._states}
        hidden = {o for _, o in self._states}
        return {k: v for k, v in outputs.items() if k not in hidden}

    def _check_request(self, params: SequenceParams, inputs: Tensors) -> None:
        name = self._spec.name
        if self._spec.batches and any(a.shape[0] != 1 for a in inputs.values()):
            raise InvalidArgument(
                f"inference request to model '{name}' must specify batch-size 1 due to requirements of sequence batcher"
            )
        if self._corrid is None:
            return
        tensor, datatype = self._corrid
        is_string = isinstance(params.correlation_id, str)
        if is_string != (datatype.name == BYTES):
            sent = "BYTES" if is_string else "UINT64"
            raise InvalidArgument(
                f"sequence batching control '{tensor}' data-type is '{sent}', but model '{name}' "
                f"expects '{datatype.name}'"
            )

    def _shutting_down(self) -> str:
        return (
            f"the server is shutting down: model {self._spec.name} starts no new sequences; "
            "retry the whole sequence, from its start request, on another replica"
        )

    def _needs_start(self, key: CorrelationId) -> str:
        message = (
            f"inference request for sequence {key} to model '{self._spec.name}' must specify the START flag "
            "on the first request of the sequence"
        )
        if key in self._expired:
            micros = int(self._config.idle_seconds * 1e6)
            message += f" (it was idle for more than max_sequence_idle_microseconds={micros} and was freed)"
        return message

    # ----------------------------------------------------------------- tensors

    def _make_flag(self, kind: str) -> _Flag | None:
        found = self._config.control(kind)
        if found is None:
            return None
        name, control = found
        field_name = next(n for n in _FLAG_TYPES if getattr(control, n) is not None)
        false, true = getattr(control, field_name)
        dtype = DATATYPES[_FLAG_TYPES[field_name]].numpy
        shape = (1, 1) if self._spec.batches else (1,)
        return _Flag(name, np.full(shape, false, dtype=dtype), np.full(shape, true, dtype=dtype))

    def _controls(self, params: SequenceParams) -> Tensors:
        feeds: Tensors = {}
        for kind, on in ((START, params.start), (READY, True), (END, params.end)):
            flag = self._flags[kind]
            if flag is not None:
                feeds[flag.name] = flag.true if on else flag.false
        if self._corrid is not None:
            tensor, datatype = self._corrid
            feeds[tensor] = corrid_tensor(params.correlation_id, datatype, self._spec.batches)
        return feeds

    def _batched(self, state: Tensors) -> Tensors:
        return {k: v[np.newaxis] for k, v in state.items()} if self._spec.batches else state

    def _group(self, feeds: Tensors) -> Hashable:
        """Requests whose inner shapes differ cannot share a batch (variable state dims)."""
        spec = self._spec
        if not (spec.batches and spec.variable_inner_dims):
            return None
        return tuple(feeds[t.name].shape[1:] for t in spec.inputs)

    # ----------------------------------------------------------------- slots and idleness

    async def _acquire(self, deadline: float | None) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self.backlog >= self._config.max_backlog_sequences:
            raise QueueFull(
                f"model {self._spec.name}: all {self.capacity} sequence slots are in use and "
                f"{self.backlog} sequences already wait for one"
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[int] = loop.create_future()
        self._waiters.append(waiter)
        try:
            # deadline is time.monotonic(), as everywhere; the loop's own clock may be coarser (uvloop's).
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                return await waiter
        except BaseException as exc:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._release(waiter.result())  # handed a slot just as the caller gave up
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"model {self._spec.name}: deadline passed while the sequence waited for one of "
                    f"{self.capacity} sequence slots"
                ) from None
            raise

    def _release(self, slot: int) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        heapq.heappush(self._free, slot)
        self._vacated.set()

    def _end(self, seq: _Sequence) -> None:
        if seq.slot is not None:
            self._release(seq.slot)
        seq.slot = None
        seq.state = {}

    def _touch(self, seq: _Sequence) -> None:
        seq.last_seen = self._clock()
        if self._table.get(seq.key) is seq:
            self._table.move_to_end(seq.key)

    def _arm_timer(self) -> None:
        """Sweep again when the least recently seen sequence without a request in progress goes idle
        (Triton's reaper wakes then too). A timer already set is never later than that: every
        sequence seen since was seen later."""
        if self._timer is not None:
            return
        limit = self._config.idle_seconds
        # A sequence with a request in progress is seen again when it ends (and the timer set then).
        expiry = next((s.last_seen + limit for s in self._table.values() if s.pending == 0), None)
        if expiry is None:
            return
        call_later = self._call_later or asyncio.get_running_loop().call_later
        self._timer = call_later(max(expiry - self._clock(), 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.sweep()
        self._arm_timer()


def corrid_tensor(correlation_id: CorrelationId, datatype: Datatype, batches: bool) -> npt.NDArray[Any]:
    """The CORRID control value; 32-bit integer types get the id's low-order 32 bits (as in Triton)."""
    shape = (1, 1) if batches else (1,)
    if datatype.name == BYTES:
        return np.full(shape, str(correlation_id), dtype=object)
    wide = np.array(int(correlation_id) % 2**64, dtype=np.uint64)
    return np.full(shape, wide.astype(datatype.numpy), dtype=datatype.numpy)
