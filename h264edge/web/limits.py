# -*- test-case-name: tests.test_limits -*-
"""
Connection limits for an HTTP/1.x site open to the internet: deadlines, connection caps, body caps.

A L{LimitedChannel} knows at all times which of four things it waits for, and holds one timer for
the deadline that goes with it:

  - a request head (from the accept, or from the first byte of a next request): complete within
    C{header_timeout} seconds, however slowly its bytes trickle in, or the connection gets a 408
    and is closed (a connection that sent nothing is just closed);
  - a next request on a kept-alive connection: within C{idle_timeout} seconds, or it is closed;
  - a request body (a pass-through method): some bytes every C{send_timeout} seconds;
  - the viewer, while an answer is being sent: when the edge has bytes for it that it does not take
    (the socket's send buffer is full, bytes wait in the transport, or the transport paused the
    answer) and no byte has left for C{send_timeout} seconds, the connection is dropped.  Waiting
    for the origin is not the viewer's fault: the origin's own timeouts cover that.

A request body larger than the method allows (L{ConnectionLimits.quiet_body} for GET, HEAD and other
methods without a body meaning, L{ConnectionLimits.max_body} for pass-through methods) is refused
with 413 as soon as the head says so (Content-Length), or as soon as that many bytes arrived
(chunked), before twisted.web reads (or spools to a temporary file) any of it.

A L{LimitedSite} caps connections in total and per client address.  At a cap, the connection idle
longest (kept alive between requests, or connected without sending a byte yet) is closed to make
room, as nginx reuses idle keep-alive connections when it runs out of connections; when none is
idle the new connection gets a 503 and is closed.  Refused connections get their answer, then a
short lingering close (their request is read and dropped for up to L{LINGER} seconds, so the
answer is not lost to a reset), at most L{MAX_LINGERING} of them at a time; beyond that a new
connection over a cap is closed at once.
"""

from __future__ import annotations

import resource
from typing import Any, Optional

import attrs
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from h264edge._twisted_compat import (
    channel_waiting_for_transport,
    close_now,
    pending_method,
    plain_tcp,
    queued_bytes,
    socket_writable,
    tcp_transport,
    transport_connected,
    transport_open,
)

log = Logger()

LINGER = 2.0
"""Seconds a refused connection is read (and what it sends dropped) before it is closed."""
MAX_LINGERING = 32
"""Refused connections lingering at once; further ones over a cap are closed without an answer."""
REFUSAL_LOG_INTERVAL = 10.0
"""At most one log line per this many seconds about connections refused at a cap."""

_HEAD, _BODY, _BUSY, _IDLE = range(4)
_QUIET_METHODS = frozenset({b"GET", b"HEAD"})


@attrs.frozen
class ConnectionLimits:
    """How long a connection may wait for what, how many connections, how big a request body."""

    header_timeout: float = 10.0  # seconds for a whole request head (from its first byte, or the accept)
    idle_timeout: float = 60.0  # seconds a kept-alive connection may wait for its next request
    send_timeout: float = 60.0  # seconds without progress while the edge waits on the peer
    max_connections: int = 0  # connections at once (this process); 0: from the descriptor limit
    max_connections_per_ip: int = 0  # connections at once from one client address; 0: no cap
    max_body: int = 2**20  # bytes of a request body for methods that carry one (pass-through)
    quiet_body: int = 8192  # bytes of a request body on GET, HEAD and methods in quiet_methods


def default_max_connections() -> int:
    """
    A total cap that leaves descriptors to spare: half of the process's descriptor limit less 128
    (each viewer may hold a socket and an open cache file; the 128 are for refused connections while
    they linger, logs, origin connections and the store), at least 16.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 2**20
    return max(16, (soft - 128) // 2)


@attrs.define
class LimitCounters:
    """What the limits did since start (for tests and metrics)."""

    header_timeouts: int = 0
    idle_closed: int = 0  # kept-alive connections closed by idle_timeout
    send_timeouts: int = 0
    body_timeouts: int = 0
    idle_evicted: int = 0  # idle connections closed to make room at a cap
    refused: int = 0  # new connections answered 503 (or closed) at a cap
    bodies_refused: int = 0  # requests answered 413


def plain_answer(code: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer with a short plain-text body that closes its connection."""
    body = (message + "\n").encode("ascii", "replace")
    return (
        f"HTTP/1.1 {code} {reason}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("ascii") + body


def _linger_close(transport: Any, clock: Any) -> Any:
    """
    Close C{transport} once what was written to it is sent, reading on meanwhile (its protocol drops
    what arrives) for up to L{LINGER} seconds, so a peer still sending its request does not get a
    reset before it read our answer.  The returned call aborts the connection; cancel it when the
    connection is lost first.
    """
    transport.unregisterProducer()
    if plain_tcp(transport):
        transport.loseWriteConnection()  # our FIN after the answer; the peer's close ends it
    else:
        transport.loseConnection()
    return clock.callLater(LINGER, transport.abortConnection)


class LimitedChannel(HTTPChannel):
    """
    An L{HTTPChannel} held to its L{LimitedSite}'s L{ConnectionLimits} (see the module).  Subclasses
    that answer a whole request themselves, without twisted.web (the hot path), call L{idle_again}.
    """

    limits = ConnectionLimits()
    clock: Any = None
    #: methods whose bodies may be up to max_body (None: every method but GET and HEAD)
    body_methods: Optional[frozenset[bytes]] = None

    _phase = _HEAD
    _since = 0.0  # when the current wait began (or, for a body, when its last bytes came)
    _fresh = True  # connected, no byte received yet
    _watch: Any = None
    _linger: Any = None
    _body_left: Optional[int] = None  # bytes a chunked body may still bring
    _token: Any = None
    _progress_at = 0.0
    _site: Optional[LimitedSite] = None
    _address: Optional[str] = None  # the client's address for the per-address cap
    _counted = False

    def connectionMade(self) -> None:
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        self._since = self.clock.seconds()
        self._watch = self.clock.callLater(self.limits.header_timeout, self._check)
        super().connectionMade()

    @property
    def reusable(self) -> bool:
        """Whether closing this connection now loses nothing: it waits for a (next) request, sending nothing."""
        if not (self._phase == _IDLE or (self._phase == _HEAD and self._fresh)):
            return False
        transport = self.transport
        return transport is not None and not (plain_tcp(transport) and queued_bytes(transport))

    # -- phases -----------------------------------------------------------------------------------

    def idle_again(self) -> None:
        """A whole request was answered outside twisted.web: wait for the next one."""
        self._phase = _IDLE
        self._fresh = False
        self._since = self.clock.seconds()
        if self._site is not None:
            self._site._now_idle(self)

    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase == _IDLE or self._fresh:
            now = self.clock.seconds()
            if phase == _IDLE:
                self._phase = _HEAD
                self._since = now
                due = now + self.limits.header_timeout
                watch = self._watch
                if watch is not None and watch.active() and watch.getTime() > due:
                    watch.reset(self.limits.header_timeout)
            self._fresh = False
            if self._site is not None:
                self._site._not_idle(self)
        elif phase == _BODY:
            self._since = self.clock.seconds()
        super().dataReceived(data)

    def headerReceived(self, line: bytes) -> bool:
        # twisted.web turns Content-Length into an int itself: a value of thousands of digits would
        # raise there (Python's int() digit limit) instead of being refused
        if line[:15].lower() == b"content-length:":
            digits = line[15:].strip(b" \t").lstrip(b"0")
            if len(digits) > 18 and digits.isdigit():
                self._refuse_body(pending_method(self))
                return False
        ok: bool = super().headerReceived(line)
        return ok

    def allHeadersReceived(self) -> None:
        method = pending_method(self)
        cap = self._body_cap(method)
        length = self.length
        if length is None:  # chunked: counted as it arrives
            self._body_left = cap
        elif length > cap:
            self._refuse_body(method)
            return
        else:
            self._body_left = None
        if length != 0:
            self._phase = _BODY
            self._since = self.clock.seconds()
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._phase == _BODY and self._body_left is not None:
            self._body_left -= len(data)
            if self._body_left < 0:
                self._refuse_body(pending_method(self))
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._phase = _BUSY
        self._body_left = None
        self._token = None
        self._progress_at = self.clock.seconds()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._phase = _IDLE
        self._since = self.clock.seconds()
        if self._site is not None and self.persistent:
            self._site._now_idle(self)
        super().requestDone(request)

    def connectionLost(self, reason: Any = None) -> None:
        for call in (self._watch, self._linger):
            if call is not None and call.active():
                call.cancel()
        self._watch = self._linger = None
        if self._site is not None:
            self._site._gone(self)
        super().connectionLost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header line over twisted.web's limit: 431 rather than a silent close."""
        self._stop_reading_requests()
        transport: Any = self.transport
        transport.write(plain_answer(431, "Request Header Fields Too Large", "a request line or header is too long"))
        self._linger = _linger_close(transport, self.clock)

    # -- bodies -----------------------------------------------------------------------------------

    def _body_cap(self, method: Optional[bytes]) -> int:
        limits = self.limits
        if method is None or method in _QUIET_METHODS:
            return limits.quiet_body
        if self.body_methods is not None and method not in self.body_methods:
            return limits.quiet_body
        return limits.max_body

    def _refuse_body(self, method: Optional[bytes]) -> None:
        """413 now, before any of the body is read; then the connection closes (what comes is dropped)."""
        cap = self._body_cap(method)
        if self._site is not None:
            self._site.counters.bodies_refused += 1
        self._stop_reading_requests()
        transport: Any = self.transport
        transport.write(plain_answer(413, "Content Too Large", f"a request body of at most {cap} bytes "
                                          "is accepted for this method"))
        self._linger = _linger_close(transport, self.clock)

    def _stop_reading_requests(self) -> None:
        """From now on what the peer sends is dropped unread, and no request reaches twisted.web."""
        self._phase = _BUSY
        self.persistent = False
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        self._watch = None  # the lingering close has its own deadline
        drop = _drop
        self.dataReceived = drop  # type: ignore[method-assign]
        self.lineReceived = drop  # type: ignore[method-assign]
        self.rawDataReceived = drop  # type: ignore[method-assign]
        self.setRawMode()

    # -- deadlines --------------------------------------------------------------------------------

    def _check(self) -> None:
        self._watch = None
        transport = self.transport
        if not transport_connected(transport):
            return
        limits, now, phase = self.limits, self.clock.seconds(), self._phase
        if not transport_open(transport) or phase == _BUSY or (phase == _IDLE and self._sending()):
            # answering, or closing or idle with an answer's last bytes still waiting in the transport
            if self._send_stalled(now):
                self._stalled()
                return
            due = now + limits.send_timeout / 2
        elif phase == _IDLE:
            due = self._since + limits.idle_timeout
            if now >= due:
                if self._site is not None:
                    self._site.counters.idle_closed += 1
                self.loseConnection()
                return
        elif phase == _HEAD:
            due = self._since + limits.header_timeout
            if now >= due:
                self._timed_out("the request head did not arrive in time")
                return
        else:
            due = self._since + limits.send_timeout
            if now >= due:
                self._timed_out("the request body stopped coming")
                return
        self._watch = self.clock.callLater(max(due - now, 0.001), self._check)

    def _sending(self) -> bool:
        transport = self.transport
        return channel_waiting_for_transport(self) or (tcp_transport(transport) and queued_bytes(transport) > 0)

    def _send_stalled(self, now: float) -> bool:
        """Whether the peer took none of what waits for it for send_timeout seconds."""
        transport = self.transport
        tcp = tcp_transport(transport)
        queued = queued_bytes(transport) if tcp else 0
        token = (sum(getattr(request, "sentLength", 0) for request in self.requests), queued)
        blocked = channel_waiting_for_transport(self) or queued > 0 or (tcp and not socket_writable(transport))
        if token != self._token or not blocked:
            self._token = token
            self._progress_at = now
            return False
        return now - self._progress_at >= self.limits.send_timeout

    def _timed_out(self, why: str) -> None:
        """A request head or body did not come in time: 408 (nothing if no byte came at all), then close."""
        if self._site is not None:
            if self._phase == _HEAD:
                self._site.counters.header_timeouts += 1
            else:
                self._site.counters.body_timeouts += 1
        fresh = self._fresh
        self._stop_reading_requests()
        transport: Any = self.transport
        if not fresh:
            transport.write(plain_answer(408, "Request Timeout", why))
        self._linger = _linger_close(transport, self.clock)

    def _stalled(self) -> None:
        if self._site is not None:
            self._site.counters.send_timeouts += 1
        transport: Any = self.transport
        transport.abortConnection()


def _drop(data: bytes) -> None:
    """What a channel that reads no more requests does with the bytes it still receives."""


class _Refusal(Protocol):
    """A connection over a cap: answered 503 at once, its request read and dropped, then closed."""

    def __init__(self, site: LimitedSite, answer: bytes) -> None:
        self.site = site
        self.answer = answer
        self.call: Any = None

    def connectionMade(self) -> None:
        self.site._lingering += 1
        transport: Any = self.transport
        transport.write(self.answer)
        self.call = _linger_close(transport, self.site.clock)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.site._lingering -= 1
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


class LimitedSite(Site):
    """
    A L{Site} whose connections are L{LimitedChannel}s held to C{limits}, and capped in number.
    twisted.web's own idle timeout is off: the channels keep their deadlines themselves.

    @ivar connections: the live connections, by client address (C{""} for non-IP ones).
    """

    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(self, resource: Any, *args: Any, limits: Optional[ConnectionLimits] = None, clock: Any = None,
                 **kwargs: Any) -> None:
        kwargs["timeout"] = None
        if clock is not None:
            kwargs.setdefault("reactor", clock)
        super().__init__(resource, *args, **kwargs)
        self.limits = limits or ConnectionLimits()
        self.clock: Any = clock if clock is not None else self.reactor
        self.max_connections = self.limits.max_connections or default_max_connections()
        pass_methods = getattr(resource, "pass_methods", None)
        self.body_methods = (frozenset(m.encode("ascii") for m in pass_methods) if pass_methods is not None
                             else None)
        self.counters = LimitCounters()
        self.connections: dict[str, dict[LimitedChannel, None]] = {}
        self.count = 0
        self._idle: dict[LimitedChannel, None] = {}  # reusable connections, longest idle first
        self._lingering = 0
        self._refused_since_log = 0
        self._refusal_logged_at: Optional[float] = None

    def buildProtocol(self, addr: Any) -> Any:
        address = getattr(addr, "host", None) or ""
        limits = self.limits
        if self.count >= self.max_connections and not self._make_room(self._idle):
            return self._refuse("the server is at its connection limit")
        per_ip = limits.max_connections_per_ip
        same = self.connections.get(address)
        if per_ip and address and same is not None and len(same) >= per_ip and not self._make_room(same):
            return self._refuse("too many connections from your address")
        channel = super().buildProtocol(addr)
        if isinstance(channel, LimitedChannel):
            channel.limits = limits
            channel.clock = self.clock
            channel.body_methods = self.body_methods
            channel._site = self
            channel._address = address
            channel._counted = True
            self.connections.setdefault(address, {})[channel] = None
            self.count += 1
            self._idle[channel] = None  # connected, nothing sent yet: reusable
        return channel

    def _make_room(self, among: dict[LimitedChannel, None]) -> bool:
        """Close the connection of C{among} idle longest; False if none of them is idle."""
        idle = self._idle
        if among is idle:
            candidates: Any = iter(lambda: next(iter(idle), None), None)  # the oldest, again and again
        else:
            candidates = sorted((c for c in among if c in idle), key=lambda c: c._since)
        for channel in candidates:
            if channel.reusable:
                self.counters.idle_evicted += 1
                self._gone(channel)
                close_now(channel.transport)  # its descriptor is free for the new connection at once
                return True
            idle.pop(channel, None)  # not reusable after all (its last bytes are still going out)
        return False

    def _refuse(self, why: str) -> Optional[Protocol]:
        self.counters.refused += 1
        now = self.clock.seconds()
        self._refused_since_log += 1
        if self._refusal_logged_at is None or now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warn("connection cap reached ({why}): {n} connection(s) refused since the last report", why=why,
                     n=self._refused_since_log)
            self._refusal_logged_at = now
            self._refused_since_log = 0
        if self._lingering >= MAX_LINGERING:
            return None  # Twisted closes the socket at once
        return _Refusal(self, plain_answer(503, "Service Unavailable", why + "; try again shortly"))

    def _now_idle(self, channel: LimitedChannel) -> None:
        if channel._counted:
            self._idle.pop(channel, None)
            self._idle[channel] = None

    def _not_idle(self, channel: LimitedChannel) -> None:
        self._idle.pop(channel, None)

    def _gone(self, channel: LimitedChannel) -> None:
        if not channel._counted:
            return
        channel._counted = False
        self.count -= 1
        self._idle.pop(channel, None)
        address = channel._address or ""
        same = self.connections.get(address)
        if same is not None:
            same.pop(channel, None)
            if not same:
                del self.connections[address]
