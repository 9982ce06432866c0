"""The onnxruntime session every peer runs: one model, CPU, a fixed number of intra-op threads.

All peers share this code so they differ only in their serving path. It needs
numpy and onnxruntime only (each peer's environment has both).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .spec import PeerModel

__all__ = ["NUMPY_DTYPES", "OnnxRunner"]

Array = npt.NDArray[Any]

# The V2 datatypes the suite's models use, and a few neighbours; BYTES is not served by peers.
NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class OnnxRunner:
    """``run(inputs) -> outputs`` on one onnxruntime CPU session built from ``model``."""

    def __init__(self, model: PeerModel) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = model.intra_op_threads
        options.inter_op_num_threads = 1
        self.model = model
        self._session = ort.InferenceSession(model.file, sess_options=options, providers=["CPUExecutionProvider"])
        self._output_names = [t.name for t in model.outputs]
        self._dtypes = {t.name: NUMPY_DTYPES[t.datatype] for t in model.inputs}

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Outputs by name for ``inputs`` by name (each cast to its declared dtype if it is not)."""
        feeds = {name: np.asarray(array, dtype=self._dtypes[name]) for name, array in inputs.items()}
        results = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, results, strict=True))
