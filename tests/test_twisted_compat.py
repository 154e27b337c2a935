"""
What each function of L{h264edge._twisted_compat} means, checked on the installed Twisted and treq
over real sockets (CI runs this on the oldest Twisted setup.cfg allows and on the newest): when a
Twisted release moves or renames an internal, a test here fails by name.
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Any, Optional

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from h264edge import _twisted_compat as compat
from h264edge.web.limits import LimitedChannel, LimitedSite
from tests.edgekit import EdgeTestCase, random_bytes


def small_window_client(port: int) -> socket.socket:
    """A client socket whose receive buffer is small (set before connecting: shrinking it later stalls TCP)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


async def turn(seconds: float = 0.05) -> None:
    await deferLater(reactor, seconds, lambda: None)


class Held(Resource):
    """Holds every request (NOT_DONE_YET) in C{requests} until the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> Any:  # type: ignore[override]
        self.requests.append(request)
        return NOT_DONE_YET


class RecordingChannel(LimitedChannel):
    instances: list[RecordingChannel] = []
    methods: list[Optional[bytes]] = []

    def connectionMade(self) -> None:
        RecordingChannel.instances.append(self)
        super().connectionMade()

    def allHeadersReceived(self) -> None:
        RecordingChannel.methods.append(compat.pending_method(self))
        super().allHeadersReceived()


class RecordingSite(LimitedSite):
    protocol = RecordingChannel  # type: ignore[assignment]


class ServerSide(protocol.Protocol):
    """The server end of a raw TCP connection, for the transport functions."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class ChannelTests(TestCase):
    def setUp(self) -> None:
        RecordingChannel.instances = []
        RecordingChannel.methods = []
        self.held = Held()
        self.port = reactor.listenTCP(0, RecordingSite(self.held), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.client = small_window_client(self.port.getHost().port)
        self.addCleanup(lambda: defer.ensureDeferred(self.close()))

    async def close(self) -> None:
        self.client.close()
        for channel in RecordingChannel.instances:
            if channel.transport is not None:
                channel.transport.abortConnection()
        await turn()

    async def channel(self) -> RecordingChannel:
        for _ in range(100):  # bounded: 5 s
            if RecordingChannel.instances:
                return RecordingChannel.instances[0]
            await turn()
        raise AssertionError("no connection")

    def test_the_channel_state_is_known_here(self) -> None:
        self.assertTrue(compat.channel_state_known())

    async def test_idle_only_between_requests(self) -> None:
        channel = await self.channel()
        self.assertTrue(compat.channel_is_idle(channel))
        self.client.sendall(b"GET /a HTTP/1.1\r\nHo")
        await turn()
        self.assertFalse(compat.channel_is_idle(channel))  # a head begun
        self.client.sendall(b"st: x\r\n\r\n")
        await turn()
        self.assertEqual(len(self.held.requests), 1)
        self.assertFalse(compat.channel_is_idle(channel))  # a request in flight
        self.held.requests[0].write(b"ok")
        self.held.requests[0].finish()
        await turn()
        self.assertTrue(compat.channel_is_idle(channel))
        self.client.sendall(b"\r\n")  # the bare CRLF Twisted skips once before a request
        await turn()
        self.assertFalse(compat.channel_is_idle(channel))

    async def test_pending_method_is_the_request_lines(self) -> None:
        await self.channel()
        self.client.sendall(b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
        await turn()
        self.assertEqual(RecordingChannel.methods, [b"PUT"])

    async def test_request_disconnected_once_the_client_left(self) -> None:
        await self.channel()
        self.client.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await turn()
        [request] = self.held.requests
        self.assertFalse(compat.request_disconnected(request))
        self.client.close()
        for _ in range(100):
            if compat.request_disconnected(request):
                break
            await turn()
        self.assertTrue(compat.request_disconnected(request))

    async def test_waiting_for_transport_while_the_peer_does_not_read(self) -> None:
        channel = await self.channel()
        self.client.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await turn()
        [request] = self.held.requests
        self.assertFalse(compat.channel_waiting_for_transport(channel))
        request.write(bytes(8 * 2**20))
        await turn()
        self.assertTrue(compat.channel_waiting_for_transport(channel))
        await deferToThread(_read_at_least, self.client, 8 * 2**20)
        await turn()
        self.assertFalse(compat.channel_waiting_for_transport(channel))


def _read_at_least(sock: socket.socket, count: int) -> int:
    got = 0
    while got < count:
        data = sock.recv(2**20)
        if not data:
            break
        got += len(data)
    return got


class TransportTests(TestCase):
    def setUp(self) -> None:
        self.servers: list[ServerSide] = []
        factory = protocol.Factory.forProtocol(self._server)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.client = small_window_client(self.port.getHost().port)
        self.addCleanup(self.client.close)

    def _server(self) -> ServerSide:
        server = ServerSide()
        self.servers.append(server)
        return server

    async def transport(self) -> Any:
        for _ in range(100):  # bounded: 5 s
            if self.servers and self.servers[0].transport is not None:
                return self.servers[0].transport
            await turn()
        raise AssertionError("no connection")

    async def test_plain_tcp_open_connected(self) -> None:
        transport = await self.transport()
        self.assertTrue(compat.plain_tcp(transport))
        self.assertTrue(compat.transport_open(transport) and compat.transport_connected(transport))
        transport.loseConnection()
        self.assertFalse(compat.plain_tcp(transport))  # closing: no direct writes any more
        self.assertFalse(compat.transport_open(transport))
        self.assertTrue(compat.transport_connected(transport))
        await turn()
        self.assertFalse(compat.transport_connected(transport))

    async def test_queued_bytes_flush_now_and_writability(self) -> None:
        transport = await self.transport()
        self.assertEqual(compat.queued_bytes(transport), 0)
        self.assertTrue(compat.socket_writable(transport))
        size = 8 * 2**20
        transport.write(bytes(size))
        self.assertEqual(compat.queued_bytes(transport), size)  # write only buffers
        compat.flush_now(transport)  # sends what the socket takes, now
        self.client.setblocking(False)
        self.assertGreater(len(self.client.recv(65536)), 0)  # arrived without a reactor turn
        self.client.setblocking(True)
        self.assertLess(compat.queued_bytes(transport), size)
        for _ in range(1000):  # bounded; each call sends at most Twisted's SEND_LIMIT
            queued = compat.queued_bytes(transport)
            compat.flush_now(transport)
            if compat.queued_bytes(transport) == queued:
                break
        self.assertGreater(compat.queued_bytes(transport), 0)
        self.assertFalse(compat.socket_writable(transport))  # the peer does not read: its buffers are full
        await deferToThread(_read_at_least, self.client, size - 65536 - 1)
        for _ in range(100):
            if compat.queued_bytes(transport) == 0:
                break
            await turn()
        self.assertEqual(compat.queued_bytes(transport), 0)
        self.assertTrue(compat.socket_writable(transport))

    async def test_send_socket_and_read_now(self) -> None:
        transport = await self.transport()
        self.assertEqual(compat.send_socket(transport).send(b"direct"), 6)
        self.assertEqual(self.client.recv(100), b"direct")
        self.client.sendall(b"ping")
        time.sleep(0.01)  # loopback: the bytes are in the server socket's buffer
        compat.read_now(transport)
        self.assertEqual(b"".join(self.servers[0].received), b"ping")  # read in this very turn

    async def test_producer_slot_and_writable_events(self) -> None:
        transport = await self.transport()
        push = _Push()
        transport.registerProducer(push, True)
        self.assertEqual(compat.transport_producer(transport), (push, True))
        transport.unregisterProducer()
        self.assertEqual(compat.transport_producer(transport), (None, False))
        pull = _Pull()
        transport.registerProducer(pull, False)
        self.assertEqual(compat.transport_producer(transport), (pull, False))
        called = pull.calls
        compat.want_writable(transport)
        await turn()
        self.assertGreater(pull.calls, called)  # the next writable event called the pull producer
        transport.unregisterProducer()

    async def test_close_now_frees_the_descriptor_in_the_call(self) -> None:
        transport = await self.transport()
        lost: list[Any] = []
        self.servers[0].connectionLost = lost.append  # type: ignore[method-assign]
        fd = transport.fileno()
        compat.close_now(transport)
        self.assertEqual(len(lost), 1)  # the protocol knows at once
        self.assertRaises(OSError, os.fstat, fd)  # and the descriptor is closed already
        self.assertEqual(self.client.recv(10), b"")
        await turn()  # the reactor does not meet it again
        self.assertEqual(len(lost), 1)

    async def test_set_read_size(self) -> None:
        transport = await self.transport()
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
        compat.set_read_size(transport, 512 * 1024)
        transport.stopReading()
        await deferToThread(self.client.sendall, bytes(300 * 1024))
        await turn(0.1)
        transport.startReading()
        await turn()
        self.assertGreater(max(len(piece) for piece in self.servers[0].received), 64 * 1024)


@implementer(IPushProducer)
class _Push:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IPullProducer)
class _Pull:
    calls = 0

    def resumeProducing(self) -> None:
        self.calls += 1

    def stopProducing(self) -> None:
        pass


class AccessLogTests(EdgeTestCase):
    async def test_the_sink_writes_lines_like_the_site(self) -> None:
        path = self.mktemp()
        site = Site(Resource(), logPath=path)
        self.assertIsNone(compat.access_log_sink(site))  # not started: logs nowhere yet
        site.startFactory()
        sink = compat.access_log_sink(site)
        assert sink is not None
        write, stamp, formatter = sink
        self.assertTrue(re.fullmatch(r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\]", stamp), stamp)
        write("first line\n")
        site.stopFactory()
        with open(path) as f:
            self.assertEqual(f.read(), "first line\n")

    async def test_reopen_takes_a_new_file_at_the_same_path(self) -> None:
        path = self.mktemp()
        site = Site(Resource(), logPath=path)
        site.startFactory()
        self.addCleanup(site.stopFactory)
        compat.access_log_sink(site)[0]("before\n")  # type: ignore[index]
        os.rename(path, path + ".1")
        compat.reopen_access_log(site)
        compat.access_log_sink(site)[0]("after\n")  # type: ignore[index]
        with open(path + ".1") as old, open(path) as new:
            self.assertEqual((old.read(), new.read()), ("before\n", "after\n"))

    def test_the_sink_of_a_site_logging_into_the_twistd_log(self) -> None:
        site = Site(Resource())
        site.startFactory()
        self.addCleanup(site.stopFactory)
        self.assertIsNotNone(compat.access_log_sink(site))

    async def test_hot_answers_take_the_fast_log_path_here(self) -> None:
        from tests.test_hot import exchange, get

        self.origin.add("/small.bin", random_bytes(1000))
        await self.restart_edge(hot_bytes=1 << 20)
        path = self.mktemp()
        self.site.access_log = True
        self.site.logPath = os.path.abspath(path)
        self.site.startFactory()
        port = int(self.edge_port.getHost().port)
        await deferToThread(exchange, port, [get("/small.bin", "User-Agent: probe/1")] * 3)
        self.site.stopFactory()
        self.assertEqual((self.edge.hot.hits, self.site.fast_log_lines), (1, 1))
        with open(path) as f:
            lines = [re.sub(r"\[[^]]*\]| time=\S+ ttfb=\S+", "", line) for line in f.read().splitlines()]
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[2], lines[1])  # the hot answer's line is the normal road's (but for its times)


class TreqTests(TestCase):
    async def test_raw_response_is_the_agents(self) -> None:
        root = Resource()
        root.putChild(b"x", _Static(b"hello"))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://127.0.0.1:{port.getHost().port}/x", unbuffered=True, pool=pool)
        raw = compat.treq_raw_response(response)
        self.assertTrue(IResponse.providedBy(raw))
        self.assertIsNot(raw, response)
        self.assertIs(compat.treq_raw_response(raw), raw)
        body: defer.Deferred[bytes] = defer.Deferred()
        raw.deliverBody(_Collect(body))
        self.assertEqual(await body, b"hello")


class _Static(Resource):
    isLeaf = True

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def render_GET(self, request: Request) -> bytes:
        return self.data


class _Collect(protocol.Protocol):
    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


class ClientConnectionTests(TestCase):
    """L{compat.strict_client_connections} and L{compat.answer_connection_fields} on Twisted's HTTP client."""

    timeout = 30

    async def test_bytes_after_an_answer_close_its_connection_and_framing_fields_are_told(self) -> None:
        from twisted.web.client import Agent

        from h264edge.testing import Answer, ScriptedOrigin, listen_scripted

        origin = ScriptedOrigin()
        port, url = listen_scripted(origin)
        self.addCleanup(port.stopListening)
        origin.route("/a", lambda r: Answer(200, [("Connection", "X-Hop"), ("X-Hop", "1")], b"a",
                                            then=b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nj"))
        origin.route("/b", lambda r: Answer(200, [], b"b"))
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.assertTrue(compat.strict_client_connections(pool))
        self.addCleanup(pool.closeCachedConnections)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        first = await client.get(url + "a")
        self.assertEqual(await first.content(), b"a")
        self.assertEqual(compat.answer_connection_fields(first), (("Connection", "X-Hop"), ("Content-Length", "1")))
        for _ in range(2):
            response = await client.get(url + "b")
            self.assertEqual(await response.content(), b"b")
        # the connection that got "j" after its answer was not reused; the next one was
        self.assertEqual([r.connection for r in origin.log], [1, 2, 2])

    async def test_an_answer_head_is_read_in_small_reads_its_body_in_large_ones(self) -> None:
        """
        L{compat.set_body_read_size}: the read that brings an answer's head takes at most
        L{16384} bytes (Twisted's parser copies what follows each head line), the
        body's reads up to the size asked for; the next request on the pooled connection again.
        """
        from h264edge.origin import ORIGIN_READ_SIZE, OriginClient
        from h264edge.testing import Answer, ScriptedOrigin, listen_scripted

        origin = ScriptedOrigin()
        port, url = listen_scripted(origin)
        self.addCleanup(port.stopListening)
        body = bytes(range(256)) * 4096  # 1 MiB, written at once
        origin.route("/big", lambda r: Answer(200, [("X-Filler-%d" % i, "x" * 40) for i in range(12)], body))
        client = OriginClient([url], timeout=10)

        async def close() -> None:
            await deferLater(reactor, 0.05, lambda: None)
            await client.pool.closeCachedConnections()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(close()))
        for _ in range(2):
            reply = await client.fetch("/big")
            await deferLater(reactor, 0.05, lambda: None)  # the rest of the body waits in the kernel
            chunks: list[int] = []
            done: defer.Deferred[None] = defer.Deferred()

            class Sizes(protocol.Protocol):
                def dataReceived(self, data: bytes) -> None:
                    chunks.append(len(data))

                def connectionLost(self, reason: Any = None) -> None:
                    done.callback(None)

            reply.deliver(Sizes())
            await done
            self.assertEqual(sum(chunks), len(body))
            self.assertLessEqual(chunks[0], compat.HEAD_READ_SIZE)
            self.assertGreater(max(chunks), 64 * 1024)
            self.assertLessEqual(max(chunks), ORIGIN_READ_SIZE)
        self.assertEqual([r.connection for r in origin.log], [1, 1])
