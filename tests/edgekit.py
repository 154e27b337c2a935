"""
Shared set-up for tests that run a real edge against a real origin, both on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any, Optional

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from h264edge.origin import OriginClient
from h264edge.store import SliceStore
from h264edge.testing import MemoryOrigin, listen_origin
from h264edge.web.hot import EdgeSite
from h264edge.web.resource import EdgeResource

SLICE = 64 * 1024


class EdgeTestCase(TestCase):
    """An origin (L{MemoryOrigin}), a store in a temp dir and an edge, each on a real socket."""

    timeout = 120
    slice_size = SLICE
    max_size = 64 * 2**20
    store_options: dict[str, Any] = {"sync": False}

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
        self.origin_client = OriginClient(origins or [self.origin_url], timeout=5)
        self.edge = EdgeResource(self.store, self.origin_client, **kwargs)
        site = self.site = EdgeSite(self.edge, self.edge.hot)
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
        response = await self.client.request(method, self.edge_url + path, headers=headers or {})
        body = await response.content()
        return response, body

    async def settle(self, seconds: float = 0.05) -> None:
        await deferLater(reactor, seconds, lambda: None)


def header(response: Any, name: str) -> Optional[str]:
    values = response.headers.getRawHeaders(name)
    return values[-1] if values else None


def random_bytes(n: int, seed: int = 1) -> bytes:
    import random

    return random.Random(seed).randbytes(n)
