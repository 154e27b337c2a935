"""
The service graph C{twistd h264edge} runs (L{makeService}), started in the test's process on free
ports with a real origin: for tests of what an operator sees (metrics, logs, pages).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from h264edge.tap import Options, makeService
from h264edge.testing import MemoryOrigin, listen_origin
from tests.running import connects, free_port, until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


class ServedEdgeTestCase(TestCase):
    """The services C{twistd h264edge} runs (makeService), started in this process on free ports."""

    timeout = 120
    extra: tuple[str, ...] = ()
    origin_base: Optional[str] = None  # instead of the test's origin

    def setUp(self) -> Any:
        self.origin = MemoryOrigin()
        self.origin_port, self.origin_url = listen_origin(self.origin)
        self.addCleanup(self.origin_port.stopListening)
        self.port, self.admin_port = free_port(), free_port()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        return self.serve(*self.extra)

    async def serve(self, *extra: str) -> None:
        options = Options()
        options.parseOptions([
            f"--origin={self.origin_base or self.origin_url}", f"--cache-dir={os.path.abspath(self.mktemp())}",
            f"--listen=tcp:{self.port}:interface=127.0.0.1", f"--admin-listen=tcp:{self.admin_port}:interface=127.0.0.1",
            "--no-sync", "--slice-size=64K", *extra,
        ])
        self.options = options
        self.top = makeService(options)
        self.top.privilegedStartService()
        self.top.startService()
        self.addCleanup(self.top.stopService)
        self.metrics = self.top.namedServices.get("metrics") if hasattr(self.top, "namedServices") else None
        await until(lambda: connects(self.admin_port) and connects(self.port))

    async def request(self, path: str, method: str = "GET", port: Optional[int] = None,
                      headers: Optional[dict[str, str]] = None) -> tuple[int, bytes, Any]:
        response = await self.client.request(method, f"http://127.0.0.1:{port or self.port}{path}",
                                             headers=headers or {})
        return response.code, await response.content(), response

    async def admin(self, path: str, method: str = "GET", headers: Optional[dict[str, str]] = None
                    ) -> tuple[int, bytes, Any]:
        return await self.request(path, method, self.admin_port, headers)

    async def scrape(self) -> dict[Any, float]:
        code, body, response = await self.admin("/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(response.headers.getRawHeaders("Content-Type")[0].startswith("text/plain; version=0.0.4"))
        return samples(body.decode())
