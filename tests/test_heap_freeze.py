"""``infergate serve`` freezes its start-up heap once the models are loaded, and serves on as before.

A full garbage collection walked every object the start-up built (some 70,000)
while every request in flight waited; frozen, they are never walked again
(``server.freeze_start_up_heap``, figures in BENCHMARKS.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from conftest import running_server, wait_until

FROZEN = re.compile(r"start-up heap frozen: (\d+) objects")


def test_the_served_process_freezes_what_its_start_up_built_and_keeps_serving(
    demo_repository: Path, log_dir: Path
) -> None:
    with running_server(demo_repository, log_dir) as server:
        wait_until(lambda: FROZEN.search(server.log()), "the start-up heap to be frozen")
        found = FROZEN.search(server.log())
        assert found is not None and int(found.group(1)) > 10_000  # modules, descriptors and models, not a handful
        client = grpcclient.InferenceServerClient(server.url)
        try:
            for _ in range(50):  # objects made after the freeze come and go as before
                x = grpcclient.InferInput("x", [2, 16], "FP32")
                x.set_data_from_numpy(np.ones((2, 16), np.float32))
                answer = client.infer("matmul16", [x]).as_numpy("y")
                assert answer is not None and answer.shape == (2, 16)
        finally:
            client.close()
        assert server.log().count("start-up heap frozen") == 1  # once, not per request or per reload
