"""infergate: a fast gRPC inference server for ONNX models.

It speaks the Open Inference Protocol (KServe V2) gRPC API, batches requests
dynamically per model and runs them on onnxruntime.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("infergate")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
