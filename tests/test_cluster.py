"""
A cluster of edges in one data centre: HAProxy (contrib/haproxy.cfg) in front of three
C{twistd h264edge} edges, all on 127.0.0.1, against one origin.  Each clip, with all its seeks,
lands on one edge; stopping an edge moves only its share.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from h264edge.testing import MemoryOrigin, listen_origin
from tests.media import clip, have_ffmpeg
from tests.engines import EdgeServer, HAProxy, haproxy_binary

CLIPS = 24


class ClusterTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if haproxy_binary() is None:
            raise SkipTest("haproxy is not installed")
        self.origin = MemoryOrigin()
        port, origin_url = listen_origin(self.origin)
        self.addCleanup(port.stopListening)
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed")
        movie = clip("av_faststart.mp4").read_bytes()
        self.files = {f"/c{i}.mp4": movie for i in range(CLIPS)}
        for path, data in self.files.items():
            self.origin.add(path, data, content_type="video/mp4")
        base = self.mktemp()
        self.edges = []
        for i in range(3):
            edge = EdgeServer(os.path.join(base, f"edge{i + 1}"), f"edge{i + 1}", origin_url)
            self.addCleanup(edge.stop)
            self.edges.append(edge.start())
        self.haproxy = HAProxy(os.path.join(base, "haproxy"), [e.port for e in self.edges])
        self.addCleanup(self.haproxy.stop)
        self.haproxy.start()
        self.client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    async def get(self, target: str) -> tuple[int, bytes, Optional[str]]:
        response = await self.client.get(f"http://127.0.0.1:{self.haproxy.port}{target}")
        body = await response.content()
        status = (response.headers.getRawHeaders("Cache-Status") or [""])[-1]
        return response.code, body, status.split(";")[0].strip() or None

    async def placement(self, rounds: int = 2) -> dict[str, str]:
        """Which edge answers each clip (and every target of it: the plain path, with a query)."""
        where: dict[str, str] = {}
        for _ in range(rounds):
            for path, data in self.files.items():
                for target in (path, path + "?start=3", path + "?start=7&end=9", path + "?session=x"):
                    code, body, edge = await self.get(target)
                    self.assertEqual(code, 200, target)
                    if "start" not in target:
                        self.assertEqual(body, data)
                    assert edge is not None
                    self.assertEqual(where.setdefault(path, edge), edge, f"{target} answered by two edges")
        return where

    async def objects(self, edge: EdgeServer, expected: int) -> int:
        """The objects on C{edge}'s disk, once it shows C{expected} (sidecars are written in a thread) or after 5 s."""
        for _ in range(100):
            count = edge.cached_objects()
            if count == expected:
                break
            await deferLater(reactor, 0.05, lambda: None)
        return count

    async def test_each_clip_lands_on_one_edge_and_a_stopped_edge_moves_only_its_share(self) -> None:
        before = await self.placement()
        per_edge = {e.name: sum(1 for w in before.values() if w == e.name) for e in self.edges}
        self.assertEqual(sum(per_edge.values()), CLIPS)
        self.assertTrue(all(per_edge.values()), per_edge)
        # every edge cached exactly the clips hashed to it: per clip the object without start/end
        # (the seeks are cut from it) and the one with ?session=x (another key)
        for edge in self.edges:
            self.assertEqual(await self.objects(edge, 2 * per_edge[edge.name]), 2 * per_edge[edge.name], edge.name)

        stopped = self.edges[1]
        stopped.stop()
        await deferLater(reactor, 1.0, lambda: None)  # HAProxy's checks (200 ms, fall 2) mark it down
        after = await self.placement(rounds=1)
        moved = {path for path in self.files if after[path] != before[path]}
        self.assertEqual(moved, {path for path, edge in before.items() if edge == stopped.name})
        self.assertNotIn(stopped.name, after.values())
        for edge in self.edges:
            if edge is not stopped:
                gained = sum(1 for path in moved if after[path] == edge.name)
                expected = 2 * (per_edge[edge.name] + gained)
                self.assertEqual(await self.objects(edge, expected), expected, edge.name)
        self.counts = (per_edge, {e.name: e.cached_objects() for e in self.edges if e is not stopped})
        print(f"\nobjects per edge before: {per_edge}; after stopping {stopped.name}: {self.counts[1]}")

    async def test_requests_while_an_edge_dies_see_no_errors(self) -> None:
        await self.placement(rounds=1)
        errors = []
        for i in range(3):
            if i == 1:
                self.edges[2].stop()  # its clips' next requests are redispatched (retry-on conn-failure)
            for path, data in self.files.items():
                code, body, _ = await self.get(path)
                if (code, body) != (200, data):
                    errors.append((path, code))
        self.assertEqual(errors, [])
