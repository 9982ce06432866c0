"""Load harness for infergate: ``python -m load_tests --help``.

One module per concern:

- ``signature``: model signatures (tensor names, V2 datatypes, shapes) and their protos.
- ``payloads``: random inputs, the wire bytes of requests and replies, reply validation.
- ``repository``: signatures read from a model repository's ONNX files.
- ``clients``: the raw (pre-serialised bytes) and tritonclient senders, ModelMetadata.
- ``loops``: closed loop (N in flight) and open loop (Poisson arrivals at a fixed rate).
- ``mix``: a weighted mix of models.
- ``generator``: one run (time- or count-limited), over one or several processes.
- ``ceiling``: the transport-ceiling server (a fixed reply, nothing parsed).
- ``compute``: the compute ceiling (in-process onnxruntime), in one session or several at once.
- ``layouts``: how infergate runs a model's sessions, asked of it, for the in-process baseline.
- ``ratios``: paired ratios of interleaved A/B runs (geometric mean, 95% interval over rounds).
- ``saved``: a saved A/B run's JSON reported again with today's statistics (``report``).
- ``servers``: starting, probing and stopping server subprocesses.
- ``procfs``: a server's process tree and listening sockets, read from /proc.
- ``answers``: one request per model, compared with in-process onnxruntime.
- ``peers``: Triton, KServe and MLServer serving the suite's models (``suite --peers``).
- ``report``: result records, tables, JSON and CSV.
- ``plots``: throughput against latency percentiles as PNG (matplotlib).
- ``compare``: two result files side by side.
- ``suite``: the side-by-side run that BENCHMARKS.md is made from (optionally with peers).
- ``cli``, ``cli_load``: argument parsing, sweeps and output files.
"""
