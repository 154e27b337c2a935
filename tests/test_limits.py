"""
Connection limits (L{h264edge.web.limits}) over real sockets, with small limits: slow peers are cut
(a head sent a byte at a time, a reader that never reads, an idle kept-alive connection), steady
ones are not (a slow reader, a viewer waiting for a slow origin), connection caps close idle
connections first and then answer 503, and request bodies over their cap get 413 before they are
read.  Every client runs in a thread with a socket timeout; every loop is bounded.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any, Optional

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from h264edge.web.limits import ConnectionLimits, default_max_connections
from tests.edgekit import EdgeTestCase, RawClient, random_bytes
from tests.running import child_env

SHORT = 0.5  # the deadlines under test, in seconds


def connect(port: int, source: str = "127.0.0.1", rcvbuf: Optional[int] = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or C{limit} seconds pass (False)."""
    data = b""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        sock.settimeout(max(end - time.monotonic(), 0.01))
        try:
            piece = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return data, True
        except socket.timeout:
            break
        if not piece:
            return data, True
        data += piece
    return data, False


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: edge\r\n{extra}\r\n".encode()


def status_of(answer: bytes) -> Optional[int]:
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer[9:12])


class LimitsTestCase(EdgeTestCase):
    limits = ConnectionLimits(header_timeout=SHORT, idle_timeout=SHORT, send_timeout=SHORT)

    def setUp(self) -> None:
        self.site_options = {"limits": self.limits}
        super().setUp()
        self.origin.add("/small.bin", random_bytes(1000, seed=3))

    @property
    def port(self) -> int:
        return int(self.edge_port.getHost().port)

    async def restart_edge(self, **kwargs: Any) -> None:
        self.site_options = {"limits": self.limits}
        await super().restart_edge(**kwargs)


class SlowPeerTests(LimitsTestCase):
    async def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_header_deadline(self) -> None:
        head = b"GET /small.bin HTTP/1.1\r\nHost: edge\r\nX-Slow: " + b"a" * 200  # never finished

        def dribble() -> tuple[int, bytes]:
            sock = connect(self.port)
            try:
                for sent in range(len(head)):  # bounded: 200 bytes, 20 ms apart, at most 4 s
                    try:
                        sock.sendall(head[sent : sent + 1])
                    except OSError:
                        return sent, b""
                    sock.settimeout(0.02)
                    try:
                        answer = sock.recv(4096)
                    except socket.timeout:
                        continue
                    except OSError:
                        return sent, b""
                    rest, _ = read_until_closed(sock, 5)
                    return sent, answer + rest
                return len(head), b""
            finally:
                sock.close()

        sent, answer = await deferToThread(dribble)
        self.assertEqual(status_of(answer), 408, answer)
        self.assertLess(sent, len(head))
        self.assertEqual(self.site.counters.header_timeouts, 1)

    async def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline(self) -> None:
        def silent() -> tuple[bytes, bool]:
            sock = connect(self.port)
            try:
                return read_until_closed(sock, 5)
            finally:
                sock.close()

        answer, closed = await deferToThread(silent)
        self.assertEqual((answer, closed), (b"", True))
        self.assertEqual(self.site.counters.header_timeouts, 1)

    async def test_an_idle_kept_alive_connection_is_closed_and_a_busy_one_is_not(self) -> None:
        def keep_alive() -> tuple[list[int], bytes, bool]:
            client = RawClient(self.port)
            try:
                codes = []
                for _ in range(4):  # 4 requests, each well within the idle deadline of the one before
                    client.send_get("/small.bin")
                    codes.append(client.read_response().status)
                    time.sleep(SHORT / 3)
                rest, closed = read_until_closed(client.sock, 5)
                return codes, rest, closed
            finally:
                client.close()

        codes, rest, closed = await deferToThread(keep_alive)
        self.assertEqual(codes, [200] * 4)
        self.assertEqual((rest, closed), (b"", True))
        self.assertEqual(self.site.counters.idle_closed, 1)

    async def test_a_reader_that_never_reads_is_dropped(self) -> None:
        size = 8 * 2**20
        self.origin.add("/big.bin", random_bytes(size, seed=4))
        await self.get("/big.bin")  # cached: the answer goes out as fast as the viewer takes it

        def stall() -> tuple[int, bool]:
            sock = connect(self.port, rcvbuf=4096)
            try:
                sock.sendall(get("/big.bin"))
                time.sleep(SHORT * 6)  # reads nothing for a while
                data, closed = read_until_closed(sock, 10)
                return len(data), closed
            finally:
                sock.close()

        got, closed = await deferToThread(stall)
        self.assertTrue(closed)
        self.assertLess(got, size)
        self.assertEqual(self.site.counters.send_timeouts, 1)

    async def test_a_slow_steady_reader_is_not_dropped(self) -> None:
        size = 2**20
        data = random_bytes(size, seed=5)
        self.origin.add("/steady.bin", data)
        await self.get("/steady.bin")

        def steady() -> bytes:
            client = RawClient(self.port, rcvbuf=16384)
            try:
                client.send_get("/steady.bin")
                # 16 KiB every SHORT/5 s: ~13 s for 1 MiB would be too slow for a test; 64 KiB pieces
                return client.read_response(piece=65536, delay=SHORT / 5).body
            finally:
                client.close()

        body = await deferToThread(steady)
        self.assertTrue(body == data)
        self.assertEqual(self.site.counters.send_timeouts, 0)

    async def test_a_viewer_waiting_for_a_slow_origin_is_not_dropped(self) -> None:
        data = random_bytes(200_000, seed=6)
        self.origin.add("/slow.bin", data)
        self.origin.hold_body = SHORT * 4  # headers at once, the body's first byte 2 s later

        def fetch() -> Any:
            client = RawClient(self.port)
            try:
                client.send_get("/slow.bin")
                return client.read_response()
            finally:
                client.close()

        answer = await deferToThread(fetch)
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.body == data)
        self.assertEqual(self.site.counters.send_timeouts, 0)

    async def test_a_closing_connection_whose_peer_does_not_read_is_dropped(self) -> None:
        """An answer written whole before its connection closes (Connection: close) still needs a reader."""
        from twisted.internet import reactor
        from twisted.web.resource import Resource

        from h264edge.web.limits import LimitedSite

        class Whole(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return bytes(8 * 2**20)

        site = LimitedSite(Whole(), limits=self.limits)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def stall() -> tuple[int, bool]:
            sock = connect(port.getHost().port, rcvbuf=4096)
            try:
                sock.sendall(get("/", "Connection: close\r\n"))
                time.sleep(SHORT * 6)
                data, closed = read_until_closed(sock, 10)
                return len(data), closed
            finally:
                sock.close()

        got, closed = await deferToThread(stall)
        self.assertTrue(closed)
        self.assertLess(got, 8 * 2**20)
        self.assertEqual(site.counters.send_timeouts, 1)

    def test_twisted_web_idle_timeout_is_off(self) -> None:
        """The channels keep their own deadlines; twisted.web's idle timeout (60 s, restarted by every byte) is off."""
        self.assertIsNone(self.site.timeOut)


class ConnectionCapTests(LimitsTestCase):
    limits = ConnectionLimits(header_timeout=30, idle_timeout=30, send_timeout=30, max_connections=3)

    async def test_idle_connections_make_room_for_a_new_viewer(self) -> None:
        def crowd() -> tuple[int, list[bool]]:
            idle = [connect(self.port, source=f"127.0.0.{n}") for n in (1, 2, 3)]
            try:
                time.sleep(0.1)
                client = RawClient(self.port)
                try:
                    client.send_get("/small.bin")
                    status = client.read_response().status
                finally:
                    client.close()
                closed = [read_until_closed(sock, 1.0)[1] for sock in idle]
                return status, closed
            finally:
                for sock in idle:
                    sock.close()

        status, closed = await deferToThread(crowd)
        self.assertEqual(status, 200)
        self.assertEqual(closed, [True, False, False])  # the oldest idle one made room
        self.assertEqual(self.site.counters.idle_evicted, 1)

    def hold_requests(self, sources: list[str]) -> list[socket.socket]:
        """Connections each waiting for an answer from a held origin (busy: not idle)."""
        socks = []
        for n, source in enumerate(sources):
            sock = connect(self.port, source=source)
            sock.sendall(get(f"/held{n}.bin"))
            socks.append(sock)
        time.sleep(0.2)
        return socks

    def one_more(self, source: str) -> bytes:
        sock = connect(self.port, source=source)
        try:
            sock.sendall(get("/small.bin"))
            return read_until_closed(sock, 5)[0]
        finally:
            sock.close()

    async def test_at_the_cap_with_no_idle_connection_a_new_one_gets_503(self) -> None:
        for n in range(3):
            self.origin.add(f"/held{n}.bin", random_bytes(1000, seed=n))
        self.origin.hold_body = 1.5

        def crowd() -> bytes:
            held = self.hold_requests(["127.0.0.1", "127.0.0.2", "127.0.0.3"])
            try:
                return self.one_more("127.0.0.4")
            finally:
                for sock in held:
                    sock.close()

        refused = await deferToThread(crowd)
        self.assertEqual(status_of(refused), 503, refused)
        self.assertIn(b"\r\nConnection: close\r\n", refused)
        self.assertEqual(self.site.counters.refused, 1)

    async def test_the_per_address_cap(self) -> None:
        self.limits = ConnectionLimits(header_timeout=30, idle_timeout=30, send_timeout=30, max_connections_per_ip=2)
        await self.restart_edge()
        for n in range(2):
            self.origin.add(f"/held{n}.bin", random_bytes(1000, seed=n))
        self.origin.hold_body = 1.5

        def crowd() -> tuple[bytes, bytes]:
            held = self.hold_requests(["127.0.0.5", "127.0.0.5"])
            try:
                return self.one_more("127.0.0.5"), self.one_more("127.0.0.6")
            finally:
                for sock in held:
                    sock.close()

        same, other = await deferToThread(crowd)
        self.assertEqual(status_of(same), 503, same)
        self.assertEqual(status_of(other), 200, other)

    def test_the_default_cap_follows_the_descriptor_limit(self) -> None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertEqual(default_max_connections(), max(16, (soft - 128) // 2))


class DescriptorLimitTests(SynchronousTestCase):
    """The issue's case: a process with few descriptors, filled with idle connections."""

    def test_idle_connections_do_not_lock_viewers_out_at_the_descriptor_limit(self) -> None:
        from h264edge.testing import MemoryOrigin, listen_origin  # noqa: F401 (the origin runs in the child)

        port_file = self.mktemp()
        script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from twisted.internet import reactor
from h264edge.origin import OriginClient
from h264edge.store import SliceStore
from h264edge.testing import MemoryOrigin, listen_origin
from h264edge.web.hot import EdgeSite
from h264edge.web.resource import EdgeResource
origin = MemoryOrigin()
origin.add("/a.bin", b"x" * 1000)
_, url = listen_origin(origin)
edge = EdgeResource(SliceStore({self.mktemp()!r}, max_size=2**30, sync=False), OriginClient([url]))
port = reactor.listenTCP(0, EdgeSite(edge, None), interface="127.0.0.1")
open({port_file!r}, "w").write(str(port.getHost().port))
reactor.callLater(60, reactor.stop)
reactor.run()
"""
        child = subprocess.Popen([sys.executable, "-c", script], env=child_env())
        idle: list[socket.socket] = []
        try:
            for _ in range(200):  # bounded: 10 s
                if os.path.exists(port_file) and open(port_file).read():
                    break
                time.sleep(0.05)
            port = int(open(port_file).read())
            for _ in range(80):  # more idle connections than the child has descriptors
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                idle.append(sock)
            client = RawClient(port)
            client.sock.settimeout(5)
            try:
                client.send_get("/a.bin")
                answer = client.read_response()
            finally:
                client.close()
            self.assertEqual((answer.status, answer.body), (200, b"x" * 1000))
        finally:
            for sock in idle:
                sock.close()
            child.kill()
            child.wait(10)


class BodyCapTests(LimitsTestCase):
    limits = ConnectionLimits(header_timeout=5, idle_timeout=5, send_timeout=5, max_body=64 * 1024)

    def setUp(self) -> None:
        super().setUp()
        self.spooled: list[Optional[int]] = []
        got_length = http.Request.gotLength

        def recording(request: http.Request, length: Optional[int]) -> None:
            self.spooled.append(length)
            got_length(request, length)

        self.patch(http.Request, "gotLength", recording)

    def exchange(self, head: bytes, body: bytes = b"", more: int = 0) -> bytes:
        """Send C{head} and C{body}, then up to C{more} zero bytes of body while no answer came; the answer."""
        sock = connect(self.port)
        try:
            sock.sendall(head + body)
            for _ in range(0, more, 65536):  # bounded by more
                sock.settimeout(0.02)
                try:
                    answer = sock.recv(65536)
                except socket.timeout:
                    pass
                else:
                    rest, _ = read_until_closed(sock, 5)
                    return answer + rest
                sock.settimeout(2)
                try:
                    sock.sendall(bytes(65536))
                except OSError:
                    break
            return read_until_closed(sock, 5)[0]
        finally:
            sock.close()

    async def test_a_big_body_on_get_is_refused_before_it_is_read(self) -> None:
        head = get("/small.bin", "Content-Length: 400000000\r\n")
        answer = await deferToThread(self.exchange, head, b"", 4 * 2**20)
        self.assertEqual(status_of(answer), 413, answer[:200])
        self.assertEqual(self.spooled, [])  # twisted.web never made a place (memory or temp file) for it
        self.assertEqual(self.site.counters.bodies_refused, 1)

    async def test_a_chunked_body_on_get_is_refused_at_the_cap(self) -> None:
        chunk = b"%x\r\n%s\r\n" % (4096, bytes(4096))
        head = get("/small.bin", "Transfer-Encoding: chunked\r\n")
        answer = await deferToThread(self.exchange, head, chunk * 4)
        self.assertEqual(status_of(answer), 413, answer[:200])

    async def test_head_with_a_body_is_refused(self) -> None:
        head = b"HEAD /small.bin HTTP/1.1\r\nHost: edge\r\nContent-Length: 100000\r\n\r\n"
        answer = await deferToThread(self.exchange, head, bytes(100000))
        self.assertEqual(status_of(answer), 413, answer[:200])

    async def test_a_small_body_on_get_is_read_and_ignored(self) -> None:
        head = get("/small.bin", "Content-Length: 100\r\nConnection: close\r\n")
        answer = await deferToThread(self.exchange, head, bytes(100))
        self.assertEqual(status_of(answer), 200, answer[:200])

    async def test_a_content_length_of_thousands_of_digits_is_413(self) -> None:
        head = get("/small.bin", "Content-Length: " + "9" * 5000 + "\r\n")
        answer = await deferToThread(self.exchange, head)
        self.assertEqual(status_of(answer), 413, answer[:200])

    async def test_pass_through_bodies_up_to_the_cap_reach_the_origin(self) -> None:
        await self.restart_edge(pass_methods=["POST"])
        head = (b"POST /small.bin HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n"
                b"Content-Length: 60000\r\n\r\n")
        answer = await deferToThread(self.exchange, head, bytes(60000))
        self.assertEqual(status_of(answer), 200, answer[:200])
        self.assertEqual([(e.method, e.headers.get("content-length")) for e in self.origin.log],
                         [("POST", "60000")])
        head = b"POST /small.bin HTTP/1.1\r\nHost: edge\r\nContent-Length: 70000\r\n\r\n"
        answer = await deferToThread(self.exchange, head, bytes(70000))
        self.assertEqual(status_of(answer), 413, answer[:200])
        self.assertEqual(len(self.origin.log), 1)


