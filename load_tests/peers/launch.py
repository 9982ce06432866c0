"""What the suite runs for each peer: its environment, command line and generated configuration.

Every peer serves the same models the same way (see ``spec.PeerModel``): the
suite's ONNX files, onnxruntime on the CPU with ``intra_op_threads`` threads
(1 by default), and, where the peer batches, the model's own ``max_batch_size``
and ``max_queue_delay_microseconds`` from its ``config.yaml`` (the values
infergate serves it with). Every endpoint a peer opens binds 127.0.0.1.

:func:`Peer.prepare` writes what the peer reads into a fresh working folder and
returns a :class:`Launch`; starting, waiting and stopping are the suite's
(``load_tests.servers.running_server``). Nothing here imports a peer's package.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from infergate.models.config import load_model_config

from ..repository import find_model_file, read_signature
from ..servers import free_port
from .spec import PeerModel, Tensor, model_to_dict, write_models

__all__ = [
    "LOOPBACK",
    "PEERS",
    "Launch",
    "Peer",
    "Ports",
    "mlserver_model_settings",
    "mlserver_settings",
    "parse_peer_names",
    "peer_models",
]

LOOPBACK = "127.0.0.1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PEERS_DIR = REPO_ROOT / ".tools" / "peers"
_DEFAULT_MAX_BATCH_SIZE = 64  # infergate's own default for a model that batches


@dataclass(frozen=True)
class Ports:
    """Loopback ports for one peer start (only MLServer's settings name a metrics port)."""

    grpc: int
    http: int
    metrics: int

    @classmethod
    def free(cls) -> Ports:
        """Three ports that nothing listened on a moment ago."""
        return cls(free_port(), free_port(), free_port())


@dataclass(frozen=True)
class Launch:
    """How to start one peer: ``env`` is added to the suite's environment."""

    argv: tuple[str, ...]
    cwd: pathlib.Path
    target: str
    env: dict[str, str] = field(default_factory=dict)


Prepare = Callable[["Peer", pathlib.Path, Sequence[PeerModel], Ports], Launch]


@dataclass(frozen=True)
class Peer:
    """One peer server: where it is installed, what it is, how to start it."""

    name: str
    title: str  # the server and version, as tables show it
    package: str  # the PyPI distribution whose version the report records
    batches: bool  # it has a dynamic/adaptive batcher that the suite configures
    start_attempts: int
    configuration: str  # one sentence for the report: what the suite configures
    _prepare: Prepare
    root: pathlib.Path = PEERS_DIR  # where the peers' environments are (tests point it elsewhere)

    @property
    def venv(self) -> pathlib.Path:
        return self.root / self.name

    @property
    def python(self) -> pathlib.Path:
        return self.venv / "bin" / "python"

    @property
    def installed(self) -> bool:
        """True once ``scripts/install_peers.sh`` finished this peer's environment."""
        return (self.venv / ".installed").is_file()

    def versions(self) -> dict[str, str]:
        """Versions of the peer's package, onnxruntime and numpy, from its ``versions.txt``."""
        wanted = {self.package, "onnxruntime", "numpy"}
        try:
            lines = (self.venv / "versions.txt").read_text(encoding="utf-8").splitlines()
        except OSError:
            return {}
        pairs = (line.split("==", 1) for line in lines if "==" in line)
        return {name.lower(): version for name, version in pairs if name.lower() in wanted}

    def prepare(self, workdir: pathlib.Path, models: Sequence[PeerModel], ports: Ports) -> Launch:
        """Write this peer's files under ``workdir`` (created) and say how to start it."""
        workdir.mkdir(parents=True, exist_ok=True)
        return self._prepare(self, workdir, models, ports)


def python_libdir(python: pathlib.Path) -> str:
    """The ``LIBDIR`` of ``python`` (where its ``libpython3.X.so`` lives)."""
    code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def _models_file(workdir: pathlib.Path, models: Sequence[PeerModel]) -> pathlib.Path:
    path = workdir / "models.json"
    write_models(path, list(models))
    return path


def _prepare_triton(peer: Peer, workdir: pathlib.Path, models: Sequence[PeerModel], ports: Ports) -> Launch:
    # The python_backend stub links libpython3.X.so; without the venv interpreter's own LIBDIR first it
    # finds the system's and dies with "'_thread.RLock' object has no attribute '_recursion_count'".
    libdir = python_libdir(peer.python)
    home = workdir / "pytriton-home"  # PyTriton's workspaces and unpacked tritonserver go here
    home.mkdir(exist_ok=True)
    argv = (
        str(peer.python), "-m", "load_tests.peers.triton_peer", "--models", str(_models_file(workdir, models)),
        "--grpc-port", str(ports.grpc), "--http-port", str(ports.http),
    )  # fmt: skip
    env = {"PYTRITON_HOME": str(home), "LD_LIBRARY_PATH": _prepend(libdir, _inherited("LD_LIBRARY_PATH"))}
    return Launch(argv, REPO_ROOT, f"{LOOPBACK}:{ports.grpc}", env)


def _prepare_kserve(peer: Peer, workdir: pathlib.Path, models: Sequence[PeerModel], ports: Ports) -> Launch:
    argv = (
        str(peer.python), "-m", "load_tests.peers.kserve_peer", "--models", str(_models_file(workdir, models)),
        "--grpc-port", str(ports.grpc), "--http-port", str(ports.http),
    )  # fmt: skip
    return Launch(argv, REPO_ROOT, f"{LOOPBACK}:{ports.grpc}")


def _tensors(tensors: tuple[Tensor, ...]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def mlserver_settings(ports: Ports, root: pathlib.Path, workers: int = 1) -> dict[str, Any]:
    """MLServer's ``settings.json``: loopback only, no per-call log, no metrics, ``workers`` worker processes.

    MLServer's model instances are its parallel workers, server-wide: each loads every model, and
    batches go to them in turn. One (its default) unless the models ask for more instances.
    """
    return {
        "host": LOOPBACK,
        "http_port": ports.http,
        "grpc_port": ports.grpc,
        "metrics_port": ports.metrics,  # unused while metrics are off; never MLServer's fixed default
        "metrics_endpoint": None,  # off, as infergate's are by default (it also drops a per-call interceptor)
        "debug": False,  # True (MLServer's default) logs every call
        "parallel_workers": workers,  # 1, MLServer's default: inference runs in one worker process
        "model_repository_root": str(root),
        "load_models_at_startup": True,
    }


def mlserver_model_settings(model: PeerModel) -> dict[str, Any]:
    """One model's ``model-settings.json``; adaptive batching on when the delay is above zero."""
    return {
        "name": model.name,
        "implementation": "load_tests.peers.mlserver_peer.OnnxModel",
        # MLServer batches only when max_batch_time > 0: at a zero delay it serves requests one by one.
        "max_batch_size": model.max_batch_size,
        "max_batch_time": model.max_queue_delay_us / 1_000_000,
        "inputs": _tensors(model.inputs),
        "outputs": _tensors(model.outputs),
        "parameters": {"version": "1", "extra": {"peer_model": model_to_dict(model)}},
    }


def _write_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _prepare_mlserver(peer: Peer, workdir: pathlib.Path, models: Sequence[PeerModel], ports: Ports) -> Launch:
    root = workdir / "mlserver"
    workers = max((model.instances for model in models), default=1)
    _write_json(root / "settings.json", mlserver_settings(ports, root, workers))
    for model in models:
        _write_json(root / model.name / "model-settings.json", mlserver_model_settings(model))
    # cwd is the working folder: MLServer keeps its .metrics and .envs folders in its current directory.
    argv = (str(peer.venv / "bin" / "mlserver"), "start", str(root))
    env = {"PYTHONPATH": _prepend(str(REPO_ROOT), _inherited("PYTHONPATH"))}
    return Launch(argv, root, f"{LOOPBACK}:{ports.grpc}", env)


def _inherited(name: str) -> str:
    return os.environ.get(name, "")


def _prepend(first: str, rest: str) -> str:
    return f"{first}:{rest}" if rest else first


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            "triton",
            "Triton 2.51 (PyTriton 0.7.0)",
            "nvidia-pytriton",
            batches=True,
            start_attempts=2,  # about 1 start in 8 failed under heavy load (a boost interprocess lock)
            configuration="tritonserver's C++ gRPC frontend and dynamic batcher (max_batch_size, "
            "max_queue_delay_microseconds); a PyTriton @batch function per model instance runs onnxruntime; "
            "metrics off",
            _prepare=_prepare_triton,
        ),
        Peer(
            "kserve",
            "KServe 0.21",
            "kserve",
            batches=False,
            start_attempts=1,
            configuration="kserve.ModelServer (grpc.aio), a kserve.Model whose predict runs onnxruntime "
            "on each request; no in-process batching and no model instances (one session per model); "
            "per-request log lines off (its Prometheus histograms cannot be turned off)",
            _prepare=_prepare_kserve,
        ),
        Peer(
            "mlserver",
            "MLServer 1.7.1",
            "mlserver",
            batches=True,
            start_attempts=1,
            configuration="MLServer with one parallel worker per model instance (one, its default, "
            "unless more instances are asked for) and adaptive batching (max_batch_size, "
            "max_batch_time = the queue delay; off at 0); an MLModel runs onnxruntime; "
            "metrics and access log off",
            _prepare=_prepare_mlserver,
        ),
    )
}


def parse_peer_names(text: str) -> tuple[str, ...]:
    """``all`` or a comma list of :data:`PEERS` names, in :data:`PEERS` order; raises ValueError."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if names == {"all"}:
        return tuple(PEERS)
    unknown = sorted(names - set(PEERS))
    if unknown or not names:
        raise ValueError(f"unknown peer(s) {', '.join(unknown) or '(none)'}: use all or {','.join(PEERS)}")
    return tuple(name for name in PEERS if name in names)


def peer_models(
    repository: pathlib.Path,
    names: Sequence[str],
    intra_op_threads: int = 1,
    queue_delay_us: int | None = None,
    instances: int = 1,
) -> list[PeerModel]:
    """``names`` from ``repository`` as peers serve them, each with ``instances`` sessions where a peer can.

    Batch size and queue delay come from each model's ``config.yaml`` (validated
    by infergate's own loader); ``queue_delay_us`` overrides the delay.
    """
    models = []
    for name in names:
        path, _ = find_model_file(repository, name)
        signature = read_signature(repository, name)
        config = load_model_config(repository / name / "config.yaml")
        models.append(
            PeerModel(
                name=name,
                file=str(path.resolve()),
                inputs=tuple(Tensor(t.name, t.datatype, t.shape) for t in signature.inputs),
                outputs=tuple(Tensor(t.name, t.datatype, t.shape) for t in signature.outputs),
                max_batch_size=_DEFAULT_MAX_BATCH_SIZE if config.max_batch_size is None else config.max_batch_size,
                max_queue_delay_us=(
                    config.dynamic_batching.max_queue_delay_microseconds if queue_delay_us is None else queue_delay_us
                ),
                intra_op_threads=intra_op_threads,
                instances=instances,
            )
        )
    return models
