"""
The README's embedding snippet, run verbatim (taken from README.md) against a real origin: the edge
mounted at /video asks the origin for the path below it, keys and purges by it, and never runs
fdatasync on the reactor thread.  Also the mount point rule itself (L{path_below_mount}).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyRequest

from h264edge.testing import MemoryOrigin, listen_origin
from h264edge.web.resource import path_below_mount
from tests.edgekit import random_bytes

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_snippet(heading: str) -> str:
    """The first indented code block after C{heading} in README.md, as code."""
    lines = README.read_text().splitlines()
    start = lines.index(heading) + 1
    block: list[str] = []
    for line in lines[start:]:
        if line.startswith("    ") or (block and not line.strip()):
            block.append(line[4:])
        elif block:
            break
    return "\n".join(block).strip() + "\n"


class ReadmeEmbeddingTests(TestCase):
    def setUp(self) -> None:
        self.origin = MemoryOrigin()
        self.origin_port, self.origin_url = listen_origin(self.origin)
        self.addCleanup(self.origin_port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def test_the_snippet_serves_below_its_mount_point_and_syncs_in_threads(self) -> None:
        code = readme_snippet("### Embedding the resource in another Twisted app")
        self.assertIn("def add_video_edge(", code)
        namespace: dict[str, Any] = {"__name__": "readme_snippet"}
        exec(compile(code, str(README), "exec"), namespace)

        on_reactor: list[bool] = []
        real_fdatasync = os.fdatasync

        def fdatasync(fd: int) -> None:
            on_reactor.append(threading.current_thread() is threading.main_thread())
            real_fdatasync(fd)

        self.patch(os, "fdatasync", fdatasync)
        root = Resource()
        edge = namespace["add_video_edge"](root, self.mktemp(), [self.origin_url])
        store = edge.store
        self.addCleanup(store.close)
        self.addCleanup(edge.origin.pool.closeCachedConnections)
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        data = random_bytes(3 * 2**20 + 5)  # several slices: each is synced before it is recorded
        self.origin.add("/clip.bin", data)

        for expected in ("MISS", "HIT"):
            response = await self.client.get(base + "/video/clip.bin")
            body = await response.content()
            self.assertEqual((response.code, response.headers.getRawHeaders("X-Cache")), (200, [expected]))
            self.assertTrue(body == data)
        self.assertEqual([entry.path for entry in self.origin.log], ["/clip.bin"])
        for _ in range(200):  # bounded: 10 s for the sync thread
            if on_reactor and not store._dirty:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(on_reactor)
        self.assertNotIn(True, on_reactor)  # every fdatasync ran in a thread

        response = await self.client.request("PURGE", base + "/video/clip.bin")
        self.assertEqual((response.code, await response.content()), (200, b"purged /clip.bin\n"))
        self.assertEqual(len(store), 0)


    async def test_pass_through_below_a_mount_point(self) -> None:
        from h264edge.origin import OriginClient
        from h264edge.store import SliceStore
        from h264edge.web.resource import EdgeResource

        store = SliceStore(self.mktemp(), max_size=2**30, sync=False)
        self.addCleanup(store.close)
        origin = OriginClient([self.origin_url])
        self.addCleanup(origin.pool.closeCachedConnections)
        root = Resource()
        root.putChild(b"video", EdgeResource(store, origin, pass_methods=["POST"]))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.origin.add("/form.bin", b"ok")
        response = await self.client.post(f"http://127.0.0.1:{port.getHost().port}/video/form.bin?a=%ff", data=b"x=1")
        self.assertEqual((response.code, await response.content()), (200, b"ok"))
        self.assertEqual([(e.method, e.path) for e in self.origin.log], [("POST", "/form.bin?a=%ff")])


class MountTests(SynchronousTestCase):
    def request(self, prepath: list[bytes], postpath: list[bytes]) -> Request:
        request: Any = DummyRequest(postpath)
        request.prepath = prepath
        return request  # type: ignore[no-any-return]

    def test_below_the_mount_point_as_sent(self) -> None:
        self.assertEqual(path_below_mount(self.request([b"video"], [b"a%2Fb.mp4"]), b"/video/a%2Fb.mp4"),
                         b"/a%2Fb.mp4")
        self.assertEqual(path_below_mount(self.request([b"v v", b"x"], [b"c.mp4"]), b"/v%20v/x/c.mp4"), b"/c.mp4")
        self.assertEqual(path_below_mount(self.request([], [b"c.mp4"]), b"/c.mp4"), b"/c.mp4")

    def test_a_rewritten_path_is_rebuilt_from_postpath(self) -> None:
        self.assertEqual(path_below_mount(self.request([b"other"], [b"d/e.mp4"]), b"/video/x.mp4"), b"/d%2Fe.mp4")
