"""The system shared-memory registry on its own: what may be opened, the bounds, and the lifetime of a mapping.

Real POSIX shared-memory files under /dev/shm (unique names per test, removed
afterwards) and this process's own /proc/self/maps to see what is mapped.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import MakeFile

from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import FailedPrecondition, InvalidArgument, NotFound
from infergate.models.datatypes import DATATYPES
from infergate.serving.shared_memory import SHM_ROOT, RegionStatus, SystemSharedMemory, detach_shared, shm_path
from infergate.serving.shm_tensors import OutputTarget, TensorRegion, write_output


def mapped(key: str) -> bool:
    """Does this process map the file of ``key`` now?"""
    target = str(SHM_ROOT / key.lstrip("/"))
    return any(line.rstrip().endswith(target) for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.parametrize(("key", "name"), [("/frames", "frames"), ("frames", "frames"), ("//frames", "frames")])
def test_a_key_names_one_file_directly_under_dev_shm(key: str, name: str) -> None:
    assert shm_path(key) == SHM_ROOT / name


@pytest.mark.parametrize("key", ["", "/", "/a/b", "/../etc/passwd", "/..", ".", "a\0b", "/" + "x" * 256])
def test_a_key_that_could_reach_anything_else_is_refused(key: str) -> None:
    with pytest.raises(InvalidArgument, match="Unable to open shared memory region"):
        shm_path(key)


def test_a_registered_region_reads_in_place_at_any_offset(make_file: MakeFile) -> None:
    data = np.arange(3000, dtype=np.float32)
    key = make_file(data.tobytes())
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    # 5000 is not a multiple of the page size: the mapping starts on the page below.
    registry.register("r", key, 5000, 4000)
    view = registry.get("r").view(8, 40, writable=False, what="input 'x'")
    array = view.array(np.dtype(np.float32), (2, 5))
    np.testing.assert_array_equal(array.reshape(-1), data[(5000 + 8) // 4 :][:10])
    assert not array.flags.writeable
    assert registry.status() == [RegionStatus("r", key, 5000, 4000)]
    registry.close()


def test_writes_through_a_writable_view_reach_the_file(make_file: MakeFile) -> None:
    key = make_file(bytes(64))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("out", key, 0, 64)
    view = registry.get("out").view(16, 16, writable=True, what="output 'y'")
    view.memory[:] = b"0123456789abcdef"
    del view
    registry.close()
    assert (SHM_ROOT / key.lstrip("/")).read_bytes()[16:32] == b"0123456789abcdef"


def test_unregistering_keeps_the_memory_a_queued_request_holds_until_it_lets_go(make_file: MakeFile) -> None:
    data = np.arange(16, dtype=np.float32)
    key = make_file(data.tobytes())
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("in", key, 0, 64)
    held = registry.get("in").view(0, 64, writable=False, what="input 'x'").array(np.dtype(np.float32), (16,))
    registry.unregister("in")
    assert registry.status() == []
    with pytest.raises(NotFound, match="Unable to find shared memory region: 'in'"):
        registry.get("in")
    np.testing.assert_array_equal(held, data)  # still mapped: the request reads what it was given
    assert mapped(key)
    del held
    assert not mapped(key)  # the last view unmapped it


def test_unregistering_an_unused_region_unmaps_it_at_once(make_file: MakeFile) -> None:
    key = make_file(bytes(64))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 64)
    assert mapped(key)
    registry.unregister()
    assert not mapped(key)
    registry.unregister("never-registered")  # as in Triton: nothing to do is not an error


def test_the_name_and_the_key_may_be_registered_again_after_unregistering(make_file: MakeFile) -> None:
    key = make_file(bytes(64))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 64)
    with pytest.raises(InvalidArgument, match="shared memory region 'r' already in manager"):
        registry.register("r", key, 0, 32)
    with pytest.raises(InvalidArgument, match='registering an active shared memory key, "/'):
        registry.register("other", key, 0, 32)
    registry.unregister("r")
    registry.register("r", key, 32, 32)
    assert registry.status("r") == [RegionStatus("r", key, 32, 32)]
    registry.close()


@pytest.mark.parametrize(
    ("offset", "byte_size", "message"),
    [
        (64, 8, "Invalid offset for shared memory region: 'r'"),
        (-1, 8, "Invalid offset for shared memory region: 'r'"),
        (60, 8, "8 bytes at offset 60 for input 'x' run past its end"),
    ],
)
def test_a_view_must_lie_inside_its_region(make_file: MakeFile, offset: int, byte_size: int, message: str) -> None:
    key = make_file(bytes(64))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 64)
    with pytest.raises(InvalidArgument, match=message):
        registry.get("r").view(offset, byte_size, writable=False, what="input 'x'")
    registry.close()


def test_a_file_that_shrank_after_registration_is_refused_not_read(make_file: MakeFile) -> None:
    key = make_file(bytes(8192))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 8192)
    os.truncate(SHM_ROOT / key.lstrip("/"), 100)  # reading past the end of a mapped file is SIGBUS
    with pytest.raises(InvalidArgument, match="shrank to 100 bytes since it was registered"):
        registry.get("r").view(4096, 16, writable=False, what="input 'x'")
    registry.close()


def test_an_output_region_whose_file_shrank_while_the_model_ran_is_refused_not_written(make_file: MakeFile) -> None:
    key = make_file(bytes(8192))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 8192)
    where = TensorRegion("r", 4096, 4096)
    target = OutputTarget(where, registry.get("r").view(4096, 4096, writable=True, what="output 'y'"))
    os.truncate(SHM_ROOT / key.lstrip("/"), 0)  # after the request was decoded; writing now would be SIGBUS
    tensor = pb.ModelInferResponse().outputs.add(name="y")
    with pytest.raises(InvalidArgument, match="shrank to 0 bytes since it was registered"):
        write_output(target, tensor, np.ones(1024, dtype=np.float32), DATATYPES["FP32"])
    del target
    registry.close()


def test_what_cannot_be_registered(make_file: MakeFile, tmp_path: Path) -> None:
    key = make_file(bytes(64))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    with pytest.raises(InvalidArgument, match=r"failed to register shared memory region 'r': invalid args \(offset 32"):
        registry.register("r", key, 32, 64)
    with pytest.raises(InvalidArgument, match="No such file or directory"):
        registry.register("r", f"/infergate-test-missing-{uuid.uuid4().hex}", 0, 8)
    with pytest.raises(InvalidArgument, match="byte_size 0"):
        registry.register("r", key, 0, 0)
    with pytest.raises(InvalidArgument, match="the name is empty"):
        registry.register("", key, 0, 8)
    assert registry.status() == []


def test_a_symbolic_link_or_a_fifo_under_dev_shm_is_not_opened(make_file: MakeFile, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(64))
    link = SHM_ROOT / f"infergate-test-link-{uuid.uuid4().hex}"
    fifo = SHM_ROOT / f"infergate-test-fifo-{uuid.uuid4().hex}"
    link.symlink_to(secret)
    os.mkfifo(fifo)
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    try:
        with pytest.raises(InvalidArgument, match="a symbolic link"):
            registry.register("r", "/" + link.name, 0, 8)
        with pytest.raises(InvalidArgument, match="not a shared memory object"):
            registry.register("r", "/" + fifo.name, 0, 8)
    finally:
        link.unlink()
        fifo.unlink()


def test_the_number_of_regions_and_their_bytes_are_bounded(make_file: MakeFile) -> None:
    registry = SystemSharedMemory(max_regions=2, max_bytes=100)
    registry.register("a", make_file(bytes(64)), 0, 60)
    with pytest.raises(FailedPrecondition, match="60 are registered"):
        registry.register("b", make_file(bytes(64)), 0, 41)
    registry.register("b", make_file(bytes(64)), 0, 40)
    with pytest.raises(FailedPrecondition, match="max_regions"):
        registry.register("c", make_file(bytes(64)), 0, 1)
    registry.close()


def test_detach_copies_only_what_lives_in_shared_memory(make_file: MakeFile) -> None:
    key = make_file(np.arange(4, dtype=np.float32).tobytes())
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 16)
    shared = registry.get("r").view(0, 16, writable=False, what="input 'x'").array(np.dtype(np.float32), (1, 4))
    own = np.ones((1, 4), dtype=np.float32)
    detached = detach_shared({"x": shared, "z": own})
    assert detached["z"] is own
    assert detached["x"] is not shared and detached["x"].flags.owndata
    np.testing.assert_array_equal(detached["x"], shared)
    plain = {"z": own}
    assert detach_shared(plain) is plain
    registry.close()
