# -*- test-case-name: tests.test_logs -*-
"""
What became of each answer, as an operator reads it in the access log and in the metrics.

L{EdgeRequest} (the request class of L{h264edge.web.hot.EdgeSite}) notes when a request began and
when its first byte (the status line) was written, and tells its site about an answer that was cut
short: the viewer left, or the edge dropped the connection mid-body.  twisted.web itself logs only
answers that finished.  The site turns each into an L{Answer}; L{combined_line} and L{json_line}
write one as an access-log line.
"""

from __future__ import annotations

import json
import time
import weakref
from typing import Any, Optional

from attrs import frozen
from twisted.web.server import Request

#: the status logged for a request whose viewer left before any byte of the answer (as nginx does)
CLIENT_CLOSED = 499


@frozen
class Answer:
    """
    One answer, as it ended.

    @ivar client: the viewer's address (from X-Forwarded-For only when the peer is a trusted
        proxy), or None when it cannot be known.
    @ivar sent: body bytes that left the process; for a cut answer, less what was still queued in
        the process when the connection went (what the kernel still held is not known).
    @ivar cut: whether the answer ended before all of its body went out.
    @ivar cache: the answer's X-Cache value (HIT, MISS, PARTIAL, ...), "-" for none.
    @ivar duration: seconds from the request line to the end of the answer.
    @ivar first_byte: seconds from the request line to the status line's write, None if never.
    """

    client: Optional[str]
    method: bytes
    uri: bytes
    protocol: bytes
    code: int
    sent: int
    cut: bool
    cache: str
    duration: float
    first_byte: Optional[float]
    referer: Optional[bytes]
    user_agent: Optional[bytes]


class Draining:
    """
    The connections of one listener, for a graceful stop.  L{track} each connection's channel (an
    L{twisted.web.http.HTTPChannel}) as it is made; L{begin} closes the idle ones and makes the busy
    ones close after their answer; L{connected} lists those still open; L{finish} runs what waited
    for the end (the access log stays open until then).
    """

    def __init__(self) -> None:
        self._channels: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.draining = False
        self.finished = False
        self._after: list[Any] = []

    def track(self, channel: Any) -> None:
        self._channels.add(channel)

    def connected(self) -> list[Any]:
        return [c for c in list(self._channels) if c.transport is not None and c.transport.connected]

    def open(self) -> int:
        return len(self.connected())

    def begin(self) -> tuple[int, int]:
        """Start draining: C{(answers in flight, idle connections closed)}."""
        self.draining = True
        busy = idle = 0
        for channel in self.connected():
            if channel.requests:
                channel.persistent = False  # closes after the answer in flight (see L{EdgeRequest.process})
                busy += 1
            else:
                channel.transport.loseConnection()
                idle += 1
        return busy, idle

    def after(self, function: Any) -> None:
        """Call C{function} when the drain is over (at once if not draining, or if it is over)."""
        if self.draining and not self.finished:
            self._after.append(function)
        else:
            function()

    def finish(self) -> None:
        self.finished = True
        after, self._after = self._after, []
        for function in after:
            function()


def _clock(request: Request) -> Any:
    site = getattr(request.channel, "site", None)
    reactor = getattr(site, "reactor", None)
    return reactor if reactor is not None else _WallClock


class _WallClock:
    seconds = staticmethod(time.time)


class EdgeRequest(Request):
    """
    A twisted.web request that keeps its timings and reports an answer cut short to its site's
    C{answered(request, cut=True, unsent=N)} (finished answers reach C{site.log} as usual).  While
    the site drains (L{h264edge.lifecycle.Draining}), its answer closes the connection.
    """

    first_byte_at: Optional[float] = None
    processed = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.began_at: float = _clock(self).seconds()

    def process(self) -> None:
        self.processed = True
        drain = getattr(getattr(self.channel, "site", None), "drain", None)
        if drain is not None and drain.draining and self.channel is not None:
            self.channel.persistent = False
            self.setHeader(b"Connection", b"close")
        super().process()

    def write(self, data: bytes) -> None:
        if self.first_byte_at is None and not self.startedWriting and not self.finished:
            self.first_byte_at = _clock(self).seconds()
        super().write(data)

    def connectionLost(self, reason: Any) -> None:
        channel = self.channel
        site = getattr(channel, "site", None)
        if self.processed and not self.finished and site is not None and hasattr(site, "answered"):
            transport = getattr(channel, "transport", None)
            site.answered(self, cut=True, unsent=_queued(transport))
        super().connectionLost(reason)


def _queued(transport: Any) -> int:
    """Bytes a Twisted transport still held, unsent (0 if it cannot tell)."""
    try:
        buffered = len(transport.dataBuffer) - getattr(transport, "offset", 0)
        return max(0, buffered) + sum(len(piece) for piece in getattr(transport, "_tempDataBuffer", ()))
    except (AttributeError, TypeError):
        return 0


def escape(value: bytes | str) -> str:
    """A field of a combined-format line, as twisted.web's formatter escapes it (repr-like, in double quotes)."""
    raw = value if isinstance(value, bytes) else value.encode("ascii", "backslashreplace")
    text = repr(raw)[1:]  # without the b
    if text.startswith("'"):
        return text[1:-1].replace('"', '\\"').replace("\\'", "'")
    return text[1:-1]


def combined_line(answer: Answer, stamp: str) -> str:
    """
    The combined format (as Apache's and nginx's) and three fields after it::

        1.2.3.4 - - [02/Jan/2025:10:00:00 +0000] "GET /a.mp4?start=30 HTTP/1.1" 200 81234 "-" "curl/8" cache=MISS time=0.012 ttfb=0.002 cut=0

    C{stamp} is the bracketed time.  C{time} and C{ttfb} are in seconds, to the millisecond (as
    nginx's $request_time); C{cut=1} marks an answer that ended before all of its body went out.
    """
    return (
        f"{answer.client or '-'} - - {stamp} "
        f'"{escape(answer.method)} {escape(answer.uri)} {escape(answer.protocol)}" {answer.code} {answer.sent} '
        f'"{escape(answer.referer or b"-")}" "{escape(answer.user_agent or b"-")}" '
        f"cache={answer.cache} time={answer.duration:.3f} "
        f"ttfb={'-' if answer.first_byte is None else format(answer.first_byte, '.3f')} cut={int(answer.cut)}"
    )


def json_line(answer: Answer, iso_time: str) -> str:
    """One JSON object per answer (the same fields as L{combined_line}; C{iso_time} is UTC, ISO 8601)."""
    return json.dumps(
        {
            "time": iso_time,
            "client": answer.client,
            "method": answer.method.decode("latin-1"),
            "uri": answer.uri.decode("latin-1"),
            "protocol": answer.protocol.decode("latin-1"),
            "status": answer.code,
            "bytes": answer.sent,
            "cut": answer.cut,
            "cache": answer.cache,
            "time_taken": round(answer.duration, 6),
            "ttfb": None if answer.first_byte is None else round(answer.first_byte, 6),
            "referer": None if answer.referer is None else answer.referer.decode("latin-1"),
            "user_agent": None if answer.user_agent is None else answer.user_agent.decode("latin-1"),
        },
        separators=(",", ":"),
    )


def iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
