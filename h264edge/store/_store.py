# -*- test-case-name: tests.test_store -*-
"""
The disk store: sparse data files cut in fixed slices, JSON sidecars, an in-memory LRU index.

Layout, for an object whose key hashes (SHA-256, hex) to C{h}::

    root/h[0:2]/h[2:4]/h.meta              sidecar (JSON): metadata, slice size, data token, bitmap
    root/h[0:2]/h[2:4]/h.<token>.data      sparse data file, truncated to the object's size at create
    root/h[0:2]/h[2:4]/h.<token>.tmp       a sidecar being written (removed by the rebuild if left over)

Trust rules:
  - In memory a slice is present from L{CachedObject.commit_slice} on (the caller wrote it).
  - On disk a sidecar lists a slice only after the data file was fdatasync'ed (when C{sync}); the
    sidecar is then replaced atomically (tmp, fsync, rename).  Persisting is batched: when the object
    completes, every L{PERSIST_EVERY_SLICES} slices, when the oldest unpersisted slice is older than
    L{PERSIST_INTERVAL} seconds (checked at commit time), and at close.  A crash loses at most the
    unpersisted slices; they are refetched.
  - A data file's bitmap only ever grows: a new representation (create()) gets a new data file.

Several processes on one root: each object instance writes its own data file, named by a random
token recorded in the sidecar, so no process ever writes into a file another process is filling,
and a sidecar (replaced atomically, last writer wins) always describes the file it names.  What can
happen is only lost work: a rebuild removes data files that no sidecar names yet (possibly another
process's in-progress fill, which then keeps streaming from its unlinked file and whose later sidecar
names a missing file and is discarded), and indexes and byte budgets are per process (a purge or an
eviction in one worker does not reach another's memory).  Never wrong bytes.

The index holds every object, but file descriptors are opened lazily (get/create/I/O) and at most
C{max_open_files} are kept for indexed objects, least recently used closed first; an evicted or
transient object keeps its descriptor until L{CachedObject.close} or garbage collection, so
in-flight readers of an unlinked file finish.
"""

from __future__ import annotations

import os
import secrets
import time
import weakref
from collections import OrderedDict
from typing import Callable, Iterator

import attrs
from attrs import define
from twisted.logger import Logger

from h264edge.errors import EdgeError
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

_HEX = frozenset("0123456789abcdef")


class StoreError(EdgeError):
    """
    The disk failed us (ENOSPC, EIO, ...) or the object is gone.  The object concerned has been
    dropped from the store and nothing of it is listed as present; serve from memory or fail.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def _is_hex_dir(name: str) -> bool:
    return len(name) == 2 and name[0] in _HEX and name[1] in _HEX


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("could not remove {path}: {error}", path=path, error=e)


@define(eq=False)
class CachedObject:
    """
    One object's data file and slice bitmap.  Created only by L{SliceStore}.

    Readers and the fill share one instance; the fill calls L{write} then L{commit_slice}, readers
    check L{has_slice}/L{available_from} before L{read} or L{fileno}.
    """

    meta: ObjectMeta
    slice_size: int
    _store: SliceStore = attrs.field(repr=False)
    _hash: str = attrs.field(repr=False)
    _token: str = attrs.field(repr=False)
    _present: bytearray = attrs.field(repr=False)
    _transient: bool = False
    _present_count: int = attrs.field(init=False, default=0)
    _fd: int = attrs.field(init=False, default=-1, repr=False)
    _finalizer: weakref.finalize | None = attrs.field(init=False, default=None, repr=False)
    _evicted: bool = attrs.field(init=False, default=False)
    _on_disk: bool = attrs.field(init=False, default=False, repr=False)  # we or a past run wrote its sidecar
    _pending: int = attrs.field(init=False, default=0, repr=False)
    _pending_since: float = attrs.field(init=False, default=0.0, repr=False)
    last_used: float = attrs.field(init=False, default=0.0)
    _use_persisted: float = attrs.field(init=False, default=0.0, repr=False)

    def __attrs_post_init__(self) -> None:
        self._present_count = int.from_bytes(self._present, "little").bit_count()

    # -- slices ---------------------------------------------------------------------------------

    @property
    def slice_count(self) -> int:
        return slice_count(self.meta.size, self.slice_size)

    def has_slice(self, index: int) -> bool:
        if not 0 <= index < self.slice_count:
            return False
        return bool(self._present[index >> 3] >> (index & 7) & 1)

    def missing_slices(self, first: int, last: int) -> list[int]:
        """Indexes in C{first}..C{last} (inclusive, clamped to the object) not present."""
        first = max(first, 0)
        last = min(last, self.slice_count - 1)
        present = self._present
        return [i for i in range(first, last + 1) if not present[i >> 3] >> (i & 7) & 1]

    def available_from(self, offset: int) -> int:
        """Contiguous bytes readable at C{offset} from present slices, capped at the object's end."""
        size = self.meta.size
        if not 0 <= offset < size:
            return 0
        index = offset // self.slice_size
        count = self.slice_count
        present = self._present
        end = index
        while end < count and present[end >> 3] >> (end & 7) & 1:
            end += 1
        if end == index:
            return 0
        return min(end * self.slice_size, size) - offset

    def slice_length(self, index: int) -> int:
        return min(self.slice_size, self.meta.size - index * self.slice_size)

    @property
    def present_bytes(self) -> int:
        total = self._present_count * self.slice_size
        count = self.slice_count
        if count and self.has_slice(count - 1):
            total -= count * self.slice_size - self.meta.size
        return total

    @property
    def complete(self) -> bool:
        return self._present_count == self.slice_count

    @property
    def evicted(self) -> bool:
        return self._evicted

    @property
    def transient(self) -> bool:
        return self._transient

    @property
    def indexed(self) -> bool:
        return not (self._transient or self._evicted)

    # -- I/O ------------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """
        Write C{data} at C{offset} of the data file.  Marks nothing present (see L{commit_slice}).

        @raise StoreError: the disk refused; the object is dropped from the store.
        @raise ValueError: the bytes fall outside the object.
        """
        if offset < 0 or offset + len(data) > self.meta.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} outside {self.meta.size}")
        fd = self.fileno()
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as e:
            self._store._fail(self, e)
            raise StoreError(f"writing {self.meta.key!r}: {e.strerror}", e.errno) from e

    def commit_slice(self, index: int) -> None:
        """
        The caller wrote all of slice C{index} (the last may be short): mark it present, account it,
        persist when a batch is due, and evict other objects if the store is over its size.

        @raise StoreError: persisting failed; the object is dropped and nothing of it is present.
        """
        if not 0 <= index < self.slice_count:
            raise ValueError(f"slice {index} outside 0..{self.slice_count - 1}")
        if self.has_slice(index):
            return
        self._present[index >> 3] |= 1 << (index & 7)
        self._present_count += 1
        if self.indexed:
            self._store._committed(self, index)

    def read(self, offset: int, length: int) -> bytes:
        """Read C{length} bytes at C{offset}; the caller only reads bytes it knows are present."""
        fd = self.fileno()
        chunks = []
        try:
            while length > 0:
                chunk = os.pread(fd, length, offset)
                if not chunk:
                    raise StoreError(f"short read of {self.meta.key!r} at {offset}")
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
        except OSError as e:
            self._store._fail(self, e)
            raise StoreError(f"reading {self.meta.key!r}: {e.strerror}", e.errno) from e
        return b"".join(chunks)

    def fileno(self) -> int:
        """The open descriptor of the data file (for os.sendfile), reopened if it was closed."""
        if self._fd < 0:
            self._store._open(self)
        return self._fd

    def close(self) -> None:
        """Persist unpersisted slices and release the descriptor (I/O later reopens it if indexed)."""
        self._store._release(self)

    # -- store plumbing -------------------------------------------------------------------------

    def _set_fd(self, fd: int) -> None:
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def _close_fd(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._fd = -1


class SliceStore:
    """
    Objects cut in C{slice_size} slices under C{root}, at most C{max_size} bytes of present slices.

    A new store is L{loading} until its L{rebuild_steps} generator has run to the end; meanwhile
    L{get} looks on disk for keys not indexed yet.  Call L{close} at shutdown.
    """

    def __init__(
        self,
        root: str,
        max_size: int,
        slice_size: int = 1 << 20,
        now: Callable[[], float] = time.time,
        sync: bool = True,
        max_open_files: int = 256,
    ) -> None:
        if slice_size <= 0 or max_size < 0:
            raise ValueError("slice_size must be positive and max_size not negative")
        self.root = root
        self.max_size = max_size
        self.slice_size = slice_size
        self.used_bytes = 0
        self._now = now
        self._sync = sync
        self._max_open = max(1, max_open_files)
        self._index: OrderedDict[str, CachedObject] = OrderedDict()
        self._by_hash: dict[str, CachedObject] = {}
        self._open_fds: OrderedDict[str, CachedObject] = OrderedDict()
        self._rebuilt: set[str] = set()  # loaded by the rebuild and not used since
        self._loading = True
        os.makedirs(root, exist_ok=True)

    # -- public ---------------------------------------------------------------------------------

    @property
    def loading(self) -> bool:
        return self._loading

    def __len__(self) -> int:
        return len(self._index)

    def keys_lru(self) -> list[str]:
        """Indexed keys, least recently used first."""
        return list(self._index)

    def get(self, key: str) -> CachedObject | None:
        """The indexed object for C{key} (now most recently used), or None."""
        obj = self._index.get(key)
        if obj is None:
            if not self._loading:
                return None
            obj = self._load_one(key)
            if obj is None:
                return None
        if obj._fd < 0:
            try:
                self._open(obj)
            except StoreError:
                return None
        self._index.move_to_end(key)
        self._rebuilt.discard(key)
        now = self._now()
        obj.last_used = now
        if obj._on_disk and now - obj._use_persisted >= LAST_USE_PERSIST_INTERVAL:
            obj._use_persisted = now
            try:
                os.utime(self._meta_path(obj._hash), (now, now))
            except OSError:
                pass  # only the LRU order after a restart suffers
        return obj

    def create(self, meta: ObjectMeta, transient: bool = False) -> CachedObject:
        """
        A new, empty object for C{meta.key}, replacing any entry of that key.  Objects larger than
        the whole store are made transient: streamed through, never kept.

        @raise StoreError: the data file could not be created.
        """
        if meta.size < 0:
            raise ValueError(f"negative size {meta.size}")
        self._discard_key(meta.key)
        transient = transient or meta.size > self.max_size
        h = key_hash(meta.key)
        token = secrets.token_hex(8)
        directory = self._dir(h)
        path = os.path.join(directory, f"{h}.{token}.data")
        fd = -1
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            if transient:
                os.unlink(path)
            os.ftruncate(fd, meta.size)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
                _unlink(path)
            raise StoreError(f"creating {meta.key!r}: {e.strerror}", e.errno) from e
        present = bytearray((slice_count(meta.size, self.slice_size) + 7) // 8)
        obj = CachedObject(meta, self.slice_size, self, h, token, present, transient)
        obj._set_fd(fd)
        obj.last_used = obj._use_persisted = self._now()
        if transient:
            return obj
        self._index[meta.key] = obj
        self._by_hash[h] = obj
        self._open_fds[meta.key] = obj
        self._trim_fds()
        if obj.complete:  # empty object: nothing will ever commit, record it now
            self._persist_or_drop(obj)
        return obj

    def refresh(self, obj: CachedObject, meta: ObjectMeta) -> None:
        """
        C{obj} was revalidated as the same representation: take C{meta}'s times and persist them.

        @raise StoreError: persisting failed; the object was dropped.
        """
        if meta.key != obj.meta.key or not meta.same_representation(obj.meta):
            raise ValueError("refresh() needs the same key and representation")
        obj.meta = meta
        if obj.indexed:
            self._persist_or_drop(obj)

    def remove(self, key: str) -> bool:
        """Drop C{key} (PURGE); True if there was something to drop."""
        return self._discard_key(key)

    def close(self) -> None:
        """Persist every unpersisted slice and close all descriptors (shutdown)."""
        for obj in list(self._open_fds.values()):
            self._release(obj)

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
            self._order_rebuilt()
            self._evict(None)
        finally:
            self._rebuilt.clear()
            self._loading = False

    # -- rebuild --------------------------------------------------------------------------------

    @staticmethod
    def _subdirs(path: str) -> list[str]:
        try:
            with os.scandir(path) as entries:
                return sorted(e.name for e in entries if _is_hex_dir(e.name) and e.is_dir())
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
            elif rest.endswith(".tmp"):
                _unlink(os.path.join(directory, name))
        data_names = {name for _, _, name in data_files}
        prefix = os.path.basename(os.path.dirname(directory)) + os.path.basename(directory)
        for h in sidecars:
            if h in self._by_hash:
                continue  # loaded meanwhile by get() or replaced by create()
            path = os.path.join(directory, f"{h}.meta")
            if not h.startswith(prefix):
                _unlink(path)
                continue
            try:
                sidecar, mtime = self._read_sidecar(path, h)
            except (OSError, BadSidecar) as e:
                log.info("discarding sidecar {path}: {error}", path=path, error=e)
                _unlink(path)
                continue
            data_name = f"{h}.{sidecar.token}.data"
            try:
                consistent = (
                    data_name in data_names
                    and os.stat(os.path.join(directory, data_name)).st_size == sidecar.meta.size
                )
            except OSError:
                consistent = False
            if not consistent:
                _unlink(path)
                continue
            obj = CachedObject(
                sidecar.meta, self.slice_size, self, h, sidecar.token, bytearray(sidecar.present)
            )
            obj._on_disk = True
            obj.last_used = obj._use_persisted = max(sidecar.last_used, mtime)
            self._index[obj.meta.key] = obj
            self._index.move_to_end(obj.meta.key, last=False)
            self._by_hash[h] = obj
            self._rebuilt.add(obj.meta.key)
            self.used_bytes += obj.present_bytes
        for h, token, name in data_files:
            live = self._by_hash.get(h)
            if live is None or live._token != token:
                _unlink(os.path.join(directory, name))
        return len(sidecars)

    def _order_rebuilt(self) -> None:
        rebuilt = sorted(
            (self._index[key] for key in self._rebuilt if key in self._index),
            key=lambda obj: obj.last_used,
        )
        used = [obj for key, obj in self._index.items() if key not in self._rebuilt]
        self._index = OrderedDict((obj.meta.key, obj) for obj in rebuilt + used)

    def _read_sidecar(self, path: str, h: str) -> tuple[Sidecar, float]:
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if st.st_size > MAX_SIDECAR_BYTES:
                raise BadSidecar("sidecar too large")
            raw = os.read(fd, st.st_size + 1)
        finally:
            os.close(fd)
        return decode_sidecar(raw, h, self.slice_size), st.st_mtime

    def _load_one(self, key: str) -> CachedObject | None:
        """While loading: index C{key} straight from its sidecar, if it has a good one."""
        h = key_hash(key)
        if h in self._by_hash:
            return None  # another key with this hash is live
        path = self._meta_path(h)
        try:
            sidecar, mtime = self._read_sidecar(path, h)
        except FileNotFoundError:
            return None
        except (OSError, BadSidecar) as e:
            log.info("discarding sidecar {path}: {error}", path=path, error=e)
            self._remove_hash_files(h)
            return None
        if sidecar.meta.key != key:
            self._remove_hash_files(h)
            return None
        obj = CachedObject(
            sidecar.meta, self.slice_size, self, h, sidecar.token, bytearray(sidecar.present)
        )
        obj._on_disk = True
        obj.last_used = obj._use_persisted = max(sidecar.last_used, mtime)
        try:
            fd = self._open_data(obj)
        except StoreError:
            self._remove_hash_files(h)
            return None
        obj._set_fd(fd)
        self._index[key] = obj
        self._by_hash[h] = obj
        self._open_fds[key] = obj
        self.used_bytes += obj.present_bytes
        self._trim_fds()
        return obj

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
        obj = self._index.get(key)
        if obj is None and self._loading:
            obj = self._load_one(key)
        if obj is None:
            return False
        self._drop(obj)
        return True

    # -- files ----------------------------------------------------------------------------------

    def _dir(self, h: str) -> str:
        return os.path.join(self.root, h[0:2], h[2:4])

    def _meta_path(self, h: str) -> str:
        return os.path.join(self.root, h[0:2], h[2:4], f"{h}.meta")

    def _data_path(self, obj: CachedObject) -> str:
        return os.path.join(self._dir(obj._hash), f"{obj._hash}.{obj._token}.data")

    def _open_data(self, obj: CachedObject) -> int:
        """Open an on-disk object's data file, checking it still has the recorded size."""
        try:
            fd = os.open(self._data_path(obj), os.O_RDWR)
        except OSError as e:
            raise StoreError(f"opening {obj.meta.key!r}: {e.strerror}", e.errno) from e
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise StoreError(f"opening {obj.meta.key!r}: {e.strerror}", e.errno) from e
        if size != obj.meta.size:
            os.close(fd)
            raise StoreError(f"data file of {obj.meta.key!r} has {size} bytes, not {obj.meta.size}")
        return fd

    def _open(self, obj: CachedObject) -> None:
        if not obj.indexed:
            raise StoreError(f"{obj.meta.key!r} was closed after it left the store")
        try:
            fd = self._open_data(obj)
        except StoreError:
            self._drop(obj)
            raise
        obj._set_fd(fd)
        self._open_fds[obj.meta.key] = obj
        self._trim_fds()

    def _trim_fds(self) -> None:
        while len(self._open_fds) > self._max_open:
            _, victim = self._open_fds.popitem(last=False)
            self._release(victim)

    def _release(self, obj: CachedObject) -> None:
        if obj.indexed and obj._pending:
            self._persist_or_log(obj)
        if obj.indexed:
            self._open_fds.pop(obj.meta.key, None)
        obj._close_fd()

    # -- persisting -----------------------------------------------------------------------------

    def _committed(self, obj: CachedObject, index: int) -> None:
        self.used_bytes += obj.slice_length(index)
        now = self._now()
        if not obj._pending:
            obj._pending_since = now
        obj._pending += 1
        if (
            obj.complete
            or obj._pending >= PERSIST_EVERY_SLICES
            or now - obj._pending_since >= PERSIST_INTERVAL
        ):
            self._persist_or_drop(obj)
        self._evict(obj)

    def _persist(self, obj: CachedObject) -> None:
        """fdatasync the data (if slices are pending), then atomically replace the sidecar."""
        if obj._pending and self._sync:
            os.fdatasync(obj.fileno())
        last_used = obj.last_used
        raw = encode_sidecar(obj.meta, self.slice_size, obj._token, obj._present, last_used)
        tmp = os.path.join(self._dir(obj._hash), f"{obj._hash}.{obj._token}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view) :]
                if self._sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.utime(tmp, (last_used, last_used))
            os.replace(tmp, self._meta_path(obj._hash))
        except OSError:
            _unlink(tmp)
            raise
        obj._pending = 0
        obj._on_disk = True
        obj._use_persisted = last_used

    def _persist_or_drop(self, obj: CachedObject) -> None:
        try:
            self._persist(obj)
        except (OSError, StoreError) as e:
            self._fail(obj, e)
            raise StoreError(f"persisting {obj.meta.key!r}: {e}", getattr(e, "errno", None)) from e

    def _persist_or_log(self, obj: CachedObject) -> None:
        try:
            self._persist_or_drop(obj)
        except StoreError as e:
            log.error("dropped {key!r}: {error}", key=obj.meta.key, error=e)

    # -- dropping and eviction ------------------------------------------------------------------

    def _fail(self, obj: CachedObject, error: Exception) -> None:
        """A disk error on C{obj}: drop it and forget every slice, so none is ever served."""
        log.error("dropping {key!r} after a disk error: {error}", key=obj.meta.key, error=error)
        self._drop(obj)
        obj._present[:] = bytes(len(obj._present))
        obj._present_count = 0
        obj._pending = 0

    def _drop(self, obj: CachedObject) -> None:
        """Remove C{obj} from the index and its files from disk; its descriptor stays valid."""
        if obj.transient:
            obj._evicted = True
            return
        if obj._evicted:
            return
        key = obj.meta.key
        if self._index.get(key) is obj:
            del self._index[key]
        if self._by_hash.get(obj._hash) is obj:
            del self._by_hash[obj._hash]
        self._open_fds.pop(key, None)
        self._rebuilt.discard(key)
        self.used_bytes -= obj.present_bytes
        obj._evicted = True
        obj._pending = 0
        if obj._on_disk:
            self._unlink_sidecar_if_ours(obj)
        _unlink(self._data_path(obj))

    def _unlink_sidecar_if_ours(self, obj: CachedObject) -> None:
        # Another process may have replaced the sidecar with its own object: leave that one alone.
        path = self._meta_path(obj._hash)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_SIDECAR_BYTES + 1)
        except OSError:
            return
        if obj._token.encode("ascii") in raw:
            _unlink(path)

    def _evict(self, keep: CachedObject | None) -> None:
        """Evict least recently used objects (sparing C{keep}) until within C{max_size}."""
        if self.used_bytes <= self.max_size:
            return
        for obj in list(self._index.values()):
            if self.used_bytes <= self.max_size:
                break
            if obj is not keep:
                self._drop(obj)
