"""Model signatures read from a model repository laid out as ``DIR/<name>/<version>/model.onnx``.

Only the ONNX graph's declared inputs and outputs are read (no weights are
checked, no session is created). A symbolic or missing dimension becomes -1.
``max_batch_size`` comes from ``DIR/<name>/config.yaml`` when that file has one.
"""

from __future__ import annotations

import pathlib
from typing import Any

import onnx
import yaml
from onnx import TensorProto

from infergate.repository.catalog import is_version_name

from .signature import ModelSignature, TensorSpec

__all__ = ["find_model_file", "read_repository", "read_signature", "signature_from_onnx"]

_ONNX_TO_V2: dict[int, str] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
}


def find_model_file(repository: pathlib.Path, name: str) -> tuple[pathlib.Path, str]:
    """``(path, version)`` of the highest numbered version holding ``model.onnx``.

    Raises FileNotFoundError when the model has none.
    """
    versions = [
        child
        for child in (repository / name).glob("*")
        if is_version_name(child.name) and (child / "model.onnx").is_file()
    ]
    if not versions:
        raise FileNotFoundError(f"no {repository / name}/<version>/model.onnx")
    best = max(versions, key=lambda child: int(child.name))
    return best / "model.onnx", best.name


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in _ONNX_TO_V2:
        raise ValueError(f"tensor {value.name!r}: ONNX element type {tensor_type.elem_type}")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
    return TensorSpec(value.name, _ONNX_TO_V2[tensor_type.elem_type], dims)


def signature_from_onnx(path: pathlib.Path, name: str, version: str = "1", max_batch_size: int = 0) -> ModelSignature:
    """Signature of the ONNX model at ``path``; initializers listed as inputs are skipped."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    return ModelSignature(
        name=name,
        inputs=tuple(_tensor_spec(v) for v in inputs),
        outputs=tuple(_tensor_spec(v) for v in model.graph.output),
        version=version,
        max_batch_size=max_batch_size,
    )


def _max_batch_size(model_dir: pathlib.Path) -> int:
    config_path = model_dir / "config.yaml"
    if not config_path.is_file():
        return 0
    config: Any = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    value = config.get("max_batch_size", 0) if isinstance(config, dict) else 0
    return int(value)


def read_signature(repository: pathlib.Path, name: str) -> ModelSignature:
    """Signature of model ``name`` in ``repository`` (its highest version)."""
    path, version = find_model_file(repository, name)
    return signature_from_onnx(path, name, version, _max_batch_size(repository / name))


def read_repository(repository: pathlib.Path) -> dict[str, ModelSignature]:
    """Every model of ``repository`` that has a ``<version>/model.onnx``, by name.

    Raises FileNotFoundError when there is none.
    """
    names = sorted(
        child.name for child in repository.iterdir() if child.is_dir() and any(child.glob("[0-9]*/model.onnx"))
    )
    if not names:
        raise FileNotFoundError(f"no <name>/<version>/model.onnx under {repository}")
    return {name: read_signature(repository, name) for name in names}
