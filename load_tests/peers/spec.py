"""The models file: which ONNX models a peer serves and how (standard library only).

The suite writes one JSON file per peer start; the peer's process reads it.
Keeping it to the standard library lets the same code run in infergate's
environment and in each peer's (whose numpy may even be 1.x).

Example::

    {"models": [{"name": "mlp", "file": "/tmp/.../mlp/1/model.onnx",
                 "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 512]}],
                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 512]}],
                 "max_batch_size": 64, "max_queue_delay_us": 0, "intra_op_threads": 1,
                 "instances": 1}]}
"""

from __future__ import annotations

import argparse
import json
import pathlib
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PeerModel", "Tensor", "model_from_dict", "model_to_dict", "parse_peer_args", "read_models", "write_models"]


@dataclass(frozen=True)
class Tensor:
    """One input or output: V2 datatype and shape with ``-1`` for the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def item_shape(self) -> tuple[int, ...]:
        """The shape of one sample (without the batch dimension)."""
        return self.shape[1:]


@dataclass(frozen=True)
class PeerModel:
    """One model as every peer must serve it.

    ``max_batch_size`` and ``max_queue_delay_us`` apply where the peer batches;
    ``intra_op_threads`` is onnxruntime's ``intra_op_num_threads`` (0: its own choice);
    ``instances`` how many sessions run batches in parallel where the peer has model
    instances (Triton's instance group, MLServer's parallel workers).
    """

    name: str
    file: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int
    max_queue_delay_us: int = 0
    intra_op_threads: int = 1
    instances: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"model {self.name!r}: peers serve batching models only (max_batch_size >= 1)")
        if any(t.shape[:1] != (-1,) for t in (*self.inputs, *self.outputs)):
            raise ValueError(f"model {self.name!r}: every tensor needs a variable first (batch) dimension")
        if self.max_queue_delay_us < 0 or self.intra_op_threads < 0:
            raise ValueError(f"model {self.name!r}: delay and threads must be >= 0")
        if self.instances < 1:
            raise ValueError(f"model {self.name!r}: instances must be >= 1")


def _tensor(item: dict[str, Any]) -> Tensor:
    return Tensor(str(item["name"]), str(item["datatype"]), tuple(int(d) for d in item["shape"]))


def model_to_dict(model: PeerModel) -> dict[str, Any]:
    """``model`` as plain JSON values (tuples become lists)."""
    return json.loads(json.dumps(asdict(model)))  # type: ignore[no-any-return]


def model_from_dict(item: dict[str, Any]) -> PeerModel:
    """The inverse of :func:`model_to_dict`; raises KeyError or TypeError on a malformed item."""
    return PeerModel(
        name=str(item["name"]),
        file=str(item["file"]),
        inputs=tuple(_tensor(t) for t in item["inputs"]),
        outputs=tuple(_tensor(t) for t in item["outputs"]),
        max_batch_size=int(item["max_batch_size"]),
        max_queue_delay_us=int(item.get("max_queue_delay_us", 0)),
        intra_op_threads=int(item.get("intra_op_threads", 1)),
        instances=int(item.get("instances", 1)),
    )


def write_models(path: pathlib.Path, models: list[PeerModel]) -> None:
    """Write ``models`` to ``path`` as JSON."""
    path.write_text(json.dumps({"models": [model_to_dict(m) for m in models]}, indent=2) + "\n", encoding="utf-8")


def read_models(path: pathlib.Path) -> list[PeerModel]:
    """The models in a file written by :func:`write_models`; raises ValueError when it is malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [model_from_dict(item) for item in data["models"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a peer models file ({exc!r})") from None


def parse_peer_args(prog: str, description: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The command line of a peer that the suite starts itself: its models file and its two ports."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--models", type=pathlib.Path, required=True, help="models file (load_tests.peers.spec)")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    return parser.parse_args(argv)
