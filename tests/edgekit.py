"""
Shared set-up for tests that run a real edge against a real origin, both on 127.0.0.1.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Optional

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from h264edge.origin import OriginClient
from h264edge.store import SliceStore
from h264edge.testing import MemoryOrigin, ScriptedOrigin, listen_origin, listen_scripted
from h264edge.web.hot import EdgeSite
from h264edge.web.resource import EdgeResource

SLICE = 64 * 1024


class EdgeTestCase(TestCase):
    """An origin (L{MemoryOrigin}), a store in a temp dir and an edge, each on a real socket."""

    timeout = 120
    slice_size = SLICE
    max_size = 64 * 2**20
    store_options: dict[str, Any] = {"sync": False}
    site_options: dict[str, Any] = {}  # given to EdgeSite (limits=...)

    def setUp(self) -> None:
        self.origin = MemoryOrigin()
        self.origin_port, self.origin_url = listen_origin(self.origin)
        self.addCleanup(self.origin_port.stopListening)
        self.cache_dir = self.mktemp()
        self.start_edge()
        self.client_pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.client_pool))

    def start_edge(self, origins: Optional[list[str]] = None, **kwargs: Any) -> None:
        self.store = SliceStore(self.cache_dir, max_size=self.max_size, slice_size=self.slice_size,
                                **self.store_options)
        self.origin_client = self.make_origin_client(origins or [self.origin_url])
        self.edge = EdgeResource(self.store, self.origin_client, **kwargs)
        site = self.site = EdgeSite(self.edge, self.edge.hot, **self.site_options)
        site.access_log = False
        self.edge_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.edge_url = f"http://127.0.0.1:{self.edge_port.getHost().port}"
        port, pool, store = self.edge_port, self.origin_client.pool, self.store

        filler = self.edge.filler

        async def stop() -> None:
            for _ in range(200):  # let fills in flight land (bounded: 10 s)
                if not filler.busy:
                    break
                await deferLater(reactor, 0.05, lambda: None)
            await port.stopListening()
            await pool.closeCachedConnections()
            store.close()

        self._stop_edge = stop
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self._stop_once(stop)))

    def make_origin_client(self, origins: list[str]) -> OriginClient:
        return OriginClient(origins, timeout=5)

    async def _stop_once(self, stop: Any) -> None:
        if getattr(stop, "done", False):
            return
        stop.done = True
        await stop()

    async def restart_edge(self, **kwargs: Any) -> None:
        await self._stop_once(self._stop_edge)
        self.start_edge(**kwargs)
        # drive the index rebuild to the end, as the IndexLoader service would
        for _ in self.store.rebuild_steps():
            pass

    async def get(self, path: str, headers: Optional[dict[str, str]] = None, method: str = "GET") -> tuple[Any, bytes]:
        response = await self.client.request(method, self.edge_url + path, headers=headers or {},
                                             allow_redirects=False)
        body = await response.content()
        return response, body

    async def settle(self, seconds: float = 0.05) -> None:
        await deferLater(reactor, seconds, lambda: None)


class ScriptedEdgeTestCase(EdgeTestCase):
    """An edge in front of a L{ScriptedOrigin} (C{self.scripted}); the MemoryOrigin stays unused."""

    def setUp(self) -> None:
        self.scripted = ScriptedOrigin()
        port, self.scripted_url = listen_scripted(self.scripted)
        self.addCleanup(port.stopListening)
        super().setUp()

    def start_edge(self, origins: Optional[list[str]] = None, **kwargs: Any) -> None:
        kwargs.setdefault("name", "edge.test")
        super().start_edge(origins or [self.scripted_url], **kwargs)

    async def fetch_ok(self, path: str, headers: Optional[dict[str, str]] = None) -> tuple[Any, bytes]:
        """A GET whose body may be cut short, as (response, body so far or b"<cut>")."""
        response = await self.client.request("GET", self.edge_url + path, headers=headers or {})
        try:
            body = await response.content()
        except Exception:
            body = b"<cut>"
        return response, body


def header(response: Any, name: str) -> Optional[str]:
    values = response.headers.getRawHeaders(name)
    return values[-1] if values else None


def random_bytes(n: int, seed: int = 1) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


class RawResponse:
    """One answer as it came: C{head} is the status line and headers, blank line included, byte for byte."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, head: bytes = b"") -> None:
        self.status, self.headers, self.body, self.head = status, headers, body, head

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())


class RawClient:
    """A blocking HTTP/1.1 client on one socket, for use in a thread."""

    def __init__(self, port: int, rcvbuf: Optional[int] = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def send_get(self, path: str, extra: str = "") -> None:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: edge\r\n{extra}\r\n".encode())

    def _fill(self, piece: int = 65536) -> None:
        data = self.sock.recv(piece)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data

    def read_response(self, piece: int = 65536, delay: float = 0.0, head_only: bool = False) -> RawResponse:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only else int(headers.get("content-length", 0))
        chunks = [self.buffer[:length]]
        got = len(chunks[0])
        self.buffer = self.buffer[length:]
        while got < length:
            data = self.sock.recv(min(piece, length - got))
            if not data:
                raise EOFError(f"short body: {got} of {length}")
            chunks.append(data)
            got += len(data)
            if delay:
                time.sleep(delay)
        return RawResponse(status, headers, b"".join(chunks), head + b"\r\n\r\n")

    def read_some_then_close(self, count: int, reset: bool) -> int:
        got = 0
        while got < count:
            data = self.sock.recv(65536)
            if not data:
                break
            got += len(data)
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        return got

    def close(self) -> None:
        self.sock.close()
