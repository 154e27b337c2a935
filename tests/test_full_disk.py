"""
A cache disk that really fills: the edge on a small tmpfs (see L{tests.smallfs}), a real origin,
every answer compared byte for byte with the origin's.

What must hold: no wrong bytes, every viewer gets a whole answer, the cache recovers (evicts and
caches again, also after a restart), free space stays above the floor (C{min_free}), and objects too
big for the store (transient) stream through a bounded memory, pausing the origin for a slow viewer.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from twisted.internet import defer, task, threads

from h264edge.store._store import DISK_RESERVE
from tests.edgekit import SLICE, EdgeTestCase, header, random_bytes
from tests.media import clip, decode_errors, have_ffmpeg
from tests.smallfs import blind_statvfs, free_bytes, mount_tmpfs

KIB, MIB = 1024, 2**20


class SmallDiskEdgeTestCase(EdgeTestCase):
    """An edge whose cache directory is on a fresh tmpfs of C{disk_size}, free space watched throughout."""

    disk_size = "4m"
    max_size = 64 * MIB  # far more than the disk holds: the disk, not the budget, is the limit
    min_free = 512 * KIB
    stream_buffer = 4 * SLICE

    def setUp(self) -> None:
        self.disk = mount_tmpfs(self, self.disk_size)  # before the edge: unmounted after it stopped
        self.set_store_options()
        super().setUp()
        self.lowest_free = free_bytes(self.disk)
        watch = task.LoopingCall(self._watch_free)
        watch.start(0.002)
        self.addCleanup(watch.stop)

    def set_store_options(self, **changes: Any) -> None:
        options = {"sync": True, "run_in_thread": threads.deferToThread, "min_free": self.min_free,
                   "stream_buffer": self.stream_buffer}
        options.update(changes)
        self.store_options = options

    def start_edge(self, origins: Any = None, **kwargs: Any) -> None:
        self.cache_dir = os.path.join(self.disk, "cache")
        super().start_edge(origins, **kwargs)

    def _watch_free(self) -> None:
        self.lowest_free = min(self.lowest_free, free_bytes(self.disk))

    def add(self, path: str, size: int, seed: int, **kwargs: Any) -> bytes:
        data = random_bytes(size, seed=seed)
        self.origin.add(path, data, **kwargs)
        return data

    async def whole(self, path: str, expected: bytes) -> str:
        """GET C{path}: a 200 with exactly the origin's bytes (not cut, not wrong); its X-Cache."""
        response, body = await self.get(path)
        self.assertEqual(response.code, 200)
        self.assertEqual(len(body), len(expected), f"{path}: {len(body)} of {len(expected)} bytes")
        self.assertTrue(body == expected, f"{path}: wrong bytes")
        return header(response, "X-Cache") or ""

    async def all_whole(self, objects: dict[str, bytes]) -> list[str]:
        """GET every path at once; each must be whole and right."""
        return list(await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.whole(path, data)) for path, data in objects.items()]))

    async def synced(self) -> None:
        """Wait (bounded: 10 s) until no fill is in flight and every batch's sidecar landed."""
        for _ in range(200):
            if not self.edge.filler.busy and not self.store._dirty:
                return
            await self.settle()


class FloorTests(SmallDiskEdgeTestCase):
    async def test_misses_past_a_full_disk_are_whole_and_cached_by_evicting(self) -> None:
        objects = {f"/o{n}.bin": self.add(f"/o{n}.bin", 700 * KIB + n, seed=n) for n in range(12)}  # 8.2 MiB
        for path, data in objects.items():
            self.assertEqual(await self.whole(path, data), "MISS")
            await self.synced()
            self.assertEqual(await self.whole(path, data), "HIT")  # cached: something older made room
        self.assertEqual(self.store.uncached, 0)
        self.assertGreaterEqual(self.lowest_free, self.min_free)
        self.assertEqual(await self.whole("/o0.bin", objects["/o0.bin"]), "MISS")  # long evicted
        self.assertEqual(await self.whole("/o11.bin", objects["/o11.bin"]), "HIT")

    async def test_concurrent_misses_all_whole_and_the_floor_holds(self) -> None:
        self.origin.dribble = (64 * KIB, 0.002)  # every fill of a round in flight at once
        for round in range(4):
            objects = {f"/r{round}-{n}.bin": self.add(f"/r{round}-{n}.bin", 500 * KIB, seed=10 * round + n)
                       for n in range(6)}  # 2.9 MiB a round: from the second on, older rounds make room
            self.assertEqual(await self.all_whole(objects), ["MISS"] * 6)
            await self.synced()
            self.assertEqual(self.store.memory_bytes, 0)
        self.assertGreaterEqual(self.lowest_free, self.min_free)
        self.assertEqual(self.store.uncached, 0)
        self.assertEqual(await self.all_whole(objects), ["HIT"] * 6)

    async def test_fills_in_flight_larger_than_the_disk_stream_from_memory(self) -> None:
        self.origin.dribble = (64 * KIB, 0.002)
        objects = {f"/o{n}.bin": self.add(f"/o{n}.bin", 900 * KIB, seed=n) for n in range(6)}  # 5.3 MiB at once
        await self.all_whole(objects)  # those that found no room went on from memory
        await self.synced()
        # the first ones that the disk could hold are cached, not every fill stopped halfway
        self.assertGreaterEqual(len(self.store), 3)
        self.assertEqual(len(self.store) + self.store.uncached, 6)
        self.assertEqual(self.store.memory_bytes, 0)
        self.assertGreaterEqual(self.lowest_free, self.min_free)
        self.origin.dribble = None
        for path, data in objects.items():  # one at a time, each fits: cached again
            await self.whole(path, data)
            await self.synced()
            self.assertEqual(await self.whole(path, data), "HIT")

    async def test_restart_on_a_full_disk_evicts_to_the_floor_first(self) -> None:
        self.set_store_options(min_free=0)  # the edge of before: it filled the disk
        objects = {f"/o{n}.bin": self.add(f"/o{n}.bin", 700 * KIB, seed=n) for n in range(6)}
        for path, data in objects.items():
            await self.whole(path, data)
        await self.synced()
        with open(os.path.join(self.disk, "ballast"), "wb") as ballast:  # and something else the rest
            try:
                while True:
                    ballast.write(bytes(64 * KIB))
                    ballast.flush()
            except OSError:
                pass
        self.assertLess(free_bytes(self.disk), 64 * KIB)
        self.set_store_options()
        await self.restart_edge()
        self.assertGreaterEqual(free_bytes(self.disk), self.min_free + DISK_RESERVE)
        self.assertGreater(len(self.store), 0)  # only what made room was evicted
        self.lowest_free = free_bytes(self.disk)
        fresh = {f"/n{n}.bin": self.add(f"/n{n}.bin", 600 * KIB, seed=100 + n) for n in range(4)}
        for path, data in fresh.items():
            self.assertEqual(await self.whole(path, data), "MISS")
            await self.synced()
            self.assertEqual(await self.whole(path, data), "HIT")
        self.assertGreaterEqual(self.lowest_free, self.min_free)


class RefusingDiskTests(SmallDiskEdgeTestCase):
    """
    The store's free-space probe is blinded, so it writes until the tmpfs itself answers ENOSPC (as
    when another process fills the disk between the probe and the write).
    """

    disk_size = "3m"
    min_free = 0

    async def test_enospc_during_concurrent_fills_cuts_none_of_them(self) -> None:
        cached = {f"/c{n}.bin": self.add(f"/c{n}.bin", 900 * KIB, seed=n) for n in range(2)}
        for path, data in cached.items():
            await self.whole(path, data)
        await self.synced()
        blind_statvfs(self)
        self.origin.dribble = (64 * KIB, 0.002)
        objects = {f"/o{n}.bin": self.add(f"/o{n}.bin", MIB + n, seed=10 + n) for n in range(6)}
        await self.all_whole(objects)
        self.assertGreater(self.store.uncached, 0)  # the disk really refused some
        await self.synced()
        self.assertEqual(self.store.memory_bytes, 0)  # the uncached ones held memory only while streamed
        again = {path: objects[path] for path in list(objects)[-2:]}
        await self.all_whole(again)
        await self.synced()
        self.assertIn("HIT", await self.all_whole(again))  # and it caches again


class TransientTests(SmallDiskEdgeTestCase):
    disk_size = "1m"
    max_size = 512 * KIB  # objects above it are transient: never written to the cache disk
    min_free = 0

    async def test_an_object_larger_than_the_store_never_touches_the_disk(self) -> None:
        before = free_bytes(self.disk)
        data = self.add("/big.bin", 6 * MIB + 7, seed=3)  # six times the disk
        self.assertEqual(await self.whole("/big.bin", data), "MISS")
        self.assertEqual(self.lowest_free, before)
        self.assertEqual(len(self.store), 0)
        # memory: the ring (stream_buffer) and a slice for its one reader, never the object
        self.assertLessEqual(self.store.memory_peak, self.stream_buffer + SLICE)
        self.assertGreater(self.store.memory_peak, 0)
        await self.synced()
        self.assertEqual(self.store.memory_bytes, 0)
        self.assertEqual(await self.whole("/big.bin", data), "MISS")  # never kept

    async def test_a_slow_viewer_pauses_the_origin(self) -> None:
        data = self.add("/big.bin", 24 * MIB, seed=4)
        port = self.edge_port.getHost().port
        head, got = await threads.deferToThread(_read_head_and_some, port, "/big.bin", 256 * KIB)
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        sock = got.pop()
        received = -1
        for _ in range(100):  # bounded: 10 s for the origin to be paused
            await self.settle(0.1)
            if self.edge.filler.origin_bytes == received:
                break
            received = self.edge.filler.origin_bytes
        else:
            self.fail("the edge kept reading the origin for a viewer that does not read")
        # what the edge took: what went to the viewer and the sockets' kernel buffers, not the object
        self.assertLess(received, len(data) // 2)
        self.assertLessEqual(self.store.memory_bytes, self.stream_buffer + SLICE)
        rest = await threads.deferToThread(_read_to, sock, len(data) - len(got[0]))
        self.assertTrue(got[0] + rest == data, "wrong bytes")
        self.assertLessEqual(self.store.memory_peak, self.stream_buffer + SLICE)

    async def test_a_viewer_paused_past_the_idle_timeout_lets_the_origin_go_and_resumes(self) -> None:
        self.edge.filler.idle_timeout = 0.5
        data = self.add("/big.bin", 24 * MIB, seed=5)
        port = self.edge_port.getHost().port
        head, got = await threads.deferToThread(_read_head_and_some, port, "/big.bin", 256 * KIB)
        sock = got.pop()
        for _ in range(100):  # bounded: 10 s for the paused fill to let its origin connection go
            await self.settle(0.1)
            if not self.edge.filler.busy:
                break
        else:
            self.fail("the paused fill kept its origin connection")
        requests = self.origin.requests
        rest = await threads.deferToThread(_read_to, sock, len(data) - len(got[0]))
        self.assertTrue(got[0] + rest == data, "wrong or missing bytes")
        self.assertGreater(self.origin.requests, requests)  # the rest was asked for again
        self.assertTrue(self.origin.log[-1].range.startswith("bytes="))  # type: ignore[union-attr]

    async def test_a_seek_into_a_transient_clip_with_its_moov_at_the_end(self) -> None:
        await self.check_transient_seek("av_moov_end.mp4", "start=7&end=15")

    async def test_a_seek_into_a_transient_clip_whose_moov_outgrows_the_memory(self) -> None:
        await self.check_transient_seek("long_big_moov.mp4", "start=600&end=610")  # a 770 KB moov

    async def check_transient_seek(self, name: str, query: str) -> None:
        """A seek answered from a transient clip is the one a cache that keeps the clip answers."""
        if not have_ffmpeg():
            self.skipTest("ffmpeg and ffprobe are needed (apt-get install -y ffmpeg)")
        original = clip(name).read_bytes()
        self.assertGreater(len(original), self.max_size)  # transient
        self.origin.add("/t.mp4", original)
        response, body = await self.get(f"/t.mp4?{query}")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.store), 0)
        self.assertLessEqual(self.store.memory_peak, self.stream_buffer + 2 * SLICE)  # readers: parse, answer
        self.max_size = 64 * MIB
        await self.restart_edge()
        self.origin.add("/k.mp4", original)
        kept_response, kept = await self.get(f"/k.mp4?{query}")
        self.assertEqual(kept_response.code, 200)
        self.assertTrue(body == kept, "a transient seek differs from a cached one")
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(body)
        self.assertEqual(decode_errors(path), "")


def _read_head_and_some(port: int, path: str, count: int) -> tuple[bytes, list[Any]]:
    """Send a GET, read its head and C{count} body bytes, then stop reading (the socket stays open)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    head, _, body = buffer.partition(b"\r\n\r\n")
    while len(body) < count:
        body += sock.recv(65536)
    return head, [body, sock]


def _read_to(sock: socket.socket, count: int) -> bytes:
    chunks, got = [], 0
    deadline = time.monotonic() + 60
    try:
        while got < count and time.monotonic() < deadline:
            data = sock.recv(min(1 << 20, count - got))
            if not data:
                break
            chunks.append(data)
            got += len(data)
    finally:
        sock.close()
    return b"".join(chunks)

