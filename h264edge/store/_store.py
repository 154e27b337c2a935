# -*- test-case-name: tests.test_store -*-
"""
The disk store: sparse data files cut in fixed slices, JSON sidecars, an in-memory LRU index.

Layout, for an object whose key hashes (SHA-256, hex) to C{h}::

    root/h[0:2]/h[2:4]/h.meta              sidecar (JSON): metadata, slice size, data token, bitmap
    root/h[0:2]/h[2:4]/h.<token>.data      sparse data file, made (truncated to the object's size) at its first write
    root/h[0:2]/h[2:4]/h.<token>.<pid>-<n>.tmp a sidecar being written (removed by the rebuild if left over)

Trust rules:
  - In memory a slice is present from L{CachedObject.commit_slice} on (the caller wrote it).
  - On disk a sidecar lists a slice only after the data file was fdatasync'ed (when C{sync}); the
    sidecar is then replaced atomically (tmp, fsync, rename).  Persisting is batched: when the object
    completes, every L{PERSIST_EVERY_SLICES} slices, when the oldest unpersisted slice is older than
    L{PERSIST_INTERVAL} seconds (checked at commit and at get()), at L{CachedObject.close} and at
    L{SliceStore.close}.  With C{run_in_thread} (the server's setting) a batch's fdatasync, then the
    new sidecar's tmp file and its fsync, run in a thread (so do those of L{SliceStore.publish} and
    L{SliceStore.refresh}); the sidecar, put in place on the reactor when both are done, lists only
    the slices present when the sync began (C{_Entry.listed}); the reactor keeps receiving and
    sending meanwhile.  Cold fills measured 5-10% faster than with the sync on the reactor thread,
    close to C{sync=False}.  L{SliceStore.close} still syncs in the caller.  A crash loses at most
    the unpersisted slices; they are refetched.  The directory is not fsync'ed after the rename: a
    crash may bring back the previous sidecar, which lists a subset of the same file's synced
    slices, so it is still true.
  - A data file's bitmap only ever grows: a new representation (create()) gets a new data file.

Several processes on one root (C{--workers}): the disk is the only thing they share, so every
decision that matters is made against it, never against another process's memory:
  - A sidecar is created only with C{link(2)} (fails if one exists) and replaced only by a process
    whose object it names (same data token), after checking that it still does.  So a key's
    sidecar changes token only by going through "absent", and two processes racing to create one
    key end with one winner; the loser finds the sidecar taken at its first persist, unlinks its
    own data file and drops its entry (its readers keep streaming from the open descriptor).
  - L{SliceStore.get} of a key not in memory looks for its sidecar (one C{stat}-sized lookup per
    miss, nothing next to an origin fetch), so any process serves what another one cached.
  - L{SliceStore.get} of a key in memory C{stat}s its sidecar (about 1 us): gone means another
    process purged or evicted it, and it is a miss here too; replaced (inode or ctime changed) means
    it is re-read: the same data token merges the other process's persisted slices and metadata
    (several processes may fill missing slices of one data file: it holds one representation, the
    fill checks the origin's validators before writing, so they write the same bytes), another
    token means the object was replaced and this process switches to the new one.
  - Removal unlinks the data file first, then the sidecar if it still names that file.  A sidecar
    naming a missing data file is a miss wherever it is found, and is removed there.
  - After each persist the writer checks that its data file still has a link; if another process
    removed it meanwhile, the writer takes its sidecar back and drops the object.
  - Each process keeps its own index and byte budget over the objects it knows (created, used or
    found by a rescan, L{SliceStore.rebuild_steps} run again with C{orphan_grace}); before evicting
    an object it checks the sidecar's mtime (the last use any process recorded) and keeps the
    object if another process used it since.  Disk use may exceed C{max_size} by what is being
    filled and by objects created by others since this process's last rescan.
  - With C{orphan_grace} a rebuild leaves data and tmp files younger than that alone: they may be
    another process's fill that has not persisted yet.
What can happen is lost work (a slice fetched twice, an object refetched after a race), never
wrong bytes and never an error for a reader.

A full disk (see L{SliceStore.min_free}): before each write into a data file the store makes
sure the file system keeps C{min_free} bytes free (C{statvfs}, the free space an unprivileged user
has), evicting least recently used objects to make room; a write that meets ENOSPC anyway (another
process filled the disk) evicts and is tried again.  When nothing more can be evicted the object is
I{uncached}: dropped from the index (its data file unlinked), while its slices already written stay
readable through its descriptor and the rest of it goes to memory, as for a transient object.  So a
full disk costs caching, never an answer.

Transient objects (no-store answers, objects larger than C{max_size}) and uncached ones keep the
slices not on disk in memory, in a bounded ring of C{stream_buffer} bytes (L{CachedObject.room_for}:
whoever writes asks for a slice's room first and waits when there is none, which is how a slow viewer
pauses the origin); L{SliceStore.memory_bytes} counts what they hold.

The index holds one small L{_Entry} per object (metadata, bitmap) and no descriptor.  get() and
create() hand out a L{CachedObject} handle owning one descriptor of the data file (a new object's
from its first write, read or fileno(), when its data file is made); while any code
references that handle, get() returns the same instance, and the descriptor is closed only when
the handle is garbage collected.  So descriptors scale with objects in use, not objects cached, and
an evicted (unlinked) object stays readable for whoever still holds it: a descriptor number taken
from fileno() can never be closed and reused for another file under its holder.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterator

import attrs
import numpy
from attrs import define
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from h264edge.errors import EdgeError
from h264edge.observer import NULL_OBSERVER, EdgeObserver
from h264edge.store._sidecar import (
    MAX_SIDECAR_BYTES,
    BadSidecar,
    ObjectMeta,
    Sidecar,
    decode_sidecar,
    encode_sidecar,
    key_hash,
    slice_count,
)

log = Logger()

PERSIST_EVERY_SLICES = 16
PERSIST_INTERVAL = 5.0
LAST_USE_PERSIST_INTERVAL = 60.0
DISK_TROUBLE_MEMORY = 60.0  # seconds after a disk error during which L{SliceStore.disk_trouble} is true
ORPHAN_GRACE = 600.0  # with several processes: a data file younger than this may be a fill in flight
DISK_RESERVE = 64 * 1024
"""Room kept free above C{min_free} for what follows a data write: sidecars, their tmp files, directories."""
STREAM_BUFFER = 2 * 2**20
"""Default bytes of memory an uncached or transient object may hold (at least two slices)."""
FREE_RECHECK = 0.1  # seconds a free-space reading is trusted (far above the floor), less our own writes
FREE_MARGIN = 64 * 2**20  # ... and only while it is this far above the floor
DEFAULT_MIN_FREE = 2**30
DEFAULT_MIN_FREE_SHARE = 0.05
_FULL = (errno.ENOSPC, errno.EDQUOT)

_HEX = frozenset("0123456789abcdef")


class _Superseded(Exception):
    """Our sidecar is gone or names another data file: another process removed or replaced the object."""


def _put_tmp_or_say_full(tmp: str, raw: bytes, last_used: float, sync: bool) -> int:
    """L{_put_tmp}, raising L{_SidecarNoSpace} when the disk is full."""
    try:
        return _put_tmp(tmp, raw, last_used, sync)
    except OSError as e:
        if e.errno in _FULL:
            raise _SidecarNoSpace(e) from e
        raise


def _put_tmp(tmp: str, raw: bytes, last_used: float, sync: bool) -> int:
    """
    Write a sidecar's bytes to the new file C{tmp}, fsync'ed when C{sync}, its mtime the recorded
    last use; its inode.  Touches no store state, so it may run in a thread.  C{tmp} is removed if
    anything fails.
    """
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(out, view) :]
            if sync:
                os.fsync(out)
        finally:
            os.close(out)
        # The mtime is the recorded last use: a lazy touch (os.utime) later moves it forward.
        os.utime(tmp, (last_used, last_used))
        return os.stat(tmp).st_ino
    except OSError:
        _unlink(tmp)
        raise


class StoreError(EdgeError):
    """
    The disk failed us (EIO, a failed sync, ...) or the object is gone.  The object concerned has been
    dropped from the store and nothing of it is listed as present; serve from memory or fail.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class CacheDirUnusable(StoreError):
    """The cache directory cannot be made, listed or written (raised by L{SliceStore}'s constructor)."""


class _SidecarNoSpace(Exception):
    """Writing a sidecar met a full disk (the data it lists was synced: nothing to distrust)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def default_min_free(root: str) -> int:
    """
    The free-space floor used when none is given: L{DEFAULT_MIN_FREE} (1 GiB), or 5% of the file
    system holding C{root} if that is less (a small disk still caches).
    """
    try:
        st = os.statvfs(root)
    except OSError:
        return DEFAULT_MIN_FREE
    return min(DEFAULT_MIN_FREE, int(st.f_blocks * st.f_frsize * DEFAULT_MIN_FREE_SHARE))


def check_cache_dir(root: str) -> None:
    """
    Make C{root} if missing and check that this process can list it and create files in it.

    A full disk is not an error here (the store evicts to make room).

    @raise CacheDirUnusable: with a one-line message naming the directory.
    """
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise CacheDirUnusable(f"cache directory {root}: cannot create it: {e.strerror}", e.errno) from None
    if not os.path.isdir(root):
        raise CacheDirUnusable(f"cache directory {root}: not a directory", errno.ENOTDIR)
    probe = os.path.join(root, f".probe.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.listdir(root)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        if e.errno in _FULL:
            log.warn("cache directory {root} is full; the store evicts to make room", root=root)
            return
        raise CacheDirUnusable(f"cache directory {root} is not usable: {e.strerror}", e.errno) from None


def _writeback_starter() -> Callable[[int, int, int], None]:
    """
    C{start(fd, offset, length)}: ask the kernel to begin writing those bytes to disk now, without
    waiting (Linux sync_file_range with SYNC_FILE_RANGE_WRITE).  The fdatasync that must come before a
    sidecar lists the slices then finds most of the work done: cold fills measured 10-20% faster.  It
    changes nothing about what is trusted.  A no-op where the call is missing.
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError, TypeError):
        return lambda fd, offset, length: None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    call.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, write)  # an error here only means no head start

    return start


_start_writeback = _writeback_starter()


def _filling(entry: _Entry) -> bool:
    """Whether C{entry} is probably being filled: incomplete, and someone holds a handle on it."""
    return entry.present_count < entry.slice_count and entry.handle is not None and entry.handle() is not None


def _is_hex_dir(name: str) -> bool:
    return len(name) == 2 and name[0] in _HEX and name[1] in _HEX


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What tells one version of a sidecar from the next: a rename brings a new inode (and ctime)."""
    return (st.st_ino, st.st_ctime_ns, st.st_mtime_ns)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("could not remove {path}: {error}", path=path, error=e)


@define(eq=False)
class _Entry:
    """The state of one object, shared by its handles: metadata, slice bitmap, persistence bookkeeping."""

    meta: ObjectMeta
    slice_size: int
    hash: str
    token: str
    present: bytearray
    transient: bool = False
    present_count: int = attrs.field(init=False, default=0)
    evicted: bool = attrs.field(init=False, default=False)
    failed: bool = attrs.field(init=False, default=False)  # a disk error: no byte of it may be used again
    on_disk: bool = attrs.field(init=False, default=False)  # we or a past run wrote its sidecar
    pending: int = attrs.field(init=False, default=0)  # committed slices the sidecar does not list yet
    pending_since: float = attrs.field(init=False, default=0.0)
    last_used: float = attrs.field(init=False, default=0.0)
    use_persisted: float = attrs.field(init=False, default=0.0)
    stamp: tuple[int, int, int] | None = attrs.field(init=False, default=None)  # sidecar as we last saw it
    # slices known to be on disk (synced), which a sidecar may list; a subset of present
    listed: bytearray = attrs.field(init=False, factory=bytearray)
    syncing: bool = attrs.field(init=False, default=False)  # a data sync runs in a thread
    in_sync: int = attrs.field(init=False, default=0)  # pending slices that sync covers
    reserved: int = attrs.field(init=False, default=0)  # bytes its fills announced and have not written
    reserved_written: int = attrs.field(init=False, default=0)  # and those they wrote meanwhile
    sync_again: bool = attrs.field(init=False, default=False)  # and another batch became due meanwhile
    # publish()es waiting for the sidecar to be in place (see SliceStore._persisted)
    sync_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list, repr=False)
    handle: weakref.ref[CachedObject] | None = attrs.field(init=False, default=None, repr=False)
    # slice -> bytes, for a transient or uncached object (None: every slice is in the data file)
    memory: dict[int, bytearray] | None = attrs.field(init=False, default=None, repr=False)
    # fixed: meta is only ever replaced by the same representation (same size); read on every
    # readable() check of a fill, a dozen times per 256 KiB of a cold miss
    slice_count: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self.present_count = int.from_bytes(self.present, "little").bit_count()
        self.listed = bytearray(self.present)
        self.slice_count = slice_count(self.meta.size, self.slice_size)

    @property
    def indexed(self) -> bool:
        return not (self.transient or self.evicted)

    def has(self, index: int) -> bool:
        return bool(self.present[index >> 3] >> (index & 7) & 1)

    def slice_length(self, index: int) -> int:
        return min(self.slice_size, self.meta.size - index * self.slice_size)

    @property
    def present_bytes(self) -> int:
        total = self.present_count * self.slice_size
        count = self.slice_count
        if count and self.has(count - 1):
            total -= count * self.slice_size - self.meta.size
        return total

    def merge_present(self, other: bytes) -> int:
        """Add the slices listed in C{other} (a bitmap of the same data file); the bytes added."""
        before = self.present_bytes
        merged = int.from_bytes(self.present, "little") | int.from_bytes(other, "little")
        self.present[:] = merged.to_bytes(len(self.present), "little")
        self.present_count = merged.bit_count()
        self.list_also(other)  # another process's sidecar lists only what it synced
        return self.present_bytes - before

    def list_also(self, synced: bytes | bytearray) -> None:
        """The slices of bitmap C{synced} are on disk: a sidecar may list them from now on."""
        merged = int.from_bytes(self.listed, "little") | int.from_bytes(synced, "little")
        self.listed[:] = merged.to_bytes(len(self.listed), "little")
        unlisted = int.from_bytes(self.present, "little") & ~merged
        self.pending = unlisted.bit_count()

    def forget_slices(self) -> None:
        self.present[:] = bytes(len(self.present))
        self.listed[:] = bytes(len(self.listed))
        self.present_count = 0
        self.pending = 0


@define(eq=False)
class CachedObject:
    """
    One object's data file and slice bitmap, as handed out by L{SliceStore.get} and
    L{SliceStore.create}.  While anyone references it, C{get()} returns this same instance, so the
    fill and its readers share it: the fill calls L{write} then L{commit_slice}; readers check
    L{has_slice}/L{available_from} before L{read} or L{fileno}.

    The data file's descriptor stays open for the life of this instance and is closed only when the
    instance is garbage collected, so a descriptor number obtained from L{fileno} can never come to
    name another file while its holder still has the object.

    A new object's data file is made at its first L{write}, L{read}, L{commit_slice} or L{fileno},
    not by L{SliceStore.create}: a miss's headers go out before that (see L{SliceStore.create}).
    """

    _store: SliceStore = attrs.field(repr=False)
    _entry: _Entry
    _fd: int = attrs.field(repr=False)  # -1 until the data file of a new object is made
    _counted: bool = attrs.field(init=False, default=False, repr=False)  # its memory is in memory_bytes
    _counted_reservation: bool = attrs.field(init=False, default=False, repr=False)  # released when collected

    def __attrs_post_init__(self) -> None:
        if self._fd >= 0:
            weakref.finalize(self, os.close, self._fd)

    def _descriptor(self) -> int:
        """
        The data file's descriptor, making the file if this new object has none yet.

        @raise StoreError: the object has no data file and gets none (it is held in memory).
        """
        fd = self._fd
        if fd < 0:
            if self._entry.memory is not None:
                raise StoreError(f"{self._entry.meta.key!r} is held in memory, it has no data file")
            fd = self._fd = self._store._make_data_file(self._entry)
            weakref.finalize(self, os.close, fd)
        return fd

    @property
    def _open_fd(self) -> int | None:
        return self._fd if self._fd >= 0 else None

    # -- state ----------------------------------------------------------------------------------

    @property
    def meta(self) -> ObjectMeta:
        return self._entry.meta

    @property
    def token(self) -> str:
        """The data file's token: one per representation of the key (see the layout)."""
        return self._entry.token

    @property
    def identity(self) -> object:
        """What L{SliceStore.peek_complete} reports for this object while this data file serves its key."""
        return self._entry

    @property
    def slice_size(self) -> int:
        return self._entry.slice_size

    @property
    def slice_count(self) -> int:
        return self._entry.slice_count

    def has_slice(self, index: int) -> bool:
        return 0 <= index < self._entry.slice_count and self._entry.has(index)

    def missing_slices(self, first: int, last: int) -> list[int]:
        """Indexes in C{first}..C{last} (inclusive, clamped to the object) not present."""
        first = max(first, 0)
        last = min(last, self._entry.slice_count - 1)
        present = self._entry.present
        return [i for i in range(first, last + 1) if not present[i >> 3] >> (i & 7) & 1]

    def available_from(self, offset: int, limit: int | None = None) -> int:
        """
        Contiguous bytes readable at C{offset} from present slices, capped at the object's end; the
        bitmap is scanned only as far as needed to answer about C{limit} bytes when it is given.
        """
        entry = self._entry
        size = entry.meta.size
        if not 0 <= offset < size:
            return 0
        if self.complete:
            return size - offset
        count = entry.slice_count
        if limit is not None:
            count = min(count, (offset + limit - 1) // entry.slice_size + 1)
        present = entry.present
        first = end = offset // entry.slice_size
        while end < count and present[end >> 3] >> (end & 7) & 1:
            end += 1
        if end == first:
            return 0
        return min(end * entry.slice_size, size) - offset

    @property
    def complete(self) -> bool:
        return self._entry.present_count == self._entry.slice_count

    @property
    def evicted(self) -> bool:
        return self._entry.evicted

    @property
    def transient(self) -> bool:
        """Not kept: a no-store answer, an object larger than the store, or one the full disk uncached."""
        return self._entry.transient

    @property
    def in_memory(self) -> bool:
        """
        Slices written from now on are held in memory (a transient or uncached object): they cannot
        be sent with C{os.sendfile}, and each takes room (L{room_for}).
        """
        return self._entry.memory is not None

    # -- I/O ------------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """
        Write C{data} at C{offset} of the data file.  Marks nothing present (see L{commit_slice});
        rewriting bytes of a present slice is allowed only with the same bytes.

        @raise StoreError: the disk refused; the object is dropped and nothing of it is present.
        @raise ValueError: the bytes fall outside the object.
        """
        self._check_failed()
        view = memoryview(data).cast("B")
        entry = self._entry
        if offset < 0 or offset + len(view) > entry.meta.size:
            raise ValueError(f"write of {len(view)} bytes at {offset} outside {entry.meta.size}")
        if entry.reserved:
            self._store._reservation_used(entry, len(view))
        if entry.memory is None:
            if self._store._disk_room(len(view), entry):
                offset, view = self._write_file(offset, view)
            else:
                self._store._uncache(entry, "the cache disk is at its free-space floor")
        if view:
            self._write_memory(offset, view)

    def _write_file(self, offset: int, view: memoryview) -> tuple[int, memoryview]:
        """pwrite C{view} at C{offset}; what the disk refused (the object is then uncached, see L{write})."""
        try:
            fd = self._descriptor()
        except StoreError:
            return offset, view  # _make_data_file uncached the object
        retried = False
        while view:
            try:
                written = os.pwrite(fd, view, offset)
            except OSError as e:
                if e.errno in _FULL and not retried and self._store._evict_for_room(len(view), self._entry, True):
                    retried = True
                    continue
                self._store._uncache(self._entry, e)
                return offset, view
            view = view[written:]
            offset += written
        return offset, view

    def _write_memory(self, offset: int, view: memoryview) -> None:
        entry = self._entry
        ss = entry.slice_size
        while view:
            index = offset // ss
            slot = self._slot(index)
            at = offset - index * ss
            n = min(len(view), len(slot) - at)
            slot[at : at + n] = view[:n]
            view = view[n:]
            offset += n

    def _slot(self, index: int) -> bytearray:
        """The memory of slice C{index}, made if missing (from what the data file holds of it, if any)."""
        memory = self._entry.memory
        assert memory is not None
        slot = memory.get(index)
        if slot is None:
            length = self._entry.slice_length(index)
            slot = bytearray(length)
            if self._fd >= 0:
                # uncached mid-fill: the bytes already written of this slice are in the file
                try:
                    slot[:] = os.pread(self._fd, length, index * self._entry.slice_size).ljust(length, b"\0")
                except OSError:
                    pass  # a fill writes a slice from its start again when its bytes are lost
            memory[index] = slot
            self._store._memory_taken(self, length)
        return slot

    def reserve(self, nbytes: int) -> None:
        """
        A fill is about to write C{nbytes} into this object.  A new object (nothing written yet) that
        the disk cannot hold, even by evicting every object not being filled, once the fills in
        flight have written what they announced, is uncached at once: it goes to memory without
        taking disk space that those fills need (when fills in flight alone outgrow the disk, the
        first ones are cached and the others stream through, rather than all of them stopping
        halfway for want of room).  An object with data on disk stays cached and is written as room
        allows.  Eviction itself happens write by write.
        """
        entry = self._entry
        if entry.memory is not None or not entry.indexed or nbytes <= 0:
            return
        store = self._store
        if store._could_hold(nbytes) or self._fd >= 0 or entry.on_disk:
            if not self._counted_reservation:
                self._counted_reservation = True
                weakref.finalize(self, store._release_reservation, entry)
            entry.reserved += nbytes
            store._reserved += nbytes
            return
        store._uncache(entry, "no room on the cache disk for it next to the fills in flight")

    def room_for(self, index: int, rank: Callable[[int], float], spare: int = 0) -> bool:
        """
        Whether slice C{index} may be written now.  Always true for an object written to disk; an
        object held in memory holds at most C{stream_buffer} bytes of slices (plus C{spare} slices):
        when that is full, the written slice needed latest is forgotten for this one, if it is needed
        later than this one.  C{rank(i)} tells how soon slice C{i} will be read (lower is sooner,
        C{math.inf}: by nobody).  False: wait, and ask again when readers have moved on.
        """
        entry = self._entry
        memory = entry.memory
        if memory is None or index in memory:
            return True
        if len(memory) < self._store._ring_slices + spare:
            return True
        latest, victim = max(((rank(i), i) for i in memory if entry.has(i)), default=(-math.inf, -1))
        if latest <= rank(index):
            return False
        self._forget_memory_slice(victim)
        return True

    def drop_partial(self, index: int) -> None:
        """The writer of slice C{index} gave up before finishing it: its memory, if any, is freed."""
        memory = self._entry.memory
        if memory is not None and index in memory and not self._entry.has(index):
            self._store._memory_freed(len(memory.pop(index)))

    def _forget_memory_slice(self, index: int) -> None:
        entry = self._entry
        assert entry.memory is not None
        self._store._memory_freed(len(entry.memory.pop(index)))
        entry.present[index >> 3] &= ~(1 << (index & 7)) & 0xFF
        entry.present_count -= 1

    def commit_slice(self, index: int) -> None:
        """
        The caller wrote all of slice C{index} (the last may be short): mark it present, account it,
        persist when a batch is due, and evict other objects if the store is over its size.

        @raise StoreError: persisting failed; the object is dropped and nothing of it is present.
        """
        self._check_failed()
        entry = self._entry
        if not 0 <= index < entry.slice_count:
            raise ValueError(f"slice {index} outside 0..{entry.slice_count - 1}")
        if entry.has(index):
            return
        entry.present[index >> 3] |= 1 << (index & 7)
        entry.present_count += 1
        if entry.indexed:
            self._store._committed(entry, index, self._descriptor())

    def _check_failed(self) -> None:
        if self._entry.failed:
            raise StoreError(f"{self.meta.key!r} met a disk error and was dropped")

    def read(self, offset: int, length: int) -> bytes:
        """Read C{length} bytes at C{offset}; the caller only reads bytes it knows are present."""
        self._check_failed()
        if self._entry.memory is not None:
            return self._read_memory(offset, length)
        self._descriptor()
        try:
            return self._pread_file(offset, length)
        except StoreError as e:
            if e.errno is not None:  # the disk failed, not a short read
                self._store._fail(self._entry, e)
            raise

    def _read_memory(self, offset: int, length: int) -> bytes:
        """Read from slices held in memory and, for the rest, from the data file (written before)."""
        entry = self._entry
        memory = entry.memory
        assert memory is not None
        ss = entry.slice_size
        chunks = []
        end = offset + length
        while offset < end:
            index = offset // ss
            at = offset - index * ss
            n = min(end - offset, entry.slice_length(index) - at)
            slot = memory.get(index)
            if slot is not None:
                chunk = bytes(slot[at : at + n])
            else:
                if self._fd < 0:
                    raise StoreError(f"{entry.meta.key!r}: slice {index} is neither in memory nor on disk")
                chunk = self._pread_file(offset, n)
            chunks.append(chunk)
            offset += n
        return b"".join(chunks)

    def _pread_file(self, offset: int, length: int) -> bytes:
        """C{length} bytes of the data file at C{offset}; L{StoreError} (with the errno of a disk error) if not."""
        chunks = []
        try:
            while length > 0:
                chunk = os.pread(self._fd, length, offset)
                if not chunk:
                    raise StoreError(f"short read of {self.meta.key!r} at {offset}")
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
        except OSError as e:
            raise StoreError(f"reading {self.meta.key!r}: {e.strerror}", e.errno) from e
        return b"".join(chunks)

    def fileno(self) -> int:
        """
        The descriptor of the data file (for os.sendfile); valid while you hold this object.  Only
        the slices that were present before the object went L{in_memory} are in that file.

        @raise StoreError: a new object's data file could not be made, or it is held in memory.
        """
        return self._descriptor()

    def close(self) -> None:
        """
        Persist slices not yet recorded on disk.  The descriptor itself is closed when the object
        is no longer referenced (others may be reading it), which also frees an evicted or uncached
        object's unlinked file, and the memory a transient or uncached object holds.
        """
        if self._entry.indexed and self._entry.pending:
            self._store._persist_soon(self._entry, self._open_fd)


class SliceStore:
    """
    Objects cut in C{slice_size} slices under C{root}, at most C{max_size} bytes of present slices.

    A new store is L{loading} until its L{rebuild_steps} generator has run to the end; L{get} looks
    on disk for keys not indexed (yet, or created by another process).  Call L{close} at shutdown.

    Several processes may share C{root} (see the module docstring); give each an C{orphan_grace}
    (L{ORPHAN_GRACE}) so that a rebuild does not take another process's fill for an orphan.

    @param min_free: bytes the cache's file system must keep free (the store evicts to keep them,
        and holds in memory what it cannot write; see the module docstring).  None: the smaller of
        1 GiB and 5% of the file system (L{default_min_free}); 0 only evicts on ENOSPC.
    @param stream_buffer: bytes of memory each transient or uncached object may hold (at least two
        slices, and a slice more per reader).
    @param alone: no other process uses C{root} (one edge process): once the index is loaded, a key
        it does not hold is not looked for on disk (each miss looked twice for a sidecar another
        process might have written: two failed opens, ~0.1 ms of a miss's first byte).
    @raise CacheDirUnusable: C{root} cannot be made, listed or written (L{check_cache_dir}).
    """

    observer: EdgeObserver = NULL_OBSERVER

    def __init__(
        self,
        root: str,
        max_size: int,
        slice_size: int = 1 << 20,
        now: Callable[[], float] = time.time,
        sync: bool = True,
        orphan_grace: float = 0.0,
        run_in_thread: Callable[..., Deferred[Any]] | None = None,
        min_free: int | None = None,
        stream_buffer: int = STREAM_BUFFER,
        alone: bool = False,
    ) -> None:
        if slice_size <= 0 or max_size < 0:
            raise ValueError("slice_size must be positive and max_size not negative")
        if min_free is not None and min_free < 0:
            raise ValueError("min_free must not be negative")
        check_cache_dir(root)
        self.min_free = default_min_free(root) if min_free is None else min_free
        self._ring_slices = max(2, stream_buffer // slice_size)
        #: bytes held in memory by transient and uncached objects now, and the most ever held
        self.memory_bytes = 0
        self.memory_peak = 0
        #: objects uncached because the disk could not take them (full, or refusing writes)
        self.uncached = 0
        self._free_estimate = 0  # free bytes at the last statvfs, less what we wrote since
        self._free_at = -math.inf  # time.monotonic() of that statvfs
        self._out_of_inodes = False
        # evicted objects whose files stay open (their space comes free when their viewers finish)
        self._releasing: list[tuple[weakref.ref[CachedObject], int]] = []
        self._reserved = 0  # bytes fills in flight announced and have not written (CachedObject.reserve)
        self._reserved_written = 0  # bytes those fills wrote so far
        self.root = root
        self._root_slash = os.path.join(root, "")
        self.max_size = max_size
        self.slice_size = slice_size
        self.used_bytes = 0
        self._now = now
        self._sync = sync
        self._orphan_grace = orphan_grace
        self._alone = alone
        self._run_in_thread = run_in_thread if sync else None
        self._index: OrderedDict[str, _Entry] = OrderedDict()
        self._by_hash: dict[str, _Entry] = {}
        self._dirty: set[_Entry] = set()  # indexed entries with slices not yet persisted
        self._rebuilt: set[str] = set()  # loaded by the rebuild and not used since
        self._loading = True
        self._tmp_serial = 0
        self._disk_error_at = float("-inf")

    # -- public ---------------------------------------------------------------------------------

    @property
    def loading(self) -> bool:
        return self._loading

    @property
    def disk_trouble(self) -> bool:
        """
        Whether the disk refused us in the last L{DISK_TROUBLE_MEMORY} seconds (full, read-only, I/O
        errors): a miss then keeps its headers until its first bytes are written, so that a write
        that fails still gets the viewer a clean 503 rather than a cut answer.
        """
        return self._now() - self._disk_error_at < DISK_TROUBLE_MEMORY

    def __len__(self) -> int:
        return len(self._index)

    def keys_lru(self) -> list[str]:
        """Indexed keys, least recently used first."""
        return list(self._index)

    def get(self, key: str) -> CachedObject | None:
        """
        The indexed object for C{key} (now most recently used), or None.  An object another process
        removed is None here too; one it cached is found on disk.
        """
        entry = self._find(key)
        if entry is None:
            return None
        try:
            obj = self._handle(entry)
        except StoreError as e:
            log.info("dropping {key!r}: {error}", key=key, error=e)
            self._drop(entry)
            return None
        self._used(key, entry, obj._open_fd)
        return obj if entry.indexed else None

    def peek_complete(self, key: str) -> tuple[object, ObjectMeta] | None:
        """
        C{(identity, meta)} of C{key}'s object if it is indexed and complete, else None: the same
        sidecar checks as L{get} (another process's purge or replacement) and the same LRU use, but
        the data file is not opened (a sidecar whose data file is gone is found out by the next
        L{get}; a caller holding a copy of the bytes still holds the right bytes).  C{identity} is
        the same object for as long as the same data file serves the key (handles share it, see
        L{CachedObject.identity}), so a copy of the bytes taken earlier is still the object's bytes.
        """
        entry = self._find(key)
        if entry is None or not entry.indexed or entry.present_count != entry.slice_count:
            return None
        self._used(key, entry, None)
        return entry, entry.meta

    def _find(self, key: str) -> _Entry | None:
        """The entry of C{key} as the disk has it now: indexed, or loaded from a sidecar; None if neither."""
        entry = self._index.get(key)
        if entry is not None and entry.on_disk:
            entry = self._check_disk(entry)
        if entry is None and not (self._alone and not self._loading):
            entry = self._load_one(key)
        return entry

    def _used(self, key: str, entry: _Entry, fd: int | None) -> None:
        """C{entry} is being served: most recently used; persist a due batch or the last use lazily."""
        self._index.move_to_end(key)
        self._rebuilt.discard(key)
        now = self._now()
        entry.last_used = now
        if entry.pending and now - entry.pending_since >= PERSIST_INTERVAL:
            self._persist_soon(entry, fd)
        elif entry.on_disk and now - entry.use_persisted >= LAST_USE_PERSIST_INTERVAL:
            self._touch(entry, now)

    def _touch(self, entry: _Entry, when: float) -> None:
        """Record a use of C{entry} at C{when} as its sidecar's mtime (the lazy LRU touch)."""
        entry.use_persisted = when
        try:
            path = self._meta_path(entry.hash)
            os.utime(path, (when, when))
            entry.stamp = _stamp(os.stat(path))
        except OSError:
            pass  # only the LRU order after a restart suffers

    def create(self, meta: ObjectMeta, transient: bool = False) -> CachedObject:
        """
        A new, empty object for C{meta.key}, replacing any entry of that key.  Objects larger than
        the whole store are made transient: streamed through, never kept (held in memory, see
        L{CachedObject.room_for}).

        Its data file (and directories) are made at its first write, not here: a miss creates the
        object as soon as the origin's answer is checked, and its headers go out before the body's
        first bytes (see L{PlanProducer}).  Making a file and its directory pair cost 0.1-0.9 ms of
        that time to first byte here, more than nginx's whole miss.  A disk that refuses (full after
        eviction, read-only) then uncaches the object at its first write: its bytes go to memory.

        An empty object's data file is made here (it is complete), and persisted like a batch (in a
        thread with C{run_in_thread}); if the disk refuses it, it is an uncached empty object.
        """
        if meta.size < 0:
            raise ValueError(f"negative size {meta.size}")
        self._discard_key(meta.key)
        transient = transient or meta.size > self.max_size
        h = key_hash(meta.key)
        present = bytearray((slice_count(meta.size, self.slice_size) + 7) // 8)
        entry = _Entry(meta, self.slice_size, h, secrets.token_hex(8), present, transient)
        if transient:
            entry.memory = {}
        entry.last_used = entry.use_persisted = self._now()
        fd = -1
        if not transient:
            self.observer.admitted(meta.key, meta.size)
            self._index[meta.key] = entry
            self._by_hash[h] = entry
            if meta.size == 0:
                try:
                    fd = self._make_data_file(entry)
                except StoreError:
                    pass  # uncached: an empty object needs no disk
        obj = CachedObject(self, entry, fd)
        entry.handle = weakref.ref(obj)
        if entry.indexed and obj.complete:  # empty object: nothing will ever commit, record it now
            if self._run_in_thread is None:
                self._persist_or_drop(entry, fd)
            else:
                self._persist_soon(entry, fd)
        return obj

    def _make_data_file(self, entry: _Entry) -> int:
        """
        Make C{entry}'s (sparse) data file; its descriptor.  A full disk is met by evicting and
        trying again once.

        An entry evicted or purged before its first byte still gets one, unlinked at once: its
        viewers stream on, nothing is kept (as with an evicted object's open file).

        @raise StoreError: the disk refused; the entry is uncached (held in memory from now on).
        """
        if entry.failed:
            raise StoreError(f"{entry.meta.key!r} met a disk error and was dropped")
        path = self._data_path(entry)
        for attempt in (1, 2):
            fd = -1
            try:
                os.makedirs(self._dir(entry.hash), exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                if not entry.indexed:
                    os.unlink(path)
                os.ftruncate(fd, entry.meta.size)
                return fd
            except OSError as e:
                if fd >= 0:
                    os.close(fd)
                    _unlink(path)
                if attempt == 1 and e.errno in _FULL and self._evict_for_room(0, entry, True):
                    continue
                self._uncache(entry, e)
                raise StoreError(f"creating {entry.meta.key!r}: {e.strerror}", e.errno) from e
        raise AssertionError("unreachable")

    def publish(self, obj: CachedObject) -> Deferred[None]:
        """
        Put C{obj}'s data file and a sidecar (listing what is synced: at first nothing) on disk now,
        rather than at its first persist, so other processes on this directory find the object and
        share its fill (see L{h264edge.store._fill_locks}).  A no-op for objects already on disk and
        for transient ones.  With C{run_in_thread}, the data's fdatasync and the sidecar's write and
        fsync run in a thread, as a batch's do (the sidecar lists only slices synced before it, and
        is put in place on the reactor once both are done); without, here.

        An object whose data file the disk refuses is uncached (see L{CachedObject.write}): nothing
        is published and its viewers stream it from memory.

        @return: fires (with None, never failing) once the sidecar is in place, or once putting it
            there failed (the object was then uncached or dropped, as a failed batch is).
        @raise StoreError: the disk failed otherwise (here, without C{run_in_thread}); the object
            was dropped.
        """
        entry = obj._entry
        if entry.indexed and not entry.on_disk:
            try:
                fd = obj.fileno()
            except StoreError:
                if entry.memory is not None:
                    return succeed(None)
                raise
            if self._run_in_thread is not None:
                return self._persisted(entry, fd)
            self._persist_or_drop(entry, fd)
        return succeed(None)

    def refresh(self, obj: CachedObject, meta: ObjectMeta) -> None:
        """
        C{obj} was revalidated as the same representation: take C{meta}'s times and persist them
        (in a thread with C{run_in_thread}, like a batch: a failure there is logged and drops it).

        @raise StoreError: persisting (here, without C{run_in_thread}) failed; the object was dropped.
        """
        entry = obj._entry
        if meta.key != entry.meta.key or not meta.same_representation(entry.meta):
            raise ValueError("refresh() needs the same key and representation")
        entry.meta = meta
        if not entry.indexed:
            return
        if self._run_in_thread is None:
            self._persist_or_drop(entry, obj.fileno())
        else:
            self._persist_soon(entry, None)

    def resize(self, max_size: int) -> None:
        """A new byte budget (a configuration reload): least recently used objects go now if over it."""
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self.max_size = max_size
        self._evict(None)

    def remove(self, key: str) -> bool:
        """Drop C{key} (PURGE); True if there was something to drop."""
        return self._discard_key(key)

    def remove_matching(self, wanted: Callable[[str], bool]) -> int:
        """
        Drop every indexed key for which C{wanted(key)} holds (a purge by prefix); how many went.
        Objects another process cached since this one last scanned the directory are not seen.
        """
        return sum(self._discard_key(key) for key in [key for key in self._index if wanted(key)])

    def close(self) -> None:
        """Persist every slice not yet recorded on disk (shutdown)."""
        for entry in list(self._dirty):
            self._persist_or_log(entry, None)

    def rebuild_steps(self, batch: int = 1000) -> Iterator[None]:
        """
        Rebuild the index from disk, about C{batch} sidecars per step; drive it with
        C{twisted.internet.task.cooperate}.  Removes orphans and leftovers, orders the LRU by
        recorded last use, and evicts down to C{max_size} at the end.
        """
        try:
            done = 0
            for first in self._subdirs(self.root):
                for second in self._subdirs(os.path.join(self.root, first)):
                    done += self._rebuild_dir(os.path.join(self.root, first, second))
                    if done >= batch:
                        done = 0
                        yield None
            yield from self._order_rebuilt(batch * 20)
            self._evict(None)
            if self._free_now() < self.min_free + DISK_RESERVE:
                self._evict_for_room(0, None)  # a restart on a full disk: make room before the first miss
        finally:
            self._rebuilt.clear()
            self._loading = False

    # -- rebuild --------------------------------------------------------------------------------

    @staticmethod
    def _subdirs(path: str) -> list[str]:
        try:
            with os.scandir(path) as entries:
                return sorted(e.name for e in entries if _is_hex_dir(e.name) and e.is_dir(follow_symlinks=False))
        except OSError:
            return []

    def _rebuild_dir(self, directory: str) -> int:
        try:
            names = os.listdir(directory)
        except OSError:
            return 0
        sidecars: list[str] = []
        data_files: list[tuple[str, str, str]] = []  # (hash, token, name)
        for name in names:
            h, _, rest = name.partition(".")
            if rest == "meta":
                sidecars.append(h)
            elif rest.endswith(".data"):
                data_files.append((h, rest[:-5], name))
            elif rest.endswith(".fill"):  # a data file's fill counts (_fill_locks): kept with it
                data_files.append((h, rest[:-5], name))
            elif rest == "lock":  # a key's contact lock (_fill_locks): kept while the key is
                data_files.append((h, "", name))
            elif rest.endswith(".tmp"):
                self._unlink_orphan(os.path.join(directory, name))
        prefix = os.path.basename(os.path.dirname(directory)) + os.path.basename(directory)
        for h in sidecars:
            if h in self._by_hash:
                continue  # loaded meanwhile by get() or replaced by create()
            path = f"{directory}/{h}.meta"
            if not h.startswith(prefix):
                _unlink(path)
                continue
            try:
                entry = self._read_entry(path, h)
            except (OSError, BadSidecar) as e:
                log.info("discarding sidecar {path}: {error}", path=path, error=e)
                _unlink(path)
                continue
            try:
                # stat, not the listing: another process may have written both files since
                consistent = os.stat(f"{directory}/{h}.{entry.token}.data").st_size == entry.meta.size
            except OSError:
                consistent = False
            if not consistent:
                _unlink(path)
                continue
            self._add_entry(entry)
            self._index.move_to_end(entry.meta.key, last=False)
            self._rebuilt.add(entry.meta.key)
        for h, token, name in data_files:
            live = self._by_hash.get(h)
            if live is None or (token and live.token != token):
                self._unlink_orphan(f"{directory}/{name}")
        return len(sidecars)

    def _unlink_orphan(self, path: str) -> None:
        """Remove a file no sidecar names, unless it is young enough to be another process's work."""
        if self._orphan_grace > 0:
            try:
                if os.stat(path).st_mtime > time.time() - self._orphan_grace:
                    return
            except OSError:
                return
        _unlink(path)

    def _order_rebuilt(self, per_step: int) -> Iterator[None]:
        """
        Put the entries loaded from disk in LRU order by their recorded last use, oldest first,
        ahead of those used since: C{per_step} moves at a time (one sort of 100,000 entries and
        a new index built at once blocked the reactor for ~200 ms).  A key used between steps has
        left C{_rebuilt} and is not moved back.
        """
        keys: list[str] = []
        last_used: list[float] = []
        pending = list(self._rebuilt)
        for start in range(0, len(pending), per_step):
            for key in pending[start : start + per_step]:
                entry = self._index.get(key)
                if entry is not None:
                    keys.append(key)
                    last_used.append(entry.last_used)
            yield None
        newest_first = numpy.argsort(numpy.array(last_used, dtype=numpy.float64), kind="stable")[::-1].tolist()
        yield None
        for start in range(0, len(newest_first), per_step):
            for i in newest_first[start : start + per_step]:
                key = keys[i]
                if key in self._rebuilt and key in self._index:
                    self._index.move_to_end(key, last=False)
            yield None

    def _read_entry(self, path: str, h: str) -> _Entry:
        """An entry from the sidecar at C{path}, last used at its recorded use or its mtime."""
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if st.st_size > MAX_SIDECAR_BYTES:
                raise BadSidecar("sidecar too large")
            raw = os.read(fd, st.st_size + 1)
        finally:
            os.close(fd)
        sidecar = decode_sidecar(raw, h, self.slice_size)
        entry = _Entry(sidecar.meta, self.slice_size, h, sidecar.token, bytearray(sidecar.present))
        entry.on_disk = True
        entry.stamp = _stamp(st)
        entry.last_used = entry.use_persisted = max(sidecar.last_used, st.st_mtime)
        return entry

    def _add_entry(self, entry: _Entry) -> None:
        self._index[entry.meta.key] = entry
        self._by_hash[entry.hash] = entry
        self.used_bytes += entry.present_bytes

    def _load_one(self, key: str) -> _Entry | None:
        """Index C{key} straight from its sidecar, if it has a good one (not indexed yet, or another process's)."""
        h = key_hash(key)
        if h in self._by_hash:
            return None  # another key with this hash is live
        path = self._meta_path(h)
        try:
            entry = self._read_entry(path, h)
        except FileNotFoundError:
            return None
        except (OSError, BadSidecar) as e:
            log.info("discarding sidecar {path}: {error}", path=path, error=e)
            self._remove_hash_files(h)
            return None
        if entry.meta.key != key:
            self._remove_hash_files(h)
            return None
        self._add_entry(entry)
        return entry

    def _read_sidecar(self, h: str) -> tuple[Sidecar, tuple[int, int, int]]:
        """The sidecar of hash C{h} as it is now, and its stamp."""
        fd = os.open(self._meta_path(h), os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if st.st_size > MAX_SIDECAR_BYTES:
                raise BadSidecar("sidecar too large")
            raw = os.read(fd, st.st_size + 1)
        finally:
            os.close(fd)
        return decode_sidecar(raw, h, self.slice_size), _stamp(st)

    def _check_disk(self, entry: _Entry) -> _Entry | None:
        """
        C{entry} (persisted) as the disk has it now: itself, updated with what other processes
        persisted of the same data file, or None if another process removed or replaced it (then it
        is dropped here as well; descriptors already handed out keep reading the old file).
        """
        try:
            st = os.stat(self._meta_path(entry.hash))
        except FileNotFoundError:
            self._drop(entry)
            return None
        except OSError:
            return entry  # cannot tell; the next use asks again
        if _stamp(st) == entry.stamp:
            return entry
        try:
            sidecar, stamp = self._read_sidecar(entry.hash)
        except FileNotFoundError:
            self._drop(entry)
            return None
        except (OSError, BadSidecar):
            return entry
        if sidecar.token != entry.token or sidecar.meta.key != entry.meta.key:
            self._drop(entry)
            return None
        self._adopt(entry, sidecar, stamp)
        return entry

    def _adopt(self, entry: _Entry, sidecar: Sidecar, stamp: tuple[int, int, int]) -> None:
        """Take what another process persisted about C{entry}'s data file: slices, fresher metadata, last use."""
        entry.stamp = stamp
        if sidecar.meta.fetched_at > entry.meta.fetched_at and sidecar.meta.same_representation(entry.meta):
            entry.meta = sidecar.meta
        added = entry.merge_present(sidecar.present)
        if entry.indexed:
            self.used_bytes += added
        entry.last_used = max(entry.last_used, sidecar.last_used)

    def _remove_hash_files(self, h: str) -> None:
        directory = self._dir(h)
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            if name.startswith(h + "."):
                _unlink(os.path.join(directory, name))

    def _discard_key(self, key: str) -> bool:
        entry = self._find(key)
        if entry is None:
            return False
        self._drop(entry)
        return True

    # -- files ----------------------------------------------------------------------------------

    def _dir(self, h: str) -> str:
        return os.path.join(self.root, h[0:2], h[2:4])

    def _meta_path(self, h: str) -> str:
        # on every get() (the cross-process check): a plain format is a few times cheaper than os.path.join
        return f"{self._root_slash}{h[0:2]}/{h[2:4]}/{h}.meta"

    def _data_path(self, entry: _Entry) -> str:
        return os.path.join(self._dir(entry.hash), f"{entry.hash}.{entry.token}.data")

    def _handle(self, entry: _Entry) -> CachedObject:
        """The live handle of C{entry}, or a new one on a freshly opened, size-checked descriptor."""
        obj = entry.handle() if entry.handle is not None else None
        if obj is not None:
            return obj
        try:
            fd = os.open(self._data_path(entry), os.O_RDWR)
        except OSError as e:
            raise StoreError(f"opening {entry.meta.key!r}: {e.strerror}", e.errno) from e
        obj = CachedObject(self, entry, fd)  # owns fd from here on
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise StoreError(f"opening {entry.meta.key!r}: {e.strerror}", e.errno) from e
        if size != entry.meta.size:
            raise StoreError(f"data file of {entry.meta.key!r} has {size} bytes, not {entry.meta.size}")
        entry.handle = weakref.ref(obj)
        return obj

    # -- persisting -----------------------------------------------------------------------------

    def _committed(self, entry: _Entry, index: int, fd: int) -> None:
        self.used_bytes += entry.slice_length(index)
        if self._sync and self._run_in_thread is None:
            _start_writeback(fd, index * entry.slice_size, entry.slice_length(index))
        now = self._now()
        if not entry.pending:
            entry.pending_since = now
            self._dirty.add(entry)
        entry.pending += 1
        if (
            entry.present_count == entry.slice_count
            or entry.pending - entry.in_sync >= PERSIST_EVERY_SLICES
            or now - entry.pending_since >= PERSIST_INTERVAL
        ):
            if self._run_in_thread is None:
                self._persist_or_drop(entry, fd)
            else:
                self._persist_soon(entry, fd)
        self._evict(entry)

    def _persist_soon(self, entry: _Entry, fd: int | None) -> None:
        """
        Persist C{entry}'s pending slices; with C{run_in_thread}, the data sync and then the new
        sidecar's write run in a thread, and the sidecar, put in place when both are done, lists only
        the slices present when the sync began (the trust rule holds: nothing is listed before it
        is on disk).  A disk error then drops the object (nobody is waiting to be told); one sync
        per object at a time.  A tmp sidecar whose thread finishes after the reactor stopped stays
        behind; the next rebuild removes it.
        """
        if self._run_in_thread is None:
            self._persist_or_log(entry, fd)
            return
        if entry.syncing:
            entry.sync_again = True
            return
        obj = entry.handle() if entry.handle is not None else None
        if obj is None:
            self._persist_or_log(entry, fd)  # nobody holds a descriptor to sync with: rare, do it here
            return
        entry.syncing = True
        entry.sync_again = False
        entry.in_sync = entry.pending
        began = self._now()
        snapshot = bytes(entry.present)
        # The sidecar this sync allows is written in the thread too, after the data's fdatasync
        # (its own fsync cost 0.5-2 ms of the reactor's time per batch during a cold fill): it lists
        # what is listed now plus the snapshot, with the metadata and last use of now.  The reactor
        # only puts it in place, unless the entry moved on meanwhile (see installed()).
        meta, listed = entry.meta, bytes(entry.listed)
        merged = (int.from_bytes(listed, "little") | int.from_bytes(snapshot, "little")).to_bytes(len(listed), "little")
        last_used = entry.last_used
        raw = encode_sidecar(meta, self.slice_size, entry.token, merged, last_used)
        tmp = self._tmp_path(entry)
        fd = obj.fileno()

        def sync_and_write() -> int:
            os.fdatasync(fd)
            return _put_tmp_or_say_full(tmp, raw, last_used, True)

        def installed(inode: int) -> None:
            rewrite = False
            entry.syncing = False
            entry.in_sync = 0
            if not entry.indexed:
                _unlink(tmp)
                return  # dropped meanwhile
            entry.list_also(snapshot)
            if entry.pending:
                entry.pending_since = began  # the oldest slice still unlisted came after this
            try:
                if (
                    entry.meta is meta
                    and bytes(entry.listed) == merged
                    and not self._merge_others(entry)
                    # a rebuild (ours while serving, or another process's rescan) takes *.tmp files
                    # for leftovers: one may have gone between the thread and this turn
                    and os.path.exists(tmp)
                ):
                    newer_use = entry.use_persisted  # a use get() recorded on the sidecar meanwhile
                    self._install(entry, tmp, inode, last_used, obj.fileno())
                    if newer_use > last_used:
                        self._touch(entry, newer_use)
                else:  # refreshed, persisted or merged with another process's meanwhile: write it anew
                    _unlink(tmp)
                    entry.sync_again = True
                    rewrite = True
            except _Superseded:
                _unlink(tmp)
                log.info("{key!r} was removed or replaced by another process", key=entry.meta.key)
                self._drop(entry)
                return
            except OSError as e:
                _unlink(tmp)
                self._fail(entry, e)
                return
            if entry.sync_again and (entry.pending or rewrite):
                self._persist_soon(entry, None)

        def failed(failure: Failure) -> None:
            entry.syncing = False
            entry.in_sync = 0
            if not entry.indexed:
                return
            error = failure.value
            if isinstance(error, _SidecarNoSpace):  # the data was synced: make room and write it again
                entry.list_also(snapshot)
                if self._evict_for_room(0, entry, True):
                    self._persist_soon(entry, None)
                else:
                    self._uncache(entry, error.error)
                return
            self._fail(entry, error)

        def over(result: object) -> object:
            self._wake(entry)
            return result

        self._run_in_thread(sync_and_write).addCallbacks(installed, failed).addBoth(over)

    def _persisted(self, entry: _Entry, fd: int) -> Deferred[None]:
        """
        L{_persist_soon}; fires once C{entry}'s sidecar is in place, or once no sync of it runs any
        more without putting one there (it failed: the entry was dropped or uncached).
        """
        d: Deferred[None] = Deferred()
        entry.sync_waiters.append(d)
        self._persist_soon(entry, fd)
        self._wake(entry)
        return d

    def _wake(self, entry: _Entry) -> None:
        if entry.sync_waiters and (entry.on_disk or not entry.syncing):
            waiters, entry.sync_waiters = entry.sync_waiters, []
            for d in waiters:
                d.callback(None)

    def _sync_data(self, entry: _Entry, fd: int | None) -> None:
        if fd is None:
            obj = entry.handle() if entry.handle is not None else None
            fd = obj.fileno() if obj is not None else None
        if fd is not None:
            os.fdatasync(fd)
            return
        # fdatasync flushes the file, whichever descriptor asks.
        own = os.open(self._data_path(entry), os.O_RDONLY)
        try:
            os.fdatasync(own)
        finally:
            os.close(own)

    def _persist(self, entry: _Entry, fd: int | None) -> None:
        """
        fdatasync the data (if slices are pending), then atomically write the sidecar: created with
        link() the first time, replaced only while it still names our data file.

        @raise _Superseded: another process removed the object or holds the key's sidecar.
        """
        if entry.pending and self._sync:
            self._sync_data(entry, fd)
        entry.list_also(entry.present)
        self._write_sidecar(entry, fd)

    def _write_sidecar(self, entry: _Entry, fd: int | None) -> None:
        """Atomically write C{entry}'s sidecar listing the synced slices (see L{_persist})."""
        self._merge_others(entry)
        last_used = entry.last_used
        raw = encode_sidecar(entry.meta, self.slice_size, entry.token, entry.listed, last_used)
        tmp = self._tmp_path(entry)
        inode = _put_tmp_or_say_full(tmp, raw, last_used, self._sync)
        self._install(entry, tmp, inode, last_used, fd)

    def _merge_others(self, entry: _Entry) -> bool:
        """
        Merge what other processes persisted of C{entry}'s data file into it (True if there was
        anything); stop if they removed or replaced the object.

        @raise _Superseded: the key's sidecar is gone or names another data file.
        """
        if not entry.on_disk:
            return False
        try:
            st = os.stat(self._meta_path(entry.hash))
        except FileNotFoundError:
            raise _Superseded() from None
        if _stamp(st) == entry.stamp:
            return False
        try:
            sidecar, stamp = self._read_sidecar(entry.hash)
        except (FileNotFoundError, BadSidecar):
            raise _Superseded() from None
        if sidecar.token != entry.token:
            raise _Superseded()
        self._adopt(entry, sidecar, stamp)
        return True

    def _tmp_path(self, entry: _Entry) -> str:
        # per process and per write: two processes holding one data file may persist it at the same
        # moment, and a sidecar written in a thread may be in flight while this process writes another
        self._tmp_serial += 1
        return f"{self._dir(entry.hash)}/{entry.hash}.{entry.token}.{os.getpid()}-{self._tmp_serial}.tmp"

    def _install(self, entry: _Entry, tmp: str, inode: int, last_used: float, fd: int | None) -> None:
        """Put the sidecar written at C{tmp} in place (see L{_persist}); C{tmp} is gone afterwards."""
        path = self._meta_path(entry.hash)
        try:
            if entry.on_disk:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # only if no process holds the key's sidecar
                except FileExistsError:
                    raise _Superseded() from None
                finally:
                    _unlink(tmp)
        except OSError:
            _unlink(tmp)
            raise
        entry.on_disk = True
        try:
            st = os.stat(path)  # rename and link change the ctime
            entry.stamp = _stamp(st) if st.st_ino == inode else None
        except OSError:
            entry.stamp = None
        if self._data_unlinked(entry, fd):
            raise _Superseded()  # removed while we wrote: _drop takes our sidecar back
        if not entry.pending:
            self._dirty.discard(entry)
        entry.use_persisted = last_used

    def _data_unlinked(self, entry: _Entry, fd: int | None) -> bool:
        try:
            if fd is not None:
                return os.fstat(fd).st_nlink == 0
            os.stat(self._data_path(entry))
            return False
        except FileNotFoundError:
            return True

    def _persist_or_drop(self, entry: _Entry, fd: int | None) -> None:
        """
        L{_persist}; a full disk evicts and tries once more, then uncaches the object (its slices
        stay readable: they were written and synced, only the sidecar found no room).

        @raise StoreError: any other disk error; the object was dropped and forgot its slices.
        """
        try:
            try:
                self._persist(entry, fd)
            except _SidecarNoSpace as e:
                if not self._evict_for_room(0, entry, True):
                    raise
                log.info("retrying {key!r}'s sidecar after evicting (full disk: {error})",
                         key=entry.meta.key, error=e.error)
                self._persist(entry, fd)
        except _SidecarNoSpace as e:
            self._uncache(entry, e.error)
        except _Superseded:
            # not a disk error: the slices we hold are true, readers keep them; the key is another's now
            log.info("{key!r} was removed or replaced by another process", key=entry.meta.key)
            self._drop(entry)
        except OSError as e:
            self._fail(entry, e)
            raise StoreError(f"persisting {entry.meta.key!r}: {e.strerror}", e.errno) from e

    def _persist_or_log(self, entry: _Entry, fd: int | None) -> None:
        try:
            self._persist_or_drop(entry, fd)
        except StoreError as e:
            log.error("dropped {key!r}: {error}", key=entry.meta.key, error=e)

    # -- a full disk, and memory ---------------------------------------------------------------

    def _free_now(self) -> int:
        """Bytes free on the cache's file system for an unprivileged user (statvfs), noted as the estimate."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return 1 << 62  # cannot tell: ENOSPC will tell
        # no inode left (a file system that counts them): as good as full
        self._out_of_inodes = st.f_files > 0 and st.f_favail == 0
        self._free_estimate = st.f_bavail * st.f_frsize
        self._free_at = time.monotonic()
        return self._free_estimate

    def _disk_room(self, nbytes: int, keep: _Entry | None) -> bool:
        """
        Whether C{nbytes} more may be written to the cache disk keeping C{min_free} (and
        L{DISK_RESERVE}) free, after evicting least recently used objects (sparing C{keep}) to make
        room.  Cheap far from the floor: statvfs is asked again only after L{FREE_RECHECK} seconds or
        near the floor, and what we write meanwhile is taken off the last reading.
        """
        need = self.min_free + DISK_RESERVE + nbytes
        if self._free_estimate >= need + FREE_MARGIN and time.monotonic() - self._free_at < FREE_RECHECK:
            self._free_estimate -= nbytes
            return True
        free = self._free_now()
        if free < need:
            self._evict_for_room(nbytes, keep)
            free = self._free_now()
            if free < need:
                return False
        self._free_estimate = free - nbytes
        return True

    def _evict_for_room(self, nbytes: int, keep: _Entry | None, enospc: bool = False) -> bool:
        """
        Evict least recently used objects (sparing C{keep}) until C{nbytes} more would leave
        C{min_free} and L{DISK_RESERVE} free, counting the files of evicted objects still open as
        freed (they are, when their viewers finish); after an ENOSPC (C{enospc}) at least one, whatever
        statvfs says (quotas, another process's writes).  True if anything was evicted.
        """
        need = self.min_free + DISK_RESERVE + nbytes
        evicted = False
        free = self._free_now()
        while free + self._held_bytes() < need or ((enospc or self._out_of_inodes) and not evicted):
            # not another fill: evicted, it would write on into its unlinked file and fail for room
            # in turn; the writer that finds no room holds its object in memory instead
            victim = next((entry for entry in self._index.values() if entry is not keep and not _filling(entry)),
                          None)
            if victim is None:
                break
            if victim.on_disk and self._used_elsewhere(victim):
                self._index.move_to_end(victim.meta.key)
                continue
            log.info("evicting {key!r}: the cache disk is at its free-space floor", key=victim.meta.key)
            self._drop(victim)
            evicted = True
            free = self._free_now()
        return evicted

    def _could_hold(self, nbytes: int) -> bool:
        """
        Whether C{nbytes} more would fit above the floor once every object not being filled were
        evicted and the fills in flight had written what they announced (L{CachedObject.reserve}).
        """
        need = self.min_free + DISK_RESERVE + self._reserved + nbytes
        free = self._free_now()
        if free >= need:
            return True
        evictable = self.used_bytes - self._reserved_written  # not what the fills in flight wrote
        return free + evictable + self._held_bytes() >= need

    def _reservation_used(self, entry: _Entry, nbytes: int) -> None:
        used = min(nbytes, entry.reserved)
        entry.reserved -= used
        self._reserved -= used
        entry.reserved_written += used
        self._reserved_written += used
        if not entry.reserved:
            self._release_reservation(entry)  # written: evictable like any other

    def _release_reservation(self, entry: _Entry) -> None:
        """C{entry}'s fills will not write what they announced (done, dropped, or its last handle gone)."""
        self._reserved -= entry.reserved
        self._reserved_written -= entry.reserved_written
        entry.reserved = entry.reserved_written = 0

    def _held_bytes(self) -> int:
        """Bytes of evicted objects' data files still open somewhere (not free yet)."""
        alive = [(ref, n) for ref, n in self._releasing if ref() is not None]
        self._releasing = alive
        return sum(n for _, n in alive)

    def _uncache(self, entry: _Entry, why: object) -> None:
        """
        The disk cannot take C{entry}: drop it from the index (and its files from disk), keep its
        slices written so far readable through its descriptor, and hold the rest in memory.
        """
        if entry.memory is not None:
            return
        if not (isinstance(why, OSError) and why.errno in _FULL) and not isinstance(why, str):
            self._disk_error_at = self._now()  # not a full disk: the disk is in trouble
        entry.memory = {}
        if entry.indexed:
            self.uncached += 1
            log.warn("not caching {key!r} ({why}): streaming it through from memory", key=entry.meta.key, why=why)
        self._drop(entry)
        entry.transient = True

    def _memory_taken(self, obj: CachedObject, nbytes: int) -> None:
        if not obj._counted:
            obj._counted = True
            weakref.finalize(obj, self._release_memory, obj._entry)
        self.memory_bytes += nbytes
        self.memory_peak = max(self.memory_peak, self.memory_bytes)

    def _memory_freed(self, nbytes: int) -> None:
        self.memory_bytes -= nbytes

    def _release_memory(self, entry: _Entry) -> None:
        """The last handle of C{entry} is gone: so is the memory its slices held."""
        if entry.memory:
            self.memory_bytes -= sum(len(slot) for slot in entry.memory.values())
            entry.memory.clear()

    # -- dropping and eviction ------------------------------------------------------------------

    def _fail(self, entry: _Entry, error: Exception) -> None:
        """A disk error on C{entry}: drop it and forget every slice, so none is ever served."""
        log.error("dropping {key!r} after a disk error: {error}", key=entry.meta.key, error=error)
        self._disk_error_at = self._now()
        self._drop(entry)
        entry.forget_slices()
        entry.failed = True  # a fill writing into it (its sync failed in a thread) stops at its next write

    def _drop(self, entry: _Entry) -> None:
        """Remove C{entry} from the index and its files from disk; open descriptors stay valid."""
        if not entry.indexed:
            entry.evicted = True
            return
        key = entry.meta.key
        if self._index.get(key) is entry:
            del self._index[key]
        if self._by_hash.get(entry.hash) is entry:
            del self._by_hash[entry.hash]
        self._dirty.discard(entry)
        self._rebuilt.discard(key)
        self.used_bytes -= entry.present_bytes
        self._release_reservation(entry)
        entry.evicted = True
        entry.pending = 0
        if entry.handle is not None and entry.handle() is not None:
            self._releasing.append((entry.handle, entry.present_bytes))  # freed when its viewers finish
            if len(self._releasing) > 256:
                self._held_bytes()  # forget those freed since
        # data file first: a sidecar found without its data file is a miss everywhere
        _unlink(self._data_path(entry))
        if self._orphan_grace > 0:  # shared directory: the data file's fill counts (_fill_locks)
            _unlink(os.path.join(self._dir(entry.hash), f"{entry.hash}.{entry.token}.fill"))
        if entry.on_disk:
            self._unlink_sidecar_if_ours(entry)

    def _unlink_sidecar_if_ours(self, entry: _Entry) -> None:
        # Another process may have replaced the sidecar with its own object: leave that one alone.
        try:
            sidecar, _ = self._read_sidecar(entry.hash)
        except BadSidecar:
            sidecar = None
        except OSError:
            return
        if sidecar is None or sidecar.token == entry.token:
            _unlink(self._meta_path(entry.hash))

    def _evict(self, keep: _Entry | None) -> None:
        """Evict least recently used objects (sparing C{keep}) until within C{max_size}."""
        while self.used_bytes > self.max_size:
            victim = next((entry for entry in self._index.values() if entry is not keep), None)
            if victim is None:
                break
            if victim.on_disk and self._used_elsewhere(victim):
                self._index.move_to_end(victim.meta.key)
                continue
            self.observer.evicted(victim.meta.key, victim.present_bytes)
            self._drop(victim)

    def _used_elsewhere(self, entry: _Entry) -> bool:
        """Whether another process recorded a use of C{entry} later than ours (its sidecar's mtime)."""
        try:
            mtime = os.stat(self._meta_path(entry.hash)).st_mtime
        except OSError:
            return False
        if mtime <= entry.last_used + 1.0:
            return False
        entry.last_used = mtime  # a second chance, once per recorded use
        return True
