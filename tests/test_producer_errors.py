"""
What the one producer does when the bytes it needs cannot come: a disk that fails a read mid-answer,
and waits for bytes past the end of an object.  Real edge, real origin, real sockets.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import implementer

from h264edge.fill import FillFailed
from h264edge.web.producer import PlanProducer
from tests.edgekit import SLICE, EdgeTestCase, RawClient, header, random_bytes

BODY = random_bytes(10 * SLICE + 1234, seed=11)


class ProducerErrorTestCase(EdgeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []

        @implementer(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level", LogLevel.info) >= LogLevel.warn:
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def warm(self, path: str, data: bytes) -> None:
        self.origin.add(path, data)
        response, body = await self.get(path)
        self.assertEqual(body, data)
        await self.settle()


def _read_until_closed(port: int, path: str) -> tuple[dict[str, str], bytes]:
    """GET C{path} on a raw socket and read its body until it is whole or the server cuts it: (headers, body)."""
    client = RawClient(port)
    client.sock.settimeout(10)
    try:
        client.send_get(path)
        while b"\r\n\r\n" not in client.buffer:
            client._fill()
        head, body = client.buffer.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            while len(body) < int(headers["content-length"]):
                data = client.sock.recv(65536)
                if not data:
                    break
                body += data
        except ConnectionResetError:
            pass
  # an aborted answer: what arrived before the reset is what we got
        return headers, body
    finally:
        client.close()


class DiskReadErrorTests(ProducerErrorTestCase):
    async def test_read_error_mid_answer_cuts_the_answer_short_once_and_drops_the_object(self) -> None:
        await self.warm("/d.bin", BODY)
        obj = self.store.get("/d.bin")  # held: the answer reads this same data file
        assert obj is not None
        fd = obj.fileno()
        self.patch(PlanProducer, "use_sendfile", False)  # the copying path reads with CachedObject.read
        real_pread = os.pread
        failed: list[int] = []

        def pread(descriptor: int, length: int, offset: int) -> bytes:
            if descriptor == fd and offset >= 3 * SLICE:
                failed.append(offset)
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_pread(descriptor, length, offset)

        self.patch(os, "pread", pread)
        headers, body = await deferToThread(_read_until_closed, self.edge_port.getHost().port, "/d.bin")
        self.assertEqual((headers.get("x-cache"), headers.get("content-length")), ("HIT", str(len(BODY))))
        self.assertEqual(len(failed), 1)
        self.assertLess(len(body), len(BODY))
        self.assertTrue(BODY.startswith(body), "bytes of the cut answer differ from the origin's")
        aborts = [e for e in self.events if "aborting" in e.get("log_format", "")]
        self.assertEqual(len(aborts), 1, [e.get("log_format") for e in self.events])
        self.assertFalse([e for e in self.events if "log_failure" in e], "a traceback was logged")
        # nothing of the object is trusted any more: the next viewer gets the origin's bytes again
        self.assertIsNone(self.store.get("/d.bin"))
        self.patch(os, "pread", real_pread)
        response, again = await self.get("/d.bin")
        self.assertEqual(header(response, "X-Cache"), "MISS")
        self.assertTrue(again == BODY)


class WaitPastTheEndTests(ProducerErrorTestCase):
    async def test_a_wait_past_the_end_fails_at_once(self) -> None:
        """
        The end of an object whose last slice is present: no fill will ever bring bytes there (a plan
        that reached past the end, from a lying sample table, waited there for ever).
        """
        await self.warm("/e.bin", BODY)
        obj = self.store.get("/e.bin")
        assert obj is not None and obj.complete
        for offset in (len(BODY), len(BODY) + 1, len(BODY) + 10 * SLICE):
            d = self.edge.filler.wait(obj, "/e.bin", offset)
            self.assertTrue(d.called, offset)
            self.failureResultOf(d, FillFailed)

    async def test_a_wait_past_the_end_of_an_object_being_filled_fails_at_once(self) -> None:
        self.origin.add("/f.bin", BODY)
        self.origin.dribble = (16 * 1024, 0.002)
        response, body = await self.get("/f.bin", {"Range": "bytes=0-99"})
        obj = self.store.get("/f.bin")
        assert obj is not None
        d = self.edge.filler.wait(obj, "/f.bin", len(BODY))
        self.failureResultOf(d, FillFailed)
