# -*- test-case-name: tests.test_hot -*-
"""
The hot path: small cached objects answered from memory without building a twisted.web Request.

twisted.web spends ~100 us of Python on every request (Request object, header parsing, Deferreds,
producer registration) before the first byte of a 16 KiB object goes out; a bare Twisted protocol
answering the same bytes does ~60,000 answers a second on this machine class (bench figure 4).
So L{EdgeSite} runs L{HotChannel}, an L{HTTPChannel} that answers a request itself when all of
these hold, and hands every other byte to twisted.web unchanged:

  - the channel is idle: no request in flight, nothing buffered, not waiting for the transport;
  - the bytes received are exactly one complete request head, C{GET <target> HTTP/1.1}, whose
    headers are all in L{PLAIN_HEADERS} or browsers' C{Sec-*} metadata (none of Range, If-*,
    Connection: close, a body...), so the answer cannot depend on them;
  - L{HotAnswers} holds a whole 200 answer for exactly that target, recorded by L{EdgeResource}
    from an answer it just sent through the normal road (a HIT of a complete object of at most
    L{HOT_OBJECT_MAX} bytes, not a Vary'd one), and that answer is still true: the store reports
    the same data file (L{SliceStore.peek_complete}, with the same disk checks and LRU use as a
    normal hit) with the same metadata, and it is fresh;
  - with C{viewer_cache_control} (the edge honours viewers' no-cache), the request has no
    Cache-Control or Pragma.

The answer is the recorded status line and headers (the object's stored header block, its stored
Date, and an Age counted anew each second from the object's metadata) and the recorded body bytes:
byte for byte what the normal road sends for that request (one exception: a request whose Via
names this edge, which the normal road refuses as a loop with 508, gets the answer: one from memory
asks nothing of another cache, so it cannot loop).  Anything else (a stale object, a purge,
another process's replacement) makes the lookup fail, the request goes the normal road, and that
road records the new answer.  Access log lines are written as for any request.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Optional

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.web.http import combinedLogFormatter
from twisted.web.http_headers import Headers
from twisted.web.server import Request


from h264edge._twisted_compat import (
    access_log_sink,
    channel_is_idle,
    channel_state_known,
    plain_tcp,
    read_now,
    reopen_access_log,
    transport_open,
)
from h264edge.store import CachedObject, ObjectMeta, SliceStore
from h264edge.tcpio import send_now
from h264edge.web.answers import CLIENT_CLOSED, Answer, Draining, EdgeRequest, combined_line, escape, iso_time, json_line
from h264edge.web.http import forwarded_client, list_field, trusted_peer
from h264edge.web.limits import LimitedChannel, LimitedSite

log = Logger()

HOT_OBJECT_MAX = 64 * 1024
MAX_HEAD = 8192

#: request headers that do not change the answer to a plain GET of a whole object (lower case)
PLAIN_HEADERS = frozenset(
    {
        b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"accept-charset",
        b"referer", b"origin", b"cookie", b"dnt", b"pragma", b"cache-control", b"upgrade-insecure-requests",
        b"connection", b"keep-alive", b"x-forwarded-for", b"x-forwarded-proto", b"x-real-ip", b"x-request-id",
        b"via", b"priority",
    }
)


@attrs.define(eq=False)
class _Answer:
    key: str
    identity: object
    meta: ObjectMeta
    before_age: bytes  # status line and the headers before Age
    after_age: bytes  # the headers after Age, the blank line and the body
    body_length: int
    born: float  # when the object's age was 0 (RFC 9111 §4.2.3: its current age is now - born)
    # the Age line for the second of age [age_from, age_until): made once a second, not per answer
    age_line: bytes = b""
    age_from: float = 0.0
    age_until: float = -1.0

    @property
    def cost(self) -> int:
        return len(self.before_age) + len(self.after_age) + 200


class HotAnswers:
    """
    Whole answers to plain GETs of small complete objects, by request target, at most C{max_bytes}
    of them (least recently used dropped first).
    """

    def __init__(self, store: SliceStore, max_bytes: int, reactor: Optional[IReactorTime] = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default  # type: ignore[assignment]
        self.store = store
        self.max_bytes = max_bytes
        self.used = 0
        self.hits = 0
        self._clock: Any = reactor
        self._answers: OrderedDict[bytes, _Answer] = OrderedDict()
        #: the edge honours viewers' Cache-Control / Pragma: requests with them take the normal road
        self.viewer_cache_control = False

    def __len__(self) -> int:
        return len(self._answers)

    def record(self, target: bytes, obj: CachedObject, request: Request) -> None:
        """
        C{request} (a GET of C{target}) is about to get a 200 with C{obj}'s whole body and the headers
        it holds now: keep that answer if it is small enough.
        """
        size = obj.meta.size
        if (
            size > HOT_OBJECT_MAX
            or not obj.complete
            or obj.evicted
            or obj.transient
            or request.code != 200
            or request.clientproto != b"HTTP/1.1"
            or request.responseHeaders.hasHeader(b"Connection")  # this answer closes its connection
        ):
            return
        head = [b"HTTP/1.1 200 ", request.code_message or b"OK", b"\r\n"]
        before: Optional[bytes] = None
        for name, values in request.responseHeaders.getAllRawHeaders():
            if name.lower() == b"age":
                before = b"".join(head)
                head = []
                continue
            for value in values:
                head += [name, b": ", value, b"\r\n"]
        if before is None:
            return  # a HIT always carries Age; without it we could not tell where it goes
        head.append(b"\r\n")
        held = self._answers.get(target)
        if held is not None and held.identity is obj.identity and held.meta is obj.meta \
                and held.before_age == before and held.after_age.startswith(b"".join(head)):
            return  # the same answer (a request the hot path did not take): no need to read it again
        body = obj.read(0, size)
        born = obj.meta.fetched_at - obj.meta.age
        answer = _Answer(obj.meta.key, obj.identity, obj.meta, before, b"".join(head) + body, size, born)
        self._drop(target)
        if answer.cost > self.max_bytes:
            return
        self._answers[target] = answer
        self.used += answer.cost
        while self.used > self.max_bytes:
            self._drop(next(iter(self._answers)))

    def answer(self, target: bytes) -> Optional[tuple[bytes, int]]:
        """The whole answer (bytes, body length) to a plain GET of C{target}, if one is known and true."""
        answer = self._answers.get(target)
        if answer is None:
            return None
        now = self._clock.seconds()
        found = self.store.peek_complete(answer.key)
        if (
            found is None
            or found[0] is not answer.identity
            or found[1] is not answer.meta
            or not answer.meta.is_fresh(now)
        ):
            self._drop(target)
            return None
        self._answers.move_to_end(target)
        self.hits += 1
        if not answer.age_from <= now < answer.age_until:
            age = max(0, int(now - answer.born))
            answer.age_line = b"Age: %d\r\n" % age
            answer.age_from = answer.born + age if age else float("-inf")
            answer.age_until = answer.born + age + 1
        return answer.before_age + answer.age_line + answer.after_age, answer.body_length

    def forget(self) -> None:
        self._answers.clear()
        self.used = 0

    def _drop(self, target: bytes) -> None:
        old = self._answers.pop(target, None)
        if old is not None:
            self.used -= old.cost


_PLAIN_GET = re.compile(
    rb"GET (/[^\x00-\x20\x7f]*) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*)\r\n"
)


def plain_get_target(data: bytes) -> Optional[tuple[bytes, dict[bytes, bytes]]]:
    """
    C{(target, headers)} if C{data} is exactly one complete C{GET ... HTTP/1.1} head whose headers
    are all plain (see L{PLAIN_HEADERS}) and well formed; None for anything else.
    """
    if len(data) > MAX_HEAD:
        return None
    match = _PLAIN_GET.fullmatch(data)
    if match is None:
        return None
    headers: dict[bytes, bytes] = {}
    for line in match.group(2).split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        name = name.lower()
        if (name not in PLAIN_HEADERS and not name.startswith(b"sec-")) or name in headers:
            return None
        value = value.strip(b" \t")
        if name == b"connection" and value.lower() != b"keep-alive":
            return None
        headers[name] = value
    return match.group(1), headers


class HotChannel(LimitedChannel):
    """An HTTP/1.1 channel that answers plain GETs known to L{HotAnswers} itself (see the module)."""

    hot: Optional[HotAnswers] = None
    state_known = channel_state_known()
    log_ip: Optional[str] = None  # the peer's address as the access log writes it

    def connectionMade(self) -> None:
        super().connectionMade()
        # A viewer sends its request right after connecting: read it now, rather than after the
        # reactor's next poll (~0.1 ms off the first byte of every new connection).  Nothing there
        # yet is fine (the read would block: it returns at once).  What it returns on an end or an
        # error is dropped: the reactor's next poll finds the socket at its end and closes it (a
        # reset read here is then seen as a plain end).
        transport: Any = self.transport
        if plain_tcp(transport):
            try:
                read_now(transport)
            except Exception:
                log.failure("reading a new connection's first request")
                transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        hot = self.hot
        if (
            hot is not None
            and channel_is_idle(self)
            and transport_open(self.transport)
        ):
            parsed = plain_get_target(data)
            if parsed is not None and not (
                hot.viewer_cache_control and (b"cache-control" in parsed[1] or b"pragma" in parsed[1])
            ):
                found = hot.answer(parsed[0])
                if found is not None:
                    send_now(self.transport, found[0])
                    self.idle_again()
                    factory = self.factory
                    if isinstance(factory, EdgeSite):
                        factory.log_hot(self, parsed[0], parsed[1], found[1])
                    return
        super().dataReceived(data)


class _LoggedHit:
    """What an access-log formatter reads of a request, for an answer from the hot path."""

    method = b"GET"
    clientproto = b"HTTP/1.1"
    code = 200

    def __init__(self, channel: HotChannel, uri: bytes, headers: dict[bytes, bytes], length: int) -> None:
        self.channel = channel
        self.uri = self.path = uri
        self._headers = headers
        self.sentLength = length

    def getClientAddress(self) -> Any:
        transport: Any = self.channel.transport
        return transport.getPeer() if transport is not None else None

    def getHeader(self, name: bytes) -> Optional[bytes]:
        return self._headers.get(name.lower())

    @property
    def requestHeaders(self) -> Headers:
        return Headers({name: [value] for name, value in self._headers.items()})


class EdgeSite(LimitedSite):
    """
    A L{Site} whose connections take the hot path for C{hot} (usually C{EdgeResource.hot}), held to
    C{limits} (L{ConnectionLimits}: deadlines, connection caps, body caps; see L{h264edge.web.limits}).
    It speaks HTTP/1.x only (plain Site negotiates HTTP/2 over TLS when the h2 package is installed).

    Hot answers are replayed without walking the resource tree: give it a C{hot} only when nothing
    above the L{EdgeResource} looks at requests (authentication, headers added by a wrapper).

    Every answer, finished or cut short, hot or not, is counted by C{metrics} (if set: see
    L{h264edge.metrics.EdgeMetrics}) and written to the access log (L{h264edge.web.answers}).

    @ivar access_log: False: no access log at all (without a logPath, a Site logs to the twistd log).
    @ivar access_log_format: C{"combined"} or C{"json"}.
    @ivar trusted_proxies: networks whose X-Forwarded-For names the client in the log.
    @ivar hot_tally: the metrics' tally of hot answers (L{EdgeMetrics.hot_tally}), added to inline.
    @ivar drain: this listener's connections, for a graceful stop.
    """

    protocol = HotChannel  # type: ignore[assignment]
    requestFactory = EdgeRequest  # type: ignore[assignment]

    def __init__(self, resource: Any, hot: Optional[HotAnswers], *args: Any, **kwargs: Any) -> None:
        super().__init__(resource, *args, **kwargs)
        self.hot = hot
        self.access_log = True
        self.access_log_format = "combined"
        self.trusted_proxies: tuple[Any, ...] = ()
        self.metrics: Any = None
        self.hot_tally: Optional[dict[bytes, list[int]]] = None  # metrics.hot_tally, counted inline
        self.drain = Draining()
        self.fast_log_lines = 0  # hot answers' log lines written from cached pieces
        self._escaped: dict[bytes, str] = {}  # access-log fields already escaped
        self._iso: tuple[int, str] = (-1, "")

    def log(self, request: Any) -> None:
        """twisted.web's call when an answer finished."""
        self.answered(request)

    def answered(self, request: Any, cut: bool = False, unsent: int = 0) -> None:
        """Count and log one answer of the normal road (finished, or C{cut} short with C{unsent} bytes left)."""
        metrics = self.metrics
        sink = access_log_sink(self) if self.access_log else None
        if metrics is None and sink is None:
            return
        now = _now(self)
        began = getattr(request, "began_at", now)
        first = getattr(request, "first_byte_at", None)
        cache = request.responseHeaders.getRawHeaders(b"x-cache")
        peer = request.getClientAddress()
        host = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else "-"
        client = forwarded_client(host, list_field(request.requestHeaders.getRawHeaders(b"x-forwarded-for")),
                                  self.trusted_proxies) \
            if self.trusted_proxies else host
        answer = Answer(
            client=client,
            method=request.method,
            uri=request.uri,
            protocol=request.clientproto,
            code=request.code if request.startedWriting or not cut else CLIENT_CLOSED,
            sent=max(0, request.sentLength - unsent) if cut else request.sentLength,
            cut=cut,
            cache=cache[-1].decode("latin-1") if cache else "-",
            duration=max(0.0, now - began),
            first_byte=None if first is None else max(0.0, first - began),
            referer=request.getHeader(b"referer"),
            user_agent=request.getHeader(b"user-agent"),
        )
        if metrics is not None:
            metrics.answered(answer)
        if sink is not None:
            write, stamp, formatter = sink
            if formatter is not combinedLogFormatter:  # an embedder's own formatter
                write(formatter(stamp, request) + "\n")
            elif self.access_log_format == "json":
                write(json_line(answer, self._iso_time(now)) + "\n")
            else:
                write(combined_line(answer, stamp) + "\n")

    def _iso_time(self, now: float) -> str:
        second = int(now)
        if self._iso[0] != second:
            self._iso = (second, iso_time(second))
        return self._iso[1]

    def log_hot(self, channel: HotChannel, uri: bytes, headers: dict[bytes, bytes], length: int) -> None:
        """
        Count and log a hot answer (a 200 HIT of C{length} body bytes, sent whole within the read
        that brought its request: its time and first byte are logged as 0.000).  The combined line
        is made from cached pieces (the generic road cost half the hot path's time: 16 KiB hits
        went from ~70k to ~36k answers/s with a log file).
        """
        tally = self.hot_tally
        if tally is not None:
            counts = tally.get(uri)
            if counts is None:
                counts = tally[uri] = [0, 0]
            counts[0] += 1
            counts[1] += length
        if not self.access_log:
            return
        sink = access_log_sink(self)
        if sink is None:
            return
        write, stamp, formatter = sink
        if formatter is not combinedLogFormatter:  # an embedder's own formatter
            write(formatter(stamp, _LoggedHit(channel, uri, headers, length)) + "\n")
            return
        ip = channel.log_ip
        if ip is None:
            transport: Any = channel.transport
            peer = transport.getPeer() if transport is not None else None
            ip = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else "-"
            if self.trusted_proxies and trusted_peer(ip, self.trusted_proxies):
                # a proxy's connection carries many clients' requests: each names its own
                ip = forwarded_client(ip, _header_text(headers.get(b"x-forwarded-for")), self.trusted_proxies) or "-"
            else:
                channel.log_ip = ip
        if self.access_log_format == "json":
            answer = Answer(ip, b"GET", uri, b"HTTP/1.1", 200, length, False, "HIT", 0.0, 0.0,
                            headers.get(b"referer"), headers.get(b"user-agent"))
            write(json_line(answer, self._iso_time(_now(self))) + "\n")
            return
        escaped = self._escaped
        if len(escaped) > 4096:
            escaped.clear()
        parts = []
        for value in (uri, headers.get(b"referer", b"-"), headers.get(b"user-agent", b"-")):
            text = escaped.get(value)
            if text is None:
                text = escaped[value] = escape(value)
            parts.append(text)
        self.fast_log_lines += 1
        write(f'{ip} - - {stamp} "GET {parts[0]} HTTP/1.1" 200 {length} "{parts[1]}" "{parts[2]}" '
              f"cache=HIT time=0.000 ttfb=0.000 cut=0\n")

    def stopFactory(self) -> None:
        # the listener stopped: while its connections drain, their answers are still logged
        self.drain.after(super().stopFactory)

    def reopen_log(self) -> None:
        """Close and open the access log file again (after logrotate moved it: SIGUSR1)."""
        reopen_access_log(self)

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if isinstance(channel, HotChannel):
            channel.hot = self.hot
        if channel is not None:
            self.drain.track(channel)
        return channel


def _now(site: Any) -> float:
    reactor: Any = site.reactor
    return float(reactor.seconds())


def _header_text(value: Optional[bytes]) -> Optional[str]:
    return value.decode("latin-1") if value is not None else None
