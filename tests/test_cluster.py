"""
A cluster of edges in one data centre: HAProxy (contrib/haproxy.cfg) in front of three
C{twistd h264edge} edges, all on 127.0.0.1, against one origin.  Each clip, with all its seeks,
lands on one edge; HAProxy's HTTP checks of the edges' C{/healthz} take a stopped or hung edge out,
which moves only its share; the viewer's address reaches the edges' access logs and purge guard
through X-Forwarded-For.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from h264edge.testing import MemoryOrigin, listen_origin
from tests.engines import EdgeServer, HAProxy, haproxy_binary
from tests.media import clip, have_ffmpeg

CLIPS = 24

#: Test-only rule: a request carrying this header is, to HAProxy, from the address it names (as if it
#: came from there: `option forwardfor` then appends that address).  Every process here is on
#: 127.0.0.1, and the edges' purge guard accepts loopback viewers: a viewer elsewhere needs this.
VIEWER = "X-Test-Viewer"
AWAY = "198.51.100.7"  # TEST-NET-2: a viewer that is not on the edge's host


class ClusterTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if haproxy_binary() is None:
            raise SkipTest("haproxy is not installed")
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed")
        self.origin = MemoryOrigin()
        port, origin_url = listen_origin(self.origin)
        self.addCleanup(port.stopListening)
        movie = clip("av_faststart.mp4").read_bytes()
        self.files = {f"/c{i}.mp4": movie for i in range(CLIPS)}
        for path, data in self.files.items():
            self.origin.add(path, data, content_type="video/mp4")
        base = self.mktemp()
        self.edges = []
        for i in range(3):
            # HAProxy's connections come from 127.0.0.1: the edges believe its X-Forwarded-For
            edge = EdgeServer(os.path.join(base, f"edge{i + 1}"), f"edge{i + 1}", origin_url,
                              "--trusted-proxy=127.0.0.1")
            self.addCleanup(edge.stop)
            self.edges.append(edge.start())
        frontend = [f"http-request set-src req.hdr({VIEWER}) if {{ req.hdr({VIEWER}) -m found }}"]
        self.haproxy = HAProxy(os.path.join(base, "haproxy"), [e.checked for e in self.edges], frontend=frontend)
        self.addCleanup(self.haproxy.stop)
        self.haproxy.start()
        self.client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    async def request(self, method: str, target: str, **headers: str) -> tuple[int, bytes, Optional[str]]:
        """Status, body and the name of the edge that answered (its Cache-Status member)."""
        response = await self.client.request(method, f"http://127.0.0.1:{self.haproxy.port}{target}",
                                             headers={k.replace("_", "-"): [v] for k, v in headers.items()})
        body = await response.content()
        status = (response.headers.getRawHeaders("Cache-Status") or [""])[-1]
        return response.code, body, status.split(";")[0].strip() or None

    async def get(self, target: str) -> tuple[int, bytes, Optional[str]]:
        return await self.request("GET", target)

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

    async def marked(self, edge: EdgeServer, state: str, after: int = 0, seconds: float = 15.0) -> str:
        """HAProxy's log line marking C{edge} C{state} (UP or DOWN), the first after its first C{after} such lines."""
        for _ in range(int(seconds / 0.05)):
            for line in self.haproxy.server_events(edge.name)[after:]:
                if f" is {state}" in line:
                    return line
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"HAProxy did not mark {edge.name} {state} in {seconds} s:\n{self.haproxy.output()[-3000:]}")

    async def moves_only_its_share(self, gone: EdgeServer, before: dict[str, str], per_edge: dict[str, int]) -> None:
        after = await self.placement(rounds=1)
        moved = {path for path in self.files if after[path] != before[path]}
        self.assertEqual(moved, {path for path, edge in before.items() if edge == gone.name})
        self.assertNotIn(gone.name, after.values())
        for edge in self.edges:
            if edge is not gone:
                gained = sum(1 for path in moved if after[path] == edge.name)
                expected = 2 * (per_edge[edge.name] + gained)
                self.assertEqual(await self.objects(edge, expected), expected, edge.name)

    async def spread(self) -> tuple[dict[str, str], dict[str, int]]:
        """Every clip placed (and cached) on the edge its path hashes to: where each is, how many each edge holds."""
        before = await self.placement()
        per_edge = {e.name: sum(1 for w in before.values() if w == e.name) for e in self.edges}
        self.assertEqual(sum(per_edge.values()), CLIPS)
        self.assertTrue(all(per_edge.values()), per_edge)
        # every edge cached exactly the clips hashed to it: per clip the object without start/end
        # (the seeks are cut from it) and the one with ?session=x (another key)
        for edge in self.edges:
            self.assertEqual(await self.objects(edge, 2 * per_edge[edge.name]), 2 * per_edge[edge.name], edge.name)
        return before, per_edge

    async def test_each_clip_lands_on_one_edge_and_a_stopped_edge_moves_only_its_share(self) -> None:
        before, per_edge = await self.spread()
        # HAProxy checked /healthz every 200 ms meanwhile (a second or more), and it passed each time
        self.assertEqual([self.haproxy.server_events(e.name) for e in self.edges], [[], [], []])
        stopped = self.edges[1]
        stopped.stop()  # SIGTERM: it drains, its listeners (admin included) close at once
        line = await self.marked(stopped, "DOWN")
        self.assertIn("Layer4", line)  # the check's connection to /healthz is refused
        await self.moves_only_its_share(stopped, before, per_edge)
        counts = {e.name: e.cached_objects() for e in self.edges if e is not stopped}
        print(f"\nobjects per edge before: {per_edge}; after stopping {stopped.name}: {counts}")

    async def test_a_hung_edge_is_marked_down_by_the_http_check_and_moves_only_its_share(self) -> None:
        """
        A hung edge (SIGSTOP) still completes TCP connections (the kernel does), so a layer-4 check
        keeps it up; the HTTP check of /healthz gets no answer and takes it out.
        """
        before, per_edge = await self.spread()
        hung = self.edges[0]
        assert hung.proc is not None
        ups = len(self.haproxy.server_events(hung.name))
        os.kill(hung.proc.pid, signal.SIGSTOP)
        self.addCleanup(lambda: hung.proc is not None and os.kill(hung.proc.pid, signal.SIGCONT))
        line = await self.marked(hung, "DOWN", after=ups)
        self.assertIn("Layer7 timeout", line)
        await self.moves_only_its_share(hung, before, per_edge)
        os.kill(hung.proc.pid, signal.SIGCONT)  # it answers again: rise 2, and its clips hash back to it
        await self.marked(hung, "UP", after=ups + 1)
        code, _, edge = await self.get(next(path for path, e in before.items() if e == hung.name))
        self.assertEqual((code, edge), (200, hung.name))

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

    def edge(self, name: Optional[str]) -> EdgeServer:
        return next(e for e in self.edges if e.name == name)

    async def clients(self, edge: EdgeServer, request: str, count: int) -> list[str]:
        """The client addresses of C{edge}'s access log lines for C{request} ("GET /a"), once there are C{count} (or after 5 s)."""
        for _ in range(100):
            found = [line.split(" ")[0] for line in edge.access_lines() if f'"{request} ' in line]
            if len(found) >= count:
                break
            await deferLater(reactor, 0.05, lambda: None)
        return found

    async def test_the_viewers_address_reaches_the_access_log_the_origin_and_the_purge_guard(self) -> None:
        # the viewer writes an X-Forwarded-For of its own: HAProxy adds the address it came from
        code, _, name = await self.request("GET", "/c1.mp4", X_Forwarded_For="203.0.113.9", **{VIEWER: AWAY})
        self.assertEqual(code, 200)
        edge = self.edge(name)
        self.assertEqual(await self.clients(edge, "GET /c1.mp4", 1), [AWAY])
        # toward the origin the edge appends the address it got the request from (HAProxy's)
        fetches = [e for e in self.origin.log if e.method == "GET"]  # not the edges' HEAD probes at start
        self.assertEqual({e.headers.get("x-forwarded-for") for e in fetches}, {f"203.0.113.9, {AWAY}, 127.0.0.1"})
        fetched = len(fetches)
        # a purge from away is refused by the edge, also when it claims to be loopback
        for claimed in ({}, {"X_Forwarded_For": "127.0.0.1"}):
            code, body, _ = await self.request("PURGE", "/c1.mp4", **claimed, **{VIEWER: AWAY})
            self.assertEqual(code, 403, claimed)
            self.assertIn(b"loopback clients only", body)  # the edge's refusal, not HAProxy's
        self.assertEqual(await self.get("/c1.mp4"), (200, self.files["/c1.mp4"], name))
        self.assertEqual(len([e for e in self.origin.log if e.method == "GET"]), fetched, "refused purges dropped nothing")
        # a viewer on the edge's host (HAProxy's own address, 127.0.0.1): accepted by the edge caching it
        code, _, _ = await self.request("PURGE", "/c1.mp4")
        self.assertEqual(code, 200)
        self.assertEqual(await self.get("/c1.mp4"), (200, self.files["/c1.mp4"], name))
        self.assertGreater(len([e for e in self.origin.log if e.method == "GET"]), fetched,
                           "the purge dropped the clip: fetched again")
        self.assertEqual(await self.clients(edge, "PURGE /c1.mp4", 3), [AWAY, AWAY, "127.0.0.1"])
