"""Does a shadow version slow the caller? Primary latency with no shadow, a 10x slower shadow, a failing one.

Builds a repository of the demo MLP (version 3, the primary), the same MLP run
ten times over (version 1, ~10x the compute) and a model that refuses the
MLP's inputs (version 2, every shadow call fails). Then, for each scenario in
turn and ``rounds`` times over (so the spread between rounds shows the
noise), starts infergate with that routing and measures closed-loop load on
the primary with the usual generator.
"""

from __future__ import annotations

import itertools
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc
from infergate.demo import build_mlp

from .generator import LoadConfig, run_closed_loop
from .models import make_model
from .report import LoadResult
from .servers import free_port, running_server

__all__ = ["SCENARIOS", "ShadowRun", "build_repository", "format_shadow_table", "run_shadow_benchmark", "write_config"]

SCENARIOS: dict[str, str] = {
    "no shadow": "",
    "shadow 10x slower": "  shadow: {version: 1, fraction: 1.0}\n",
    "shadow always failing": "  shadow: {version: 2, fraction: 1.0}\n",
}


@dataclass(frozen=True)
class ShadowRun:
    scenario: str
    round: int
    result: LoadResult
    shadow: dict[str, int]  # the server's own shadow counters (sent, compared, errors, dropped)


def _shadow_counters(target: str) -> dict[str, int]:
    """What the server did with the shadow copies, from the admin RPC (empty without a shadow)."""
    with grpc.insecure_channel(target) as channel:
        stub = apb_grpc.InferGateAdminStub(channel)  # type: ignore[no-untyped-call]
        status = stub.RoutingStatus(apb.RoutingStatusRequest(name="mlp"), timeout=10)
    if not status.models or not status.models[0].HasField("shadow"):
        return {}
    shadow = status.models[0].shadow
    return {"sent": shadow.sent, "compared": shadow.compared, "errors": shadow.errors, "dropped": shadow.dropped}


def _repeated_mlp(repeats: int) -> onnx.ModelProto:
    """The demo MLP's layers applied ``repeats`` times in a row (weights shared): ~repeats x the compute."""
    mlp = build_mlp()
    weights = {t.name: t for t in mlp.graph.initializer}
    layers = [n for n in mlp.graph.node]
    nodes: list[onnx.NodeProto] = []
    current = "x"
    for copy in range(repeats):
        renamed: dict[str, str] = {"x": current}
        for node in layers:
            outputs = [f"c{copy}_{o}" for o in node.output]
            renamed.update(zip(node.output, outputs, strict=True))
            inputs = [renamed.get(i, i) for i in node.input]
            nodes.append(helper.make_node(node.op_type, inputs, outputs))
        current = renamed["y"]
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes, "mlp_x10", list(mlp.graph.input), list(mlp.graph.output), initializer=list(weights.values())
    )
    return helper.make_model(graph, opset_imports=list(mlp.opset_import), ir_version=mlp.ir_version)


def _refusing_model() -> onnx.ModelProto:
    """Takes 513 columns where the MLP sends 512: every call fails inside onnxruntime."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "zero"], ["y"])],
        "refusing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 513])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 513])],
        [numpy_helper.from_array(np.zeros(513, dtype=np.float32), "zero")],
    )
    return make_model(graph)


def build_repository(root: pathlib.Path, routing: str) -> None:
    # The primary is also the newest version, so even a server without routing would describe it.
    for version, model in ((3, build_mlp()), (1, _repeated_mlp(10)), (2, _refusing_model())):
        directory = root / "mlp" / str(version)
        directory.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(directory / "model.onnx"))
    write_config(root, routing)


def write_config(root: pathlib.Path, routing: str) -> None:
    """The MLP's config.yaml: every version served, all routed traffic to version 3, plus ``routing``."""
    (root / "mlp").mkdir(parents=True, exist_ok=True)
    (root / "mlp" / "config.yaml").write_text(
        "max_batch_size: 64\nversion_policy: {all: {}}\nsession_options: {intra_op_num_threads: 1}\n"
        "routing:\n  weights: {3: 1}\n" + routing
    )


def run_shadow_benchmark(concurrency: int, duration: float, rounds: int, out: pathlib.Path) -> list[ShadowRun]:
    runs: list[ShadowRun] = []
    for round_, (scenario, routing) in itertools.product(range(rounds), SCENARIOS.items()):
        with tempfile.TemporaryDirectory(prefix="shadow-bench-") as tmp:
            root = pathlib.Path(tmp)
            build_repository(root, routing)
            port = free_port()
            target = f"127.0.0.1:{port}"
            argv = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(root), "--port", str(port)]
            with running_server("infergate", argv, target, out / "shadow-server.log", pathlib.Path.cwd()):
                config = LoadConfig(target=target, model="mlp", concurrency=concurrency, duration=duration)
                result = run_closed_loop(config)
                runs.append(ShadowRun(scenario, round_, result, _shadow_counters(target)))
        print(format_shadow_table(runs[-1:]).splitlines()[-1], flush=True)
    return runs


def format_shadow_table(runs: Sequence[ShadowRun]) -> str:
    lines = [
        "| scenario | round | req/s | p50 ms | p99 ms | errors | shadow compared / errors / dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r = run.result
        errors = sum(r.errors.values())
        cells = [run.scenario, str(run.round + 1), f"{r.requests_per_s:.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}"]
        counters = run.shadow
        shadow = f"{counters['compared']} / {counters['errors']} / {counters['dropped']}" if counters else "-"
        lines.append(f"| {' | '.join(cells)} | {errors} | {shadow} |")
    return "\n".join(lines)
