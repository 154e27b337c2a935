# -*- test-case-name: tests.test_edge -*-
"""
The one producer every answer goes through: it streams a L{Plan}'s parts to a twisted.web request.

Literal parts are written as they are.  Span parts are read from the object's data file in bounded
chunks; where the bytes are not there yet, the producer asks the L{Filler} to fetch them and waits, so
hits, misses, partial hits, seeks and ranges all take the same road.  It is a push producer: when the
viewer's socket buffer is full, Twisted pauses it and nothing more is read until it resumes.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from h264edge.fill import Filler
from h264edge.plan import Literal, Plan
from h264edge.store import CachedObject

log = Logger()

CHUNK = 256 * 1024


@implementer(IPushProducer)
class PlanProducer:
    """
    Streams C{plan} into C{request} and finishes it; on a fill failure mid-body the connection is
    aborted, so the viewer sees a short body (Content-Length tells it) and never wrong bytes.

    @param objects: the cached object for each key a span of the plan names.
    @param paths: the origin path for each key (for fetches of missing slices).
    """

    def __init__(
        self,
        request: Request,
        plan: Plan,
        objects: Mapping[str, CachedObject],
        paths: Mapping[str, str],
        filler: Filler,
        chunk: int = CHUNK,
    ) -> None:
        self.request = request
        self.parts = plan.parts
        self.objects = objects
        self.paths = paths
        self.filler = filler
        self.chunk = chunk
        self._part = 0
        self._done_in_part = 0
        self._paused = False
        self._stopped = False
        self._waiting: Optional[Deferred[None]] = None
        self._pumping = False
        self.sent = 0

    def start(self) -> None:
        self.request.registerProducer(self, True)
        # ask for every missing slice up front so the origin streams while we send what we have
        for part in self.parts:
            if not isinstance(part, Literal) and part.length:
                obj = self.objects[part.key]
                if self.filler.readable(obj, part.offset) < part.length:
                    self.filler.ensure(obj, self.paths[part.key], part.offset, part.offset + part.length - 1)
        self._pump()

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._waiting is None:
            self._pump()

    def stopProducing(self) -> None:
        self._stopped = True

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump_loop()
        finally:
            self._pumping = False

    def _pump_loop(self) -> None:
        while not self._paused and not self._stopped:
            if self._part >= len(self.parts):
                self._finish()
                return
            part = self.parts[self._part]
            remaining = part.length - self._done_in_part
            if remaining == 0:
                self._part += 1
                self._done_in_part = 0
                continue
            if isinstance(part, Literal):
                data = part.data[self._done_in_part : self._done_in_part + self.chunk]
            else:
                obj = self.objects[part.key]
                position = part.offset + self._done_in_part
                ready = self.filler.readable(obj, position)
                if ready == 0:
                    self._wait(obj, self.paths[part.key], position)
                    return
                try:
                    data = obj.read(position, min(ready, remaining, self.chunk))
                except OSError as e:
                    self._abort(Failure(e))
                    return
                if not data:
                    self._abort(Failure(EOFError(f"short read at {position} of {part.key}")))
                    return
            self._done_in_part += len(data)
            self.sent += len(data)
            self.request.write(data)

    def _wait(self, obj: CachedObject, path: str, position: int) -> None:
        d = self._waiting = self.filler.wait(obj, path, position)

        def ready(_: Any) -> None:
            self._waiting = None
            if not self._paused:
                self._pump()

        def failed(failure: Failure) -> None:
            self._waiting = None
            self._abort(failure)

        d.addCallbacks(ready, failed)

    def _finish(self) -> None:
        self._stopped = True
        self.request.unregisterProducer()
        self.request.finish()

    def _abort(self, failure: Failure) -> None:
        if self._stopped:
            return
        self._stopped = True
        log.warn(
            "aborting {uri} after {sent} bytes: {why}",
            uri=self.request.uri,
            sent=self.sent,
            why=failure.getErrorMessage(),
        )
        self.request.unregisterProducer()
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None:
            transport.abortConnection()
