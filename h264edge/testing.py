# -*- test-case-name: tests.test_edge -*-
"""
Test doubles for embedders and for our own tests: a real HTTP origin that serves files from memory.

L{MemoryOrigin} is a twisted.web resource; listen on it with L{listen_origin} and point an edge at the
URL.  It honours single byte ranges, sends ETag/Last-Modified, counts requests and body bytes, and can
misbehave on purpose: ignore Range, dribble the body slowly, abort mid-body, answer 5xx.
"""

from __future__ import annotations

import hashlib
import re
from email.utils import formatdate
from typing import Any, Optional

from attrs import define, field
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from h264edge._twisted_compat import request_disconnected

_RANGE = re.compile(rb"^bytes=(\d*)-(\d*)$")


@define
class OriginFile:
    data: bytes
    content_type: str = "application/octet-stream"
    etag: Optional[str] = None
    last_modified: Optional[str] = field(factory=lambda: formatdate(1_700_000_000, usegmt=True))
    cache_control: Optional[str] = None
    content_encoding: Optional[str] = None  # sent as Content-Encoding (the body is sent as given)
    set_cookie: Optional[str] = None  # sent as Set-Cookie

    def __attrs_post_init__(self) -> None:
        if self.etag is None:
            self.etag = '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'


@define
class OriginLog:
    method: str
    path: str
    range: Optional[str]
    code: int
    sent: int = 0
    headers: dict[str, str] = field(factory=dict)  # the request's headers (lower-case names, last value)


class MemoryOrigin(Resource):
    """
    An origin serving C{files} (path -> L{OriginFile}).  Knobs, all changeable between requests:

    @ivar ignore_range: answer 200 with the whole body even when asked for a Range.
    @ivar fail_code: answer every request with this status (e.g. 503) while set.
    @ivar abort_after: drop the connection when the body reaches this byte of the object.
    @ivar aborts_left: how many requests are aborted that way before the origin behaves again.
    @ivar drops_left: drop this many connections before answering anything.
    @ivar dribble: (bytes, seconds): send the body in pieces of that many bytes, one per interval.
    @ivar hold_body: send the headers at once and the body's first byte this many seconds later.
    """

    isLeaf = True

    def __init__(self, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.files: dict[str, OriginFile] = {}
        self.log: list[OriginLog] = []
        self.ignore_range = False
        self.fail_code: Optional[int] = None
        self.abort_after: Optional[int] = None
        self.aborts_left = 0
        self.dribble: Optional[tuple[int, float]] = None
        self.hold_body = 0.0
        self.honour_conditionals = True
        self.drops_left = 0  # drop this many requests' connections before any answer
        self.drop_every: Optional[int] = None  # drop every answer after this many body bytes

    def add(self, path: str, data: bytes, **kwargs: Any) -> OriginFile:
        f = self.files[path] = OriginFile(data, **kwargs)
        return f

    @property
    def requests(self) -> int:
        return len(self.log)

    @property
    def bytes_sent(self) -> int:
        return sum(entry.sent for entry in self.log)

    def render(self, request: Request) -> Any:  # type: ignore[override]
        path = request.uri.decode("latin-1")
        rng = request.getHeader(b"Range")
        entry = OriginLog(request.method.decode(), path, rng.decode() if rng else None, 200)
        for name, values in request.requestHeaders.getAllRawHeaders():
            entry.headers[name.decode("latin-1").lower()] = b", ".join(values).decode("latin-1")
        self.log.append(entry)
        if self.drops_left > 0:  # before anything is sent
            self.drops_left -= 1
            entry.code = 0
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        if self.fail_code is not None:
            entry.code = self.fail_code
            request.setResponseCode(self.fail_code)
            return b"origin failure\n"
        f = self.files.get(path.partition("?")[0]) or self.files.get(path)
        if f is None:
            entry.code = 404
            request.setResponseCode(404)
            return b"not found\n"
        if f.etag:
            request.setHeader(b"ETag", f.etag.encode())
        if f.last_modified:
            request.setHeader(b"Last-Modified", f.last_modified.encode())
        request.setHeader(b"Content-Type", f.content_type.encode())
        request.setHeader(b"Accept-Ranges", b"bytes")
        if f.cache_control:
            request.setHeader(b"Cache-Control", f.cache_control.encode())
        if f.content_encoding:
            request.setHeader(b"Content-Encoding", f.content_encoding.encode())
        if f.set_cookie:
            request.setHeader(b"Set-Cookie", f.set_cookie.encode())
        inm = request.getHeader(b"If-None-Match")
        if self.honour_conditionals and inm is not None and inm.decode() == f.etag:
            entry.code = 304
            request.setResponseCode(304)
            return b""
        body_first, body_last = 0, len(f.data) - 1
        if rng and not self.ignore_range:
            match = _RANGE.match(rng)
            if_range = request.getHeader(b"If-Range")
            if match and (if_range is None or if_range.decode() == f.etag):
                first_s, last_s = match.groups()
                if first_s:
                    body_first = int(first_s)
                    body_last = min(int(last_s), len(f.data) - 1) if last_s else len(f.data) - 1
                else:
                    body_first = max(0, len(f.data) - int(last_s))
                if body_first >= len(f.data):
                    entry.code = 416
                    request.setResponseCode(416)
                    request.setHeader(b"Content-Range", f"bytes */{len(f.data)}".encode())
                    return b""
                request.setResponseCode(206)
                entry.code = 206
                request.setHeader(b"Content-Range", f"bytes {body_first}-{body_last}/{len(f.data)}".encode())
        body = f.data[body_first : body_last + 1]
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method == b"HEAD":
            return b""
        self._send(request, entry, body, body_first)
        return NOT_DONE_YET

    def _send(self, request: Request, entry: OriginLog, body: bytes, body_first: int) -> None:
        limit = len(body)
        abort = False
        if self.abort_after is not None and self.aborts_left > 0:
            self.aborts_left -= 1
            limit = max(0, min(limit, self.abort_after - body_first))
            abort = True
        if self.drop_every is not None and limit > self.drop_every:
            limit, abort = self.drop_every, True
        piece, interval = self.dribble if self.dribble else (64 * 1024, 0.0)
        position = 0
        pending: list[Any] = []

        def cancel(_: object) -> None:
            for call in pending:
                if call.active():
                    call.cancel()

        request.notifyFinish().addBoth(cancel)
        if self.hold_body and limit:
            request.write(b"")  # the headers alone

        def step() -> None:
            nonlocal position
            if request_disconnected(request):
                return
            chunk = body[position : min(position + piece, limit)]
            request.write(chunk)  # an empty first write still sends the headers
            entry.sent += len(chunk)
            position += len(chunk)
            if position >= limit:
                if abort:
                    # drop the connection once what was written has gone out: a body that ends early
                    transport: Any = request.channel.transport  # type: ignore[union-attr]
                    pending[:] = [self.reactor.callLater(0.02, transport.abortConnection)]
                else:
                    request.finish()
                return
            pending[:] = [self.reactor.callLater(interval, step)]

        if self.hold_body and limit:
            pending[:] = [self.reactor.callLater(self.hold_body, step)]
        else:
            step()


def listen_origin(resource: Resource, reactor: Any = None) -> tuple[IListeningPort, str]:
    """Serve C{resource} on 127.0.0.1 at a free port; returns the port and the base URL."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    site = Site(resource)
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}/"
