# -*- test-case-name: tests.test_shared_fill -*-
"""
Fills coordinated across the processes sharing one cache directory (C{--workers}), so that N
processes fetch each missing slice once, as one process does.

Two kinds of record locks (Linux open-file-description locks, C{F_OFD_SETLK}: they belong to an open
file, so two stores in one process exclude each other as two processes do, and the kernel drops them
when the file's last descriptor closes, so a killed worker never leaves a lock behind):

  - the contact lock, on byte 0 of C{h.lock} (next to the sidecar of key hash C{h}): held by the
    process that asks the origin for a key not cached yet, until its new object's (empty) sidecar
    is on disk; the others wait for that sidecar and share the object instead of asking too;
  - slice locks, on the 8-byte record of slice I in C{h.<token>.fill} (one file per data file):
    held by the process fetching slice I.  The record holds how many bytes of the slice that
    process has written so far; it writes the data first and the count after (both through the page
    cache of one machine), so another process that reads count C may read C bytes of the slice from
    the data file, and once C is the slice's length it may take the slice as present (its own
    persist fdatasyncs the data file before any sidecar lists it).  A slice whose lock is free and
    whose count is short was given up: whoever needs it takes the lock and fetches it.

The C{.fill} file starts with the machine's boot id: counts written before a reboot (whose data may
not have reached the disk) are never believed; such a file is cleared on open.

Where open-file-description locks are missing (not Linux), classic POSIX locks stand in: they
belong to the process, so only separate processes exclude each other, which is what C{--workers}
needs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Optional

from twisted.logger import Logger

from h264edge.store._sidecar import key_hash

log = Logger()

RECORD = 8
TAKEN, HELD, WHOLE = "taken", "held", "whole"
HEADER = 64  # the boot id, then zeros; slice I's record is at HEADER + 8 * I


def boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()[:HEADER]
    except OSError:
        return b"no-boot-id"


_BOOT = boot_id().ljust(HEADER, b"\0")


_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", None)
_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid (0 for OFD locks)


def _ofd(fd: int, command: int, kind: int, offset: int, length: int) -> None:
    fcntl.fcntl(fd, command, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, length, 0))


def _try_lock(fd: int, offset: int, length: int) -> bool:
    try:
        if _OFD_SETLK is not None:
            _ofd(fd, _OFD_SETLK, fcntl.F_WRLCK, offset, length)
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, offset, os.SEEK_SET)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def _lock_waiting(fd: int, offset: int, length: int) -> None:
    if _OFD_SETLKW is not None:
        _ofd(fd, _OFD_SETLKW, fcntl.F_WRLCK, offset, length)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX, length, offset, os.SEEK_SET)


def _unlock(fd: int, offset: int, length: int) -> None:
    if _OFD_SETLK is not None:
        _ofd(fd, _OFD_SETLK, fcntl.F_UNLCK, offset, length)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, length, offset, os.SEEK_SET)


class ContactLock:
    """The held contact lock of one key; L{release} it once the object is published (or on failure)."""

    def __init__(self, fd: int) -> None:
        self._fd: Optional[int] = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the lock


class SliceLocks:
    """The slice locks and write counts of one data file (one object representation)."""

    def __init__(self, path: str, slice_size: int, size: int) -> None:
        self.path = path
        self.slice_size = slice_size
        self.size = size
        self.held: set[int] = set()
        self._fd: Optional[int] = None

    def _open(self) -> int:
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.pread(fd, HEADER, 0) != _BOOT:
                    # new, or from before a reboot: no count in it may be believed.  Clearing under a
                    # lock on the header, so two processes opening it at once do not clear each
                    # other's first counts.
                    _lock_waiting(fd, 0, HEADER)  # held for two syscalls at most
                    try:
                        if os.pread(fd, HEADER, 0) != _BOOT:
                            os.ftruncate(fd, 0)
                            os.pwrite(fd, _BOOT, 0)
                    finally:
                        _unlock(fd, 0, HEADER)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def take(self, index: int) -> str:
        """
        Lock slice C{index} for fetching here: L{TAKEN} (its count set to 0), L{HELD} if another process
        holds it, or L{WHOLE} if a process already wrote all of it (and let it go): it is present.
        """
        if index in self.held:
            return TAKEN
        fd = self._open()
        offset = HEADER + RECORD * index
        if not _try_lock(fd, offset, RECORD):
            self._close_if_idle()
            return HELD
        raw = os.pread(fd, RECORD, offset)
        if len(raw) == RECORD and struct.unpack("<Q", raw)[0] >= self._length(index):
            _unlock(fd, offset, RECORD)
            self._close_if_idle()
            return WHOLE
        self.held.add(index)
        os.pwrite(fd, bytes(RECORD), offset)
        return TAKEN

    def _length(self, index: int) -> int:
        return min(self.slice_size, self.size - index * self.slice_size)

    def wrote(self, index: int, count: int) -> None:
        """We hold slice C{index} and have written its first C{count} bytes to the data file."""
        if self._fd is not None and index in self.held:
            os.pwrite(self._fd, struct.pack("<Q", count), HEADER + RECORD * index)

    def release(self, index: int) -> None:
        """We no longer fetch slice C{index} (complete, given up, or the object dropped)."""
        if index not in self.held or self._fd is None:
            return
        self.held.discard(index)
        _unlock(self._fd, HEADER + RECORD * index, RECORD)
        self._close_if_idle()

    def release_all(self) -> None:
        for index in list(self.held):
            self.release(index)

    def written(self, index: int) -> int:
        """Bytes of slice C{index} another process wrote (0 if it never wrote a count)."""
        fd = self._open()
        raw = os.pread(fd, RECORD, HEADER + RECORD * index)
        count = struct.unpack("<Q", raw)[0] if len(raw) == RECORD else 0
        self._close_if_idle()
        return min(count, self._length(index))

    def whole(self, index: int) -> bool:
        """Whether a process wrote all of slice C{index}."""
        return self.written(index) >= self._length(index)

    def free(self, index: int) -> bool:
        """Whether no process holds slice C{index} (we do not either)."""
        if index in self.held:
            return False
        fd = self._open()
        offset = HEADER + RECORD * index
        if not _try_lock(fd, offset, RECORD):
            self._close_if_idle()
            return False
        _unlock(fd, offset, RECORD)
        self._close_if_idle()
        return True

    def _close_if_idle(self) -> None:
        if not self.held and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class FillLocks:
    """The cache directory's fill locks, for one process (see the module docstring)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def _dir(self, h: str) -> str:
        return os.path.join(self.root, h[0:2], h[2:4])

    def contact(self, key: str) -> Optional[ContactLock]:
        """The contact lock of C{key} if no other process holds it, else None."""
        h = key_hash(key)
        directory = self._dir(h)
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, f"{h}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if _try_lock(fd, 0, 1):
                return ContactLock(fd)
        except OSError:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def slices(self, key: str, token: str, slice_size: int, size: int) -> SliceLocks:
        h = key_hash(key)
        os.makedirs(self._dir(h), exist_ok=True)
        return SliceLocks(os.path.join(self._dir(h), f"{h}.{token}.fill"), slice_size, size)
