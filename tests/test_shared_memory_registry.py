"""The system shared-memory registry on its own: what may be opened, the bounds, and how long a file is held.

Real POSIX shared-memory files under /dev/shm (unique names per test, removed
afterwards), and this process's own /proc/self/fd and /proc/self/maps to see
what it holds.
"""

from __future__ import annotations

import contextlib
import os
import resource
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import MakeFile

from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from infergate.models.datatypes import DATATYPES
from infergate.serving.shared_memory import SHM_ROOT, RegionStatus, SystemSharedMemory, shm_path
from infergate.serving.shm_tensors import OutputTarget, TensorRegion, write_output


def held(key: str) -> bool:
    """Does this process hold a descriptor of the file of ``key`` now?"""
    target = str(SHM_ROOT / key.lstrip("/"))
    return any(os.readlink(fd).startswith(target) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink())


def mapped(key: str) -> bool:
    """Does this process map the file of ``key`` now?"""
    target = str(SHM_ROOT / key.lstrip("/"))
    return target in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize(("key", "name"), [("/frames", "frames"), ("frames", "frames"), ("//frames", "frames")])
def test_a_key_names_one_file_directly_under_dev_shm(key: str, name: str) -> None:
    assert shm_path(key) == SHM_ROOT / name


@pytest.mark.parametrize("key", ["", "/", "/a/b", "/../etc/passwd", "/..", ".", "a\0b", "/" + "x" * 256])
def test_a_key_that_could_reach_anything_else_is_refused(key: str) -> None:
    with pytest.raises(InvalidArgument, match="Unable to open shared memory region"):
        shm_path(key)


def test_a_registered_region_is_read_into_memory_of_its_own_at_any_offset(make_file: MakeFile) -> None:
    data = np.arange(3000, dtype=np.float32)
    key = make_file(data.tobytes())
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 5000, 4000)
    copied = registry.get("r").slice(8, 40, "input 'x'").read()
    np.testing.assert_array_equal(copied.view(np.float32), data[(5000 + 8) // 4 :][:10])
    assert not copied.flags.writeable
    os.truncate(SHM_ROOT / key.lstrip("/"), 0)  # the client's file changes: the copy does not
    np.testing.assert_array_equal(copied.view(np.float32), data[(5000 + 8) // 4 :][:10])
    assert registry.status() == [RegionStatus("r", key, 5000, 4000)]
    assert not mapped(key)  # never mapped: touching a mapping past its file's end is SIGBUS
    registry.close()


def test_writes_reach_the_file(make_file: MakeFile) -> None:
    key = make_file(bytes(64))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("out", key, 8, 40)
    registry.get("out").slice(8, 16, "output 'y'").write(memoryview(b"0123456789abcdef"))
    registry.close()
    assert (SHM_ROOT / key.lstrip("/")).read_bytes()[16:32] == b"0123456789abcdef"


def test_unregistering_keeps_the_file_a_queued_request_holds_until_it_lets_go(make_file: MakeFile) -> None:
    key = make_file(bytes(64))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("out", key, 0, 64)
    target = registry.get("out").slice(0, 16, "output 'y'")
    registry.unregister("out")
    assert registry.status() == []
    with pytest.raises(NotFound, match="Unable to find shared memory region: 'out'"):
        registry.get("out")
    assert held(key)
    target.write(memoryview(b"written after it"))  # the request writes where it was told to
    del target
    assert not held(key)  # the last slice closed it
    assert (SHM_ROOT / key.lstrip("/")).read_bytes()[:16] == b"written after it"


def test_unregistering_an_unused_region_closes_its_file_at_once(make_file: MakeFile) -> None:
    key = make_file(bytes(64))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 64)
    assert held(key)
    registry.unregister()
    assert not held(key)
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


@pytest.mark.parametrize("spelling", ["{name}", "//{name}", "a hard link"])
def test_a_file_is_registered_once_whatever_key_names_it(make_file: MakeFile, spelling: str) -> None:
    key = make_file(bytes(64))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 64)
    name = key.lstrip("/")
    if spelling == "a hard link":
        other = f"infergate-test-link-{uuid.uuid4().hex}"
        os.link(SHM_ROOT / name, SHM_ROOT / other)
        again = "/" + other
    else:
        again = spelling.format(name=name)
    try:
        with pytest.raises(InvalidArgument, match=f'registering an active shared memory key, "{again}"'):
            registry.register("other", again, 0, 32)
    finally:
        if spelling == "a hard link":
            (SHM_ROOT / again.lstrip("/")).unlink()
    assert [r.name for r in registry.status()] == ["r"]
    registry.close()


@contextlib.contextmanager
def open_files_limit(extra: int) -> Iterator[None]:
    """Lower this process's open-file limit (RLIMIT_NOFILE's soft limit) to ``extra`` more than it has open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_running_out_of_descriptors_is_the_servers_exhaustion_not_a_bad_argument(make_file: MakeFile) -> None:
    keys = [make_file(bytes(64)) for _ in range(8)]
    registry = SystemSharedMemory(max_regions=8, max_bytes=1 << 20)
    with open_files_limit(2), pytest.raises(ResourceExhausted) as refused:
        for i, key in enumerate(keys):
            registry.register(f"r{i}", key, 0, 64)
    assert "failed to register shared memory region" in refused.value.message
    assert "Too many open files" in refused.value.message
    assert 0 < len(registry.status()) < 8
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
        registry.get("r").slice(offset, byte_size, "input 'x'")
    registry.close()


def test_a_file_that_shrank_after_registration_is_refused_not_read(make_file: MakeFile) -> None:
    key = make_file(bytes(8192))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 8192)
    taken = registry.get("r").slice(4096, 16, "input 'x'")
    os.truncate(SHM_ROOT / key.lstrip("/"), 4100)
    with pytest.raises(InvalidArgument, match=r"region 'r': the file of key '.*' shrank to 4100 bytes since it was"):
        taken.read()
    registry.close()


def test_an_output_region_whose_file_shrank_while_the_model_ran_is_refused_not_written(make_file: MakeFile) -> None:
    key = make_file(bytes(8192))
    registry = SystemSharedMemory(max_regions=4, max_bytes=1 << 20)
    registry.register("r", key, 0, 8192)
    where = TensorRegion("r", 4096, 4096)
    target = OutputTarget(where, registry.get("r").slice(4096, 4096, "output 'y'"))
    os.truncate(SHM_ROOT / key.lstrip("/"), 0)  # after the request was decoded
    tensor = pb.ModelInferResponse().outputs.add(name="y")
    with pytest.raises(InvalidArgument, match="shrank to 0 bytes since it was registered"):
        write_output(target, tensor, np.ones(1024, dtype=np.float32), DATATYPES["FP32"])
    assert os.stat(SHM_ROOT / key.lstrip("/")).st_size == 0  # not grown back
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
