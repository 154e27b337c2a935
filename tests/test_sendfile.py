"""
Cache hits on plain TCP go out with os.sendfile: bytes, ranges, keep-alive, pipelining, disconnects
and slow viewers, over real sockets (raw clients run in a thread so they can block).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from zope.interface import implementer

from h264edge._twisted_compat import HEAD_READ_SIZE
from h264edge.plan import Literal, Plan, Span
from h264edge.web import producer
from h264edge.web.producer import PlanProducer
from tests.edgekit import SLICE, EdgeTestCase, RawClient, RawResponse, header, random_bytes

BODY = random_bytes(10 * SLICE + 1234, seed=7)
BIG = random_bytes(8 * 2**20 + 4321, seed=8)


class SendfileTestCase(EdgeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.warnings: list[dict[str, Any]] = []

        @implementer(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level", LogLevel.info) >= LogLevel.warn:
                self.warnings.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    @property
    def port(self) -> int:
        return int(self.edge_port.getHost().port)  # type: ignore[misc]

    def sendfile_bytes(self) -> int:
        return producer.counters.bytes

    async def warm(self, path: str, data: bytes) -> None:
        self.origin.add(path, data)
        response, body = await self.get(path)
        self.assertEqual(body, data)
        await self.settle()

    def in_thread(self, f: Any, *args: Any) -> Any:
        return deferToThread(f, *args)


class HitTests(SendfileTestCase):
    async def test_whole_hit_goes_out_by_sendfile_byte_identical(self) -> None:
        await self.warm("/w.bin", BODY)
        before, answers = self.sendfile_bytes(), producer.counters.answers
        response, body = await self.get("/w.bin")
        self.assertEqual(header(response, "X-Cache"), "HIT")
        self.assertEqual(body, BODY)
        self.assertEqual(self.sendfile_bytes() - before, len(BODY))
        self.assertEqual(producer.counters.answers - answers, 1)

    async def test_range_hits_are_byte_identical(self) -> None:
        await self.warm("/r.bin", BODY)
        size = len(BODY)
        ranges = [
            (0, 0),
            (0, SLICE - 1),
            (SLICE - 100, SLICE + 100),  # crosses a slice boundary
            (3 * SLICE + 5, 7 * SLICE + 17),  # crosses several
            (size - 1234, size - 1),  # the short last slice
            (5, size - 1),
            (SLICE, 2 * SLICE - 1),  # exactly one slice
        ]
        before = self.sendfile_bytes()
        for first, last in ranges:
            response, body = await self.get("/r.bin", {"Range": f"bytes={first}-{last}"})
            self.assertEqual(response.code, 206)
            self.assertEqual(header(response, "Content-Range"), f"bytes {first}-{last}/{size}")
            self.assertEqual(body, BODY[first : last + 1], (first, last))
        # every range over SENDFILE_MIN went by sendfile; the tiny ones were copied
        big = sum(last - first + 1 for first, last in ranges if last - first + 1 >= producer.SENDFILE_MIN)
        self.assertEqual(self.sendfile_bytes() - before, big)

    async def test_suffix_range_hit(self) -> None:
        await self.warm("/s.bin", BODY)
        response, body = await self.get("/s.bin", {"Range": "bytes=-100000"})
        self.assertEqual(response.code, 206)
        self.assertEqual(body, BODY[-100000:])

    async def test_access_log_counts_sendfile_bytes(self) -> None:
        await self.warm("/log.bin", BODY)
        logged: list[int] = []
        site: Site = self.edge_port.factory
        site.log = lambda request: logged.append(request.sentLength)  # type: ignore[method-assign]
        await self.get("/log.bin")
        await self.get("/log.bin", {"Range": "bytes=100-200099"})
        self.assertEqual(logged, [len(BODY), 200000])

    async def test_head_on_a_hit_sends_no_body(self) -> None:
        await self.warm("/h.bin", BODY)
        response, body = await self.get("/h.bin", method="HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(header(response, "Content-Length"), str(len(BODY)))

    async def test_disabled_sendfile_copies_the_same_bytes(self) -> None:
        await self.warm("/off.bin", BODY)
        self.patch(PlanProducer, "use_sendfile", False)
        before = self.sendfile_bytes()
        response, body = await self.get("/off.bin")
        self.assertEqual(body, BODY)
        self.assertEqual(self.sendfile_bytes(), before)


class ConnectionTests(SendfileTestCase):
    async def test_two_sequential_requests_on_one_connection(self) -> None:
        await self.warm("/k.bin", BODY)
        before = self.sendfile_bytes()

        def talk() -> list[RawResponse]:
            client = RawClient(self.port)
            try:
                client.send_get("/k.bin")
                first = client.read_response()
                client.send_get("/k.bin", "Range: bytes=1000-299999\r\n")
                second = client.read_response()
                return [first, second]
            finally:
                client.close()

        first, second = await self.in_thread(talk)
        self.assertEqual((first.status, second.status), (200, 206))
        self.assertEqual(first.body, BODY)
        self.assertEqual(second.body, BODY[1000:300000])
        self.assertEqual(self.sendfile_bytes() - before, len(BODY) + 299000)

    async def test_pipelined_requests_answer_in_order(self) -> None:
        await self.warm("/p.bin", BODY)

        def talk() -> list[RawResponse]:
            client = RawClient(self.port)
            try:
                client.sock.sendall(
                    b"GET /p.bin HTTP/1.1\r\nHost: e\r\n\r\n"
                    b"GET /p.bin HTTP/1.1\r\nHost: e\r\nRange: bytes=70000-70099\r\n\r\n"
                    b"GET /p.bin HTTP/1.1\r\nHost: e\r\nRange: bytes=65000-600000\r\n\r\n"
                )
                return [client.read_response() for _ in range(3)]
            finally:
                client.close()

        answers = await self.in_thread(talk)
        self.assertEqual([a.status for a in answers], [200, 206, 206])
        self.assertEqual(answers[0].body, BODY)
        self.assertEqual(answers[1].body, BODY[70000:70100])
        self.assertEqual(answers[2].body, BODY[65000:600001])

    async def test_persistent_treq_pool_reuses_the_connection(self) -> None:
        import treq
        from twisted.web.client import Agent, HTTPConnectionPool

        await self.warm("/t.bin", BODY)
        site: Site = self.edge_port.factory
        connections = []
        build = site.buildProtocol

        def counting(addr: Any) -> Any:
            connections.append(addr)
            return build(addr)

        site.buildProtocol = counting  # type: ignore[method-assign]
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
        self.addCleanup(pool.closeCachedConnections)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[arg-type]
        before = self.sendfile_bytes()
        for _ in range(3):
            response = await client.get(self.edge_url + "/t.bin")
            self.assertEqual(await response.content(), BODY)
        self.assertEqual(len(connections), 1)
        self.assertEqual(self.sendfile_bytes() - before, 3 * len(BODY))

    async def _disconnect_mid_body(self, reset: bool) -> None:
        await self.warm("/d.bin", BIG)

        def leave() -> int:
            client = RawClient(self.port, rcvbuf=16384)
            client.send_get("/d.bin")
            return client.read_some_then_close(200000, reset)

        got = await self.in_thread(leave)
        self.assertGreater(got, 0)
        await self.settle(0.2)
        self.assertEqual(self.warnings, [])
        # the edge still serves, whole and by sendfile
        before = self.sendfile_bytes()
        response, body = await self.get("/d.bin")
        self.assertEqual(body, BIG)
        self.assertEqual(self.sendfile_bytes() - before, len(BIG))

    async def test_viewer_closing_mid_body_is_quiet(self) -> None:
        await self._disconnect_mid_body(reset=False)

    async def test_viewer_resetting_mid_body_is_quiet(self) -> None:
        await self._disconnect_mid_body(reset=True)

    async def test_slow_viewer_gets_every_byte(self) -> None:
        await self.warm("/slow.bin", BIG)
        before = self.sendfile_bytes()

        def read_slowly() -> RawResponse:
            client = RawClient(self.port, rcvbuf=8192)
            try:
                client.send_get("/slow.bin")
                return client.read_response(piece=32768, delay=0.0005)
            finally:
                client.close()

        started = time.monotonic()
        answer = await self.in_thread(read_slowly)
        self.assertLess(time.monotonic() - started, 60)
        self.assertEqual(answer.body, BIG)
        self.assertEqual(self.sendfile_bytes() - before, len(BIG))

    async def test_many_concurrent_hits(self) -> None:
        from twisted.internet import defer

        await self.warm("/c.bin", BIG)
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.get("/c.bin")) for _ in range(6)]
        )
        for response, body in results:
            self.assertEqual(body, BIG)


class FillTests(SendfileTestCase):
    async def test_miss_is_read_while_written(self) -> None:
        self.origin.add("/m.bin", BODY)
        self.origin.dribble = (16 * 1024, 0.001)
        response, body = await self.get("/m.bin")
        self.assertEqual(header(response, "X-Cache"), "MISS")
        self.assertEqual(body, BODY)
        self.assertEqual(self.origin.bytes_sent, len(BODY))

    async def test_partial_hit_sends_what_is_present_and_waits_for_the_rest(self) -> None:
        self.origin.add("/part.bin", BODY)
        for first, last in ((0, 3 * SLICE - 1), (6 * SLICE, 8 * SLICE - 1)):
            response, body = await self.get("/part.bin", {"Range": f"bytes={first}-{last}"})
            self.assertEqual(body, BODY[first : last + 1])
        await self.settle()
        self.origin.dribble = (16 * 1024, 0.001)
        before = self.sendfile_bytes()
        response, body = await self.get("/part.bin")
        self.assertEqual(header(response, "X-Cache"), "PARTIAL")
        self.assertEqual(body, BODY)
        self.assertGreaterEqual(self.sendfile_bytes() - before, 5 * SLICE)
        self.assertEqual(self.origin.bytes_sent, len(BODY))

    async def test_a_miss_at_the_fill_frontier_streams_in_one_run(self) -> None:
        self.origin.add("/f.bin", BODY)
        self.origin.dribble = (16 * 1024, 0.002)  # 41 pieces: the viewer keeps catching up with the fill
        runs, parks, before = producer.counters.runs, producer.counters.parks, self.sendfile_bytes()
        response, body = await self.get("/f.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("MISS", BODY))
        # all but the body's first bytes, read with the origin's head (at most HEAD_READ_SIZE: under
        # SENDFILE_MIN, they are copied)
        self.assertGreaterEqual(self.sendfile_bytes() - before, len(BODY) - HEAD_READ_SIZE)
        # the run waits at the frontier for the next piece instead of ending and starting anew
        self.assertLessEqual(producer.counters.runs - runs, 2)
        self.assertGreater(producer.counters.parks - parks, 0)

    async def test_a_fill_failing_at_the_frontier_cuts_the_answer_short(self) -> None:
        import treq

        self.origin.add("/x.bin", BODY)
        self.origin.dribble = (16 * 1024, 0.002)
        self.origin.abort_after = 3 * SLICE + 5000
        self.origin.aborts_left = 100  # every resumption fails too
        runs, parks = producer.counters.runs, producer.counters.parks
        response = await self.client.get(self.edge_url + "/x.bin", unbuffered=True)
        chunks: list[bytes] = []
        with self.assertRaises(Exception):
            await treq.collect(response, chunks.append)
        got = b"".join(chunks)
        self.assertTrue(BODY.startswith(got), "wrong bytes")
        self.assertGreater(len(got), 2 * SLICE)
        self.assertLess(len(got), len(BODY))
        self.assertGreater(self.origin.requests, 2)  # the fill tried to resume while the viewer waited
        self.assertLessEqual(producer.counters.runs - runs, 2)
        self.assertGreater(producer.counters.parks - parks, 0)  # the failure met a waiting run

    async def _leave_at_the_fill_frontier(self, reset: bool) -> None:
        self.origin.add("/v.bin", BODY)
        self.origin.dribble = (16 * 1024, 0.005)
        parks = producer.counters.parks

        def leave() -> int:
            client = RawClient(self.port)
            client.send_get("/v.bin")
            return client.read_some_then_close(3 * 16384, reset=reset)

        self.assertGreater(await self.in_thread(leave), 0)
        self.assertGreater(producer.counters.parks - parks, 0)
        for _ in range(100):  # the fill goes on for the cache (bounded: 5 s)
            if not self.edge.filler.busy:
                break
            await self.settle()
        self.assertEqual(self.warnings, [])
        response, body = await self.get("/v.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", BODY))

    async def test_viewer_closing_at_the_fill_frontier_is_quiet(self) -> None:
        await self._leave_at_the_fill_frontier(reset=False)

    async def test_viewer_resetting_at_the_fill_frontier_is_quiet(self) -> None:
        await self._leave_at_the_fill_frontier(reset=True)


class PlanResource(Resource):
    """Answers with a fixed plan over one cached key, through L{PlanProducer}."""

    isLeaf = True

    def __init__(self, test: EdgeTestCase, key: str, path: str, plan: Plan, content_length: bool) -> None:
        super().__init__()
        self.test, self.key, self.path, self.plan, self.content_length = test, key, path, plan, content_length

    def render_GET(self, request: Request) -> Any:
        obj = self.test.store.get(self.key)
        assert obj is not None
        if self.content_length:
            request.setHeader(b"Content-Length", str(self.plan.length).encode())
        PlanProducer(request, self.plan, {self.key: obj}, {self.key: self.path}, self.test.edge.filler).start()
        return NOT_DONE_YET


class MixedPlanTests(SendfileTestCase):
    async def _serve_plan(self, plan: Plan, content_length: bool) -> bytes:
        resource = PlanResource(self, "/mix.bin", "/mix.bin", plan, content_length)
        site = Site(resource)
        site.log = lambda request: None  # type: ignore[method-assign]
        port: Any = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type, call-overload]
        self.addCleanup(port.stopListening)
        response = await self.client.get(f"http://127.0.0.1:{port.getHost().port}/")
        return bytes(await response.content())

    def mixed_plan(self) -> Plan:
        big_literal = random_bytes(3 * 2**20, seed=9)  # fills the transport buffer, so a pause comes first
        return Plan((
            Literal(b"head"),
            Span("/mix.bin", SLICE - 10, 3 * SLICE),
            Literal(big_literal),
            Span("/mix.bin", 0, 100),  # too short for sendfile: copied
            Span("/mix.bin", 5 * SLICE, len(BIG) - 5 * SLICE),
            Literal(b"tail"),
        ))

    async def test_literals_and_spans_interleave_in_order(self) -> None:
        await self.warm("/mix.bin", BIG)
        plan = self.mixed_plan()
        before = self.sendfile_bytes()
        body = await self._serve_plan(plan, content_length=True)
        self.assertEqual(body, plan.render(lambda key, offset, length: BIG[offset : offset + length]))
        self.assertEqual(self.sendfile_bytes() - before, 3 * SLICE + len(BIG) - 5 * SLICE)

    async def test_without_content_length_the_body_is_copied_chunked(self) -> None:
        await self.warm("/mix.bin", BIG)
        plan = self.mixed_plan()
        before = self.sendfile_bytes()
        body = await self._serve_plan(plan, content_length=False)
        self.assertEqual(body, plan.render(lambda key, offset, length: BIG[offset : offset + length]))
        self.assertEqual(self.sendfile_bytes(), before)
