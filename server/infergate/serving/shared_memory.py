"""System shared memory: the regions clients registered, read and written through their files in ``/dev/shm``.

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
  covers the region. Nothing else on the host can be reached through it. One
  file is registered once, whatever key names it (``/k``, ``k``, a hard link).
* **Bounds.** At most ``max_regions`` regions and ``max_bytes`` registered bytes
  in all. Each region holds one open file descriptor; running out of them is
  RESOURCE_EXHAUSTED (config.py keeps ``max_regions`` under the open-file limit).
* **No mapping.** The server never maps a client's file: the client may shrink
  it at any time, and touching a mapping past the end of its file ends the
  process (SIGBUS). Inputs are read with ``preadv`` into the server's own
  memory when the request is decoded (a file that no longer holds them is
  INVALID_ARGUMENT); outputs are written with ``pwrite``, which cannot fault.
* **Lifetime.** A request that names a region takes a :class:`RegionSlice` of
  it (the inputs it reads, the outputs it will write). Unregistering takes the
  region out of the registry at once: later requests naming it get NOT_FOUND
  and its name and key may be registered again. The descriptor is closed when
  no slice of the region is left, so requests that were already queued write
  their outputs where they were told to; a closed descriptor's number, reused
  for another file, can never be written through.

Errors use Triton's words where its clients match on them, then infergate's detail.
"""

from __future__ import annotations

import errno
import os
import stat
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from infergate.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

__all__ = [
    "SHM_ROOT",
    "Region",
    "RegionSlice",
    "RegionStatus",
    "SystemSharedMemory",
    "shm_path",
]

SHM_ROOT = Path("/dev/shm")
_NAME_MAX = 255  # one path component (NAME_MAX)
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


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
    """One registered region: ``byte_size`` bytes at ``offset`` of the file ``key`` names, held open read/write.

    ``identity`` is the file's (device, inode): the same file under another key has the same one.
    """

    def __init__(self, name: str, key: str, offset: int, byte_size: int, root: Path = SHM_ROOT):
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        fd = _open(name, key, shm_path(key, root))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(f"Unable to open shared memory region: '{key}' (not a shared memory object)")
            if offset + byte_size > info.st_size:
                raise InvalidArgument(
                    f"failed to register shared memory region '{name}': invalid args (offset {offset} + "
                    f"byte_size {byte_size} runs past the end of '{key}', which holds {info.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        self.identity = (info.st_dev, info.st_ino)
        self._fd = fd
        # Closed when the region is gone: unregistered, and no request holds a slice of it.
        self._closer = weakref.finalize(self, os.close, fd)

    @property
    def status(self) -> RegionStatus:
        return RegionStatus(self.name, self.key, self.offset, self.byte_size)

    def slice(self, offset: int, byte_size: int, what: str) -> RegionSlice:
        """``byte_size`` bytes at ``offset`` into the region, for ``what`` (e.g. "input 'x' for model 'm'").

        Raises InvalidArgument when they do not lie inside the region.
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
        return RegionSlice(self, offset, byte_size)

    def read(self, offset: int, byte_size: int) -> npt.NDArray[np.uint8]:
        """A copy of ``byte_size`` bytes at ``offset`` into the region, in memory of the server's own
        (read-only). InvalidArgument when the file no longer holds them."""
        data = np.empty(byte_size, dtype=np.uint8)
        memory, done, position = data.data, 0, self.offset + offset
        while done < byte_size:
            count = os.preadv(self._fd, [memory[done:]], position + done)
            if count == 0:
                raise self._shrank()
            done += count
        data.flags.writeable = False
        return data

    def write(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` into the region. A file shrunk below the region since it was registered
        is refused (InvalidArgument); ``pwrite`` would grow it back, never fault."""
        if os.fstat(self._fd).st_size < self.offset + self.byte_size:
            raise self._shrank()
        done, position = 0, self.offset + offset
        try:
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], position + done)
        except OSError as exc:  # e.g. ENOSPC: the file has holes and /dev/shm is full
            raise ResourceExhausted(
                f"shared memory region '{self.name}': writing to its file failed: {exc.strerror}"
            ) from None

    def _shrank(self) -> InvalidArgument:
        size = os.fstat(self._fd).st_size
        return InvalidArgument(
            f"shared memory region '{self.name}': the file of key '{self.key}' shrank to {size} bytes "
            f"since it was registered ({self.offset + self.byte_size} needed)"
        )


def _open(name: str, key: str, path: Path) -> int:
    try:
        # O_NOFOLLOW: /dev/shm is writable by everyone, a symbolic link there must not lead elsewhere.
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _OUT_OF_DESCRIPTORS:  # the server's limit, not the caller's mistake
            raise ResourceExhausted(
                f"failed to register shared memory region '{name}': {exc.strerror} (each region holds an open "
                "file; the server is at its open-file limit: unregister regions, or raise the limit, "
                "docs/security.md)"
            ) from None
        reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise InvalidArgument(f"Unable to open shared memory region: '{key}' ({reason})") from None


@dataclass(frozen=True, slots=True)
class RegionSlice:
    """Part of a region that one request reads or writes; keeps the region's descriptor open while it exists."""

    region: Region
    offset: int
    byte_size: int

    def __len__(self) -> int:
        return self.byte_size

    def read(self) -> npt.NDArray[np.uint8]:
        """The bytes, copied (see :meth:`Region.read`)."""
        return self.region.read(self.offset, self.byte_size)

    def write(self, data: memoryview) -> None:
        """Write ``data`` (at most ``byte_size`` bytes) at the start of the slice (see :meth:`Region.write`)."""
        self.region.write(self.offset, data)


class SystemSharedMemory:
    """The registered regions, bounded in number and in bytes (see the module docstring)."""

    def __init__(self, max_regions: int, max_bytes: int, root: Path = SHM_ROOT):
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._root = root
        self._regions: dict[str, Region] = {}

    @property
    def registered_bytes(self) -> int:
        return sum(r.byte_size for r in self._regions.values())

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Register ``byte_size`` bytes at ``offset`` of the file ``key`` names as region ``name``."""
        if not name:
            raise InvalidArgument("failed to register shared memory region: the name is empty")
        if name in self._regions:
            raise InvalidArgument(f"shared memory region '{name}' already in manager")
        if byte_size == 0:
            raise InvalidArgument(f"failed to register shared memory region '{name}': invalid args (byte_size 0)")
        if len(self._regions) >= self.max_regions:
            raise FailedPrecondition(
                f"failed to register shared memory region '{name}': {len(self._regions)} regions are registered, "
                f"the server's limit (shared_memory.system.max_regions); unregister one first"
            )
        if self.registered_bytes + byte_size > self.max_bytes:
            raise FailedPrecondition(
                f"failed to register shared memory region '{name}': {byte_size} more bytes would pass the "
                f"server's limit of {self.max_bytes} registered bytes (shared_memory.system.max_bytes); "
                f"{self.registered_bytes} are registered"
            )
        region = Region(name, key, offset, byte_size, self._root)
        for other in self._regions.values():
            if other.identity == region.identity:
                region._closer()  # nothing else holds it
                raise InvalidArgument(
                    f'registering an active shared memory key, "{key}", under a different name is not currently '
                    f"supported (region '{other.name}' uses that file, as key \"{other.key}\"; unregister it first)"
                )
        self._regions[name] = region

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
            self._regions.pop(each, None)

    def close(self) -> None:
        """Unregister every region (at server stop)."""
        self.unregister()
