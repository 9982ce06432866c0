"""Smoke test run INSIDE a built image by scripts/build_image.sh (image's own Python).

Starts ``infergate serve`` on the repository mounted at /models (port 0, loopback),
waits for grpc.health.v1 SERVING, sends one ModelInfer to ``matmul16`` through the
generated stubs, checks the answer against the model's own weights, then sends
SIGTERM and requires exit status 0 (the drain). Exits non-zero on any failure.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import numpy_helper

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

MODELS = Path(sys.argv[1] if len(sys.argv) > 1 else "/models")


def _wait_serving(channel: grpc.Channel) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
    for update in watch:
        if update.status == health_pb2.HealthCheckResponse.SERVING:
            watch.cancel()
            return


def _infer(channel: grpc.Channel) -> None:
    weight = numpy_helper.to_array(onnx.load(MODELS / "matmul16" / "1" / "model.onnx").graph.initializer[0])
    x = np.arange(16, dtype=np.float32).reshape(1, 16) / 16
    request = pb.ModelInferRequest(
        model_name="matmul16",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[x.tobytes()],
    )
    reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    y = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(1, 16)
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5, atol=1e-6)
    head = ", ".join(f"{v:.4f}" for v in y[0, :4])
    print(f"ModelInfer matmul16 v{reply.model_version}: y[0, :4] = [{head}] (matches x @ W)")


def main() -> int:
    server = subprocess.Popen(
        ["infergate", "serve", "--model-repository", str(MODELS), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline().strip()
    print(line)
    try:
        with grpc.insecure_channel(line.rsplit(" ", 1)[1]) as channel:
            _wait_serving(channel)
            print("health: SERVING")
            _infer(channel)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    print(f"after SIGTERM the server exited {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
