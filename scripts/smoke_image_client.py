"""Smoke test of a built image from the outside, as a client sees it: ``smoke_image_client.py IMAGE``.

scripts/build_image.sh runs it with the repository's venv (tritonclient is a dev dependency).
It writes the demo repository to a temporary directory, runs the image's own entrypoint
(``infergate serve``) in a ``buildah run --isolation chroot`` container with the repository
mounted read-only at /models, on 127.0.0.1 and a free port (chroot isolation shares the
host's network), and then, from this process:

1. waits for grpc.health.v1 SERVING;
2. sends one ModelInfer to ``matmul16`` with ``tritonclient`` and checks the answer
   against the model's own weights;
3. sends SIGTERM to the server process and requires exit status 0 after the drain.

Exits non-zero on any failure. Needs root (buildah) and a built IMAGE.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import numpy_helper

from infergate.demo import write_demo_repository
from infergate.telemetry.logs import listening_address

TIMEOUT_S = 120.0


def _server_pid(root: int) -> int:
    """The ``infergate serve`` process under ``root`` (buildah's own processes sit in between)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            command = []
        # The console script: [".../python", "/opt/infergate/bin/infergate", "serve", ...] (not buildah's own argv).
        if len(command) > 2 and b"python" in command[0] and command[1:3] == [b"/opt/infergate/bin/infergate", b"serve"]:
            return pid
        todo += children.get(pid, [])
    raise RuntimeError(f"no infergate serve process under pid {root}")


def _wait_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        for update in watch:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return


def _infer(address: str, models: Path) -> None:
    weight = numpy_helper.to_array(onnx.load(models / "matmul16" / "1" / "model.onnx").graph.initializer[0])
    x = np.arange(16, dtype=np.float32).reshape(1, 16) / 16
    client = grpcclient.InferenceServerClient(address)
    tensor = grpcclient.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("matmul16", [tensor])
    y = result.as_numpy("y")
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5, atol=1e-6)
    version = result.get_response().model_version
    head = ", ".join(f"{v:.4f}" for v in y[0, :4])
    print(f"tritonclient ModelInfer matmul16 v{version}: y[0, :4] = [{head}] (matches x @ W)")
    client.close()


def main(image: str) -> int:
    with tempfile.TemporaryDirectory() as directory:
        models, scratch = Path(directory) / "models", Path(directory) / "tmp"
        write_demo_repository(models)
        scratch.mkdir(mode=0o1777)
        scratch.chmod(0o1777)  # the image's uid 10001 writes here, as in the chart's /tmp emptyDir
        for path in [Path(directory), *models.rglob("*"), models]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        container = subprocess.run(["buildah", "from", image], capture_output=True, text=True, check=True).stdout
        container = container.strip()
        try:
            return _serve_and_call(container, models, scratch)
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def _serve_and_call(container: str, models: Path, scratch: Path) -> int:
    # Two mounts, as the chart has: buildah 1.28 (chroot isolation) shows a lone bind mount onto
    # the image's VOLUME /models as an empty directory; with a second mount it works.
    mounts = ["-v", f"{models}:/models:ro", "-v", f"{scratch}:/tmp"]
    command = ["buildah", "run", "--isolation", "chroot", *mounts, container, "--"]
    command += ["infergate", "serve", "--model-repository", "/models", "--host", "127.0.0.1", "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    try:
        line = server.stdout.readline()
        address = listening_address(line)
        if address is None:
            raise RuntimeError(f"the image's server did not start: {line!r}")
        print(line.strip())
        _wait_serving(address)
        print("health: SERVING")
        _infer(address, models)
        pid = _server_pid(server.pid)
        os.kill(pid, signal.SIGTERM)
        code = server.wait(TIMEOUT_S)
        print(f"after SIGTERM to the server (pid {pid}) the container exited {code}")
        return code
    finally:
        if server.poll() is None:  # a failed check: the server outlives a killed `buildah run`, so kill it first
            try:
                os.kill(_server_pid(server.pid), signal.SIGKILL)
            except (RuntimeError, ProcessLookupError):
                pass
            server.kill()
            server.wait()
        server.stdout.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
