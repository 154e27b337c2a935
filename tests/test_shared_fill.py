"""
One origin fetch per slice per machine: fills coordinated across the processes (or stores) sharing one
cache directory (L{h264edge.store._fill_locks}), in process with two edges on one directory, and end
to end with C{twistd h264edge --workers=2}.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from typing import Any, Optional

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from h264edge.fill import Filler
from h264edge.origin import OriginClient
from h264edge.store import SliceStore
from h264edge.store._fill_locks import FillLocks
from h264edge.store._store import ORPHAN_GRACE
from h264edge.testing import MemoryOrigin, OriginLog, listen_origin
from h264edge.web.hot import EdgeSite
from h264edge.web.resource import EdgeResource
from tests.edgekit import SLICE, random_bytes
from tests.engines import free_port, wait_for_port

SLICES = 32
VIEWERS = 20
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


def viewer_ranges(seed: int) -> list[tuple[int, int]]:
    """20 closed ranges of 1-3 whole slices, overlapping each other."""
    rng = random.Random(seed)
    ranges = []
    for _ in range(VIEWERS):
        first = rng.randrange(0, SLICES - 3)
        ranges.append((first * SLICE, (first + rng.randint(1, 3)) * SLICE - 1))
    return ranges


def slices_asked(log: list[OriginLog]) -> list[int]:
    """Every slice named by the origin requests' ranges, once per request that named it."""
    asked = []
    for entry in log:
        match = _RANGE.match(entry.range or "")
        assert match is not None, f"an origin request without a closed range: {entry.range!r}"
        first, last = int(match.group(1)), int(match.group(2))
        assert first % SLICE == 0 and (last + 1) % SLICE == 0, entry.range
        asked.extend(range(first // SLICE, (last + 1) // SLICE))
    return asked


def needed(ranges: list[tuple[int, int]]) -> set[int]:
    return {i for first, last in ranges for i in range(first // SLICE, last // SLICE + 1)}


class FillLockTests(SynchronousTestCase):
    def test_a_slice_held_elsewhere_is_not_taken_and_its_count_is_read(self) -> None:
        root = self.mktemp()
        one, two = FillLocks(root).slices("k", "t", 100, 250), FillLocks(root).slices("k", "t", 100, 250)
        self.assertEqual(one.take(2), "taken")
        self.assertEqual(two.take(2), "held")
        self.assertFalse(two.free(2))
        one.wrote(2, 30)
        self.assertEqual(two.written(2), 30)
        one.wrote(2, 50)
        one.release(2)
        self.assertTrue(two.free(2))
        self.assertEqual(two.written(2), 50, "the last slice is 50 bytes: whole")
        self.assertEqual(two.take(2), "whole")
        self.assertTrue(one.take(1) == "taken" and two.take(1) == "held")
        one.wrote(1, 70)
        one.release(1)
        self.assertEqual(two.take(1), "taken", "a slice given up short is fetched again")
        self.assertEqual(one.written(1), 0, "a new taker starts the count again")

    def test_a_contact_is_held_by_one_store_at_a_time_and_dropped_with_its_file(self) -> None:
        root = self.mktemp()
        first = FillLocks(root).contact("key")
        assert first is not None
        self.assertIsNone(FillLocks(root).contact("key"))
        first.release()
        self.assertIsNotNone(FillLocks(root).contact("key"))

    def test_counts_from_before_a_reboot_are_not_believed(self) -> None:
        root = self.mktemp()
        one = FillLocks(root).slices("k", "t", 100, 1000)
        one.take(3)
        one.wrote(3, 100)
        one.release(3)
        with open(one.path, "r+b") as f:
            f.write(b"another boot")
        self.assertEqual(FillLocks(root).slices("k", "t", 100, 1000).written(3), 0)


class TwoEdgesOneDirectoryTests(TestCase):
    """Two edges (each its own store and filler, as two worker processes have) on one cache directory."""

    timeout = 60

    def setUp(self) -> None:
        self.origin = MemoryOrigin()
        self.origin.dribble = (16 * 1024, 0.005)
        port, self.origin_url = listen_origin(self.origin)
        self.addCleanup(port.stopListening)
        self.cache_dir = self.mktemp()
        self.edges = [self.start_edge() for _ in range(2)]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def start_edge(self, origin_url: Optional[str] = None, max_resumes: int = 5) -> str:
        store = SliceStore(self.cache_dir, max_size=2**30, slice_size=SLICE, sync=False, orphan_grace=ORPHAN_GRACE)
        origin = OriginClient([origin_url or self.origin_url], timeout=5)
        filler = Filler(store, origin, max_resumes=max_resumes)
        filler.shared = FillLocks(self.cache_dir)
        edge = EdgeResource(store, origin, filler=filler)
        site = EdgeSite(edge, None)
        site.access_log = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")

        async def stop() -> None:
            for _ in range(200):
                if not filler.busy:
                    break
                await defer.Deferred.fromCoroutine(_sleep(0.05))
            await port.stopListening()
            await origin.pool.closeCachedConnections()
            store.close()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        return f"http://127.0.0.1:{port.getHost().port}"

    async def view(self, base: str, path: str, first: int, last: int) -> tuple[int, bytes]:
        response = await self.client.get(base + path, headers={"Range": f"bytes={first}-{last}"})
        return response.code, await response.content()

    async def test_concurrent_cold_viewers_on_two_edges_fetch_each_slice_once(self) -> None:
        data = random_bytes(SLICES * SLICE, seed=3)
        self.origin.add("/v.bin", data)
        ranges = viewer_ranges(seed=4)
        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self.view(self.edges[i % 2], "/v.bin", first, last))
            for i, (first, last) in enumerate(ranges)
        ])
        for (first, last), (code, body) in zip(ranges, results):
            self.assertEqual((code, body == data[first : last + 1]), (206, True))
        asked = slices_asked(self.origin.log)
        self.assertEqual(sorted(asked), sorted(set(asked)), "a slice was asked of the origin twice")
        self.assertEqual(set(asked), needed(ranges))

    async def test_a_whole_object_filled_by_one_edge_streams_from_the_other(self) -> None:
        data = random_bytes(SLICES * SLICE, seed=5)
        self.origin.add("/w.bin", data)
        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self._whole(self.edges[i % 2], "/w.bin")) for i in range(6)
        ])
        for code, body in results:
            self.assertEqual((code, body == data), (200, True))
        self.assertEqual(len(self.origin.log), 1)
        self.assertEqual(self.origin.bytes_sent, len(data))

    async def _whole(self, base: str, path: str) -> tuple[int, bytes]:
        response = await self.client.get(base + path)
        return response.code, await response.content()

    async def test_a_fill_given_up_by_one_edge_is_taken_over_by_the_other(self) -> None:
        data = random_bytes(8 * SLICE, seed=6)
        flaky = MemoryOrigin()  # the first edge's origin: cuts the body after three slices and a bit
        flaky.dribble = (16 * 1024, 0.01)
        flaky.add("/g.bin", data)
        flaky.abort_after = 3 * SLICE + 100
        flaky.aborts_left = 1
        port, flaky_url = listen_origin(flaky)
        self.addCleanup(port.stopListening)
        self.origin.add("/g.bin", data, etag=flaky.files["/g.bin"].etag)
        first = self.start_edge(flaky_url, max_resumes=0)  # gives up at the cut
        cut = defer.Deferred.fromCoroutine(self._whole(first, "/g.bin"))
        await _sleep(0.1)
        code, body = await self._whole(self.edges[1], "/g.bin")
        self.assertEqual((code, body == data), (200, True))
        self.assertEqual([e.range for e in self.origin.log], [f"bytes={3 * SLICE}-{8 * SLICE - 1}"])
        self.assertFailure(cut, Exception)
        await cut


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


class WorkersEndToEndTests(TestCase):
    """C{twistd -n h264edge --workers=2} in front of an in-process origin that logs each request."""

    timeout = 120

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("needs Linux (SO_REUSEPORT-free socket sharing, OFD locks)")
        self.origin = MemoryOrigin()
        self.origin.dribble = (16 * 1024, 0.005)
        port, self.origin_url = listen_origin(self.origin)
        self.addCleanup(port.stopListening)
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.log = open(os.path.join(self.dir, "edge.log"), "wb")
        self.addCleanup(self.log.close)
        self.proc: Optional[subprocess.Popen[bytes]] = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "h264edge", "--workers=2", f"--origin={self.origin_url}", "--cache-dir=cache", "--slice-size=64K",
             "--no-sync", f"--listen=tcp:{self.port}:interface=127.0.0.1"],
            env=env, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.addCleanup(self.stop)
        wait_for_port(self.port, self.proc)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    async def view(self, path: str, first: int, last: int) -> tuple[int, bytes, str]:
        response = await self.client.get(f"http://127.0.0.1:{self.port}{path}",
                                         headers={"Range": f"bytes={first}-{last}"})
        body = await response.content()
        return response.code, body, (response.headers.getRawHeaders("X-Served-By") or [""])[0]

    async def test_twenty_cold_viewers_on_two_workers_fetch_each_slice_once(self) -> None:
        # both processes must be serving (the worker starts a moment after the parent listens)
        for round_ in range(40):
            path = f"/v{round_}.bin"
            data = random_bytes(SLICES * SLICE, seed=round_)
            self.origin.add(path, data)
            start = len(self.origin.log)
            ranges = viewer_ranges(seed=round_)
            results = await defer.gatherResults([
                defer.Deferred.fromCoroutine(self.view(path, first, last)) for first, last in ranges
            ])
            for (first, last), (code, body, _) in zip(ranges, results):
                self.assertEqual((code, body == data[first : last + 1]), (206, True))
            log = [e for e in self.origin.log[start:] if e.path == path]
            asked = slices_asked(log)
            self.assertEqual(sorted(asked), sorted(set(asked)), f"a slice was asked twice: {[e.range for e in log]}")
            self.assertEqual(set(asked), needed(ranges))
            if len({pid for _, _, pid in results}) == 2:
                return  # this round's viewers were served by both processes
            await _sleep(0.25)
        self.fail("the two processes never both served a round of viewers")
