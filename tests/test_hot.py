"""
The hot path (L{h264edge.web.hot}): small hits answered by the channel itself must be byte for byte
the normal road's answer, and must never outlive the truth (purge, replacement, staleness, another
process's removal).  A raw keep-alive client on a real socket sees exactly what goes out.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any, Optional

import attrs
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from h264edge.store import ObjectMeta, SliceStore
from h264edge.web.hot import HOT_OBJECT_MAX, HotAnswers, plain_get_target
from tests.edgekit import EdgeTestCase, RawClient, RawResponse, random_bytes


def without_date(answer: RawResponse) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", answer.head) + answer.body


def exchange(port: int, requests: list[bytes], *, pipeline: bool = False, split: bool = False,
             receive_buffer: Optional[int] = None, pause: float = 0.0) -> list[RawResponse]:
    """
    Send each raw request on ONE connection and read its answer (all at once when C{pipeline}; a head
    in two writes when C{split}; reading only after C{pause} seconds); runs in a thread.
    """
    client = RawClient(port, rcvbuf=receive_buffer)
    answers = []
    try:
        if pipeline:
            client.send(b"".join(requests))
        for raw in requests:
            if not pipeline:
                if split:
                    client.send(raw[:7])
                    time.sleep(0.02)
                    client.send(raw[7:])
                else:
                    client.send(raw)
            if pause:
                time.sleep(pause)
            answers.append(client.read_response(head_only=raw.startswith(b"HEAD ")))
    finally:
        client.close()
    return answers


def get(path: str, *extra: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1", *extra, "", ""]
    return "\r\n".join(lines).encode()


class HotEdgeTests(EdgeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.data = random_bytes(16 * 1024, seed=7)
        self.origin.add("/small.bin", self.data)

    def start_edge(self, origins: Optional[list[str]] = None, **kwargs: Any) -> None:
        kwargs.setdefault("hot_bytes", 1 << 20)
        super().start_edge(origins, **kwargs)

    @property
    def port(self) -> int:
        return int(self.edge_port.getHost().port)

    async def warm(self, path: str = "/small.bin") -> list[RawResponse]:
        """MISS, then a HIT by the normal road (which records the answer), then one from the hot path."""
        answers = await deferToThread(exchange, self.port, [get(path)] * 3)
        self.assertEqual([a.header("X-Cache") for a in answers], ["MISS", "HIT", "HIT"])
        return answers

    async def test_hot_answer_is_the_normal_answer(self) -> None:
        answers = await self.warm()
        self.assertEqual(self.edge.hot.hits, 1)
        self.assertEqual(answers[2].body, self.data)
        self.assertEqual(without_date(answers[2]), without_date(answers[1]))
        self.assertIsNotNone(answers[2].header("Date"))
        self.assertEqual(self.origin.requests, 1)
        more = await deferToThread(exchange, self.port, [get("/small.bin", "User-Agent: x", "Accept: */*",
                                                             "Connection: keep-alive")] * 5)
        self.assertEqual(self.edge.hot.hits, 6)
        self.assertEqual({without_date(a) for a in more}, {without_date(answers[1])})

    async def test_requests_that_change_the_answer_take_the_normal_road(self) -> None:
        await self.warm()
        hits = self.edge.hot.hits
        ranged, conditional, head, unknown, closing = await deferToThread(exchange, self.port, [
            get("/small.bin", "Range: bytes=10-19"),
            get("/small.bin", 'If-None-Match: "nope", ' + self.origin.files["/small.bin"].etag),
            get("/small.bin", method="HEAD"),
            get("/small.bin", "X-Whatever: 1"),
            get("/small.bin", "Connection: close"),
        ])
        [old] = await deferToThread(exchange, self.port, [get("/small.bin", version="HTTP/1.0")])
        self.assertEqual(self.edge.hot.hits, hits)
        self.assertEqual((ranged.status, ranged.body), (206, self.data[10:20]))
        self.assertEqual((conditional.status, conditional.body), (304, b""))
        self.assertEqual((head.status, head.header("Content-Length")), (200, str(len(self.data))))
        self.assertTrue(old.head.startswith(b"HTTP/1.0 200"))
        self.assertEqual(old.body, self.data)
        self.assertEqual(unknown.body, self.data)
        self.assertEqual((closing.header("Connection"), closing.body), ("close", self.data))
        # a closing answer is never what the hot path replays
        after = await deferToThread(exchange, self.port, [get("/small.bin")])
        self.assertIsNone(after[0].header("Connection"))
        self.assertEqual(self.edge.hot.hits, hits + 1)

    async def test_split_and_pipelined_heads(self) -> None:
        await self.warm()
        hits = self.edge.hot.hits
        split = await deferToThread(exchange, self.port, [get("/small.bin")] * 2, split=True)
        self.assertEqual(self.edge.hot.hits, hits)  # a head in pieces: the normal road
        # several heads at once: the normal road, until only one is left with the channel idle
        piped = await deferToThread(exchange, self.port, [get("/small.bin", "Range: bytes=0-0"), get("/small.bin"),
                                                          get("/small.bin")], pipeline=True)
        self.assertEqual([a.body for a in split], [self.data] * 2)
        self.assertEqual([a.body for a in piped], [self.data[:1], self.data, self.data])
        self.assertEqual([a.status for a in piped], [206, 200, 200])

    async def test_bare_crlf_between_requests(self) -> None:
        await self.warm()

        def crlf_then_get() -> list[RawResponse]:
            client = RawClient(self.port)
            answers = []
            try:
                for _ in range(3):
                    client.send(b"\r\n")  # tolerated before a request (Twisted ignores one)
                    time.sleep(0.05)
                    client.send(get("/small.bin"))
                    answers.append(client.read_response())
            finally:
                client.close()
            return answers

        answers = await deferToThread(crlf_then_get)
        self.assertEqual([(a.status, a.body) for a in answers], [(200, self.data)] * 3)

    async def test_browser_metadata_headers_keep_the_hot_path(self) -> None:
        await self.warm()
        hits = self.edge.hot.hits
        answers = await deferToThread(exchange, self.port, [get(
            "/small.bin", "Sec-Fetch-Mode: no-cors", "Sec-Fetch-Dest: video", 'Sec-Ch-Ua: "x";v="1"',
            "Accept-Language: en", "Connection: keep-alive")] * 2)
        self.assertEqual([a.body for a in answers], [self.data] * 2)
        self.assertEqual(self.edge.hot.hits, hits + 2)

    async def test_purge_and_new_content(self) -> None:
        await self.warm()
        new = random_bytes(16 * 1024, seed=8)
        self.origin.add("/small.bin", new)
        purge, first, second, third = await deferToThread(exchange, self.port, [
            get("/small.bin", method="PURGE"), get("/small.bin"), get("/small.bin"), get("/small.bin")])
        self.assertEqual(purge.status, 200)
        self.assertEqual([first.header("X-Cache"), first.body], ["MISS", new])
        self.assertEqual([second.body, third.body], [new, new])
        self.assertEqual(self.edge.hot.hits, 2)  # the old answer never again; the new one from its 2nd hit on

    async def test_stale_object_is_revalidated(self) -> None:
        self.origin.add("/short.bin", self.data, cache_control="max-age=1")
        await self.warm("/short.bin")
        await self.settle(1.1)
        answers = await deferToThread(exchange, self.port, [get("/short.bin")] * 3)
        # the stale copy went to the origin first (a 304: REVALIDATED), the next HIT by the normal road
        # recorded the refreshed answer, and the hot path had the third
        self.assertEqual([entry.code for entry in self.origin.log], [206, 304])  # the edge always asks with Range
        self.assertEqual([a.body for a in answers], [self.data] * 3)
        self.assertEqual([a.header("X-Cache") for a in answers], ["REVALIDATED", "HIT", "HIT"])
        self.assertEqual(self.edge.hot.hits, 1 + 1)

    async def test_objects_over_the_limit_and_seeks_are_not_kept(self) -> None:
        self.origin.add("/big.bin", random_bytes(HOT_OBJECT_MAX + 1, seed=9))
        answers = await deferToThread(exchange, self.port, [get("/big.bin")] * 3 + [get("/small.bin?x=1")] * 3)
        self.assertEqual(len(self.edge.hot), 1)
        self.assertEqual(self.edge.hot.hits, 1)
        self.assertEqual(answers[2].body, self.origin.files["/big.bin"].data)

    async def test_slow_reader_gets_every_byte_in_order(self) -> None:
        data = random_bytes(HOT_OBJECT_MAX, seed=10)
        self.origin.add("/full.bin", data)
        channels: list[Any] = []
        build = self.site.buildProtocol

        def keep(addr: Any) -> Any:
            channel = build(addr)
            channels.append(channel)
            return channel

        self.site.buildProtocol = keep  # type: ignore[method-assign]
        await deferToThread(exchange, self.port, [get("/full.bin")] * 2)

        def shrink_then_exchange() -> list[RawResponse]:
            return exchange(self.port, [get("/full.bin")] * 4, receive_buffer=4096, pause=0.1)

        # the server's send buffer too: most of each answer waits in the transport
        reactor.callLater(0.03, lambda: [c.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                                          for c in channels if c.transport is not None and c.transport.connected])
        answers = await deferToThread(shrink_then_exchange)
        self.assertEqual([a.body for a in answers], [data] * 4)
        self.assertGreaterEqual(self.edge.hot.hits, 3)

    async def test_hot_path_off(self) -> None:
        await self.restart_edge(hot_bytes=0)
        answers = await deferToThread(exchange, self.port, [get("/small.bin")] * 3)
        self.assertIsNone(self.edge.hot)
        self.assertEqual([a.body for a in answers], [self.data] * 3)


class FirstReadTests(EdgeTestCase):
    """A new connection's first request is read as the connection is accepted (HotChannel.connectionMade)."""

    @property
    def port(self) -> int:
        return int(self.edge_port.getHost().port)

    async def test_request_sent_with_the_connection_is_read_at_accept(self) -> None:
        from h264edge.web.hot import HotChannel

        self.origin.add("/a.bin", random_bytes(1000, seed=3))
        inside = []
        made, received = HotChannel.connectionMade, HotChannel.dataReceived

        def connection_made(channel: HotChannel) -> None:
            channel.accepting = True  # type: ignore[attr-defined]
            made(channel)
            channel.accepting = False  # type: ignore[attr-defined]

        def data_received(channel: HotChannel, data: bytes) -> None:
            inside.append(getattr(channel, "accepting", False))
            received(channel, data)

        self.patch(HotChannel, "connectionMade", connection_made)
        self.patch(HotChannel, "dataReceived", data_received)
        # connect and send while the reactor is not running: the edge accepts with the request there
        quiet = socket.create_connection(("127.0.0.1", self.port))  # sends nothing: the read finds nothing
        closed = socket.create_connection(("127.0.0.1", self.port))
        closed.close()  # gone before it was accepted: its end is seen on a later poll
        client = RawClient(self.port)
        client.send_get("/a.bin")
        answer = await deferToThread(client.read_response)
        client.close()
        self.assertEqual((answer.status, answer.body), (200, self.origin.files["/a.bin"].data))
        self.assertEqual(inside, [True])
        again = await deferToThread(exchange, self.port, [get("/a.bin")])
        self.assertEqual(again[0].status, 200)
        quiet.sendall(get("/a.bin"))  # a request sent later on an idle connection still gets read
        answer = await deferToThread(RawClient.read_response, _Wrapped(quiet))
        quiet.close()
        self.assertEqual(answer.status, 200)


class _Wrapped(RawClient):
    """A RawClient around a socket already connected."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""


class AccessLogTests(EdgeTestCase):
    async def test_hot_answers_are_logged(self) -> None:
        self.origin.add("/small.bin", random_bytes(1000))
        await self.restart_edge(hot_bytes=1 << 20)
        path = self.mktemp()
        self.site.access_log = True
        self.site.logPath = path
        self.site.startFactory()
        port = int(self.edge_port.getHost().port)
        await deferToThread(exchange, port, [get("/small.bin", "User-Agent: probe/1", "Referer: http://r/")] * 3)
        self.site.stopFactory()
        self.assertEqual(self.edge.hot.hits, 1)
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 3)
        # a miss, a hit by the normal road, a hot hit: the same line but for the time and the cache status
        shapes = [re.sub(r"\[[^]]*\]| time=\S+ ttfb=\S+", "", line) for line in lines]
        self.assertEqual(shapes[1], shapes[2], lines)
        self.assertEqual(shapes[0], shapes[1].replace("cache=HIT", "cache=MISS"), lines)
        self.assertTrue(lines[2].startswith('127.0.0.1 - - ['), lines[2])
        self.assertIn('"GET /small.bin HTTP/1.1" 200 1000 "http://r/" "probe/1" cache=HIT time=0.000 ttfb=0.000 cut=0',
                      lines[2])


@attrs.define
class _Request:
    """What L{HotAnswers.record} reads of a twisted.web request."""

    responseHeaders: Headers
    code: int = 200
    code_message: bytes = b"OK"
    clientproto: bytes = b"HTTP/1.1"


def _headers() -> Headers:
    return Headers({b"Server": [b"t"], b"Date": [b"Tue, 14 Nov 2023 22:13:20 GMT"], b"Age": [b"0"],
                    b"Content-Length": [b"4"], b"X-Cache": [b"HIT"]})


class HotAnswersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = SliceStore(self.mktemp(), max_size=1 << 30, slice_size=64 * 1024, sync=False,
                                now=self.clock.seconds)
        self.hot = HotAnswers(self.store, 4096, self.clock)

    def put(self, key: str, data: bytes, ttl: float = 60.0, age: float = 0.0) -> Any:
        now = self.clock.seconds()
        meta = ObjectMeta(key=key, size=len(data), content_type="application/octet-stream", etag='"e"',
                          last_modified=None, fetched_at=now, expires_at=now + ttl, age=age)
        obj = self.store.create(meta)
        obj.write(0, data)
        for index in range(obj.slice_count):
            obj.commit_slice(index)
        return obj

    def test_answer_bytes(self) -> None:
        self.hot.record(b"/a", self.put("/a", b"body"), _Request(_headers()))
        answer = self.hot.answer(b"/a")
        assert answer is not None
        self.assertEqual(answer[0], b"HTTP/1.1 200 OK\r\nServer: t\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
                                    b"Age: 0\r\nContent-Length: 4\r\nX-Cache: HIT\r\n\r\nbody")
        self.assertEqual(answer[1], 4)

    def test_age_is_counted_on_every_answer(self) -> None:
        """RFC 9111 §5.1, §4.2.3: a hot answer's Age is its object's initial age plus the time stored."""
        obj = self.put("/a", b"body", ttl=60, age=7)
        self.hot.record(b"/a", obj, _Request(_headers()))
        self.clock.advance(2.5)
        answer = self.hot.answer(b"/a")
        assert answer is not None
        self.assertIn(b"\r\nAge: 9\r\n", answer[0])
        self.assertIn(b"\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n", answer[0])  # the stored Date, never now

    def test_stale_removed_replaced(self) -> None:
        obj = self.put("/a", b"body", ttl=10)
        self.hot.record(b"/a", obj, _Request(_headers()))
        self.clock.advance(11)
        self.assertIsNone(self.hot.answer(b"/a"))
        self.assertEqual(len(self.hot), 0)
        self.hot.record(b"/a", self.put("/a", b"body"), _Request(_headers()))
        self.assertIsNotNone(self.hot.answer(b"/a"))
        self.store.remove("/a")
        self.assertIsNone(self.hot.answer(b"/a"))
        self.hot.record(b"/a", self.put("/a", b"body"), _Request(_headers()))
        self.put("/a", b"BODY")  # replaced by a new fetch
        self.assertIsNone(self.hot.answer(b"/a"))

    def test_another_process_removes_it(self) -> None:
        self.hot.record(b"/a", self.put("/a", b"body"), _Request(_headers()))
        other = SliceStore(self.store.root, max_size=1 << 30, slice_size=64 * 1024, sync=False)
        for _ in other.rebuild_steps():
            pass
        self.assertTrue(other.remove("/a"))
        self.assertIsNone(self.hot.answer(b"/a"))

    def test_what_is_not_recorded(self) -> None:
        obj = self.put("/a", b"body")
        self.hot.record(b"/1", obj, _Request(_headers(), code=206))
        self.hot.record(b"/2", obj, _Request(_headers(), clientproto=b"HTTP/1.0"))
        closing = _headers()
        closing.setRawHeaders(b"Connection", [b"close"])
        self.hot.record(b"/3", obj, _Request(closing))
        partial = self.store.create(ObjectMeta(key="/p", size=200_000, content_type="x", etag=None,
                                               last_modified=None, fetched_at=0, expires_at=1e12))
        self.hot.record(b"/4", partial, _Request(_headers()))
        self.assertEqual(len(self.hot), 0)

    def test_memory_bound(self) -> None:
        for n in range(20):
            self.hot.record(f"/{n}".encode(), self.put(f"/{n}", bytes(1000)), _Request(_headers()))
            self.assertLessEqual(self.hot.used, 4096)
        self.assertEqual(len(self.hot), 3)
        self.assertIsNotNone(self.hot.answer(b"/19"))
        self.assertIsNone(self.hot.answer(b"/0"))


class PlainGetTests(SynchronousTestCase):
    def test_plain(self) -> None:
        self.assertEqual(plain_get_target(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: y z\r\n\r\n"),
                         (b"/a?b=1", {b"host": b"x", b"user-agent": b"y z"}))
        self.assertEqual(plain_get_target(b"GET / HTTP/1.1\r\n\r\n"), (b"/", {}))

    def test_not_plain(self) -> None:
        for head in [
            b"GET /a HTTP/1.1\r\nHost: x\r\n",  # incomplete
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\n\r\n",  # two requests
            b"HEAD /a HTTP/1.1\r\n\r\n",
            b"get /a HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.0\r\n\r\n",
            b"GET a HTTP/1.1\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nIf-None-Match: *\r\n\r\n",
            b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET /a HTTP/1.1\r\n Host: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\x00\r\n\r\n",
            b"GET /a HTTP/1.1\nHost: x\n\n",
            b"GET /a HTTP/1.1\r\nHost: " + b"x" * 9000 + b"\r\n\r\n",
        ]:
            self.assertIsNone(plain_get_target(head), head)
