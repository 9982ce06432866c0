"""Device-resident execution: one instance's session run through onnxruntime IO binding.

Why: ``session.run`` copies every input to the execution provider's device and
every output back inside the call, allocating device memory each time. A
:class:`BoundSession` instead owns, for the life of the model version:

- one host *staging* buffer per input, ``max_batch_size`` rows: the batch is
  collated straight into it, so collating allocates nothing;
- a ladder of device buffers per input, one per *bucket* of rows. A batch of
  ``n`` rows is copied host→device once, into the smallest bucket that holds
  ``n`` rows (``OrtValue.update_inplace``), and bound by address with its exact
  shape ``[n, ...]``. Buckets are powers of two, so a copy moves at most twice
  the rows it needs and no device memory is allocated per batch;
- outputs that onnxruntime writes straight into host arrays allocated for the
  batch (one device→host copy; the arrays outlive the batch, so they are new
  each time, and the callers get views of them). An output whose shape is not
  known before the run (variable dimensions besides the batch, or a first
  dimension that is not the batch: the load's probe says which) is bound by
  device alone, and onnxruntime allocates it.

CUDA graphs (``device_execution.cuda_graph_batch_sizes``): every captured size
is a bucket whose inputs and outputs stay bound to fixed device buffers, as
replay requires. A batch is padded with zero rows up to the next captured size
here, where it is collated, its graph replays (run option ``gpu_graph_id``),
and the padding rows are cut off the outputs. Graphs are captured at load, in
:meth:`BoundSession.warm_up`, with the rest of the process's CUDA work held
back (device_gate.py). Batches larger than the largest captured size
use ordinary buckets.

The same code runs with the CPU execution provider (``device_execution.io_binding:
true``): buffers then live in host memory and onnxruntime binds them the same
way. That is how the tests exercise it without a GPU; only capturing and
replaying graphs needs one (``scripts/gpu_check.sh``).

onnxruntime's Python API has no pinned host allocation that every supported
version offers, so the staging buffer is ordinary pageable memory: the copy is
still one per input per batch.

A BoundSession belongs to one instance thread; it is not thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from infergate.models.config import DeviceExecution
from infergate.models.device_gate import CUDA_GATE
from infergate.models.spec import ModelSpec, Tensors, TensorSpec

__all__ = [
    "DEVICE_OF_PROVIDER",
    "BindingPlan",
    "BoundSession",
    "Staged",
    "bucket_sizes",
    "plan_binding",
    "skip_graph_run_options",
]

log = logging.getLogger(__name__)

# Where bound buffers live for each provider that computes on a device of its own.
DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}

# onnxruntime's CUDA EP runs a graph id this many times normally before it captures it
# (min_num_runs_before_cuda_graph_capture is 2), then captures on the next run and
# replays from the one after: warm-up runs each captured size this often.
GRAPH_WARMUP_RUNS = 4
_SKIP_GRAPH = "-1"  # gpu_graph_id of a run that must neither capture nor replay


def skip_graph_run_options() -> Any:
    """Run options for a ``session.run`` of a session with CUDA graphs that must neither capture nor replay."""
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", _SKIP_GRAPH)
    return options


@dataclass(frozen=True)
class BindingPlan:
    """How a model version's sessions bind: on which device, and the sizes with a CUDA graph."""

    device: str  # "cuda" or "cpu": where the bound input buffers live
    device_id: int = 0
    graph_sizes: tuple[int, ...] = ()

    def describe(self) -> str:
        where = f"{self.device}:{self.device_id}" if self.device != "cpu" else "cpu"
        graphs = f" with CUDA graphs at batch {', '.join(map(str, self.graph_sizes))}" if self.graph_sizes else ""
        return f"io binding on {where}{graphs}"


def plan_binding(
    device: DeviceExecution, provider: str, options: dict[str, str], spec: ModelSpec
) -> BindingPlan | None:
    """The plan for sessions that run on ``provider``, or None for plain ``session.run``.

    Graphs asked for on a session that did not land on CUDA (a fallback) are
    dropped with a warning; on one that did, a model that cannot replay them
    raises ValueError (see :func:`_graph_blockers`). Models with BYTES tensors
    run with ``session.run``, with a warning: onnxruntime cannot bind strings.
    """
    sizes: tuple[int, ...] = tuple(device.cuda_graph_batch_sizes)
    if sizes and provider != "CUDAExecutionProvider":
        log.warning(
            "model %s: cuda_graph_batch_sizes ignored: the model runs on %s, not CUDAExecutionProvider",
            spec.name,
            provider,
        )
        sizes = ()
    if sizes and (blockers := _graph_blockers(spec, sizes)):
        raise ValueError(f"device_execution.cuda_graph_batch_sizes: {blockers}")
    where = DEVICE_OF_PROVIDER.get(provider, "cpu")
    if device.io_binding is False or (device.io_binding == "auto" and where == "cpu"):
        return None
    strings = [t.name for t in (*spec.inputs, *spec.outputs) if t.datatype.name == "BYTES"]
    if strings:
        log.warning("model %s: io binding off: tensors %s are BYTES, which onnxruntime cannot bind", spec.name, strings)
        return None
    return BindingPlan(where, int(options.get("device_id", "0")), sizes)


def _graph_blockers(spec: ModelSpec, sizes: Sequence[int]) -> str:
    """Why this model cannot replay CUDA graphs at ``sizes`` ('' if it can)."""
    if not spec.batches:
        return "the model does not batch (max_batch_size 0)"
    if max(sizes) > spec.max_batch_size:
        return f"{[s for s in sizes if s > spec.max_batch_size]} exceed max_batch_size {spec.max_batch_size}"
    unfit = [t.name for t in (*spec.inputs, *spec.outputs) if t.datatype.name == "BYTES" or _inner(t) is None]
    if unfit:
        return f"tensors {unfit} are BYTES or have variable dimensions besides the batch; a graph needs fixed buffers"
    return ""


def bucket_sizes(capacity: int, graph_sizes: Sequence[int] = ()) -> list[int]:
    """Row counts of the device buffers: the graph sizes, then powers of two above them, then ``capacity``."""
    sizes = sorted(graph_sizes)
    size = 1
    while size < capacity:
        if not sizes or size > sizes[-1]:
            sizes.append(size)
        size *= 2
    if not sizes or sizes[-1] < capacity:
        sizes.append(capacity)
    return sizes


def _inner(tensor: TensorSpec) -> tuple[int, ...] | None:
    """The fixed dimensions after the batch, or None when they vary (no fixed buffer then)."""
    inner = tensor.shape[1:]
    return None if -1 in inner else inner


@dataclass(frozen=True)
class _Slot:
    """One input or output: its numpy type and, when it has a fixed buffer, the dims after the batch."""

    name: str
    dtype: np.dtype[Any]
    inner: tuple[int, ...] | None


class _Bucket:
    """Device buffers for ``size`` rows and the binding that runs them (a CUDA graph when ``graph_id``)."""

    def __init__(self, session: Any, size: int, graph_id: int | None, plan: BindingPlan, run_options: Any) -> None:
        self.size = size
        self.graph_id = graph_id
        self.binding = session.io_binding()
        self.inputs: dict[str, Any] = {}  # staged input name -> OrtValue [size, *inner] on the device
        self.outputs: dict[str, Any] = {}  # graph buckets: output name -> OrtValue [size, *inner] on the device
        self.run_options = run_options
        if graph_id is not None:
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self._plan = plan

    def allocate(self, slot: _Slot, output: bool = False) -> None:
        assert slot.inner is not None
        value = ort.OrtValue.ortvalue_from_shape_and_type(
            [self.size, *slot.inner], slot.dtype.type, self._plan.device, self._plan.device_id
        )
        if output:
            self.outputs[slot.name] = value
            self.binding.bind_ortvalue_output(slot.name, value)
        else:
            self.inputs[slot.name] = value
            if self.graph_id is not None:  # a graph replays on the buffers it was captured with: bind once
                self.binding.bind_ortvalue_input(slot.name, value)


@dataclass(frozen=True)
class Staged:
    """A batch collated into the staging buffers, ready for :meth:`BoundSession.execute`."""

    rows: int
    bucket: _Bucket
    direct: Tensors  # inputs with variable dimensions, collated as they are

    @property
    def run_rows(self) -> int:
        """Rows the model computes: ``rows`` padded up to a captured size, when a graph runs the batch."""
        return self.bucket.size if self.bucket.graph_id is not None else self.rows


class BoundSession:
    """One session, its staging buffers and its buckets; see the module docstring."""

    def __init__(self, session: Any, spec: ModelSpec, plan: BindingPlan, unbatched: Collection[str] = ()) -> None:
        """``unbatched``: outputs whose first dimension is not the batch's rows, though the model batches
        (the load's probe found them); bound without a shape, and the runner's ``split`` tells."""
        self.session = session
        self.plan = plan
        batches = self._batches = spec.batches
        if plan.graph_sizes and unbatched:
            raise ValueError(f"outputs {sorted(unbatched)} do not have the batch's rows first; a graph needs them")
        self._inputs = [_Slot(t.name, t.datatype.numpy, _inner(t) if batches else None) for t in spec.inputs]
        self._outputs = [
            _Slot(t.name, t.datatype.numpy, _inner(t) if batches and t.name not in unbatched else None)
            for t in spec.outputs
        ]
        # Runs outside the buckets (a failed batch retried request by request) must not touch a graph.
        self.plain_run_options: Any = skip_graph_run_options() if plan.graph_sizes else None
        capacity = spec.max_batch_size if batches else 0
        self._staging = {
            s.name: np.zeros((capacity, *s.inner), dtype=s.dtype) for s in self._inputs if s.inner is not None
        }
        sizes = bucket_sizes(capacity, plan.graph_sizes) if batches else [0]
        self._buckets = [self._bucket(size) for size in sizes]

    def _bucket(self, size: int) -> _Bucket:
        graphs = self.plan.graph_sizes
        graph_id = graphs.index(size) + 1 if size in graphs else None
        bucket = _Bucket(self.session, size, graph_id, self.plan, self.plain_run_options)
        for slot in self._inputs:
            if slot.inner is not None:
                bucket.allocate(slot)
        if graph_id is not None:
            for slot in self._outputs:
                bucket.allocate(slot, output=True)
        return bucket

    @property
    def bucket_sizes(self) -> list[int]:
        return [b.size for b in self._buckets]

    def stage(self, payloads: Sequence[Tensors], rows: int) -> Staged:
        """Collate ``payloads`` (``rows`` rows in all) into the staging buffers, padded for a graph."""
        bucket = next((b for b in self._buckets if b.size >= rows), self._buckets[-1])
        for name, buffer in self._staging.items():
            target = buffer[:rows]
            if len(payloads) == 1:
                source = payloads[0][name]
                if source.shape != target.shape:  # assignment would broadcast; concatenate refuses by itself
                    raise ValueError(f"input {name}: shape {list(source.shape)}, expected {list(target.shape)}")
                target[...] = source
            else:
                np.concatenate([p[name] for p in payloads], out=target)
            if bucket.graph_id is not None and bucket.size > rows:
                buffer[rows : bucket.size] = 0  # padding rows: computed, then cut off
        direct = {s.name: _collate([p[s.name] for p in payloads]) for s in self._inputs if s.name not in self._staging}
        return Staged(rows, bucket, direct)

    def execute(self, staged: Staged) -> list[npt.NDArray[Any]]:
        """Copy the staged batch to the device, run it, and return its outputs (``rows`` rows each)."""
        bucket, rows = staged.bucket, staged.rows
        binding = bucket.binding
        for name, value in bucket.inputs.items():
            staging = self._staging[name]
            value.update_inplace(staging[: bucket.size])
            if bucket.graph_id is None:  # bind the first ``rows`` rows of the bucket, by address
                shape = [rows, *staging.shape[1:]]
                plan = self.plan
                binding.bind_input(name, plan.device, plan.device_id, staging.dtype.type, shape, value.data_ptr())
        for name, array in staged.direct.items():
            binding.bind_cpu_input(name, array)
        if bucket.inputs and self.plan.device != "cpu":
            # update_inplace copied on another stream than the session computes on: wait for it.
            binding.synchronize_inputs()
        if bucket.graph_id is not None:
            self.session.run_with_iobinding(binding, bucket.run_options)
            return [bucket.outputs[s.name].numpy()[:rows] for s in self._outputs]
        hosts = self._bind_host_outputs(binding, rows)
        self.session.run_with_iobinding(binding, bucket.run_options)
        produced: list[Any] | None = None
        results: list[npt.NDArray[Any]] = []
        for index, slot in enumerate(self._outputs):
            host = hosts.get(slot.name)
            if host is None:
                produced = produced if produced is not None else binding.get_outputs()
                host = produced[index].numpy()
            results.append(host)
        return results

    def _bind_host_outputs(self, binding: Any, rows: int) -> dict[str, npt.NDArray[Any]]:
        """Bind every output to host memory: into a new array where its shape is known, else onnxruntime's."""
        binding.clear_binding_outputs()  # keeps get_outputs() in the order of self._outputs
        hosts: dict[str, npt.NDArray[Any]] = {}
        for slot in self._outputs:
            if slot.inner is None:
                binding.bind_output(slot.name, "cpu")
                continue
            host = np.empty((rows, *slot.inner), dtype=slot.dtype)
            binding.bind_output(slot.name, "cpu", 0, slot.dtype.type, list(host.shape), host.ctypes.data)
            hosts[slot.name] = host
        return hosts

    def capture_graphs(self, zeros: Callable[[int], Tensors]) -> None:
        """Run zero batches (``zeros(n)`` gives one of ``n`` rows) of every graph size, often enough to
        capture its graph. Zeros: a graph replays whatever its buffers hold, so the data need not suit the
        model; its warm-up (``warmup`` or ``model_warmup``, :meth:`run`) is the config's, after this."""
        for bucket in self._buckets:
            if bucket.graph_id is not None:
                with CUDA_GATE.exclusive():  # no other CUDA work in the process while a graph is captured
                    for _ in range(GRAPH_WARMUP_RUNS):
                        self.execute(self.stage([zeros(bucket.size)], bucket.size))

    def run(self, feeds: Tensors) -> list[npt.NDArray[Any]]:
        """One request as a batch of its own, as the runner runs one (a warm-up run, at load)."""
        rows = len(next(iter(feeds.values()))) if self._batches and feeds else 1
        return self.execute(self.stage([feeds], rows))


def _collate(arrays: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
