"""Load harness for infergate: ``python -m load_tests --help``.

One module per concern:

- ``signature``: model signatures (tensor names, V2 datatypes, shapes) and their protos.
- ``payloads``: random inputs, the wire bytes of requests and replies, reply validation.
- ``repository``: signatures read from a model repository's ONNX files.
- ``clients``: the raw (pre-serialised bytes) and tritonclient senders, ModelMetadata.
- ``generator``: the closed-loop generator, over one or several processes.
- ``ceiling``: the transport-ceiling server (a fixed reply, nothing parsed).
- ``compute``: the compute ceiling (in-process onnxruntime).
- ``servers``: starting, probing and stopping server subprocesses.
- ``report``: result records, tables and JSON.
- ``suite``: the side-by-side run that BENCHMARKS.md is made from.
- ``cli``: argument parsing only.
"""
