"""Does a server compute what the model computes? One request per model, checked against onnxruntime.

The suite asks this of every real server (infergate and each peer) before
loading it, through the same raw client the load uses: a reply of the right
shape but with wrong numbers would otherwise go unnoticed, since the load
itself validates shapes only.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Sequence

import numpy as np

from infergate._proto import grpc_service_pb2 as pb

from .clients import CallFailed, RawClient
from .compute import open_session
from .payloads import Array, random_inputs
from .repository import find_model_file, read_signature
from .signature import NUMPY_DTYPES, ModelSignature

__all__ = ["WrongAnswer", "check_answers", "decode_outputs"]

_BATCH = 3
_TOLERANCE = 1e-4  # relative and absolute: same ONNX file, same onnxruntime kernels, FP32


class WrongAnswer(Exception):
    """A server's reply differs from in-process onnxruntime (or the call failed)."""


def decode_outputs(reply: pb.ModelInferResponse) -> dict[str, Array]:
    """The reply's raw output contents as numpy arrays by name (numeric datatypes only).

    Raises WrongAnswer when the contents do not fit the declared shape.
    """
    try:
        return _decode(reply)
    except (KeyError, ValueError) as exc:
        raise WrongAnswer(f"undecodable reply: {exc}") from None


def _decode(reply: pb.ModelInferResponse) -> dict[str, Array]:
    return {
        tensor.name: np.frombuffer(raw, dtype=NUMPY_DTYPES[tensor.datatype]).reshape(tuple(tensor.shape))
        for tensor, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)
    }


async def _ask(target: str, signature: ModelSignature, arrays: dict[str, Array]) -> pb.ModelInferResponse:
    client = RawClient(target, signature, arrays, timeout=30.0)
    try:
        return await client.first()
    except CallFailed as exc:
        raise WrongAnswer(f"{signature.name}: {exc}") from None
    finally:
        await client.close()


def check_answers(target: str, repository: pathlib.Path, models: Sequence[str]) -> None:
    """Send one batch of random inputs per model to ``target`` and compare with onnxruntime.

    Raises WrongAnswer naming the model and output that differ.
    """
    for name in models:
        signature = read_signature(repository, name)
        arrays = random_inputs(signature, _BATCH, seed=7)
        expected = open_session(find_model_file(repository, name)[0]).run(None, arrays)
        got = decode_outputs(asyncio.run(_ask(target, signature, arrays)))
        for spec, want in zip(signature.outputs, expected, strict=True):
            if spec.name not in got:
                raise WrongAnswer(f"{name}: no output {spec.name!r} in the reply")
            if got[spec.name].shape != want.shape:
                raise WrongAnswer(f"{name}: output {spec.name!r} has shape {got[spec.name].shape}, want {want.shape}")
            if not np.allclose(got[spec.name], want, rtol=_TOLERANCE, atol=_TOLERANCE):
                worst = float(np.max(np.abs(got[spec.name].astype(np.float64) - want)))
                raise WrongAnswer(f"{name}: output {spec.name!r} differs from onnxruntime by up to {worst:g}")
