# -*- test-case-name: tests.test_edge,tests.test_http_cache,tests.test_origin_lies -*-
"""
Test doubles for embedders and for our own tests: real HTTP origins on a real socket.

L{MemoryOrigin} is a twisted.web resource that serves files from memory; listen on it with
L{listen_origin} and point an edge at the URL.  It honours single byte ranges, sends
ETag/Last-Modified, counts requests and body bytes, and can misbehave on purpose: ignore Range,
dribble the body slowly, abort mid-body, answer 5xx.

L{ScriptedOrigin} is a raw HTTP/1.1 server (no twisted.web underneath, so it can break framing)
whose every answer a test scripts per request (L{Answer}: status, fields, body, raw bytes, bytes
after the end); it logs each request it got.  Listen on it with L{listen_scripted}.
"""

from __future__ import annotations

import hashlib
import re
from email.utils import formatdate
from typing import Any, Callable, Optional, Sequence

import attrs
from attrs import define, field, frozen
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
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


# -- an origin that scripts every answer -----------------------------------------------------------


@frozen
class ScriptedRequest:
    """One request as L{ScriptedOrigin} received it: header names lower case, values as sent."""

    method: str
    target: str  # the request target, query included
    version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    connection: int  # serial number of the TCP connection it came on (1, 2, ...)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> Optional[str]:
        """The last value of header C{name}, or None."""
        values = self.values(name)
        return values[-1] if values else None

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]


@define
class Answer:
    """
    What L{ScriptedOrigin} writes for one request.

    @ivar headers: sent in this order; a C{Content-Length} is added (for C{body}) unless one is given,
        C{Transfer-Encoding} is given, or C{length} is False.
    @ivar interim: whole 1xx heads (C{"103 Early Hints"} -> status line) written first, each a
        (status line rest, headers) pair.
    @ivar raw: bytes written instead of the whole answer (framing errors).
    @ivar then: bytes written right after the answer, in the same write (a second, unasked answer).
    @ivar then_delay: write C{then} this many seconds later instead.
    @ivar cut_after: drop the connection after this many bytes of the answer (head included).
    @ivar close: close the connection after the answer.
    @ivar delay: seconds before anything is written.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(factory=list)
    body: bytes = b""
    reason: str = ""
    length: bool = True
    interim: list[tuple[str, list[tuple[str, str]]]] = field(factory=list)
    raw: Optional[bytes] = None
    then: bytes = b""
    then_delay: float = 0.0
    cut_after: Optional[int] = None
    close: bool = False
    delay: float = 0.0

    def header(self, name: str) -> Optional[str]:
        found = [value for key, value in self.headers if key.lower() == name.lower()]
        return found[-1] if found else None

    def with_headers(self, *pairs: tuple[str, str], drop: tuple[str, ...] = ()) -> "Answer":
        """A copy with C{drop}ped header names removed and C{pairs} added."""
        lowered = {name.lower() for name in drop}
        kept = [(k, v) for k, v in self.headers if k.lower() not in lowered]
        return attrs.evolve(self, headers=kept + list(pairs))

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        out = []
        for line, headers in self.interim:
            out.append(f"HTTP/1.1 {line}\r\n".encode("latin-1"))
            out += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
            out.append(b"\r\n")
        reason = self.reason or _REASONS.get(self.status, "Whatever")
        out.append(f"HTTP/1.1 {self.status} {reason}\r\n".encode("latin-1"))
        names = {k.lower() for k, _ in self.headers}
        headers = list(self.headers)
        if self.length and "content-length" not in names and "transfer-encoding" not in names:
            headers.append(("Content-Length", str(len(self.body))))
        if self.close and "connection" not in names:
            headers.append(("Connection", "close"))
        out += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
        out.append(b"\r\n")
        out.append(self.body)
        return b"".join(out)


_REASONS = {200: "OK", 203: "Non-Authoritative Information", 204: "No Content", 206: "Partial Content",
            301: "Moved Permanently", 302: "Found", 304: "Not Modified", 404: "Not Found",
            410: "Gone", 416: "Range Not Satisfiable", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable"}

Handler = Callable[[ScriptedRequest], Answer]

_RANGE_TEXT = re.compile(r"^bytes=(\d*)-(\d*)$")


def represent(request: ScriptedRequest, data: bytes, headers: Sequence[tuple[str, str]] = (),
              etag: Optional[str] = None, last_modified: Optional[str] = None,
              ranges: bool = True) -> Answer:
    """
    The answer an honest origin gives C{request} for a representation of C{data} with C{headers}
    (ETag and Last-Modified given apart, so conditionals can use them): 200, 206 for one byte range
    (honouring If-Range), 416, or 304 for If-None-Match / If-Modified-Since.  HEAD gets no body.
    """
    head = list(headers)
    if etag is not None:
        head.append(("ETag", etag))
    if last_modified is not None:
        head.append(("Last-Modified", last_modified))
    inm = request.header("if-none-match")
    ims = request.header("if-modified-since")
    validators = [(k, v) for k, v in head if k.lower() not in ("content-type", "content-length")]
    if inm is not None:
        tags = [tag.strip() for tag in inm.split(",")]
        if etag is not None and ("*" in tags or any(t.removeprefix("W/") == etag.removeprefix("W/") for t in tags)):
            return Answer(304, validators, length=False)
    elif ims is not None and last_modified is not None and ims == last_modified:
        return Answer(304, validators, length=False)
    first, last = 0, len(data) - 1
    status = 200
    wanted = request.header("range")
    if_range = request.header("if-range")
    match = _RANGE_TEXT.match(wanted or "") if ranges else None
    if match and (if_range is None or if_range in (etag, last_modified)):
        first_s, last_s = match.groups()
        if first_s:
            first = int(first_s)
            last = min(int(last_s), len(data) - 1) if last_s else len(data) - 1
        elif last_s:
            first = max(0, len(data) - int(last_s))
        if first >= len(data):
            return Answer(416, head + [("Content-Range", f"bytes */{len(data)}")])
        status = 206
        head.append(("Content-Range", f"bytes {first}-{last}/{len(data)}"))
    body = data[first : last + 1]
    if request.method == "HEAD":
        return Answer(status, head + [("Content-Length", str(len(body)))])
    return Answer(status, head, body)


class ScriptedOrigin(Factory):
    """
    A raw HTTP/1.1 origin whose every answer is scripted: C{routes[path](request) -> Answer}, where
    the path is the request target without its query (unknown paths get a 404).  It speaks
    keep-alive and logs every request (L{ScriptedRequest}) in C{log}, so a test can assert what the
    edge sent as well as what the viewer got; answers may break HTTP's framing on purpose (see
    L{Answer}).  Listen on it with L{listen_scripted}.
    """

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.routes: dict[str, Handler] = {}
        self.log: list[ScriptedRequest] = []
        self.connections = 0

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def serve(self, path: str, data: bytes, headers: Sequence[tuple[str, str]] = (), *,
              etag: Optional[str] = "auto", last_modified: Optional[str] = None) -> None:
        """Serve C{data} at C{path} honestly (see L{represent}); C{etag="auto"} derives one from the bytes."""
        tag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"' if etag == "auto" else etag
        self.routes[path] = lambda request: represent(request, data, headers, tag, last_modified)

    @property
    def requests(self) -> int:
        return len(self.log)

    def buildProtocol(self, addr: Any) -> "_ScriptedChannel":
        self.connections += 1
        channel = _ScriptedChannel()
        channel.origin = self
        channel.serial = self.connections
        return channel

    def answer(self, request: ScriptedRequest) -> Answer:
        self.log.append(request)
        handler = self.routes.get(request.path)
        if handler is None:
            return Answer(404, [("Content-Type", "text/plain")], b"not found\n")
        return handler(request)


class _ScriptedChannel(Protocol):
    origin: ScriptedOrigin
    serial: int
    transport: Any
    MAX_HEAD = 65536

    def connectionMade(self) -> None:
        self.buffer = b""
        self.busy = False
        self.calls: list[Any] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        if self.busy or self.transport is None:
            return
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self.buffer) > self.MAX_HEAD:
                self.transport.loseConnection()
            return
        lines = self.buffer[:head_end].decode("latin-1").split("\r\n")
        method, target, version = (lines[0].split(" ", 2) + ["", ""])[:3]
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        length = 0
        for name, value in headers:
            if name == "content-length":
                length = int(value)
        if len(self.buffer) < head_end + 4 + length:
            return
        body = self.buffer[head_end + 4 : head_end + 4 + length]
        self.buffer = self.buffer[head_end + 4 + length :]
        request = ScriptedRequest(method, target, version, tuple(headers), body, self.serial)
        answer = self.origin.answer(request)
        self.busy = True
        if answer.delay:
            self.calls.append(self.origin.reactor.callLater(answer.delay, self._send, answer))
        else:
            self._send(answer)

    def _send(self, answer: Answer) -> None:
        if self.transport is None:
            return
        raw = answer.encode()
        if answer.cut_after is not None:
            self.transport.write(raw[: answer.cut_after])
            self.transport.loseConnection()
            return
        if answer.then and not answer.then_delay:
            raw += answer.then
        self.transport.write(raw)
        if answer.then and answer.then_delay:
            self.calls.append(self.origin.reactor.callLater(answer.then_delay, self.transport.write, answer.then))
        if answer.close:
            self.transport.loseConnection()
            return
        self.busy = False
        if self.buffer:
            self._next()

    def connectionLost(self, reason: Any = None) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()


def listen_scripted(origin: ScriptedOrigin, reactor: Any = None) -> tuple[IListeningPort, str]:
    """Serve C{origin} on 127.0.0.1 at a free port; returns the port and the base URL."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    port = reactor.listenTCP(0, origin, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}/"
