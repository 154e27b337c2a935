"""
Edges in tiers (L{h264edge.tiers}): a child edge whose origin is a parent edge whose origin is a real
HTTP origin, all on 127.0.0.1; bytes at each hop counted from each server's own log.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import treq
from hypothesis import given, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from h264edge import tiers
from h264edge.origin import OriginClient
from h264edge.store import SliceStore
from h264edge.testing import MemoryOrigin, listen_origin
from h264edge.web.hot import EdgeSite
from h264edge.web.resource import EdgeResource
from tests.edgekit import SLICE, random_bytes
from tests.media import clip, decode_errors, have_ffmpeg

_LOG_LINE = re.compile(r'"(\w+) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


class ViaTests(SynchronousTestCase):
    def test_names_are_read_from_every_member(self) -> None:
        self.assertEqual(tiers.via_names(["1.1 a, HTTP/1.0 b:8080 (comment)", "1.1 c"]), ["a", "b:8080", "c"])

    def test_a_via_naming_us_is_a_loop(self) -> None:
        self.assertTrue(tiers.is_loop("edge-b", ["1.1 edge-a, 1.1 edge-b"]))
        self.assertFalse(tiers.is_loop("edge-b", ["1.1 edge-bb, 1.1 edge-a"]))

    def test_onward_via_appends_us(self) -> None:
        self.assertEqual(tiers.via_onward("me", []), "1.1 me")
        self.assertEqual(tiers.via_onward("me", ["1.1 a", " 1.1 b "]), "1.1 a, 1.1 b, 1.1 me")

    def test_cache_status_members_follow_the_upstream_ones(self) -> None:
        self.assertEqual(tiers.cache_status("child", "MISS", "parent; hit"), "parent; hit, child; fwd=uri-miss")
        self.assertEqual(tiers.cache_status("child", "HIT"), "child; hit")
        self.assertEqual(tiers.cache_status("child", "PARTIAL", ""), "child; fwd=partial")

    def test_bad_names_are_refused(self) -> None:
        for bad in ("", "a b", "a,b", "x" * 65, "é"):
            self.assertRaises(tiers.BadEdgeName, tiers.check_name, bad)

    @given(st.lists(st.text(max_size=300), max_size=5))
    def test_any_via_parses_or_is_skipped(self, values: list[str]) -> None:
        names = tiers.via_names(values)
        self.assertIsInstance(tiers.is_loop("x", values), bool)
        for name in names:
            self.assertNotIn(",", name)


class Edge:
    """One edge on a real socket with its own access log file."""

    def __init__(self, test: TestCase, name: str, origin_url: str) -> None:
        self.name = name
        self.log_path = test.mktemp()
        self.store = SliceStore(test.mktemp(), max_size=2**30, slice_size=SLICE, sync=False)
        self.origin = OriginClient([origin_url], timeout=5)
        self.resource = EdgeResource(self.store, self.origin, name=name)
        self.site = EdgeSite(self.resource, None, logPath=self.log_path)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/"
        test.addCleanup(self.stop)

    async def stop_async(self) -> None:
        for _ in range(100):
            if not self.resource.filler.busy:
                break
            await deferLater(reactor, 0.05, lambda: None)
        await self.port.stopListening()
        await self.origin.pool.closeCachedConnections()
        self.store.close()

    def stop(self) -> Any:
        return defer.Deferred.fromCoroutine(self.stop_async())

    def log(self) -> list[tuple[str, str, int, int]]:
        """(method, path, status, bytes) of each request this edge answered, from its access log."""
        self.site.logFile.flush()
        with open(self.log_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        out = []
        for line in lines:
            match = _LOG_LINE.search(line)
            if match:
                method, path, status, sent = match.groups()
                out.append((method, path, int(status), 0 if sent == "-" else int(sent)))
        return out


class TwoTierTests(TestCase):
    """viewer -> child edge -> parent edge -> origin."""

    timeout = 60

    def setUp(self) -> None:
        self.origin = MemoryOrigin()
        port, origin_url = listen_origin(self.origin)
        self.addCleanup(port.stopListening)
        self.parent = Edge(self, "h264edge-parent", origin_url)
        self.child = Edge(self, "h264edge-child", self.parent.url)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def get(self, path: str, headers: Optional[dict[str, str]] = None, edge: Optional[Edge] = None) -> Any:
        response = await self.client.get((edge or self.child).url + path.lstrip("/"), headers=headers or {})
        return response, await response.content()

    async def test_a_cold_range_moves_one_slice_over_each_hop(self) -> None:
        data = random_bytes(10 * SLICE, seed=1)
        self.origin.add("/v.bin", data)
        first, last = 6 * SLICE + 100, 6 * SLICE + 199
        response, body = await self.get("/v.bin", {"Range": f"bytes={first}-{last}"})
        self.assertEqual((response.code, body), (206, data[first : last + 1]))
        self.assertEqual(self.origin.bytes_sent, SLICE)
        self.assertEqual([e.range for e in self.origin.log], [f"bytes={6 * SLICE}-{7 * SLICE - 1}"])
        self.assertEqual([(m, s, n) for m, _, s, n in self.parent.log()], [("GET", 206, SLICE)])
        self.assertEqual([(m, s, n) for m, _, s, n in self.child.log()], [("GET", 206, 100)])

    async def test_each_tier_adds_itself_to_via_and_cache_status(self) -> None:
        self.origin.add("/c.bin", b"c" * 1000)
        response, _ = await self.get("/c.bin")
        headers = response.headers
        self.assertEqual(headers.getRawHeaders("Cache-Status"),
                         ["h264edge-parent; fwd=uri-miss, h264edge-child; fwd=uri-miss"])
        self.assertEqual(headers.getRawHeaders("Via"), ["1.1 h264edge-parent, 1.1 h264edge-child"])
        self.assertEqual(headers.getRawHeaders("X-Cache"), ["MISS"])
        self.assertEqual(self.origin.log[0].headers.get("via"), "1.1 h264edge-child, 1.1 h264edge-parent")
        response, _ = await self.get("/c.bin")
        self.assertEqual(response.headers.getRawHeaders("Cache-Status"),
                         ["h264edge-parent; fwd=uri-miss, h264edge-child; hit"])
        self.assertEqual(response.headers.getRawHeaders("X-Cache"), ["HIT"])
        self.child.store.remove("/c.bin")
        response, _ = await self.get("/c.bin")
        self.assertEqual(response.headers.getRawHeaders("Cache-Status"),
                         ["h264edge-parent; hit, h264edge-child; fwd=uri-miss"])

    async def test_a_cold_seek_into_a_moov_at_end_clip_crosses_both_tiers_in_ranges(self) -> None:
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed")
        original = clip("av_moov_end.mp4").read_bytes()
        self.origin.add("/clip.mp4", original, content_type="video/mp4")
        response, body = await self.get("/clip.mp4?start=12.5")
        self.assertEqual(response.code, 200)
        out = self.mktemp() + ".mp4"
        with open(out, "wb") as f:
            f.write(body)
        self.assertEqual(decode_errors(out), "")
        to_parent = self.origin.bytes_sent
        to_child = sum(n for _, _, _, n in self.parent.log())
        self.assertLess(to_parent, len(original) * 0.6)
        self.assertEqual(to_child, to_parent, "the parent passes on what it fetched, slice for slice")
        self.assertTrue(all(e.range and e.range.startswith("bytes=") for e in self.origin.log))
        self.assertTrue(all(path == "/clip.mp4" for _, path, _, _ in self.parent.log()), self.parent.log())

    async def test_a_request_whose_via_names_the_edge_is_a_508(self) -> None:
        self.origin.add("/l.bin", b"l" * 10)
        response, body = await self.get("/l.bin", {"Via": "1.1 somewhere, 1.1 h264edge-child"})
        self.assertEqual(response.code, 508)
        self.assertIn(b"loop detected", body)
        self.assertEqual(self.origin.requests, 0)


class LoopTests(TestCase):
    """Two edges configured as each other's origin: a request goes round once and is refused."""

    timeout = 30

    async def test_a_loop_of_two_edges_ends_with_an_error_not_a_storm(self) -> None:
        from tests.engines import free_port

        port_b = free_port()
        a = Edge(self, "edge-a", f"http://127.0.0.1:{port_b}/")
        b_store = SliceStore(self.mktemp(), max_size=2**30, slice_size=SLICE, sync=False)
        b_origin = OriginClient([a.url], timeout=5)
        b_resource = EdgeResource(b_store, b_origin, name="edge-b")
        b_site = EdgeSite(b_resource, None)
        b_site.access_log = False
        b_port = reactor.listenTCP(port_b, b_site, interface="127.0.0.1")
        self.addCleanup(b_port.stopListening)
        self.addCleanup(b_origin.pool.closeCachedConnections)
        client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        response = await client.get(a.url + "x.bin")
        await response.content()
        self.assertEqual(response.code, 508)  # the answer at the loop's end, relayed back as it is
        statuses = [s for _, _, s, _ in a.log()]
        self.assertIn(508, statuses)
        self.assertLessEqual(len(statuses), 4)
