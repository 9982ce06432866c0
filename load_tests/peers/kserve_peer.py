"""KServe's model server, serving the models file with onnxruntime.

Runs in ``.tools/peers/kserve`` (``python -m load_tests.peers.kserve_peer``), started
by the suite. Each model is a ``kserve.Model`` whose synchronous ``predict`` runs
:class:`~load_tests.peers.onnx_runner.OnnxRunner` on one request (KServe's model
server has no in-process batching) and answers with raw output contents, as it
does for a gRPC request that sent raw inputs. ModelMetadata lists the model's
tensors so clients can build requests from it.

Per-request log lines are off, as infergate writes none: the latency lines
(``enable_latency_logging=False``) and the "grpc method" line its gRPC
interceptor logs for every call (:class:`_NoPerCallLines`).

KServe 0.21 hard-codes its listen addresses (REST ``0.0.0.0``, gRPC ``[::]``);
:func:`_bind_loopback_only` swaps in a REST server subclass and a ``grpc.aio``
stand-in that bind 127.0.0.1 instead (KServe still logs ``[::]``).
SIGTERM or SIGINT stops the server (KServe's own handlers).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from .onnx_runner import OnnxRunner
from .spec import PeerModel, Tensor, parse_peer_args, read_models

__all__ = ["main"]

LOOPBACK = "127.0.0.1"


def _types(tensors: tuple[Tensor, ...]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def _model_class() -> type[Any]:
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    class OnnxModel(kserve.Model):
        """One ONNX model; ``predict`` runs one request's tensors as they came."""

        def __init__(self, spec: PeerModel) -> None:
            super().__init__(spec.name)
            self.spec = spec
            self.runner: OnnxRunner | None = None

        def load(self) -> bool:
            self.runner = OnnxRunner(self.spec)
            self.ready = True
            return True

        def get_input_types(self) -> list[dict[str, Any]]:
            return _types(self.spec.inputs)

        def get_output_types(self) -> list[dict[str, Any]]:
            return _types(self.spec.outputs)

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
            if self.runner is None:
                raise RuntimeError(f"model {self.name!r}: predict before load")
            results = self.runner.run({tensor.name: tensor.as_numpy() for tensor in payload.inputs})
            outputs = []
            for spec in self.spec.outputs:
                array = results[spec.name]
                output = InferOutput(name=spec.name, shape=list(array.shape), datatype=spec.datatype)
                output.set_data_from_numpy(array, binary_data=True)
                outputs.append(output)
            return InferResponse(
                response_id=payload.id,
                model_name=self.name,
                infer_outputs=outputs,
                from_grpc=payload.from_grpc,
                use_binary_outputs=payload.use_binary_outputs,
            )

    return OnnxModel


def _bind_loopback_only() -> None:
    """Make KServe's REST and gRPC servers listen on 127.0.0.1 (it hard-codes all interfaces)."""
    import grpc
    import kserve.model_server
    import kserve.protocol.grpc.server as grpc_server

    class LoopbackREST(kserve.model_server.RESTServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = LOOPBACK  # uvicorn reads it when it binds

    class LoopbackAio:
        """Stands in for ``grpc.aio`` in KServe's gRPC server module: rewrites the bind address."""

        @staticmethod
        def server(*args: Any, **kwargs: Any) -> Any:
            server = grpc.aio.server(*args, **kwargs)
            bind = server.add_insecure_port
            server.add_insecure_port = lambda address: bind(f"{LOOPBACK}:{address.rsplit(':', 1)[1]}")
            return server

    kserve.model_server.RESTServer = LoopbackREST
    grpc_server.aio = LoopbackAio


class _NoPerCallLines(logging.Filter):
    """Drops the INFO line KServe's gRPC LoggingInterceptor writes for every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and str(record.msg).startswith("grpc method:"))


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    args = parse_peer_args("python -m load_tests.peers.kserve_peer", __doc__, argv)
    # kserve parses sys.argv when it is imported; it must not see ours.
    del sys.argv[1:]
    import kserve

    _bind_loopback_only()
    model_class = _model_class()
    models = [model_class(spec) for spec in read_models(args.models)]
    for model in models:
        model.load()
    server = kserve.ModelServer(
        grpc_port=args.grpc_port, http_port=args.http_port, workers=1, enable_latency_logging=False
    )
    logging.getLogger("kserve").addFilter(_NoPerCallLines())  # after ModelServer() set up KServe's logging
    print(f"kserve_peer: serving on {LOOPBACK}:{args.grpc_port}", flush=True)
    server.start(models)


if __name__ == "__main__":
    main()
