"""Interleaved A/B runs: every variant's server up for every slot of its round, the order rotating, ratios paired.

The servers are real (``infergate serve`` on the demo models, one with JWT auth
on), and so are the loads and the calls that check auth is really on. The
ratios' statistics are specified in test_ratios.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.demo import write_demo_repository
from load_tests.auth import auth_block
from load_tests.generator import LoadConfig
from load_tests.interleave import Slot, Variant, interleaved, measure, pinning_note, slot_order
from load_tests.suite import REPO_ROOT


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): it is gone once its state says so
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _ready_code(target: str, token: str) -> grpc.StatusCode:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="matmul16"), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_every_server_of_a_round_is_up_for_each_of_its_slots(tmp_path: pathlib.Path) -> None:
    repo = tmp_path / "models"
    write_demo_repository(repo)
    auth, token = auth_block(tmp_path, "HS256")
    (tmp_path / "auth.yaml").write_text(json.dumps({"auth": auth}))  # YAML reads JSON
    serve = (sys.executable, "-m", "infergate", "serve", "--model-repository", str(repo))
    variants = [Variant("off", serve), Variant("jwt", (*serve, "--config", str(tmp_path / "auth.yaml")), token=token)]
    load = LoadConfig(target="", model="matmul16", concurrency=2, duration=0.3, warmup=0)
    seen: list[Slot] = []
    for slot in interleaved(variants, rounds=2, slices=2, logs=tmp_path / "logs", cwd=REPO_ROOT, models=["matmul16"]):
        round_pids = {s.pid for s in seen if s.round == slot.round} | {slot.pid}
        assert all(_alive(pid) for pid in round_pids), "a server of the round stopped before its last slot"
        if slot.slice == 0:
            sample = measure(slot, load)  # the slot's target and token, whatever the load named
            assert sample.result.requests > 0 and not sample.result.errors, slot.variant.name
            assert sample.server_cpu_us > 0 and sample.client_cpu_us > 0
            expected = grpc.StatusCode.UNAUTHENTICATED if slot.variant.token else grpc.StatusCode.OK
            assert _ready_code(slot.target, "") == expected  # the jwt variant really runs with auth on
        seen.append(slot)
    order = [(s.round, s.slice, s.variant.name) for s in seen]
    # The order rotates slot after slot, across rounds too: every variant goes first equally often.
    assert order == [(0, 0, "off"), (0, 0, "jwt"), (0, 1, "jwt"), (0, 1, "off"),
                     (1, 0, "off"), (1, 0, "jwt"), (1, 1, "jwt"), (1, 1, "off")]  # fmt: skip
    first, second = ({s.pid for s in seen if s.round == r} for r in (0, 1))
    assert len(first) == len(second) == 2 and not first & second  # fresh servers every round
    assert not any(_alive(pid) for pid in first | second)  # and none left behind
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"off.log", "jwt.log"}


def test_pinned_servers_run_on_their_cores_and_the_client_on_the_others(tmp_path: pathlib.Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, "pinning the servers apart from the client needs two cores"
    before = os.sched_getaffinity(0)
    repo = tmp_path / "models"
    write_demo_repository(repo)
    serve = (sys.executable, "-m", "infergate", "serve", "--model-repository", str(repo))
    load = LoadConfig(target="", model="matmul16", concurrency=2, duration=0.3, warmup=0)
    slots = interleaved(
        [Variant("off", serve)], rounds=1, slices=1, logs=tmp_path, cwd=REPO_ROOT, models=["matmul16"],
        server_cpus=cores[:1],
    )  # fmt: skip
    for slot in slots:
        assert os.sched_getaffinity(slot.pid) == set(cores[:1])  # the server itself, not a taskset left running
        assert os.sched_getaffinity(0) == set(cores[1:])  # and the load processes this one starts
        assert measure(slot, load).result.requests > 0
    assert os.sched_getaffinity(0) == before, "the client's pinning ends with the slots"
    assert pinning_note(cores[:1]).strip() == f"Servers pinned to cores {cores[0]}; the client ran on the others."
    assert pinning_note(None) == ""


def test_every_variant_takes_every_place_in_the_slot_order() -> None:
    """A fixed order would always load one variant right after the same other one."""
    orders = [slot_order(["a", "b", "c"], slot) for slot in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert slot_order(["a", "b"], 5) == ["b", "a"]
    assert slot_order([], 2) == []
