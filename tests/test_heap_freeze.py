"""``infergate serve`` freezes its start-up heap once the models are loaded, and a retired version is still freed.

A full garbage collection walked every object the start-up built (some 70,000)
while every request in flight waited; frozen, they are never walked again
(``heap.py``, figures in BENCHMARKS.md). A model version is a reference
cycle, so one frozen at start-up and later unloaded would keep its
onnxruntime sessions for good, unless the server collects again once it has
closed, which it does.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import running_server, wait_until

FROZEN = re.compile(r"start-up heap frozen: (\d+) objects")


def test_the_served_process_freezes_what_its_start_up_built_and_keeps_serving(
    demo_repository: Path, log_dir: Path
) -> None:
    with running_server(demo_repository, log_dir) as server:
        found = FROZEN.search(server.logged("start-up heap frozen"))  # before readiness: ready once frozen
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
        assert server.log().count("start-up heap frozen") == 1  # once, not per request


def test_an_unloaded_model_is_collected_again_after_the_freeze(demo_repository: Path, log_dir: Path) -> None:
    with running_server(demo_repository, log_dir, "--model-control-mode", "explicit", "--load-model", "*") as server:
        client = grpcclient.InferenceServerClient(server.url)
        try:
            client.unload_model("matmul16")
            client.unload_model("mlp")
        finally:
            client.close()
        wait_until(lambda: "heap frozen again" in server.log(), "a collection after the unloaded versions closed")


# The same server in a process of its own, so that freezing touches no test's heap: it loads a model,
# unloads it through the repository (the path a RepositoryModelUnload takes) and says whether the
# version's runner, which holds its onnxruntime sessions, is gone. With "late-pool", every thread of
# asyncio's pool keeps its work item 0.3 s after setting the result, as a thread the OS stops right
# then does: the load's item holds the version, the close's the runner.
_CHILD = textwrap.dedent(
    """
    import asyncio, gc, sys, time, weakref
    import concurrent.futures.thread
    from infergate.config import ServerConfig
    from infergate.server import InferGateServer

    if sys.argv[3] == "late-pool":
        run = concurrent.futures.thread._WorkItem.run
        def run_then_hold(item):
            run(item)
            time.sleep(0.3)
        concurrent.futures.thread._WorkItem.run = run_then_hold

    async def main(repository: str, mode: str) -> None:
        config = ServerConfig(model_repository=repository, host="127.0.0.1", port=0,
                              model_control_mode="explicit", load_models=["matmul16"])
        server = InferGateServer(config, freeze_heap=mode == "server")
        await server.start()
        await server.load_models()
        if mode == "bare":
            gc.collect()
            gc.freeze()  # what the server does at start-up, without what it does after a retirement
        runner = weakref.ref(server.repository.catalog.get("matmul16").runner)
        await server.repository.unload("matmul16")
        await server.repository.aclose()  # returns once the retired version has closed
        for _ in range(3):
            await asyncio.sleep(0)  # the turns in which the server collects again (heap.FrozenHeap.retired)
        gc.collect()  # and a collection of our own, which cannot reach frozen objects
        print("gone" if runner() is None else "alive")
        await server.stop()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.parametrize(
    ("mode", "pool", "expected"),
    [("server", "prompt-pool", "gone"), ("bare", "prompt-pool", "alive"), ("server", "late-pool", "gone")],
)
def test_a_version_frozen_at_start_up_is_freed_once_retired(
    demo_repository: Path, mode: str, pool: str, expected: str
) -> None:
    """``bare`` shows why the server collects again: frozen without that, the version is never freed.
    ``late-pool``: the version is freed even when the pool's threads let go of their work late."""
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(demo_repository), mode, pool], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == expected, run.stderr[-3000:]
