"""The inference handler: route → infer → record → mirror, for one request, with no transport.

The servicer reads the wire message into an
:class:`~infergate.serving.request.InferenceRequest` and encodes the
:class:`~infergate.serving.request.InferenceResult`; everything between is
here and knows no gRPC:

1. **route**: the catalog picks the version (and resolves the shadow copy's target);
2. **decode**: the request's tensors, checked against that version's spec (on a thread when they hold
   many BYTES elements, or many bytes to copy out of shared memory: ``offload.py``);
3. **infer**: the version's batcher queues them and its runner executes the batch
   (a stateful model's requests go through its sequence scheduler, which adds
   the control and state inputs); outputs asked for as classes become top-k strings.
   A model with ``response_cache`` enabled first looks for the same inputs in the
   server's response cache, and keeps what it computes there. An ensemble's request
   runs each of its steps through steps 1 to 5 on the step's model (its routing, batcher,
   statistics, monitor and shadow), feeding each step the tensors of the steps before;
4. **record**: the outcome goes to the version's statistics and to the router (canary),
   and an answered request is offered to the version's monitor (drift, payload log:
   sampled, handed to a background thread, never waited on);
5. **mirror**: when routing chose to, the same inputs are offered to the shadow
   version, after the answer is ready; that never waits and never fails the caller.
   Requests of a sequence are never mirrored (a shadow would hold only part of it).

Unary ModelInfer and every request of a ModelStreamInfer stream go through
:meth:`InferenceHandler.infer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Coroutine, Hashable

from infergate.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from infergate.heap import in_thread
from infergate.models.ensemble import MAX_NESTING, EnsembleStep, EnsembleVersion, step_request, takes_sequences
from infergate.models.response_cache import ResponseCache, request_digest
from infergate.models.sequence import SequenceParams, refuse_sequence
from infergate.models.spec import Tensors
from infergate.models.stats import StepTimes
from infergate.models.version import ModelVersion
from infergate.repository.catalog import ModelCatalog, Routed, ShadowTarget
from infergate.routing.shadow import ShadowJob, ShadowQueue
from infergate.serving.classification import classify_outputs
from infergate.serving.offload import ELEMENTS_ON_LOOP, class_strings
from infergate.serving.request import DecodedRequest, InferenceRequest, InferenceResult, RequestLimits

__all__ = ["InferenceHandler"]

# Errors that say something about the request, not about the version that served it (canary judgement).
_CALLER_ERRORS = (InvalidArgument, NotFound, Cancelled)
# A cancellation this close to the call's deadline is the deadline's doing (gRPC's timer and ours differ slightly).
_EXPIRY_SLACK_NS = 5_000_000


class InferenceHandler:
    """Serves inference requests from the models in ``catalog``."""

    def __init__(
        self, catalog: ModelCatalog, limits: RequestLimits, shadows: ShadowQueue, cache: ResponseCache | None = None
    ):
        """``cache``: the response cache of the models that enable one (None: none of them caches)."""
        self._catalog = catalog
        self._limits = limits
        self._shadows = shadows
        self._cache = cache

    async def infer(self, request: InferenceRequest, remaining: float | None) -> InferenceResult:
        """Run ``request``; ``remaining`` is the caller's deadline in seconds from now, if any.

        Raises the :class:`~infergate.errors.InferGateError` that says what went wrong.
        """
        started = time.perf_counter_ns()
        expires = None if remaining is None else started + int(remaining * 1e9)
        routed = self._catalog.route(request.model, request.version, request)
        error: BaseException | None = None
        model = routed.model
        try:
            spec = model.spec
            if request.decode_elements(spec) <= ELEMENTS_ON_LOOP:
                decoded = request.decode(spec, self._limits)
            else:
                routed, decoded = await self._decoded_on_thread(request, routed)
                model, spec = routed.model, routed.model.spec
            outputs = await self._outputs(routed, decoded, request, expires)
            if not decoded.classes or class_strings(outputs, decoded.classes, spec) <= ELEMENTS_ON_LOOP:
                answer = classify_outputs(outputs, decoded.classes, spec, model.labels)
            else:
                answer = await in_thread(classify_outputs, outputs, decoded.classes, spec, model.labels)
        except BaseException as exc:  # a cancelled call (CancelledError) is an outcome too: never a success
            error = exc
            raise
        finally:
            _record(routed, error, started, expires)
            # The error's traceback holds this frame: a reference back to the error would make a cycle, and keep
            # the request (its shared-memory regions' descriptors) until the garbage collector happened by.
            error = None
        shadowed = self._answered(routed, decoded, outputs, request.id)
        return InferenceResult(model.spec, answer, decoded.outputs, routed.decision, request.id, shadowed)

    async def _decoded_on_thread(self, request: InferenceRequest, routed: Routed) -> tuple[Routed, DecodedRequest]:
        """``request`` decoded on a thread (``offload.py``), and the version it is for.

        A version takes new work only in the step that routes to it (``catalog.py``): a reload
        may switch it out while the decoding runs. Then the request is routed again, and decoded
        again for the version that now serves, as if it had arrived after the reload.
        """
        while True:
            request.attach(routed.model.spec, self._limits)
            decoded = await in_thread(request.decode, routed.model.spec, self._limits)
            if self._catalog.serves(routed.model):
                return routed, decoded
            routed = self._catalog.route(request.model, request.version, request)

    def _outputs(
        self,
        routed: Routed,
        decoded: DecodedRequest,
        request: InferenceRequest,
        expires: int | None,
        accrue: StepTimes | None = None,
        depth: int = 0,
    ) -> Coroutine[None, None, Tensors]:
        """The routed version's outputs for ``decoded`` (to await): from its steps, from the cache, or run.
        Not a coroutine function itself: the request path pays for one coroutine, not two.
        ``accrue``: an ensemble's step adds its queue and compute times there; ``depth``: how many
        ensembles this request is inside."""
        model = routed.model
        if isinstance(model, EnsembleVersion):
            return self._ensemble(model, decoded, request, expires, accrue, depth)
        remaining = _remaining(expires)
        if model.cache_token is not None and self._cache is not None:
            return self._cached(self._cache, model, decoded, request, remaining, accrue)
        return self._run(model, decoded, request, remaining, accrue)

    def _answered(self, routed: Routed, decoded: DecodedRequest, outputs: Tensors, request_id: str) -> bool:
        """Offer an answered request to its version's monitor, and mirror it when routing chose to.
        Returns whether a copy was queued for the shadow (not dropped: see ``ShadowQueue.offer``)."""
        model = routed.model
        if model.monitor is not None:
            model.monitor.record(decoded.inputs, outputs, request_id=request_id, route=routed.decision.arm)
        if routed.shadow is not None and model.sequences is None:
            return self._mirror(routed.shadow, decoded, outputs)
        return False

    async def _ensemble(
        self,
        ensemble: EnsembleVersion,
        decoded: DecodedRequest,
        request: InferenceRequest,
        expires: int | None,
        accrue: StepTimes | None,
        depth: int,
    ) -> Tensors:
        """Run an ensemble's steps, each wave's together, and return the ensemble's outputs.

        The ensemble's statistics count the request with its steps' queue and compute times summed, as
        Triton's; an ensemble run as a step of another adds them to that one's too (``accrue``).
        """
        if depth >= MAX_NESTING:  # checked at load; only reloads of several ensembles at once get here
            raise FailedPrecondition(
                f"ensemble '{ensemble.name}' runs inside {depth} ensembles, more than {MAX_NESTING}: "
                "reload the ensembles to have their steps checked"
            )
        sequence = decoded.sequence
        if sequence is not None and not (sequence.in_sequence or sequence.start or sequence.end):
            sequence = None
        if sequence is not None and not ensemble.stateful:
            raise InvalidArgument(
                f"ensemble '{ensemble.name}' runs no stateful model, so it cannot take sequence_id "
                f"{sequence.correlation_id!r}; send the request without sequence parameters"
            )
        # A sequence's requests go through in the order they came (see SequenceTurns.in_turn).
        turn = ensemble.turns.in_turn(sequence.correlation_id) if sequence is not None else contextlib.nullcontext()
        async with turn:
            tensors = dict(decoded.inputs)
            times = StepTimes()
            for wave in ensemble.waves:
                steps = [self._step(ensemble, s, tensors, request, expires, times, depth, sequence) for s in wave]
                results = [await steps[0]] if len(steps) == 1 else await asyncio.gather(*steps)
                for step, outputs in zip(wave, results, strict=True):
                    for inner, outer in step.outputs:
                        tensors[outer] = outputs[inner]
        ensemble.stats.record_ensemble(decoded.rows, times)
        if accrue is not None:
            accrue.absorb(times)
        return {t.name: tensors[t.name] for t in ensemble.spec.outputs}

    async def _step(
        self,
        ensemble: EnsembleVersion,
        step: EnsembleStep,
        tensors: Tensors,
        request: InferenceRequest,
        expires: int | None,
        times: StepTimes,
        depth: int,
        sequence: SequenceParams | None,
    ) -> Tensors:
        """One step, served as a request to its model is: routed, run, counted, monitored, mirrored.
        ``sequence``: the request's sequence parameters, which go to a stateful step's model only."""
        started = time.perf_counter_ns()
        try:
            routed = self._catalog.route(step.model, step.version, request)
        except (NotFound, Unavailable, InvalidArgument) as exc:
            raise Unavailable(f"ensemble '{ensemble.name}' {step.where}: {exc.message}") from None
        # Checked before it counts as the step model's request: a mismatch is the pipeline's, not the model's.
        part = step_request(ensemble.name, step, routed.model.spec, tensors)
        stateful = sequence if takes_sequences(routed.model) else None
        decoded = DecodedRequest(part.inputs, part.rows, part.group, (), stateful)
        error: BaseException | None = None
        try:
            outputs = await self._outputs(routed, decoded, request, expires, times, depth + 1)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _record(routed, error, started, expires)
            error = None  # no cycle through the traceback (see infer)
        self._answered(routed, decoded, outputs, request.id)
        return outputs

    async def _cached(
        self,
        cache: ResponseCache,
        model: ModelVersion,
        decoded: DecodedRequest,
        request: InferenceRequest,
        remaining: float | None,
        accrue: StepTimes | None = None,
    ) -> Tensors:
        """The answer kept for the same inputs, or the computed one, kept for next time."""
        refuse_sequence(model.name, decoded.sequence)  # a request the model would refuse is refused, kept or not
        stats = model.stats
        started = time.perf_counter_ns()
        key = (model.cache_token, request_digest(decoded.inputs))
        kept = cache.get(key)
        model.cache_looked_up(kept is not None)
        if kept is not None:
            stats.record_cache_hit(time.perf_counter_ns() - started)
            return dict(kept)
        looked_up = time.perf_counter_ns() - started
        outputs = await self._run(model, decoded, request, remaining, accrue)
        keeping = time.perf_counter_ns()
        cache.put(key, outputs)
        stats.cache_miss.add(looked_up + time.perf_counter_ns() - keeping)
        return outputs

    @staticmethod
    async def _run(
        model: ModelVersion,
        decoded: DecodedRequest,
        request: InferenceRequest,
        remaining: float | None,
        accrue: StepTimes | None = None,
    ) -> Tensors:
        """Run the request on the routed version. Nothing here awaits before the request is queued
        (on the batcher, or in its sequence's order): requests of one sequence keep their order."""
        deadline, server_side = _deadline(remaining, request.timeout_us, model.default_timeout_s)
        # gRPC cancels the call at its own deadline; the batcher times only server-side timeouts.
        if model.sequences is not None:
            return await model.sequences.infer(decoded.sequence, decoded.inputs, deadline, server_side, accrue)
        refuse_sequence(model.name, decoded.sequence)
        level = model.priority_level(request.priority)
        return await model.infer(decoded.inputs, decoded.rows, decoded.group, deadline, server_side, level, accrue)

    def _mirror(self, shadow: ShadowTarget, decoded: DecodedRequest, outputs: Tensors) -> bool:
        """Queue the same inputs for the shadow version; never waits, never fails the caller.
        Returns whether the copy was queued (False: dropped, and counted as dropped)."""
        call = functools.partial(_shadow_call, shadow.model, decoded.inputs, decoded.rows, decoded.group)
        job = ShadowJob(call, outputs, shadow.stats, shadow.spec.timeout_seconds, shadow.spec.max_busy_fraction)
        return self._shadows.offer(job, limit=shadow.spec.queue_size)


async def _shadow_call(model: ModelVersion, inputs: Tensors, rows: int, group: Hashable) -> Tensors:
    """A shadow's inference, counted in its version's statistics as a request that succeeded or failed
    (its batches and rows are counted by the version as any others)."""
    started = time.perf_counter_ns()
    answered = False
    try:
        outputs = await model.infer(inputs, rows, group, None)
        answered = True
        return outputs
    finally:
        model.stats.record_request(answered, time.perf_counter_ns() - started)


def _record(routed: Routed, error: BaseException | None, started_ns: int, expires_ns: int | None) -> None:
    """Count one finished request in its version's statistics and feed the router's canary.

    Only an answered request is a success. The canary is judged on what the
    version did: a bad request is not its fault, and a call its client gave
    up on before the deadline says nothing either way; a call whose deadline
    passed (gRPC cancels it then) counts against the version that was too slow.
    """
    now = time.perf_counter_ns()
    elapsed_ns = now - started_ns
    routed.model.stats.record_request(error is None, elapsed_ns)
    if isinstance(error, asyncio.CancelledError) and (expires_ns is None or now < expires_ns - _EXPIRY_SLACK_NS):
        return  # the client hung up in time: no judgement
    served_ok = error is None or isinstance(error, _CALLER_ERRORS)
    routed.router.observe(routed.decision, served_ok, elapsed_ns / 1e9)


def _remaining(expires_ns: int | None) -> float | None:
    """Seconds left until ``expires_ns`` (``time.perf_counter_ns``), if the call has a deadline."""
    return None if expires_ns is None else (expires_ns - time.perf_counter_ns()) / 1e9


def _deadline(remaining: float | None, timeout_us: int | None, default_s: float | None) -> tuple[float | None, bool]:
    """The ``time.monotonic()`` by which the request must have run (the tightest of the gRPC
    deadline, the ``timeout`` parameter and the model's default timeout), and whether
    that limit is a server-side one (which nothing but the batcher enforces)."""
    server = timeout_us / 1e6 if timeout_us else default_s
    if remaining is None and server is None:
        return None, False
    server_side = server is not None and (remaining is None or server < remaining)
    limit = server if server_side else remaining
    assert limit is not None
    return time.monotonic() + limit, server_side
