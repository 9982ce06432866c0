"""Every values file under helm/infergate/ci/ describes a pod whose server starts and serves.

For each file, helm renders the chart. The test takes the server's ConfigMap (server.yaml and
the models' config.yaml files) and the container's args and env exactly as rendered, and runs
``python -m infergate serve <args>`` (the image's ENTRYPOINT is ``infergate serve``). Only what
cannot exist on this machine is replaced:

* the pod's paths: the mounted server.yaml; ``/models`` (the demo models, as the chart's demo
  init container writes them, with the config.yaml files the chart mounts and a copy of
  version 1 for every other version a model config names); files in the mounted Secrets
  (keys and certificates generated here, of the kind each config key asks for);
* addresses and ports: every address becomes 127.0.0.1 (tests bind loopback only, so
  ``$(POD_IP)`` is 127.0.0.1) and every port 0 (the health port with ``--workers`` a free one:
  workers share it, so it must be fixed); the ports the server prints are mapped back to the
  container ports they stand for.

Then it probes like the kubelet: grpc.health.v1 on each probe's port and service, in
plaintext, watching the readiness service until SERVING. Every probe's port is the pod's
``health`` port, which the server announces and answers on (health alone: the serving port's
pending-call backlog, full in a spike, is not the probes'). It scrapes the metrics port when
the pod has one, and finally sends SIGTERM (exit 0 after the drain). With a broken model in
the repository, the pod must pass its startup and liveness probes (it is not restarted) and
fail readiness (it gets no traffic and the rollout stops).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml
from chart import CI_VALUES, Manifests, container, one, render, server_config_map
from grpc_health.v1 import health_pb2, health_pb2_grpc
from security import issue, make_ca, public_pem, rsa_key

from infergate.telemetry.logs import HEALTH, LISTENING, METRICS

HANG_GUARD_S = 90.0  # how long a step may take before the test calls it a hang; not a performance bound
LOOPBACK = "127.0.0.1"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PORT_FLAGS = ("--port", "--metrics-port", "--health-port")
ADDRESS_KEYS = ("host", "metrics_host", "health_host")
PORT_KEYS = ("port", "metrics_port", "health_port")
CI_VALUES_BY_NAME = {path.stem: path for path in CI_VALUES}
ANNOUNCED = {LISTENING: "grpc", METRICS: "metrics", HEALTH: "health"}  # printed line -> container port name


class Pod:
    """The pod's filesystem on this machine: each mount (a pod path) is a directory under ``root``."""

    def __init__(self, manifests: Manifests, root: Path, demo_repository: Path):
        self.root = root
        self.pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
        self.server = container(manifests)
        self.config_map = server_config_map(manifests)
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        self.mounts: dict[str, Path] = {}
        # Outer mounts first, so a file mounted into another volume (a model's config.yaml) lands inside it.
        for mount in sorted(self.server["volumeMounts"], key=lambda m: len(m["mountPath"])):
            path = mount["mountPath"]
            inside = any(path.startswith(outer.rstrip("/") + "/") for outer in self.mounts)
            local = self.local(path) if inside else root / mount["name"] / PurePosixPath(path).name
            self.mounts[path] = local
            volume = volumes[mount["name"]]
            if "configMap" in volume:  # server.yaml and each model's config.yaml (replacing the file there)
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(self.config_map[mount["subPath"]])
            elif path == "/models":  # what the init container (or the claim) provides
                shutil.copytree(demo_repository, local)
            else:
                local.mkdir(parents=True, exist_ok=True)  # a Secret's directory, or /tmp
        self.secret_paths = [m["mountPath"] for m in self.server["volumeMounts"] if "secret" in volumes[m["name"]]]

    def local(self, pod_path: str) -> Path:
        """Where a pod path lives here (the longest mount that contains it)."""
        for mount in sorted(self.mounts, key=len, reverse=True):
            if pod_path == mount or pod_path.startswith(mount.rstrip("/") + "/"):
                return self.mounts[mount] / os.path.relpath(pod_path, mount)
        raise AssertionError(f"{pod_path} is on no volume the pod mounts: it would not exist in the container")

    def add_model_configs(self) -> None:
        """config.yaml mounted over /models/<model>/: copy version 1 for each other version it names, and
        point the paths in it (a payload log's) at the pod's volumes here."""
        models = self.local("/models")
        for model_dir in models.iterdir():
            config_path = model_dir / "config.yaml"
            config = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
            if f"{model_dir.name}.yaml" in self.config_map:
                config = self.localize_paths(config)
                config_path.write_text(yaml.safe_dump(config))
            for version in _named_versions(config or {}):
                if not (model_dir / str(version)).exists():
                    shutil.copytree(model_dir / "1", model_dir / str(version))

    def localize_paths(self, node: Any) -> Any:
        """``node`` with every absolute path replaced by where it lives here (:meth:`local`)."""
        if isinstance(node, dict):
            return {k: self.localize_paths(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.localize_paths(v) for v in node]
        return str(self.local(node)) if isinstance(node, str) and node.startswith("/") else node

    def written(self) -> list[str]:
        """Pod paths of the files the server writes: the audit trail and the models' payload logs."""
        paths = [yaml.safe_load(self.config_map["server.yaml"]).get("audit_log")]
        for key, text in self.config_map.items():
            if key != "server.yaml":
                monitoring = (yaml.safe_load(text) or {}).get("monitoring") or {}
                paths.append((monitoring.get("payload_log") or {}).get("path"))
        return [path for path in paths if path]


def _named_versions(config: dict[str, Any]) -> set[int]:
    routing = config.get("routing") or {}
    named = {int(v) for v in routing.get("weights", {})}
    named |= {int(routing[side]["version"]) for side in ("shadow", "canary") if side in routing}
    specific = (config.get("version_policy") or {}).get("specific") or {}
    return named | {int(v) for v in specific.get("versions", [])}


class Secrets:
    """Makes the file a config key names, of the kind that key asks for."""

    def __init__(self) -> None:
        self.ca = make_ca("chart-run CA")
        self.client_ca = make_ca("chart-run client CA")
        self.server = issue(self.ca, "infergate")
        self.signing_key = rsa_key()

    def write(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        contents = {
            "cert_file": lambda: self.server.cert_pem,
            "key_file": lambda: self.server.key_pem,
            "client_ca_file": lambda: self.client_ca.cert_pem,
            "file": lambda: public_pem(self.signing_key),  # auth.public_keys[].file
            "secret_file": lambda: secrets.token_urlsafe(48).encode(),
        }
        assert key in contents, f"the test does not know what kind of file {key!r} is: teach Secrets.write"
        path.write_bytes(contents[key]())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def _localize_server_config(config: dict[str, Any], pod: Pod, made: Secrets) -> dict[str, Any]:
    """server.yaml localised (:func:`_localize`). With workers the health port cannot be 0 (each worker
    would bind another), so it gets a port free now, which the workers then share."""
    local: dict[str, Any] = _localize(config, pod, made)
    if local.get("health_port") is not None and local.get("workers", 1) > 1:
        local["health_port"] = _free_port()
    return local


def _localize(node: Any, pod: Pod, made: Secrets, key: str = "") -> Any:
    """server.yaml with pod paths, addresses and ports replaced (see the module docstring)."""
    if isinstance(node, dict):
        return {k: _localize(v, pod, made, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_localize(v, pod, made, key) for v in node]
    if key in ADDRESS_KEYS:
        return LOOPBACK
    if key in PORT_KEYS and node is not None:
        return 0
    if isinstance(node, str) and node.startswith("/"):
        local = pod.local(node)
        if any(node.startswith(path.rstrip("/") + "/") for path in pod.secret_paths):
            made.write(key, local)
        return str(local)
    return node


def _environment(pod: Pod) -> dict[str, str]:
    env = {}
    for item in pod.server.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, item
            env[item["name"]] = LOOPBACK  # the pod's IP, here
    return env


def _arguments(pod: Pod, env: dict[str, str], config: Path) -> list[str]:
    """The container's args as the kubelet passes them ($(VAR) expanded), localised."""
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in pod.server["args"]]
    for i, arg in enumerate(args[:-1]):
        if arg in PORT_FLAGS:
            args[i + 1] = "0"
        elif arg == "--config":
            assert pod.local(args[i + 1]).exists()
            args[i + 1] = str(config)
    return args


def _announced(process: subprocess.Popen[str], names: set[str]) -> dict[str, str]:
    """Container port name -> the address the server printed for it (text or JSON lines)."""
    assert process.stdout is not None
    found: dict[str, str] = {}
    while set(found) < names:
        line = process.stdout.readline()
        assert line, f"the server exited ({process.wait()}) before announcing {names - set(found)}"
        message = json.loads(line)["message"] if line.startswith("{") else line.strip()
        for prefix, name in ANNOUNCED.items():
            if message.startswith(prefix):
                found[name] = message[len(prefix) :].removeprefix("http://").split("/")[0]
    return found


def _probe_until_serving(address: str, service: str) -> None:
    """A kubelet gRPC probe, repeated until it passes: plaintext, no credentials.

    Watched rather than polled. Each probe is a new connection, so with --workers it may
    reach a worker still loading its models; the kubelet would retry, the Watch waits.
    """
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        updates = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=HANG_GUARD_S)
        try:
            assert any(update.status == SERVING for update in updates), (address, service)
        finally:
            updates.cancel()


@pytest.fixture
def running_pod(
    request: pytest.FixtureRequest, tmp_path: Path, demo_repository: Path
) -> Iterator[tuple[Pod, dict[str, str]]]:
    pod = Pod(render(request.param), tmp_path, demo_repository)
    pod.add_model_configs()
    with _run(pod, tmp_path) as addresses:
        yield pod, addresses


@contextmanager
def _run(pod: Pod, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The pod's server, started as the container would be; yields the addresses it announced."""
    config_path = tmp_path / "server.yaml"
    config = _localize_server_config(yaml.safe_load(pod.config_map["server.yaml"]), pod, Secrets())
    config_path.write_text(yaml.safe_dump(config))
    env = _environment(pod)
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "infergate", "serve", *_arguments(pod, env, config_path)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=tmp_path,
            env={**os.environ, **env},
        )
    try:
        yield _announced(process, {p["name"] for p in pod.server["ports"]})
        process.send_signal(signal.SIGTERM)
        assert process.wait(HANG_GUARD_S) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


@pytest.mark.parametrize("running_pod", CI_VALUES, ids=[v.stem for v in CI_VALUES], indirect=True)
def test_the_rendered_pod_spec_starts_a_server_its_probes_find_serving(running_pod: tuple[Pod, dict[str, str]]) -> None:
    pod, addresses = running_pod
    by_number = {p["containerPort"]: addresses[p["name"]] for p in pod.server["ports"]}
    health = _health_container_port(pod)
    assert addresses["health"] != addresses["grpc"]  # a listener of its own, announced by the server
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = pod.server[name]["grpc"]
        assert probe["port"] == health, name  # never the serving port, whose backlog a spike fills
        _probe_until_serving(by_number[probe["port"]], probe["service"])
    if "metrics" in addresses:  # what Prometheus scrapes
        with urllib.request.urlopen(f"http://{addresses['metrics']}/metrics", timeout=HANG_GUARD_S) as scrape:
            assert scrape.status == 200 and b"infergate_model_loads_total" in scrape.read()
    for path in pod.written():  # opened at start (audit trail) or at load (payload log), on the pod's volumes
        assert pod.local(path).is_file(), path


def _health_container_port(pod: Pod) -> int:
    (port,) = [p["containerPort"] for p in pod.server["ports"] if p["name"] == "health"]
    return port


@pytest.mark.parametrize("values", [None, CI_VALUES_BY_NAME["tls-values"]], ids=["default", "tls"])
def test_a_broken_model_fails_readiness_but_not_startup_or_liveness(
    values: Path | None, tmp_path: Path, demo_repository: Path
) -> None:
    """Readiness asks "" (strict: every model loaded), startup and liveness the inference service."""
    pod = Pod(render(values), tmp_path, demo_repository)
    (pod.local("/models") / "matmul16" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    with _run(pod, tmp_path) as addresses:
        by_number = {p["containerPort"]: addresses[p["name"]] for p in pod.server["ports"]}
        for name in ("startupProbe", "livenessProbe"):  # pass once loading is over: no restart loop
            probe = pod.server[name]["grpc"]
            assert probe["port"] == _health_container_port(pod), name
            _probe_until_serving(by_number[probe["port"]], probe["service"])
        readiness = pod.server["readinessProbe"]["grpc"]
        with grpc.insecure_channel(by_number[readiness["port"]]) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=readiness["service"]), timeout=HANG_GUARD_S
            )
        assert check.status == NOT_SERVING  # final: loading is over (the probes above passed)
