"""Triton Inference Server through PyTriton, serving the models file with onnxruntime.

Runs in ``.tools/peers/triton`` (``python -m load_tests.peers.triton_peer``), started
by the suite. PyTriton starts the ``tritonserver`` binary it bundles (C++ gRPC
frontend and dynamic batcher); each model is a ``@batch`` Python function that
runs :class:`~load_tests.peers.onnx_runner.OnnxRunner`, bound with the model's
``max_batch_size`` and a dynamic batcher with its ``max_queue_delay_us``. A model
with ``instances`` N is bound with N such functions, each with its own session:
PyTriton makes them N model instances (Triton's ``instance_group`` count).

Both endpoints (gRPC, HTTP) bind 127.0.0.1; metrics are off, as infergate's
are by default (``allow_metrics=False``). The environment must
already hold ``PYTRITON_HOME`` (read when pytriton is imported) and the
interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` (for the python_backend
stub); ``load_tests.peers.launch`` sets both. SIGTERM or SIGINT stops the server
and PyTriton removes its workspace.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from .onnx_runner import NUMPY_DTYPES, Array, OnnxRunner
from .spec import PeerModel, parse_peer_args, read_models

__all__ = ["main"]

LOOPBACK = "127.0.0.1"


def _infer_function(runner: OnnxRunner) -> Callable[..., dict[str, Array]]:
    from pytriton.decorators import batch

    @batch
    def infer(**inputs: Array) -> dict[str, Array]:
        return runner.run(inputs)

    return infer  # type: ignore[no-any-return]


def _bind(triton: Any, model: PeerModel) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    def tensors(specs: tuple[Any, ...]) -> list[Any]:
        return [Tensor(name=t.name, dtype=NUMPY_DTYPES[t.datatype], shape=t.item_shape) for t in specs]

    triton.bind(
        model_name=model.name,
        infer_func=[_infer_function(OnnxRunner(model)) for _ in range(model.instances)],
        inputs=tensors(model.inputs),
        outputs=tensors(model.outputs),
        config=ModelConfig(
            max_batch_size=model.max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=model.max_queue_delay_us),
        ),
        strict=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    args = parse_peer_args("python -m load_tests.peers.triton_peer", __doc__, argv)
    from pytriton.triton import Triton, TritonConfig

    # Triton.serve() stops the server cleanly on KeyboardInterrupt only.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = TritonConfig(
        grpc_address=LOOPBACK,
        grpc_port=args.grpc_port,
        http_address=LOOPBACK,
        http_port=args.http_port,
        allow_metrics=False,
    )
    with Triton(config=config) as triton:
        for model in read_models(args.models):
            _bind(triton, model)
        print(f"triton_peer: serving on {LOOPBACK}:{args.grpc_port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
