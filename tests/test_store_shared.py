"""
Several L{SliceStore}s on one root, as C{--workers} runs them (one per process; here in one process,
which exercises the same disk protocol): what one caches the others serve, what one removes the
others miss, racing creates leave one consistent object, and nobody ever reads wrong bytes.
"""

from __future__ import annotations

import gc
import os

import attrs

from h264edge.store import SliceStore
from h264edge.store._store import ORPHAN_GRACE
from tests.test_store import SLICE, StoreTestCase, body, meta_for, rebuild


class SharedRootTests(StoreTestCase):
    def two(self, **kw: object) -> tuple[SliceStore, SliceStore]:
        return self.open_store(**kw), self.open_store(**kw)  # type: ignore[arg-type]

    def data_files(self) -> list[str]:
        return [f for f in self.all_files() if f.endswith(".data")]

    def test_object_cached_by_one_is_a_hit_in_the_other(self) -> None:
        a, b = self.two()
        self.fill(a, "/clip.mp4", 50, seed=3)
        got = b.get("/clip.mp4")
        assert got is not None
        self.assertTrue(got.complete)
        self.assertEqual(got.read(0, 50), body(50, 3))
        self.assertEqual(b.used_bytes, 50)

    def test_object_not_yet_persisted_is_a_miss_elsewhere(self) -> None:
        a, b = self.two()
        obj = a.create(meta_for("/a", 50))
        obj.write(0, body(16))
        obj.commit_slice(0)  # batched: not on disk yet
        self.assertIsNone(b.get("/a"))

    def test_removal_in_one_is_a_miss_in_the_other(self) -> None:
        a, b = self.two()
        self.fill(a, "/a", 50)
        held = b.get("/a")
        assert held is not None
        self.assertTrue(a.remove("/a"))
        self.assertIsNone(b.get("/a"))
        self.assertEqual(b.used_bytes, 0)
        self.assertEqual(held.read(0, 50), body(50))  # a reader already streaming keeps its bytes
        self.assertFalse(b.remove("/a"))
        self.assertEqual(self.all_files(), [])

    def test_removal_is_a_miss_for_an_entry_without_a_live_handle(self) -> None:
        a, b = self.two()
        self.fill(a, "/a", 50)
        self.assertIsNotNone(b.get("/a"))
        gc.collect()  # b's handle is gone; only its index entry is left
        a.remove("/a")
        self.assertIsNone(b.get("/a"))

    def test_eviction_in_one_is_a_miss_in_the_other(self) -> None:
        a, b = self.open_store(max_size=64), self.open_store()
        self.fill(a, "/old", 48)
        self.assertIsNotNone(b.get("/old"))
        self.clock.advance(1)
        self.fill(a, "/new", 48)  # over a's budget: /old goes
        self.assertIsNone(b.get("/old"))
        self.assertIsNotNone(b.get("/new"))

    def test_sidecar_without_its_data_file_is_a_miss(self) -> None:
        a, b = self.two()
        self.fill(a, "/a", 50)
        for path in self.data_files():
            os.unlink(path)
        self.assertIsNone(b.get("/a"))
        self.assertEqual(self.all_files(), [])

    def test_racing_creates_leave_one_consistent_object(self) -> None:
        a, b = self.two()
        one = a.create(meta_for("/a", 48, etag='"one"'))
        two = b.create(meta_for("/a", 48, etag='"two"'))
        one.write(0, body(48, 1))
        two.write(0, body(48, 2))
        two.commit_slice(0)
        one.commit_slice(0)
        one.commit_slice(1)
        one.commit_slice(2)  # complete: a persists first and owns the key
        for index in (1, 2):
            two.commit_slice(index)  # complete: b finds the key taken and drops its object
        self.assertTrue(two.evicted)
        self.assertEqual(two.read(0, 48), body(48, 2))  # b's readers still get b's own bytes
        for store in (a, b):
            got = store.get("/a")
            assert got is not None
            self.assertEqual(got.meta.etag, '"one"')
            self.assertEqual(got.read(0, 48), body(48, 1))
        self.assertEqual(len(self.data_files()), 1)
        self.assertEqual(b.used_bytes, 48)

    def test_loser_of_a_race_never_serves_the_winners_bitmap_over_its_file(self) -> None:
        a, b = self.two()
        one = a.create(meta_for("/a", 48, etag='"one"'))
        two = b.create(meta_for("/a", 48, etag='"two"'))
        one.write(0, body(48, 1))
        for index in range(3):
            one.commit_slice(index)
        two.write(0, body(16, 2))
        two.commit_slice(0)
        b.close()
        got = b.get("/a")
        assert got is not None
        self.assertIsNot(got, two)
        self.assertEqual(got.read(0, 48), body(48, 1))

    def test_new_representation_in_one_replaces_the_other(self) -> None:
        a, b = self.two()
        old = self.fill(a, "/a", 48, seed=1)
        self.assertIsNotNone(b.get("/a"))
        new = b.create(meta_for("/a", 48, etag='"v2"'))
        new.write(0, body(48, 2))
        for index in range(3):
            new.commit_slice(index)
        got = a.get("/a")
        assert got is not None
        self.assertEqual(got.meta.etag, '"v2"')
        self.assertEqual(got.read(0, 48), body(48, 2))
        self.assertEqual(old.read(0, 48), body(48, 1))
        self.assertEqual(len(self.data_files()), 1)

    def test_removed_object_is_not_brought_back_by_its_filler(self) -> None:
        a, b = self.two()
        obj = a.create(meta_for("/a", 48))
        obj.write(0, body(48))
        obj.commit_slice(0)
        a.close()  # on disk with slice 0
        self.assertTrue(b.remove("/a"))
        obj.commit_slice(1)
        obj.commit_slice(2)  # complete: a finds its sidecar gone and drops the object
        obj.close()
        self.assertTrue(obj.evicted)
        self.assertEqual(self.all_files(), [])
        self.assertIsNone(a.get("/a"))

    def test_slices_filled_by_another_process_are_merged(self) -> None:
        a, b = self.two()
        first = a.create(meta_for("/a", 64))
        first.write(0, body(16))
        first.commit_slice(0)
        a.close()
        second = b.get("/a")
        assert second is not None
        self.assertEqual(second.missing_slices(0, 3), [1, 2, 3])
        second.write(32, body(64)[32:])
        second.commit_slice(2)
        second.commit_slice(3)
        b.close()
        again = a.get("/a")
        assert again is not None
        self.assertEqual(again.missing_slices(0, 3), [1])
        self.assertEqual(again.read(32, 32), body(64)[32:])
        self.assertEqual(a.used_bytes, 48)
        first.write(16, body(64)[16:32])
        first.commit_slice(1)
        first.close()
        self.assertTrue(self.reopen().get("/a").complete)  # type: ignore[union-attr]

    def test_refresh_in_one_reaches_the_other(self) -> None:
        a, b = self.two()
        obj = self.fill(a, "/a", 20)
        self.assertFalse(b.get("/a").meta.is_fresh(6000))  # type: ignore[union-attr]
        a.refresh(obj, attrs.evolve(meta_for("/a", 20), fetched_at=2000.0, expires_at=9000.0))
        self.assertTrue(b.get("/a").meta.is_fresh(6000))  # type: ignore[union-attr]

    def test_eviction_spares_an_object_another_process_used_since(self) -> None:
        a, b = self.open_store(max_size=100), self.open_store()
        self.fill(a, "/popular", 48)
        self.clock.advance(1)
        self.fill(a, "/other", 48)
        self.clock.advance(100)  # later than a's last use of either, and past the lazy touch interval
        self.assertIsNotNone(b.get("/popular"))  # b records its use in the sidecar's mtime
        self.clock.advance(1)
        self.fill(a, "/third", 48)  # a is over budget: its oldest, /popular, was used by b
        self.assertIsNotNone(a.get("/popular"))
        self.assertIsNone(a.get("/other"))

    def test_rebuild_with_grace_leaves_another_process_fill_alone(self) -> None:
        a = self.open_store()
        obj = a.create(meta_for("/a", 48))  # not persisted: no sidecar names its data file yet
        obj.write(0, body(16))
        b = self.open_store(orphan_grace=ORPHAN_GRACE)
        rebuild(b)
        self.assertEqual(len(self.data_files()), 1)
        for index in range(3):
            obj.write(index * SLICE, body(48)[index * SLICE : (index + 1) * SLICE])
            obj.commit_slice(index)
        got = b.get("/a")
        assert got is not None
        self.assertEqual(got.read(0, 48), body(48))

    def test_rebuild_without_grace_removes_unnamed_data_files(self) -> None:
        a = self.open_store()
        a.create(meta_for("/a", 48))
        rebuild(self.open_store())
        self.assertEqual(self.data_files(), [])


class AloneTests(StoreTestCase):
    """C{alone=True} (one edge process on the directory): no disk look for keys the loaded index lacks."""

    def test_a_loaded_lone_store_does_not_look_on_disk_for_keys_it_lacks(self) -> None:
        writer = self.open_store()
        self.fill(writer, "/a", 50)
        lone = self.open_store(alone=True)
        self.assertIsNotNone(lone.get("/a"), "while its index loads, a lone store still looks on disk")
        lone.remove("/a")
        self.fill(writer, "/b", 50)
        rebuild(lone)
        self.fill(writer, "/c", 50)  # another process (here: not supported) writes after the load
        opened: list[str] = []
        real_open = os.open

        def counting_open(path: str, *args: object, **kw: object) -> int:
            opened.append(path)
            return real_open(path, *args, **kw)  # type: ignore[arg-type]

        self.patch(os, "open", counting_open)
        self.assertIsNone(lone.get("/c"))
        self.assertIsNone(lone.get("/missing"))
        self.assertEqual([p for p in opened if p.endswith(".meta")], [])
        self.assertIsNotNone(lone.get("/b"), "what the load indexed is served")
        shared = self.open_store()
        rebuild(shared)
        self.fill(writer, "/d", 50)
        self.assertIsNotNone(shared.get("/d"), "a store shared with other processes finds their objects")
