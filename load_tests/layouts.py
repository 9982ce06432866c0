"""The layout infergate serves a model with, asked of the running server, for the in-process baseline.

infergate runs a CPU model on ``instance_group.count`` sessions (``auto``: two
for a model that is not tiny, where there are two CPUs), each with the
configured ``intra_op_num_threads`` or, where the config leaves that to the
server, the models' CPUs shared out among the sessions (one session with every
CPU keeps onnxruntime's own choice; under a CPU quota it gets the quota):
``infergate.models.runner.intra_op_threads``. ModelConfig answers the count
infergate came to and the configured threads; the threads are worked out here
by the runner's own function, for a server of one process on this machine
(``--workers N`` gives each of N processes an Nth of the CPUs: not covered).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate._proto import model_config_pb2 as mc
from infergate.models.cpus import model_cpus
from infergate.models.runner import intra_op_threads

from .compute import Layout

__all__ = ["served_layout", "served_layouts"]

_THREADS = "intra_op_thread_count"  # the onnxruntime backend's parameter, as ModelConfig answers it


def served_layout(target: str, model: str, timeout: float = 10.0) -> Layout | None:
    """How the server at ``target`` runs ``model`` on the CPU; None when it runs elsewhere (a GPU).

    Raises grpc.RpcError when the server does not answer ModelConfig for ``model``.
    """
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        config = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=timeout).config
    groups = list(config.instance_group)
    if not groups or any(group.kind != mc.ModelInstanceGroup.KIND_CPU for group in groups):
        return None
    sessions = sum(group.count for group in groups)
    configured = config.parameters[_THREADS].string_value if _THREADS in config.parameters else ""
    return Layout(sessions, intra_op_threads(int(configured or 0), sessions, True, model_cpus()))


def served_layouts(target: str, models: Iterable[str]) -> dict[str, Layout]:
    """:func:`served_layout` of each of ``models``, leaving out those the server does not say it runs on
    the CPU (no ModelConfig, as a server other than infergate may not answer, or another device)."""
    layouts = {}
    for model in models:
        try:
            layout = served_layout(target, model)
        except grpc.RpcError:
            continue
        if layout is not None:
            layouts[model] = layout
    return layouts
