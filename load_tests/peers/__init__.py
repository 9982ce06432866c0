"""Peer servers that the suite runs beside infergate (``python -m load_tests suite --peers``).

Each peer serves the suite's ONNX files with onnxruntime from its own virtual
environment under ``.tools/peers/<name>/`` (``scripts/install_peers.sh``). The
modules split by where they run:

- in infergate's environment: ``launch`` (what to run for each peer: argv,
  environment, generated configuration files);
- in every environment: ``spec`` (the models file the suite writes and each peer
  reads; standard library only);
- in the peers' environments: ``onnx_runner`` (the one onnxruntime session code
  all peers share), ``triton_peer`` (PyTriton), ``kserve_peer`` (KServe) and
  ``mlserver_peer`` (an MLServer runtime).

Nothing here imports a peer's package at import time of this package, so the
suite can plan and test peers without any of them installed.
"""
