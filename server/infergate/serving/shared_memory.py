"""System shared memory: the regions clients registered, mapped read/write from ``/dev/shm``.

Triton's system shared-memory extension lets a client on the same host pass
tensors through a POSIX shared-memory object instead of the request: it
creates ``/dev/shm/<key>``, registers ``[offset, offset + byte_size)`` of it
under a name (SystemSharedMemoryRegister), and then names that region in an
input's or requested output's ``shared_memory_region`` parameter.

:class:`SystemSharedMemory` is that registry. The composition root owns it
(built when ``shared_memory.system.enabled``) and closes it at stop. It is used
on the event loop only, so it takes no lock.

* **What may be opened.** A key names one file directly under ``/dev/shm``
  (``/name`` or ``name``; no other slash, not ``.`` or ``..``). It is opened
  read/write without following a symbolic link and must be a regular file that
  covers the region. Nothing else on the host can be reached through it.
* **Bounds.** At most ``max_regions`` regions and ``max_bytes`` mapped bytes in all.
* **Lifetime.** A request that names a region takes a :class:`RegionView` of it
  (the inputs it reads in place, the outputs it will write). Unregistering
  takes the region out of the registry at once: later requests naming it get
  NOT_FOUND and its name and key may be registered again. The mapping itself
  is closed only when no view of it is left, so requests that were already
  queued finish with the memory they were given; an unmap can never pull the
  memory from under a running batch (Python refuses to close an ``mmap``
  with live buffer exports, and the last view to go unmaps it).
* **A file that shrinks.** Every view first checks that the file still covers
  the region; reading a mapping past the end of its file would kill the
  process (SIGBUS). The check cannot stop a process that shrinks the file on
  purpose while a batch reads it: docs/security.md says who may use this.

Errors use Triton's words where its clients match on them, then infergate's detail.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate.errors import FailedPrecondition, InvalidArgument, NotFound

__all__ = [
    "SHM_ROOT",
    "Region",
    "RegionStatus",
    "RegionView",
    "SystemSharedMemory",
    "detach_shared",
    "shm_path",
]

SHM_ROOT = Path("/dev/shm")
_NAME_MAX = 255  # one path component (NAME_MAX)


@dataclass(frozen=True, slots=True)
class RegionStatus:
    """What SystemSharedMemoryStatus reports for one region."""

    name: str
    key: str
    offset: int
    byte_size: int


def shm_path(key: str, root: Path = SHM_ROOT) -> Path:
    """The file a key names: ``root/<name>`` for a key ``/<name>`` (or ``<name>``).

    Raises InvalidArgument in Triton's words when the key could reach anything else.
    """
    name = key.lstrip("/")
    if not name or "/" in name or name in (".", "..") or "\0" in name or len(name) > _NAME_MAX:
        raise InvalidArgument(
            f"Unable to open shared memory region: '{key}' (a key names one file directly under {root}: "
            "'/name', with no other '/')"
        )
    return root / name


class Region:
    """One registered region: ``byte_size`` bytes at ``offset`` of the file ``key`` names, mapped read/write."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, root: Path = SHM_ROOT):
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        path = shm_path(key, root)
        try:
            # O_NOFOLLOW: /dev/shm is writable by everyone, a symbolic link there must not lead elsewhere.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise InvalidArgument(f"Unable to open shared memory region: '{key}' ({reason})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(f"Unable to open shared memory region: '{key}' (not a shared memory object)")
            if offset + byte_size > info.st_size:
                raise InvalidArgument(
                    f"failed to register shared memory region '{name}': invalid args (offset {offset} + "
                    f"byte_size {byte_size} runs past the end of '{key}', which holds {info.st_size} bytes)"
                )
            # mmap offsets must be multiples of the allocation granularity: map from the one below.
            self._start = offset % mmap.ALLOCATIONGRANULARITY
            base = offset - self._start
            try:
                self._map = mmap.mmap(fd, self._start + byte_size, mmap.MAP_SHARED, offset=base)
            except OSError as exc:
                raise InvalidArgument(f"failed to register shared memory region '{name}': {exc.strerror}") from None
        finally:
            os.close(fd)  # the mapping holds its own descriptor

    @property
    def status(self) -> RegionStatus:
        return RegionStatus(self.name, self.key, self.offset, self.byte_size)

    def view(self, offset: int, byte_size: int, *, writable: bool, what: str) -> RegionView:
        """``byte_size`` bytes at ``offset`` into the region, for ``what`` (e.g. "input 'x' for model 'm'").

        Raises InvalidArgument when they do not lie inside the region, or when
        the file no longer covers it.
        """
        if offset < 0 or offset >= max(self.byte_size, 1):
            raise InvalidArgument(
                f"Invalid offset for shared memory region: '{self.name}' (offset {offset} for {what}; "
                f"the region holds {self.byte_size} bytes)"
            )
        if byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidArgument(
                f"shared memory region '{self.name}' holds {self.byte_size} bytes: {byte_size} bytes at offset "
                f"{offset} for {what} run past its end"
            )
        self._check_file()
        begin = self._start + offset
        memory = memoryview(self._map)[begin : begin + byte_size]
        return RegionView(self, memory if writable else memory.toreadonly())

    def _check_file(self) -> None:
        size = self._map.size()  # fstat of the mapping's own descriptor: the file's size now
        if self.offset + self.byte_size > size:
            raise InvalidArgument(
                f"shared memory region '{self.name}': the file of key '{self.key}' shrank to {size} bytes "
                f"since it was registered ({self.offset + self.byte_size} needed)"
            )

    def close(self) -> bool:
        """Unmap now if no view is left; otherwise the last view unmaps it. True if unmapped now."""
        try:
            self._map.close()
        except BufferError:  # views still exported: the mapping goes when they do
            return False
        return True


class RegionView:
    """Part of a region that one request reads or writes; keeps the mapping alive while it exists."""

    __slots__ = ("memory", "region")

    def __init__(self, region: Region, memory: memoryview):
        self.region = region
        self.memory = memory

    def check(self) -> None:
        """Raise InvalidArgument when the region's file no longer covers it: touching the view then would
        end the process with SIGBUS. For a write that comes long after the view was taken (an output,
        written once the model ran)."""
        self.region._check_file()

    def array(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """The bytes as an array, in place (no copy); read-only unless the view is writable."""
        return np.frombuffer(self.memory, dtype=dtype).reshape(shape)


def detach_shared(tensors: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """The same tensors, with those read in place from shared memory copied out of it.

    Inputs read from a region are views of the client's memory, which the
    client may overwrite as soon as it has its answer. Anything that keeps
    inputs past the answer (a shadow copy, the drift monitor, the payload
    log) must hold a copy: call this before handing them over.
    """
    if not any(_in_shared_memory(a) for a in tensors.values()):
        return tensors
    return {name: array.copy() if _in_shared_memory(array) else array for name, array in tensors.items()}


def _in_shared_memory(array: npt.NDArray[Any]) -> bool:
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


class SystemSharedMemory:
    """The registered regions, bounded in number and in mapped bytes (see the module docstring)."""

    def __init__(self, max_regions: int, max_bytes: int, root: Path = SHM_ROOT):
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._root = root
        self._regions: dict[str, Region] = {}

    @property
    def mapped_bytes(self) -> int:
        return sum(r.byte_size for r in self._regions.values())

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of ``key`` as region ``name``."""
        if not name:
            raise InvalidArgument("failed to register shared memory region: the name is empty")
        if name in self._regions:
            raise InvalidArgument(f"shared memory region '{name}' already in manager")
        if any(r.key == key for r in self._regions.values()):
            raise InvalidArgument(
                f'registering an active shared memory key, "{key}", under a different name is not currently '
                f"supported (unregister the region that uses it first)"
            )
        if byte_size == 0:
            raise InvalidArgument(f"failed to register shared memory region '{name}': invalid args (byte_size 0)")
        if len(self._regions) >= self.max_regions:
            raise FailedPrecondition(
                f"failed to register shared memory region '{name}': {len(self._regions)} regions are registered, "
                f"the server's limit (shared_memory.system.max_regions); unregister one first"
            )
        if self.mapped_bytes + byte_size > self.max_bytes:
            raise FailedPrecondition(
                f"failed to register shared memory region '{name}': {byte_size} more bytes would pass the "
                f"server's limit of {self.max_bytes} mapped bytes (shared_memory.system.max_bytes); "
                f"{self.mapped_bytes} are registered"
            )
        self._regions[name] = Region(name, key, offset, byte_size, self._root)

    def get(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find shared memory region: '{name}'")
        return region

    def status(self, name: str = "") -> list[RegionStatus]:
        """Every region (``name`` empty) or the one named; NOT_FOUND for an unknown name."""
        if not name:
            return [r.status for r in self._regions.values()]
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find system shared memory region: '{name}'")
        return [region.status]

    def unregister(self, name: str = "") -> None:
        """Unregister ``name`` (empty: every region). An unknown name is not an error, as in Triton."""
        names: Iterable[str] = list(self._regions) if not name else [name]
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                region.close()

    def close(self) -> None:
        """Unregister every region (at server stop)."""
        self.unregister()
