"""An MLServer inference runtime that serves one ONNX model with onnxruntime.

MLServer imports it as ``load_tests.peers.mlserver_peer.OnnxModel`` from each
model's ``model-settings.json``, which ``load_tests.peers.launch`` writes with the
model's :class:`~load_tests.peers.spec.PeerModel` under ``parameters.extra``.
``predict`` decodes each input with MLServer's NumPy codec, runs
:class:`~load_tests.peers.onnx_runner.OnnxRunner` and encodes the outputs back;
with adaptive batching MLServer hands it several requests merged into one.
"""

from __future__ import annotations

from typing import Any

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from .onnx_runner import OnnxRunner
from .spec import model_from_dict

__all__ = ["OnnxModel"]


class OnnxModel(MLModel):
    """Loads the PeerModel in ``parameters.extra['peer_model']``."""

    async def load(self) -> bool:
        extra: dict[str, Any] = self.settings.parameters.extra
        self._runner = OnnxRunner(model_from_dict(extra["peer_model"]))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {request_input.name: NumpyCodec.decode_input(request_input) for request_input in payload.inputs}
        results = self._runner.run(inputs)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, array) for name, array in results.items()],
        )
