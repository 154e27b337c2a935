"""Tests for L{h264edge.store}: slices, persistence, restart, eviction, hostile sidecars, disk errors."""

from __future__ import annotations

import errno
import gc
import json
import os

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from h264edge.store import CacheDirUnusable, CachedObject, ObjectMeta, SliceStore, StoreError
from h264edge.store._sidecar import key_hash
from tests.smallfs import unwritable_dir

SLICE = 16


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.time = start

    def __call__(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds


def meta_for(key: str, size: int, etag: str | None = '"v1"', expires_at: float = 5000.0) -> ObjectMeta:
    return ObjectMeta(
        key=key,
        size=size,
        etag=etag,
        last_modified="Mon, 01 Jan 2024 00:00:00 GMT",
        content_type="video/mp4",
        fetched_at=1000.0,
        expires_at=expires_at,
    )


def body(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


def rebuild(store: SliceStore) -> None:
    for _ in store.rebuild_steps(batch=1):
        pass


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        self.clock = FakeClock()
        self.stores: list[SliceStore] = []

    def tearDown(self) -> None:
        for store in self.stores:
            store.close()

    def open_store(self, max_size: int = 1 << 20, **kw: object) -> SliceStore:
        store = SliceStore(self.root, max_size, slice_size=SLICE, now=self.clock, **kw)  # type: ignore[arg-type]
        self.stores.append(store)
        return store

    def reopen(self, max_size: int = 1 << 20) -> SliceStore:
        store = self.open_store(max_size)
        rebuild(store)
        return store

    def fill(self, store: SliceStore, key: str, size: int, seed: int = 0) -> CachedObject:
        obj = store.create(meta_for(key, size))
        data = body(size, seed)
        for index in range(obj.slice_count):
            obj.write(index * SLICE, data[index * SLICE : (index + 1) * SLICE])
            obj.commit_slice(index)
        return obj

    def sidecar_path(self, key: str) -> str:
        h = key_hash(key)
        return os.path.join(self.root, h[:2], h[2:4], h + ".meta")

    def all_files(self) -> list[str]:
        out: list[str] = []
        for directory, _, names in os.walk(self.root):
            out.extend(os.path.join(directory, n) for n in names)
        return sorted(out)


class SliceTests(StoreTestCase):
    def test_write_commit_read_back(self) -> None:
        store = self.open_store()
        obj = self.fill(store, "/a.mp4", 50)
        self.assertTrue(obj.complete)
        self.assertEqual(obj.read(0, 50), body(50))
        self.assertEqual(obj.read(17, 20), body(50)[17:37])
        self.assertEqual(store.used_bytes, 50)
        self.assertEqual(os.pread(obj.fileno(), 5, 45), body(50)[45:])

    def test_write_does_not_mark_present(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 40))
        obj.write(0, body(16))
        self.assertFalse(obj.has_slice(0))
        self.assertEqual(obj.available_from(0), 0)
        self.assertEqual(store.used_bytes, 0)

    def test_available_from_across_present_and_missing_slices(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 70))  # slices 0..4, last one 6 bytes
        for index in (0, 1, 3, 4):
            obj.write(index * SLICE, body(70)[index * SLICE : (index + 1) * SLICE])
            obj.commit_slice(index)
        self.assertEqual(obj.available_from(0), 32)
        self.assertEqual(obj.available_from(5), 27)
        self.assertEqual(obj.available_from(32), 0)
        self.assertEqual(obj.available_from(40), 0)
        self.assertEqual(obj.available_from(47), 0)
        self.assertEqual(obj.available_from(-1), 0)
        self.assertEqual(obj.available_from(48), 22)
        self.assertEqual(obj.available_from(69), 1)
        self.assertEqual(obj.available_from(70), 0)
        self.assertEqual(obj.missing_slices(0, 4), [2])
        self.assertEqual(obj.missing_slices(3, 99), [])
        self.assertFalse(obj.complete)
        self.assertEqual(store.used_bytes, 16 * 3 + 6)

    def test_commit_is_idempotent(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 40))
        obj.write(0, body(16))
        obj.commit_slice(0)
        obj.commit_slice(0)
        self.assertEqual(store.used_bytes, 16)

    def test_empty_object_is_complete_and_survives_restart(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/empty", 0))
        self.assertTrue(obj.complete)
        store.close()
        again = self.reopen()
        loaded = again.get("/empty")
        assert loaded is not None
        self.assertTrue(loaded.complete)
        self.assertEqual(loaded.available_from(0), 0)


class RestartTests(StoreTestCase):
    def test_uncommitted_bytes_never_present_after_reopen(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 64))
        obj.write(0, body(64))  # every byte written, only slice 1 committed
        obj.commit_slice(1)
        store.close()
        again = self.reopen()
        loaded = again.get("/a")
        assert loaded is not None
        self.assertEqual(loaded.missing_slices(0, 3), [0, 2, 3])
        self.assertEqual(loaded.read(16, 16), body(64)[16:32])
        self.assertEqual(again.used_bytes, 16)

    def test_unpersisted_slices_lost_on_crash(self) -> None:
        # No close(): a crash.  Slices committed since the last persist are refetched, never trusted.
        store = self.open_store()
        obj = store.create(meta_for("/a", 64))
        obj.write(0, body(64))
        obj.commit_slice(0)
        obj2 = self.fill(store, "/b", 20)
        self.assertTrue(obj2.complete)
        other = self.open_store()
        rebuild(other)
        self.assertEqual(other.keys_lru(), ["/b"])

    def test_persisted_after_batch_of_slices(self) -> None:
        store = self.open_store()
        size = SLICE * 40
        obj = store.create(meta_for("/big", size))
        for index in range(17):
            obj.write(index * SLICE, body(size)[index * SLICE : (index + 1) * SLICE])
            obj.commit_slice(index)
        other = self.reopen()  # crash of the first: the first 16 were persisted
        loaded = other.get("/big")
        assert loaded is not None
        self.assertEqual(loaded.available_from(0), 16 * SLICE)

    def test_persisted_after_interval(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 64))
        obj.write(0, body(32))
        obj.commit_slice(0)
        self.clock.advance(10)
        obj.commit_slice(1)
        loaded = self.reopen().get("/a")
        assert loaded is not None
        self.assertEqual(loaded.missing_slices(0, 3), [2, 3])

    def test_rebuild_loads_entries_in_lru_order(self) -> None:
        store = self.open_store()
        for name in ("/1", "/2", "/3", "/4"):
            self.fill(store, name, 20)
            self.clock.advance(100)
        store.get("/2")
        self.clock.advance(100)
        store.get("/1")
        store.close()
        self.assertEqual(store.keys_lru(), ["/3", "/4", "/2", "/1"])
        again = self.reopen()
        self.assertEqual(again.keys_lru(), ["/3", "/4", "/2", "/1"])
        self.assertEqual(len(again), 4)
        self.assertEqual(again.used_bytes, 80)
        self.assertFalse(again.loading)
        loaded = again.get("/3")
        assert loaded is not None
        self.assertEqual(loaded.meta, meta_for("/3", 20))
        self.assertEqual(loaded.read(0, 20), body(20))

    def test_get_during_loading_finds_key_on_disk(self) -> None:
        store = self.open_store()
        for n in range(30):
            self.fill(store, f"/k{n}", 20, seed=n)
        store.close()
        again = self.open_store()
        steps = again.rebuild_steps(batch=1)
        next(steps)
        self.assertTrue(again.loading)
        self.assertLess(len(again), 30)
        missing = next(k for k in (f"/k{n}" for n in range(30)) if k not in again.keys_lru())
        obj = again.get(missing)
        assert obj is not None
        self.assertEqual(obj.read(0, 20), body(20, int(missing[2:])))
        self.assertIsNone(again.get("/nothing"))
        for _ in steps:
            pass
        self.assertEqual(len(again), 30)
        self.assertIs(again.get(missing), obj)
        self.assertEqual(again.keys_lru()[-1], missing)
        self.assertEqual(again.used_bytes, 600)

    def test_get_before_rebuild_runs_finds_key(self) -> None:
        store = self.open_store()
        self.fill(store, "/a", 20)
        store.close()
        again = self.open_store()
        self.assertTrue(again.loading)
        obj = again.get("/a")
        assert obj is not None
        self.assertTrue(obj.complete)

    def test_create_during_loading_replaces_disk_entry(self) -> None:
        store = self.open_store()
        self.fill(store, "/a", 20)
        store.close()
        again = self.open_store()
        fresh = again.create(meta_for("/a", 40, etag='"v2"'))
        fresh.write(0, body(16))  # its data file is made
        rebuild(again)
        self.assertIs(again.get("/a"), fresh)
        self.assertEqual(fresh.missing_slices(0, 2), [0, 1, 2])
        self.assertEqual(again.used_bytes, 0)
        self.assertEqual(len([f for f in self.all_files() if f.endswith(".data")]), 1)

    def test_rebuild_removes_orphans_and_leftovers(self) -> None:
        store = self.open_store()
        self.fill(store, "/keep", 20)
        self.fill(store, "/nodata", 20)
        orphan = store.create(meta_for("/nosidecar", 40))  # never persisted: data without sidecar
        orphan.write(0, body(16))
        store.close()
        del orphan
        for f in self.all_files():
            if f.endswith(".data") and key_hash("/nodata") in f:
                os.unlink(f)
        leftover = self.sidecar_path("/keep")[:-5] + ".0123456789abcdef.tmp"
        with open(leftover, "w") as tmp:
            tmp.write("{")
        again = self.reopen()
        self.assertEqual(again.keys_lru(), ["/keep"])
        self.assertEqual(len(self.all_files()), 2)

    def test_rebuild_discards_other_slice_size(self) -> None:
        store = self.open_store()
        self.fill(store, "/a", 20)
        store.close()
        other = SliceStore(self.root, 1 << 20, slice_size=32, now=self.clock)
        rebuild(other)
        self.assertEqual(len(other), 0)
        self.assertEqual(self.all_files(), [])

    def test_rebuild_evicts_over_max_size(self) -> None:
        store = self.open_store()
        for name in ("/1", "/2", "/3"):
            self.fill(store, name, 20)
            self.clock.advance(100)
        store.close()
        again = self.reopen(max_size=45)
        self.assertEqual(again.keys_lru(), ["/2", "/3"])
        self.assertEqual(again.used_bytes, 40)

    def test_last_use_persisted_lazily(self) -> None:
        store = self.open_store()
        self.fill(store, "/old", 20)
        self.clock.advance(10)
        self.fill(store, "/new", 20)
        self.clock.advance(10)
        store.get("/old")  # within 60 s of the sidecar write: not recorded on disk
        self.assertEqual(self.reopen().keys_lru(), ["/old", "/new"])
        self.clock.advance(100)
        store.get("/old")  # now it is
        self.assertEqual(self.reopen().keys_lru(), ["/new", "/old"])


class ValidatorTests(StoreTestCase):
    def test_create_with_new_validators_drops_old_slices(self) -> None:
        store = self.open_store()
        old = self.fill(store, "/a", 40)
        new = store.create(meta_for("/a", 40, etag='"v2"'))
        self.assertTrue(old.evicted)
        self.assertEqual(new.missing_slices(0, 2), [0, 1, 2])
        self.assertEqual(store.used_bytes, 0)
        self.assertIs(store.get("/a"), new)
        self.assertEqual(old.read(0, 40), body(40))  # in-flight readers of the old one finish
        new.write(16, body(16, 9))
        new.commit_slice(1)
        store.close()
        loaded = self.reopen().get("/a")
        assert loaded is not None
        self.assertEqual(loaded.meta.etag, '"v2"')
        self.assertEqual(loaded.missing_slices(0, 2), [0, 2])
        self.assertEqual(loaded.read(16, 16), body(16, 9))

    def test_refresh_persists_new_times(self) -> None:
        store = self.open_store()
        obj = self.fill(store, "/a", 20)
        newer = meta_for("/a", 20, expires_at=9000.0)
        self.assertTrue(newer.same_representation(obj.meta))
        store.refresh(obj, newer)
        self.assertTrue(obj.meta.is_fresh(8000.0))
        loaded = self.reopen().get("/a")
        assert loaded is not None
        self.assertEqual(loaded.meta.expires_at, 9000.0)

    def test_refresh_rejects_other_representation(self) -> None:
        store = self.open_store()
        obj = self.fill(store, "/a", 20)
        self.assertRaises(ValueError, store.refresh, obj, meta_for("/a", 20, etag='"v2"'))

    def test_remove(self) -> None:
        store = self.open_store()
        obj = self.fill(store, "/a", 20)
        self.assertTrue(store.remove("/a"))
        self.assertFalse(store.remove("/a"))
        self.assertTrue(obj.evicted)
        self.assertIsNone(store.get("/a"))
        self.assertEqual(self.all_files(), [])
        self.assertEqual(store.used_bytes, 0)

    def test_remove_during_loading_removes_disk_entry(self) -> None:
        store = self.open_store()
        self.fill(store, "/a", 20)
        store.close()
        again = self.open_store()
        self.assertTrue(again.remove("/a"))
        rebuild(again)
        self.assertEqual(len(again), 0)
        self.assertEqual(self.all_files(), [])

    def test_unicode_and_hostile_keys(self) -> None:
        store = self.open_store()
        keys = ["/ü/é?x=1&y=2", "../../etc/passwd", "/a/../../b", "\x00\ud800/", "/" + "x" * 5000]
        for n, key in enumerate(keys):
            self.fill(store, key, 20, seed=n)
        store.close()
        again = self.reopen()
        self.assertEqual(sorted(again.keys_lru()), sorted(keys))
        for n, key in enumerate(keys):
            obj = again.get(key)
            assert obj is not None
            self.assertEqual(obj.read(0, 20), body(20, n))
        for f in self.all_files():
            self.assertTrue(f.startswith(self.root + os.sep))


class EvictionTests(StoreTestCase):
    def test_eviction_by_last_use(self) -> None:
        store = self.open_store(max_size=60)
        for name in ("/1", "/2", "/3"):
            self.fill(store, name, 20)
        store.get("/1")
        self.fill(store, "/4", 20)
        self.assertEqual(store.keys_lru(), ["/3", "/1", "/4"])
        self.assertEqual(store.used_bytes, 60)
        self.assertIsNone(store.get("/2"))
        self.fill(store, "/5", 40)
        self.assertEqual(store.keys_lru(), ["/4", "/5"])
        self.assertEqual(store.used_bytes, 60)
        self.assertEqual(len([f for f in self.all_files() if f.endswith(".data")]), 2)

    def test_object_being_written_is_spared(self) -> None:
        store = self.open_store(max_size=40)
        self.fill(store, "/old", 20)
        obj = store.create(meta_for("/new", 40))
        store.get("/old")  # /new is now the least recently used
        obj.write(0, body(40))
        obj.commit_slice(0)
        obj.commit_slice(1)
        self.assertEqual(store.keys_lru(), ["/new"])
        self.assertFalse(obj.evicted)

    def test_object_bigger_than_store_is_transient(self) -> None:
        store = self.open_store(max_size=30)
        self.fill(store, "/small", 20)
        obj = self.fill(store, "/huge", 100)
        self.assertTrue(obj.transient)
        self.assertEqual(obj.read(0, 100), body(100))
        self.assertEqual(store.keys_lru(), ["/small"])
        self.assertEqual(store.used_bytes, 20)
        self.assertEqual(len([f for f in self.all_files() if f.endswith(".data")]), 1)

    def test_transient_object_not_indexed(self) -> None:
        store = self.open_store()
        self.fill(store, "/keep", 20)
        obj = store.create(meta_for("/nostore", 20), transient=True)
        obj.write(0, body(20))
        obj.commit_slice(0)
        obj.commit_slice(1)
        self.assertTrue(obj.complete)
        self.assertEqual(obj.read(0, 20), body(20))
        self.assertEqual(store.keys_lru(), ["/keep"])
        self.assertEqual(store.used_bytes, 20)
        self.assertEqual(len(self.all_files()), 2)
        obj.close()

    def test_eviction_while_reader_holds_object(self) -> None:
        store = self.open_store(max_size=40)
        held = self.fill(store, "/held", 40, seed=3)
        reader = store.get("/held")
        assert reader is not None
        fd = reader.fileno()
        self.fill(store, "/other", 40)
        self.assertTrue(held.evicted)
        self.assertEqual(store.keys_lru(), ["/other"])
        self.assertEqual(reader.read(0, 40), body(40, 3))
        self.assertEqual(os.pread(fd, 40, 0), body(40, 3))
        self.assertTrue(reader.has_slice(2))

    def test_descriptor_lives_as_long_as_the_handle(self) -> None:
        store = self.open_store()
        obj = self.fill(store, "/a", 20)
        self.assertIs(store.get("/a"), obj)
        fd = obj.fileno()
        obj.close()  # persists, but others may still hold the descriptor
        self.assertEqual(os.pread(fd, 20, 0), body(20))
        del obj
        gc.collect()
        self.assertRaises(OSError, os.fstat, fd)
        again = store.get("/a")
        assert again is not None
        self.assertEqual(again.read(0, 20), body(20))

    def test_unreferenced_objects_hold_no_descriptor(self) -> None:
        store = self.open_store()
        gc.collect()  # earlier tests' garbage may hold descriptors
        before = len(os.listdir("/proc/self/fd"))
        for n in range(50):
            self.fill(store, f"/{n}", 20, seed=n)
        gc.collect()
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        self.assertEqual(len(store), 50)

    def test_pending_slices_persisted_by_get_after_interval(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 64))
        obj.write(0, body(16))
        obj.commit_slice(0)
        del obj
        self.clock.advance(10)
        store.get("/a")
        loaded = self.reopen().get("/a")
        assert loaded is not None
        self.assertTrue(loaded.has_slice(0))

    def test_store_close_persists_unreferenced_objects(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 64))
        obj.write(0, body(16))
        obj.commit_slice(0)
        del obj
        gc.collect()
        store.close()
        loaded = self.reopen().get("/a")
        assert loaded is not None
        self.assertEqual(loaded.read(0, 16), body(16))


class DiskErrorTests(StoreTestCase):
    def test_enospc_with_nothing_to_evict_holds_the_rest_in_memory(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 64))
        obj.write(0, body(16))
        obj.commit_slice(0)

        def full(fd: int, data: object, offset: int) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "pwrite", full)
        obj.write(16, body(64)[16:])  # no error: the object is uncached, its bytes go to memory
        for index in range(1, 4):
            obj.commit_slice(index)
        self.assertEqual(obj.read(0, 64), body(64))  # its viewers get every byte, the first slice from its file
        self.assertTrue(obj.in_memory)
        self.assertTrue(obj.transient)
        self.assertIsNone(store.get("/a"))
        self.assertEqual((store.used_bytes, store.uncached, store.memory_bytes), (0, 1, 48))
        self.assertFalse(store.disk_trouble)  # a full disk is not a broken one
        self.assertEqual(self.all_files(), [])
        del obj
        gc.collect()
        self.assertEqual(store.memory_bytes, 0)

    def test_enospc_evicts_the_least_recently_used_and_writes_again(self) -> None:
        store = self.open_store()
        self.fill(store, "/old", 32, seed=1)
        self.fill(store, "/newer", 32, seed=2)
        store.get("/old")  # /newer is now the least recently used
        obj = store.create(meta_for("/a", 32))
        real_pwrite = os.pwrite
        refusals = []

        def full_once(fd: int, data: object, offset: int) -> int:
            if not refusals:
                refusals.append(offset)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

        self.patch(os, "pwrite", full_once)
        obj.write(0, body(32, 3))
        obj.commit_slice(0)
        obj.commit_slice(1)
        self.assertEqual(refusals, [0])
        self.assertFalse(obj.in_memory)
        self.assertEqual(store.keys_lru(), ["/old", "/a"])
        self.assertEqual(self.reopen().get("/a").read(0, 32), body(32, 3))  # type: ignore[union-attr]

    def test_other_write_errors_hold_the_rest_in_memory_too(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 32))

        def broken(fd: int, data: object, offset: int) -> int:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(os, "pwrite", broken)
        obj.write(0, body(32))
        obj.commit_slice(0)
        obj.commit_slice(1)
        self.assertEqual(obj.read(0, 32), body(32))
        self.assertIsNone(store.get("/a"))
        self.assertTrue(store.disk_trouble)

    def test_failed_sidecar_write_drops_object(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 16))
        obj.write(0, body(16))
        real_replace = os.replace

        def failing(src: str, dst: str) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        real_link = os.link
        self.patch(os, "replace", failing)
        self.patch(os, "link", failing)  # a first sidecar is linked into place, later ones replace it
        self.assertRaises(StoreError, obj.commit_slice, 0)
        self.patch(os, "replace", real_replace)
        self.patch(os, "link", real_link)
        self.assertFalse(obj.has_slice(0))
        self.assertEqual(self.all_files(), [])
        self.assertEqual(len(self.reopen()), 0)

    def test_data_file_of_wrong_size_discarded(self) -> None:
        store = self.open_store()
        self.fill(store, "/a", 40)
        store.close()
        for f in self.all_files():
            if f.endswith(".data"):
                os.truncate(f, 20)
        again = self.reopen()
        self.assertIsNone(again.get("/a"))
        self.assertEqual(again.used_bytes, 0)
        self.assertEqual(self.all_files(), [])


class HostileSidecarTests(StoreTestCase):
    """A corrupt or forged sidecar is discarded (with its data), never trusted, never raises."""

    def write_and_tamper(self, change: object) -> SliceStore:
        store = self.open_store()
        self.fill(store, "/a", 40)
        self.fill(store, "/b", 40)
        store.close()
        path = self.sidecar_path("/a")
        with open(path, "rb") as f:
            record = json.loads(f.read())
        if callable(change):
            raw = change(record)
        else:
            raise TypeError(change)
        with open(path, "wb") as f:
            f.write(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
        return self.open_store()

    def assert_discarded(self, change: object) -> None:
        store = self.write_and_tamper(change)
        self.assertIsNone(store.get("/a"))  # during loading: straight from disk
        rebuild(store)
        self.assertEqual(store.keys_lru(), ["/b"])
        self.assertEqual(store.used_bytes, 40)
        self.assertEqual(len(self.all_files()), 2)
        # and through a rebuild alone
        again = self.write_and_tamper(change)
        rebuild(again)
        self.assertEqual(again.keys_lru(), ["/b"])
        self.assertIsNone(again.get("/a"))

    def with_field(self, name: str, value: object) -> object:
        def change(record: dict[str, object]) -> dict[str, object]:
            record[name] = value
            return record

        return change

    def test_bad_json(self) -> None:
        self.assert_discarded(lambda r: b'{"version": 1, "key": ')

    def test_not_utf8(self) -> None:
        self.assert_discarded(lambda r: b"\xff\xfe{}")

    def test_deep_nesting(self) -> None:
        self.assert_discarded(lambda r: b"[" * 100000)

    def test_not_an_object(self) -> None:
        self.assert_discarded(lambda r: b"[1, 2]")

    def test_wrong_key(self) -> None:
        self.assert_discarded(self.with_field("key", "/b"))

    def test_path_traversal_key(self) -> None:
        self.assert_discarded(self.with_field("key", "../../../etc/passwd"))

    def test_wrong_bitmap_length(self) -> None:
        self.assert_discarded(self.with_field("present", "ffff"))

    def test_bitmap_past_the_end(self) -> None:
        self.assert_discarded(self.with_field("present", "ff"))  # 3 slices, 8 bits set

    def test_bitmap_not_hex(self) -> None:
        self.assert_discarded(self.with_field("present", "zz"))

    def test_size_mismatch(self) -> None:
        # Same bitmap length, but the data file is 40 bytes: caught when the data is opened.
        self.assert_discarded(self.with_field("size", 45))

    def test_huge_size(self) -> None:
        self.assert_discarded(self.with_field("size", 10**30))

    def test_negative_size(self) -> None:
        self.assert_discarded(self.with_field("size", -1))

    def test_huge_numbers(self) -> None:
        self.assert_discarded(self.with_field("expires_at", 10**400))

    def test_huge_digit_string(self) -> None:
        self.assert_discarded(lambda r: json.dumps(r).replace('"size": 40', '"size": ' + "9" * 5000).encode())

    def test_last_used_far_future(self) -> None:
        self.assert_discarded(self.with_field("last_used", 1e300))

    def test_nan(self) -> None:
        self.assert_discarded(lambda r: json.dumps(r).replace('"fetched_at": 1000.0', '"fetched_at": NaN').encode())

    def test_bool_size(self) -> None:
        self.assert_discarded(self.with_field("size", True))

    def test_wrong_types(self) -> None:
        self.assert_discarded(self.with_field("etag", 5))

    def test_data_token_traversal(self) -> None:
        self.assert_discarded(self.with_field("data", "../../../x"))

    def test_missing_field(self) -> None:
        def change(record: dict[str, object]) -> dict[str, object]:
            del record["content_type"]
            return record

        self.assert_discarded(change)

    def test_unknown_version(self) -> None:
        self.assert_discarded(self.with_field("version", 3))

    def test_huge_sidecar(self) -> None:
        self.assert_discarded(lambda r: b" " * (2 << 20))


class SharedRootTests(StoreTestCase):
    def test_two_stores_on_one_root_never_mix_bytes(self) -> None:
        one, two = self.open_store(), self.open_store()
        a = one.create(meta_for("/a", 48, etag='"one"'))
        b = two.create(meta_for("/a", 48, etag='"two"'))
        a.write(0, body(48, 1))
        b.write(0, body(48, 2))
        for index in range(3):
            a.commit_slice(index)  # complete: one's sidecar is on disk first
        b.commit_slice(0)
        b.close()  # two finds the key taken: it drops its object, its handle still reads its own bytes
        self.assertEqual(a.read(0, 48), body(48, 1))
        self.assertEqual(b.read(0, 16), body(16, 2))
        self.assertTrue(b.evicted)
        loaded = self.reopen().get("/a")
        assert loaded is not None
        self.assertEqual(loaded.meta.etag, '"one"')
        self.assertEqual(loaded.read(0, 48), body(48, 1))
        self.assertEqual(len([f for f in self.all_files() if f.endswith(".data")]), 1)

    def test_a_data_file_the_disk_refuses_leaves_the_object_in_memory(self) -> None:
        store = self.open_store()

        def full(fd: int, length: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "ftruncate", full)
        obj = store.create(meta_for("/a", 48))  # the data file is made at the first write
        self.assertEqual(self.all_files(), [])
        obj.write(0, body(48))
        for index in range(3):
            obj.commit_slice(index)
        self.assertTrue(obj.in_memory)
        self.assertEqual(obj.read(0, 48), body(48))
        self.assertEqual(len(store), 0)
        self.assertIsNone(store.get("/a"))
        self.assertEqual(self.all_files(), [])
        empty = store.create(meta_for("/empty", 0))  # made at once: it is complete
        self.assertTrue(empty.complete)
        self.assertEqual(empty.read(0, 0), b"")
        self.assertEqual((len(store), self.all_files()), (0, []))

    def test_new_object_dropped_before_its_first_byte_still_streams(self) -> None:
        store = self.open_store()
        obj = store.create(meta_for("/a", 48))
        self.assertTrue(store.remove("/a"))  # a purge between the origin's answer and its body
        obj.write(0, body(48))
        for index in range(3):
            obj.commit_slice(index)
        self.assertEqual(obj.read(0, 48), body(48))  # its viewers get every byte
        self.assertIsNone(store.get("/a"))  # nothing is kept
        self.assertEqual(self.all_files(), [])


class MemoryTests(StoreTestCase):
    """Transient objects hold their slices in memory, at most stream_buffer bytes of them."""

    def test_a_transient_object_is_held_in_memory_and_counted(self) -> None:
        store = self.open_store(stream_buffer=4 * SLICE)
        obj = store.create(meta_for("/t", 40), transient=True)
        self.assertTrue(obj.in_memory)
        obj.write(0, body(40))
        for index in range(3):
            obj.commit_slice(index)
        self.assertEqual(obj.read(0, 40), body(40))
        self.assertEqual((store.memory_bytes, store.memory_peak, self.all_files()), (40, 40, []))
        del obj
        gc.collect()
        self.assertEqual((store.memory_bytes, store.memory_peak), (0, 40))

    def test_room_goes_to_the_slice_needed_soonest(self) -> None:
        store = self.open_store(stream_buffer=2 * SLICE)
        obj = store.create(meta_for("/t", 10 * SLICE), transient=True)
        data = body(10 * SLICE)
        needed = {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0}  # slice -> how soon a reader reads it

        def rank(index: int) -> float:
            return needed.get(index, float("inf"))

        for index in (1, 3):
            self.assertTrue(obj.room_for(index, rank))
            obj.write(index * SLICE, data[index * SLICE : (index + 1) * SLICE])
            obj.commit_slice(index)
        self.assertFalse(obj.room_for(5, rank))  # needed by nobody: it waits
        self.assertTrue(obj.room_for(0, rank))  # needed first: slice 3, needed last, makes room
        self.assertFalse(obj.has_slice(3))
        self.assertTrue(obj.has_slice(1))
        obj.write(0, data[:SLICE])
        obj.commit_slice(0)
        self.assertEqual(obj.read(0, 2 * SLICE), data[: 2 * SLICE])
        self.assertFalse(obj.room_for(2, {0: 0.0, 1: 0.0, 2: 1.0}.get))  # both held slices are being read
        self.assertTrue(obj.room_for(2, rank, spare=1))  # a reader more: a slice more
        self.assertEqual(store.memory_bytes, 2 * SLICE)


class CacheDirTests(SynchronousTestCase):
    def test_an_unwritable_root_raises_at_once(self) -> None:
        root = unwritable_dir(self)
        error = self.assertRaises(CacheDirUnusable, SliceStore, root, 1 << 20)
        self.assertIsInstance(error, StoreError)
        self.assertIn(root, str(error))
        self.assertNotIn("\n", str(error))

    def test_a_root_under_a_file_raises_at_once(self) -> None:
        parent = self.mktemp()
        with open(parent, "w"):
            pass
        error = self.assertRaises(CacheDirUnusable, SliceStore, os.path.join(parent, "cache"), 1 << 20)
        self.assertIn(parent, str(error))

    def test_a_missing_root_is_made_and_left_clean(self) -> None:
        root = os.path.join(self.mktemp(), "a", "b")
        SliceStore(root, 1 << 20)
        self.assertEqual(os.listdir(root), [])


class ManualThreads:
    """A C{run_in_thread} whose jobs run only when the test says so (or fail)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[object, tuple[object, ...], Deferred[object]]] = []

    def __call__(self, f: object, *args: object) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_next(self) -> None:
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)  # type: ignore[operator]
        except Exception:
            d.errback()  # as deferToThread does
            return
        d.callback(result)

    def fail_next(self, error: Exception) -> None:
        _, _, d = self.jobs.pop(0)
        d.errback(error)


class ThreadedSyncTests(StoreTestCase):
    """
    With C{run_in_thread}, batches are fdatasync'ed off the reactor; a sidecar lists only synced slices.
    Jobs run when the test says, to pin the order; tests.test_edge.ThreadedSyncEdgeTests runs real threads.
    """

    def setUp(self) -> None:
        super().setUp()
        self.threads = ManualThreads()

    def commit(self, obj: CachedObject, indexes: range, size: int) -> None:
        for index in indexes:
            obj.write(index * SLICE, body(size)[index * SLICE : (index + 1) * SLICE])
            obj.commit_slice(index)

    def listed(self, key: str) -> list[int]:
        other = SliceStore(self.root, 1 << 20, slice_size=SLICE, now=self.clock)
        loaded = other.get(key)
        return [] if loaded is None else [i for i in range(loaded.slice_count) if loaded.has_slice(i)]

    def test_sidecar_waits_for_the_sync(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        size = SLICE * 40
        obj = store.create(meta_for("/big", size))
        self.commit(obj, range(16), size)
        self.assertEqual(len(self.threads.jobs), 1)
        self.assertEqual(self.listed("/big"), [])  # not before the data is on disk
        self.commit(obj, range(16, 20), size)  # committed while the sync runs: not covered by it
        self.assertEqual(len(self.threads.jobs), 1)  # and not a batch of their own yet
        self.threads.run_next()
        self.assertEqual(self.listed("/big"), list(range(16)))
        self.assertEqual(self.threads.jobs, [])
        self.commit(obj, range(20, 40), size)  # due at 31 (16 unlisted), complete at 39 meanwhile
        self.threads.run_next()
        self.assertEqual(self.listed("/big"), list(range(32)))
        self.threads.run_next()
        self.assertEqual(self.listed("/big"), list(range(40)))
        self.assertEqual(self.threads.jobs, [])
        self.assertEqual(self.tmp_files(), [])

    def tmp_files(self) -> list[str]:
        return [name for name in self.all_files() if name.endswith(".tmp")]

    def big_with_a_batch(self) -> tuple[SliceStore, CachedObject, int]:
        """A 40-slice object with its first 16 slices committed: a batch whose sync waits in the thread."""
        store = self.open_store(run_in_thread=self.threads)
        size = SLICE * 40
        obj = store.create(meta_for("/big", size))
        self.commit(obj, range(16), size)
        return store, obj, size

    def test_refresh_during_a_sync_keeps_the_new_metadata(self) -> None:
        store, obj, size = self.big_with_a_batch()  # its sidecar is written in the thread, with this metadata
        store.refresh(obj, meta_for("/big", size, expires_at=9000.0))  # persisted once that sync is done
        self.threads.run_next()
        self.assertEqual(len(self.threads.jobs), 1)  # the sidecar with the new metadata: in a thread too
        self.threads.run_next()
        loaded = SliceStore(self.root, 1 << 20, slice_size=SLICE, now=self.clock).get("/big")
        assert loaded is not None
        self.assertEqual(loaded.meta.expires_at, 9000.0)
        self.assertEqual(self.listed("/big"), list(range(16)))
        self.assertEqual(self.tmp_files(), [])

    def test_a_rebuild_removing_the_threads_tmp_file_is_not_a_disk_error(self) -> None:
        store, obj, size = self.big_with_a_batch()
        f, args, d = self.threads.jobs.pop(0)
        inode = f(*args)  # the sync and the tmp sidecar, in the thread
        self.assertEqual(len(self.tmp_files()), 1)
        for _ in store.rebuild_steps():  # a rescan while serving: every *.tmp is a leftover to it
            pass
        self.assertEqual(self.tmp_files(), [])
        d.callback(inode)
        self.assertFalse(obj.evicted)
        self.assertFalse(store.disk_trouble)
        self.threads.run_next()  # the sidecar is written again, in the thread
        self.assertEqual(self.listed("/big"), list(range(16)))
        self.commit(obj, range(16, 40), size)
        while self.threads.jobs:
            self.threads.run_next()
        self.assertEqual(self.listed("/big"), list(range(40)))

    def test_a_use_during_the_sync_is_not_set_back(self) -> None:
        store, obj, size = self.big_with_a_batch()
        self.threads.run_next()  # on disk, last used when created
        self.clock.advance(100)
        self.commit(obj, range(16, 32), size)  # the next batch: its sidecar records that same use
        self.clock.advance(1)
        self.assertIs(store.get("/big"), obj)  # a use 101 s later, recorded on the sidecar at once
        self.assertEqual(os.stat(self.sidecar_path("/big")).st_mtime, self.clock())
        self.threads.run_next()
        self.assertEqual(os.stat(self.sidecar_path("/big")).st_mtime, self.clock())
        self.assertEqual(self.listed("/big"), list(range(32)))

    def test_another_process_persisting_during_a_sync_is_merged(self) -> None:
        store, obj, size = self.big_with_a_batch()
        self.threads.run_next()  # on disk: another process can find it
        self.commit(obj, range(16, 32), size)  # the next batch, in the thread
        other = self.open_store().get("/big")
        assert other is not None
        self.commit(other, range(35, 40), size)
        other.close()  # the other process lists its slices
        self.threads.run_next()
        self.threads.run_next()  # merged: the sidecar listing both is written in the thread
        self.assertEqual(self.listed("/big"), list(range(32)) + list(range(35, 40)))
        self.assertEqual(self.tmp_files(), [])

    def test_sidecar_finding_no_room_in_the_thread_uncaches_the_object(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        obj = store.create(meta_for("/a", 64))
        self.commit(obj, range(4), 64)

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "fsync", full)  # the sidecar's: the data's is fdatasync
        self.threads.run_next()
        self.assertTrue(obj.evicted)
        self.assertEqual(obj.read(0, 64), body(64))  # synced and true: its viewers keep reading it
        self.assertIsNone(store.get("/a"))
        self.assertEqual(self.all_files(), [])

    def syncs_here(self) -> list[str]:
        """Record the fsync/fdatasync calls made outside the jobs run by self.threads."""
        calls: list[str] = []
        running = []
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)

            def recording(fd: int, real: object = real, name: str = name) -> None:
                if not running:
                    calls.append(name)
                real(fd)  # type: ignore[operator]

            self.patch(os, name, recording)
        run_next = self.threads.run_next

        def run_in_the_thread() -> None:
            running.append(1)
            try:
                run_next()
            finally:
                running.pop()

        self.patch(self.threads, "run_next", run_in_the_thread)
        return calls

    def test_refresh_syncs_in_the_thread(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        obj = store.create(meta_for("/a", 32))
        self.commit(obj, range(2), 32)  # complete: persisted
        self.threads.run_next()
        calls = self.syncs_here()
        store.refresh(obj, meta_for("/a", 32, expires_at=9000.0))
        self.assertEqual(calls, [])  # the reactor's thread did not wait for the disk
        self.assertEqual(len(self.threads.jobs), 1)
        self.threads.run_next()
        self.assertEqual(calls, [])
        loaded = SliceStore(self.root, 1 << 20, slice_size=SLICE, now=self.clock).get("/a")
        assert loaded is not None
        self.assertEqual((loaded.meta.expires_at, loaded.read(0, 32)), (9000.0, body(32)))

    def test_an_empty_object_is_persisted_in_the_thread(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        calls = self.syncs_here()
        obj = store.create(meta_for("/empty", 0))
        self.assertTrue(obj.complete)
        self.assertEqual(calls, [])
        self.assertEqual(self.listed("/empty"), [])
        self.assertIsNone(SliceStore(self.root, 1 << 20, slice_size=SLICE, now=self.clock).get("/empty"))
        self.threads.run_next()
        loaded = SliceStore(self.root, 1 << 20, slice_size=SLICE, now=self.clock).get("/empty")
        assert loaded is not None
        self.assertTrue(loaded.complete)
        self.assertEqual(calls, [])

    def reopened(self, key: str) -> CachedObject | None:
        """C{key} as a store opened on the directory now finds it (after a crash: no close())."""
        return SliceStore(self.root, 1 << 20, slice_size=SLICE, now=self.clock).get(key)

    def test_publish_syncs_in_the_thread(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        obj = store.create(meta_for("/p", SLICE * 4))
        calls = self.syncs_here()
        published = store.publish(obj)
        self.assertEqual(calls, [])  # the reactor's thread did not wait for the disk
        self.assertNoResult(published)  # the sidecar is not there yet: other processes wait
        self.assertIsNone(self.reopened("/p"))
        self.threads.run_next()
        self.assertIsNone(self.successResultOf(published))
        self.assertEqual(calls, [])
        found = self.reopened("/p")  # published: another process finds it, with nothing present yet
        assert found is not None
        self.assertEqual(found.missing_slices(0, 3), [0, 1, 2, 3])
        self.assertEqual(self.tmp_files(), [])

    def test_a_crash_around_a_publish_leaves_no_partial_object(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        size = SLICE * 4
        obj = store.create(meta_for("/p", size))
        published = store.publish(obj)
        # every byte arrives and is committed while the publish's sync runs: the object completes,
        # its batch waits for that sync
        self.commit(obj, range(4), size)
        self.assertTrue(obj.complete)
        f, args, d = self.threads.jobs.pop(0)
        inode = f(*args)  # the publish's sync and tmp sidecar, in the thread: a crash here ...
        self.assertIsNone(self.reopened("/p"))  # ... shows no object (the tmp file is a leftover)
        d.callback(inode)  # the sidecar is put in place, listing what was synced before it: nothing
        self.assertIsNone(self.successResultOf(published))
        self.assertEqual(len(self.threads.jobs), 1)  # the complete object's batch
        found = self.reopened("/p")  # a crash now: the object is there, none of its bytes trusted yet
        assert found is not None
        self.assertEqual((found.complete, found.missing_slices(0, 3)), (False, [0, 1, 2, 3]))
        self.threads.run_next()
        found = self.reopened("/p")
        assert found is not None
        self.assertEqual((found.complete, found.read(0, size)), (True, body(size)))
        self.assertEqual(self.tmp_files(), [])

    def test_a_publish_whose_sync_fails_drops_the_object_and_is_over(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        obj = store.create(meta_for("/p", SLICE * 4))
        published = store.publish(obj)
        self.threads.fail_next(OSError(errno.EIO, "I/O error"))
        self.assertIsNone(self.successResultOf(published))  # the contact lock is released all the same
        self.assertTrue(obj.evicted)
        self.assertIsNone(self.reopened("/p"))
        self.assertEqual(self.all_files(), [])

    def test_batches_due_during_a_sync_follow_it(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        size = SLICE * 40
        obj = store.create(meta_for("/big", size))
        self.commit(obj, range(35), size)  # due at 16 and at 32: the second waits for the first
        self.assertEqual(len(self.threads.jobs), 1)
        self.threads.run_next()
        self.assertEqual(len(self.threads.jobs), 1)  # the pending 19 start at once
        self.threads.run_next()
        self.assertEqual(self.listed("/big"), list(range(35)))

    def test_failed_sync_drops_the_object(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        obj = store.create(meta_for("/a", 64))
        self.commit(obj, range(4), 64)
        self.threads.fail_next(OSError(errno.EIO, "I/O error"))
        self.assertTrue(obj.evicted)
        self.assertEqual(obj.missing_slices(0, 3), [0, 1, 2, 3])
        # the fill writing into it stops at its next write; nobody reads it again
        self.assertRaises(StoreError, obj.write, 0, body(16))
        self.assertRaises(StoreError, obj.commit_slice, 0)
        self.assertRaises(StoreError, obj.read, 0, 16)
        self.assertFalse(obj.has_slice(0))
        self.assertIsNone(store.get("/a"))
        self.assertEqual(self.all_files(), [])

    def test_dropped_while_syncing(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        obj = store.create(meta_for("/a", 64))
        self.commit(obj, range(4), 64)
        self.assertTrue(store.remove("/a"))
        self.threads.run_next()
        self.assertEqual(self.all_files(), [])
        self.assertIsNone(store.get("/a"))

    def test_store_close_syncs_what_is_pending(self) -> None:
        store = self.open_store(run_in_thread=self.threads)
        size = SLICE * 40
        obj = store.create(meta_for("/big", size))
        self.commit(obj, range(20), size)
        store.close()  # shutdown: everything committed is synced and listed, here and now
        self.assertEqual(self.listed("/big"), list(range(20)))
        self.threads.run_next()  # the batch's own sync finishing later changes nothing
        self.assertEqual(self.listed("/big"), list(range(20)))
