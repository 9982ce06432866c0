"""What one inference request is to the handler, and what it gets back, without any transport.

The servicer reads a ModelInferRequest once into an object that satisfies
:class:`InferenceRequest` (``codec.WireRequest``); the handler routes it, asks
it to decode its tensors for the version that was chosen, runs it, and hands
back an :class:`InferenceResult` that the servicer encodes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from infergate.models.sequence import SequenceParams
from infergate.models.spec import ModelSpec, Tensors
from infergate.routing.router import Decision

__all__ = ["DecodedRequest", "InferenceRequest", "InferenceResult", "RequestLimits"]


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may carry, on top of each model's own shapes and ``max_batch_size``."""

    max_elements: int = 64 * 1024 * 1024  # elements of any one tensor
    max_rows: int | None = None  # the batch dimension
    max_inputs: int | None = None  # input tensors


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    """A request's tensors, validated against the spec of the version that serves it."""

    inputs: Tensors
    rows: int  # the batch dimension (1 for a model that does not batch)
    group: Hashable  # requests with equal groups may share a batch
    outputs: tuple[str, ...]  # requested output names; empty: all
    sequence: SequenceParams | None = None  # sequence_id/start/end, when the request sent any
    classes: Mapping[str, int] = field(default_factory=dict)  # output -> top-k asked for (classification)


class InferenceRequest(Protocol):
    """One inference request as the handler sees it: read once, decoded on demand."""

    @property
    def model(self) -> str: ...

    @property
    def version(self) -> str:
        """The version the caller named; empty: let the router decide."""

    @property
    def id(self) -> str: ...

    @property
    def priority(self) -> int:
        """Triton's ``priority`` parameter: 1 is the highest; 0: the model's default."""

    @property
    def timeout_us(self) -> int | None:
        """The request's own server-side timeout (Triton's ``timeout`` parameter), if any."""

    def routing_key(self, header: str | None, parameter: str | None) -> str | None:
        """The sticky routing key: the value of metadata ``header`` or of request ``parameter``."""

    def decode(self, spec: ModelSpec, limits: RequestLimits) -> DecodedRequest:
        """The tensors and the parameters that shape the answer (sequence, classification), validated
        against ``spec``; raises InvalidArgument naming model and tensor."""

    def decode_elements(self, spec: ModelSpec) -> int:
        """How many elements :meth:`decode` will convert one by one (BYTES), bytes it copies out of shared
        memory counted in (``offload.py``): past ``offload.ELEMENTS_ON_LOOP`` it runs on a thread, after
        :meth:`attach`."""

    def attach(self, spec: ModelSpec, limits: RequestLimits) -> None:
        """Take hold, on the event loop, of what the request reads outside its message (shared-memory
        regions), so that :meth:`decode` may run on a thread; raises InvalidArgument as it would."""


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """What the handler answers: the outputs of the version that ran, and how the request was routed."""

    spec: ModelSpec
    outputs: Tensors
    requested: tuple[str, ...]  # output names the caller asked for; empty: all
    decision: Decision
    id: str
    shadowed: bool = False  # a copy was queued for the shadow version (routing chose to, and none dropped it)
