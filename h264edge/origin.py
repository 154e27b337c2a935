# -*- test-case-name: tests.test_edge,tests.test_http_cache,tests.test_origin_lies -*-
"""
The origin client: ranged GETs over treq with timeouts and failover across several origins in order.

An origin is any HTTP server that honours (or ignores) C{Range}: a plain web server, an S3-compatible
store behind a URL, or a parent h264edge.  Bodies are never buffered: the caller gets an L{OriginReply}
whose body it streams with L{OriginReply.deliver}, pausing the socket when it must (small bodies of
unknown length can be read whole with L{read_body}).

Each origin is asked at most once per call: a GET moves on to the next origin after a connect
failure, a lost or broken answer (cut headers, an unknown transfer coding, conflicting
Content-Lengths) or a 5xx, and the last origin's 5xx is the answer; other methods are sent once
(see L{OriginClient.forward}).
"""

from __future__ import annotations

import re
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import treq
from attrs import field, frozen
from hyperlink import EncodedURL
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError as TxTimeoutError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from h264edge._twisted_compat import (
    TreqResponse,
    answer_connection_fields,
    set_body_read_size,
    strict_client_connections,
    treq_raw_response,
)
from h264edge.errors import OriginUnavailable
from h264edge.health import OriginHealth, RetryBudget
from h264edge.httpcache import Fields, HeaderError, check_framing, check_partial, parse_content_range
from h264edge.observer import NULL_OBSERVER, EdgeObserver
from h264edge.s3 import S3_AUTH_ERRORS, S3Origin, error_code as s3_error_code
from h264edge.tcpio import write_at_once

log = Logger()


def header(headers: Headers, name: str) -> Optional[str]:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    return values[-1].decode("latin-1") if isinstance(values[-1], bytes) else values[-1]


def field_list(headers: Headers) -> Fields:
    """
    Twisted's Headers as a field list (names as Twisted spells them, values latin-1 text).  An empty
    Content-Encoding is left out: Twisted's ContentDecoderAgent (under every treq request) adds one to
    each answer that had none, and the edge would store and replay it.
    """
    return tuple(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, values in headers.getAllRawHeaders()
        for value in values
        if value.strip(b" \t") or name.lower() != b"content-encoding"
    )


class OriginPath(str):
    """
    An origin path (what L{OriginClient.fetch} asks for: normalised, percent-encoded, query included)
    that also carries the request fields forwarded with every request made for it (see
    L{h264edge.httpcache.forwarded_request_fields}).  It is a C{str}, so it travels where paths do.
    """

    fields: Fields

    def __new__(cls, path: str, fields: Fields = ()) -> "OriginPath":
        self = super().__new__(cls, path)
        self.fields = fields
        return self


class _Slot:
    """A connection slot held for one origin answer until its body is read or dropped (released once)."""

    def __init__(self, release: Callable[[], None] = lambda: None) -> None:
        self._release: Optional[Callable[[], None]] = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class _Releasing:
    """Passes an origin body to C{protocol} and frees the answer's slot when the body ends."""

    def __init__(self, protocol: Any, slot: _Slot) -> None:
        self._protocol = protocol
        self._slot = slot

    def makeConnection(self, transport: Any) -> None:
        self._protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._protocol.dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self._slot.release()
        self._protocol.connectionLost(reason)


@frozen
class OriginReply:
    """
    One origin answer: status, headers, where its body lies in the object, and the body still unread.

    C{first} is the object offset of the body's first byte (0 but for a 206), C{total} the object's
    size when the origin told it (Content-Length, or the Content-Range of a 206).  C{request_time}
    and C{response_time} are when the request left and its answer's head arrived (RFC 9111 §4.2.3).
    """

    code: int
    headers: Headers
    first: int
    length: Optional[int]
    total: Optional[int]
    url: str
    response: Any
    slot: _Slot = field(factory=_Slot)
    request_time: float = 0.0
    response_time: float = 0.0

    def header(self, name: str) -> Optional[str]:
        return header(self.headers, name)

    @property
    def fields(self) -> Fields:
        """Every field of the answer's head, the connection ones Twisted keeps apart included."""
        return field_list(self.headers) + answer_connection_fields(self.response)

    def deliver(self, protocol: IProtocol) -> None:
        """Stream the body into C{protocol} (its transport can pause and stop the origin socket)."""
        self.response.deliverBody(_Releasing(protocol, self.slot))

    def discard(self) -> None:
        """We do not want this body: drop the connection rather than read it."""
        self.slot.release()
        discard_body(self.response)


class BodyTooLarge(OriginUnavailable):
    """An answer of unknown length went on past the cap given to L{read_body}."""


class _Collect:
    def __init__(self, cap: int, done: "Deferred[bytes]") -> None:
        self.cap = cap
        self.done = done
        self.chunks: list[bytes] = []
        self.size = 0
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.cap:
            self.done.errback(BodyTooLarge(f"the answer's body is over {self.cap} bytes and has no length"))
            if self.transport is not None:
                self.transport.stopProducing()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Any) -> None:
        if self.done.called:
            return
        from twisted.web.client import ResponseDone

        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(OriginUnavailable(f"the answer's body was cut short ({reason.getErrorMessage()})"))


def read_body(reply: OriginReply, cap: int) -> "Deferred[bytes]":
    """
    The whole body of C{reply}, at most C{cap} bytes (for small answers of unknown length).

    @raise BodyTooLarge: it went on past C{cap} (the connection is dropped).
    @raise OriginUnavailable: it was cut short.
    """
    done: Deferred[bytes] = Deferred()
    reply.deliver(_Collect(cap, done))  # type: ignore[arg-type]
    return done


class _Discard:
    transport = None

    def makeConnection(self, transport: object) -> None:
        self.transport = transport  # type: ignore[assignment]
        stop = getattr(transport, "stopProducing", None)
        if stop is not None:
            stop()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        pass


ORIGIN_READ_SIZE = 256 * 1024


@implementer(IStreamClientEndpoint)
class _LargeReads:
    """
    Connects like C{endpoint}, then lets the TCP transport read up to C{size} bytes per call: an origin
    body arrives in a quarter of the calls of Twisted's 64 KiB default, which measured ~30% faster cold
    misses (each read is written through to disk and wakes the readers).  Requests are sent as they
    are written (L{write_at_once}).
    """

    def __init__(self, endpoint: Any, size: int) -> None:
        self._endpoint = endpoint
        self._size = size

    def connect(self, factory: Any) -> Any:
        def grow(protocol: Any) -> Any:
            set_body_read_size(protocol, self._size)
            # a request leaves when it is written, not on the reactor's next turn (~0.2 ms of a miss)
            write_at_once(getattr(protocol, "transport", None))
            return protocol

        return self._endpoint.connect(factory).addCallback(grow)


@implementer(IAgentEndpointFactory)
class _OriginEndpoints:
    """Plain TCP (or TLS for https) connections to origins, with large reads."""

    def __init__(self, reactor: Any, timeout: float, read_size: int) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._read_size = read_size
        self._tls = BrowserLikePolicyForHTTPS()
        # the Agent asks for an endpoint on every request, a pooled connection or not: one per origin
        self._made: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        known = self._made.get((uri.scheme, uri.host, uri.port))
        if known is None:
            known = self._made[(uri.scheme, uri.host, uri.port)] = self._endpoint(uri)
        return known

    def _endpoint(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        endpoint: Any
        if isIPAddress(host):  # an address needs no resolver thread (~5 ms on a process's first miss)
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return _LargeReads(endpoint, self._read_size)


class EncodedBody(OriginUnavailable):
    """The origin answered with a Content-Encoding although the edge asked for identity only."""


@implementer(IAgent)
class _PlainAgent:
    """
    The agent under treq's wrappers.  treq always adds C{Accept-Encoding: gzip} (its
    ContentDecoderAgent) and would replay cookies the origin set: an edge must not do either, since a
    gzip-decoded body no longer matches the origin's Content-Length and Content-Range, and one
    viewer's cookies must not reach the origin on another's behalf.  So every request leaves with
    C{Accept-Encoding: identity} only, the cookie jar keeps nothing (L{_NoCookies}: a Cookie field
    is only ever the viewer's own, forwarded for its request), and an answer that is encoded anyway
    is refused (L{EncodedBody}) before treq could decode it: nothing of it is cached or served.
    """

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def request(self, method: bytes, uri: bytes, headers: Optional[Headers] = None, bodyProducer: Any = None) -> Any:
        headers = headers.copy() if headers is not None else Headers()
        headers.setRawHeaders(b"Accept-Encoding", [b"identity"])
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(self._plain, uri)

    @staticmethod
    def _plain(response: Any, uri: bytes) -> Any:
        for value in response.headers.getRawHeaders(b"Content-Encoding") or []:
            if value.strip().lower() not in (b"", b"identity"):
                discard_body(response)
                raise EncodedBody(f"{uri.decode('ascii', 'replace')}: the origin sent Content-Encoding "
                                  f"{value.decode('latin-1')!r} although asked for identity")
        return response


class _NoCookies(CookieJar):
    """A cookie jar that keeps nothing: the edge is stateless towards its origins."""

    def __init__(self) -> None:
        super().__init__(DefaultCookiePolicy(allowed_domains=[]))

    def add_cookie_header(self, request: Any) -> None:
        pass  # it holds none (the policy walk cost ~10 us a request)

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass


#: a URI as sent: only the characters RFC 3986 lets a URI hold
_URI = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")


class _ReadyURL(EncodedURL):
    """
    An origin URL that is a URI already (the base URL as given, the path normalised and
    percent-encoded: L{OriginClient._send} checks its characters), which treq sends as it is.
    Given a string, treq parses it with hyperlink and encodes its host with IDNA again on every
    request: ~40% of its cost per request, on the path of every miss (and IDNA refuses an IPv6
    literal).  treq reads nothing of a URL but C{to_uri().to_text()} when no C{params} and a cookie
    jar are passed (tests/test_origin.py checks it on both treq versions setup.cfg allows).
    """

    def __init__(self, text: str) -> None:  # not hyperlink's: nothing of it is parsed
        self._ready = text

    def to_uri(self) -> "_ReadyURL":
        return self

    def to_text(self, with_password: bool = False) -> str:
        return self._ready


class OriginClient:
    """
    Ranged GETs against one or more origin base URLs, tried in order, each once (see L{fetch}), and
    other methods passed through at most once (see L{forward}).
    Origins whose circuit is open or that health checks marked down are skipped (L{health}, see
    L{h264edge.health}); extra attempts draw on a L{RetryBudget}; C{connection_limit} caps the
    answers in flight per origin (0: no cap; a request waits up to C{timeout} for a free slot, then
    tries the next origin).
    """

    observer: EdgeObserver = NULL_OBSERVER

    def __init__(
        self,
        bases: Iterable[str],
        reactor: Any = None,
        timeout: float = 10.0,
        pool_size: int = 16,
        *,
        health: Optional[OriginHealth] = None,
        retry_budget: Optional[RetryBudget] = None,
        connection_limit: int = 0,
        check_path: str = "",
        s3_origins: Iterable[S3Origin] = (),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._s3 = {s3.base: s3 for s3 in s3_origins}
        self.bases = [b if b.endswith("/") else b + "/" for b in bases]
        if not self.bases:
            raise ValueError("at least one origin URL is needed")
        for base in self.bases:
            if not base.startswith(("http://", "https://")) and base not in self._s3:
                raise ValueError(f"origin {base!r} is not an http(s) URL")
        self.reactor = reactor
        self.timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=True)
        strict_client_connections(pool)  # a connection that got bytes after its answer is never reused
        pool.maxPersistentPerHost = pool_size
        # a GET lost on a pooled keep-alive connection the origin had closed meanwhile is sent again
        # once on a new connection (idempotent, RFC 9110 §9.2.2; Twisted retries only such requests)
        pool.retryAutomatically = True
        self.pool = pool
        agent = Agent.usingEndpointFactory(reactor, _OriginEndpoints(reactor, timeout, ORIGIN_READ_SIZE), pool=pool)
        self._jar = _NoCookies()
        self._client = treq.client.HTTPClient(_PlainAgent(agent), cookiejar=self._jar)  # type: ignore[arg-type]
        # pass-through methods: one connection per request, never a pooled one (see forward())
        once = Agent.usingEndpointFactory(reactor, _OriginEndpoints(reactor, timeout, ORIGIN_READ_SIZE),
                                          pool=HTTPConnectionPool(reactor, persistent=False))
        self._once = treq.client.HTTPClient(_PlainAgent(once), cookiejar=self._jar)  # type: ignore[arg-type]
        self.requests = 0  # statistics: origin requests sent
        self.health = health or OriginHealth(self.bases, reactor, limit=connection_limit)
        self.budget = retry_budget or RetryBudget(reactor)
        self.check_path = check_path.lstrip("/")

    def url_for(self, base: str, path: str) -> str:
        """C{path} is already normalised and percent-encoded, starting with C{/}."""
        s3 = self._s3.get(base)
        if s3 is not None:
            return s3.url_for(path)
        return base + path.lstrip("/")

    def _signed(self, base: str, method: str, url: str, headers: Mapping[str, str], body: bytes = b"") -> Any:
        """C{headers} as sent to C{base}: signed for an S3 origin, as they are for an HTTP one."""
        s3 = self._s3.get(base)
        return s3.sign(method, url, dict(headers), body) if s3 is not None else headers

    async def _refused_credentials(self, base: str, response: Any) -> Optional[str]:
        """
        For an S3 origin's 400/403, the error code if it says our signature or key was refused (the
        body, a small XML document, is read; a large one is dropped unread); else None.
        """
        if base not in self._s3 or response.code not in (400, 403):
            return None
        if not isinstance(response.length, int) or response.length > 65536:
            discard_body(response)
            return None
        code = s3_error_code(await response.content())
        return code if code in S3_AUTH_ERRORS else None

    async def fetch(
        self,
        path: str,
        first: int = 0,
        last: Optional[int] = None,
        conditional: Optional[Mapping[str, str]] = None,
        method: str = "GET",
        via: Optional[str] = None,
    ) -> OriginReply:
        """
        GET C{path} asking for bytes C{first}..C{last} (inclusive; None = to the end; a negative
        C{first} asks for the last C{-first} bytes), with the request fields C{path} carries when it
        is an L{OriginPath} (not to an S3 origin: it gets the edge's own fields only, signed), and
        C{via} when they hold no Via.

        With C{first == 0 and last is None} we still send C{Range: bytes=0-} so that the answer carries
        the total size in Content-Range even from an origin that streams without Content-Length.

        Every final status is returned (the caller decides what a 404 or a 301 means); the origins are
        asked in order, each once, skipping those whose circuit is open: a connect failure, a lost or
        malformed answer, an encoded body, refused S3 credentials or a 5xx moves on to the next, and
        when none gives a usable answer the last 5xx one is returned.

        @raise OriginUnavailable: no origin gave an answer (C{timeout} set when one timed out).
        """
        if first < 0:
            wanted = f"bytes=-{-first}"  # a suffix range: the last -first bytes
        else:
            wanted = f"bytes={first}-{'' if last is None else last}"
        fields = tuple(getattr(path, "fields", ()))
        own = {"Range": wanted, "Accept-Encoding": "identity", **(conditional or {})}
        if via and not any(name.lower() == "via" for name, _ in fields):
            own["Via"] = via  # a parent edge adds itself and refuses a request that went round
        failures: list[str] = []
        timed_out = False
        attempts = 0
        health = self.health
        server_error: Optional[OriginReply] = None  # the last 5xx, answered if nothing better comes
        for base in self.bases:
            if not health.admit(base):
                continue  # down: the next origin at once
            attempts += 1
            if attempts == 1:
                self.budget.deposit()
            elif not self.budget.withdraw():
                health.abandoned(base)
                failures.append("retry budget spent")
                break
            slot = await self._slot(base)
            if slot is None:
                failures.append(f"{base}: {health.limit} requests in flight for {self.timeout}s")
                continue
            url = self.url_for(base, path)
            self.requests += 1
            request_time = self.reactor.seconds()
            try:
                response = await self._send(
                    self._client,
                    method,
                    url,
                    headers=self._request_headers(base, method, url, fields, own),
                    unbuffered=True,
                )
            except EncodedBody as e:
                self.observer.origin_failed(base, "encoded")
                slot.release()
                health.succeeded(base)  # it answered; the answer is unusable
                failures.append(str(e))
                log.warn("{error}", error=e)
                continue
            except Exception as e:  # refused, timed out, cut, or not HTTP: a GET may go to the next origin
                self.observer.origin_failed(base, "timeout" if _is_timeout(e) else "connect")
                slot.release()
                timed_out = timed_out or _is_timeout(e)
                # no connection or no answer in time: skip it for a while; a lost or broken answer
                # (a restart, a stale keep-alive, bad framing) counts like a 5xx
                health.failed(base, hard=_is_timeout(e) or isinstance(e, (ConnectError, DNSLookupError)))
                failures.append(f"{base}: {_why(e)}")
                log.warn("origin {url} failed: {error}", url=url, error=_why(e))
                continue
            code = response.code
            if not 200 <= code <= 599:  # RFC 9110 §15: 100-599 (1xx are interim): a broken answer
                discard_body(response)
                slot.release()
                self.observer.origin_failed(base, "connect")
                health.failed(base, hard=False)
                failures.append(f"{base}: an invalid status {code}")
                log.warn("origin {url} answered an invalid status {code}", url=url, code=code)
                continue
            self.observer.origin_answered(base, code, self.reactor.seconds() - request_time)
            if code >= 500:
                self.observer.origin_failed(base, "status_5xx")
                health.failed(base, hard=False)
                failures.append(f"{base}: {code}")
                log.warn("origin {url} answered {code}", url=url, code=code)
                try:
                    answered = self._reply(response, url, first, last, request_time, slot)
                except OriginUnavailable:
                    continue
                if server_error is not None:
                    server_error.discard()
                server_error = answered
                continue
            try:
                refused = await self._refused_credentials(base, response)
            except Exception as e:  # the error body was lost: treat it like a dropped answer
                slot.release()
                health.failed(base, hard=False)
                failures.append(f"{base}: {code} and a lost body ({e.__class__.__name__})")
                continue
            if refused is not None:
                slot.release()
                health.failed(base, hard=False)
                failures.append(f"{base}: origin authentication failed ({refused})")
                log.error("origin {base} refused our credentials: {code} {error} (check --s3-credentials, "
                          "the AWS_* variables or ~/.aws/credentials, and --s3-region)",
                          base=base, code=code, error=refused)
                continue
            try:
                reply = self._reply(response, url, first, last, request_time, slot)
            except OriginUnavailable as e:
                health.succeeded(base)  # it answered; the answer is unusable (as an encoded one)
                failures.append(str(e))
                continue
            health.succeeded(base)
            if server_error is not None:
                server_error.discard()
            return reply
        if server_error is not None:
            return server_error
        if not attempts:
            raise OriginUnavailable(health.all_skipped_message())
        raise OriginUnavailable("no origin answered: " + "; ".join(failures), timeout=timed_out)

    def _send(self, client: Any, method: str, url: str, **options: Any) -> "Deferred[TreqResponse]":
        """
        One request through treq: no redirects, no cookies, C{timeout}; C{url} as built when it is
        a URI already (L{_ReadyURL}), else (a base URL with a space or a non-ASCII host or path, as
        C{--origin} allows) encoded by treq.
        """
        target = _ReadyURL(url) if _URI.fullmatch(url) else url
        return client.request(method, target, allow_redirects=False, timeout=self.timeout,
                              reactor=self.reactor, cookies=self._jar, **options)

    def _request_headers(
        self, base: str, method: str, url: str, fields: Sequence[tuple[str, str]], own: Mapping[str, str],
        body: bytes = b"",
    ) -> Any:
        """
        The request's fields for C{base}: the forwarded C{fields} then the edge's C{own} (which
        replace those of the same name); for an S3 origin, the edge's own only, signed.
        """
        if base in self._s3:
            return self._signed(base, method, url, own, body)
        headers = Headers()
        for name, value in fields:
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        for name, value in own.items():
            headers.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
        return headers

    async def _slot(self, base: str) -> Optional[_Slot]:
        """A connection slot for C{base}, or None after waiting C{timeout} seconds for one."""
        wait = self.health.slot(base)
        if wait.called:
            return _Slot(lambda: self.health.release(base))
        wait.addTimeout(self.timeout, self.reactor)
        try:
            await wait
        except (CancelledError, DeferredTimeoutError):
            self.health.abandoned(base)
            return None
        return _Slot(lambda: self.health.release(base))

    def body_failed(self, url: str) -> None:
        """The body of an answer from C{url} went silent: count it against that origin like a timeout."""
        for base in self.bases:
            if url.startswith(base):
                self.health.failed(base, hard=True)
                return

    async def check(self, base: str) -> bool:
        """One health check: C{HEAD} of the check path on C{base}; healthy if it answers 2xx or 3xx in time."""
        url = self.url_for(base, "/" + self.check_path)
        response = await self._send(
            self._client, "HEAD", url, headers=self._signed(base, "HEAD", url, {}), unbuffered=True,
        )
        discard_body(response)
        return 200 <= response.code < 400

    def _reply(self, response: TreqResponse, url: str, asked_first: int = 0,
               asked_last: Optional[int] = None, request_time: float = 0.0,
               slot: Optional[_Slot] = None) -> OriginReply:
        """
        The answer to a GET of bytes C{asked_first}..C{asked_last} (see L{fetch}) as an L{OriginReply}
        holding C{slot}; a 206 is used only if it holds exactly those bytes (or more) and agrees with
        itself, and a body is used only in a framing the edge trusts.

        @raise OriginUnavailable: it is not (its body is dropped, its slot released).
        """
        slot = slot or _Slot()
        try:
            return self._checked_reply(response, url, asked_first, asked_last, request_time, slot)
        except BaseException:
            slot.release()
            raise

    def _checked_reply(self, response: Any, url: str, asked_first: int, asked_last: Optional[int],
                       request_time: float, slot: _Slot) -> OriginReply:
        code = response.code
        raw = treq_raw_response(response)
        hdrs: Headers = response.headers
        length = response.length if isinstance(response.length, int) else None
        try:
            check_framing(answer_connection_fields(raw))
        except HeaderError as e:
            discard_body(response)
            log.warn("origin {url}: {error}", url=url, error=e)
            raise OriginUnavailable(f"{url}: {e}") from None
        first, total = 0, None
        if code == 206:
            value = header(hdrs, "Content-Range")
            try:
                if value is None:
                    raise HeaderError("206 without Content-Range")
                content_range = parse_content_range(value)
                check_partial(asked_first, asked_last, content_range, length)
            except HeaderError as e:
                discard_body(response)
                log.warn("origin {url}: {error}", url=url, error=e)
                raise OriginUnavailable(f"{url}: {e}") from None
            assert content_range.first is not None and content_range.length is not None
            first, length, total = content_range.first, content_range.length, content_range.total
        elif code in (304, 416):
            slot.release()
            if code == 416:
                value = header(hdrs, "Content-Range")
                try:
                    total = parse_content_range(value).total if value else None
                except HeaderError:
                    pass
            discard_body(response)
            length = 0
        else:
            total = length
        return OriginReply(code, hdrs, first, length, total, url, raw, slot, request_time, self.reactor.seconds())

    async def probe(self) -> dict[str, str]:
        """
        HEAD each origin's base URL once, at startup: what each said (any HTTP status means it is
        reachable) or why it could not be reached.  The connection then waits in the pool, so the
        first viewer's miss does not also pay for connecting.
        """
        results: dict[str, str] = {}
        for base in self.bases:
            url = self.url_for(base, "/")
            try:
                response = await self._send(
                    self._client, "HEAD", url, headers=self._signed(base, "HEAD", url, {}), unbuffered=True,
                )
            except EncodedBody:
                results[base] = "HTTP, with an encoded body although asked for identity"
                continue
            except Exception as e:  # a probe reports, it never fails the server
                results[base] = f"unreachable ({'timeout' if _is_timeout(e) else e.__class__.__name__})"
                continue
            discard_body(response)
            results[base] = f"HTTP {response.code}"
        return results

    async def forward(
        self, method: str, path: str, fields: Sequence[tuple[str, str]], body: bytes
    ) -> TreqResponse:
        """
        Pass a method other than GET/HEAD through to the origins (uncached), sending it at most once:
        only a connection that could not be made moves on to the next origin.  Whatever the first
        origin that took the request answers (a 5xx included) is the answer, and an answer lost after
        the request went out is L{OriginUnavailable}: the method may have taken effect, so it is never
        sent again.  Each request has a connection of its own, so that no stale pooled connection
        can lose a request the origin may or may not have seen.
        """
        failures = []
        for base in self.bases:
            if not self.health.admit(base):
                continue  # down: nothing was sent there
            url = self.url_for(base, path)
            self.requests += 1
            try:
                return await self._send(
                    self._once, method, url, headers=self._request_headers(base, method, url, fields, {}, body),
                    data=body or None,
                )
            except (ConnectError, DNSLookupError) as e:
                failures.append(f"{base}: {e.__class__.__name__}")
                log.warn("origin {url} could not be reached for {method}: {error}", url=url, method=method, error=e)
                continue
            except Exception as e:
                log.warn("origin {url} took {method} but its answer was lost: {error}", url=url, method=method,
                         error=e)
                raise OriginUnavailable(f"{base}: the answer to {method} was lost "
                                        f"({'timeout' if _is_timeout(e) else e.__class__.__name__}); "
                                        "not sent again", timeout=_is_timeout(e)) from None
        raise OriginUnavailable("no origin could be reached: " + "; ".join(failures))


def _why(error: BaseException) -> str:
    """A short reason for a failed request: the timeout, or the innermost error's class and message."""
    if _is_timeout(error):
        return "timeout"
    reasons = getattr(error, "reasons", None) or []
    inner = [reason.value for reason in reasons if reason.value is not None]
    shown = inner[-1] if inner else error
    text = str(shown)[:100]
    return f"{shown.__class__.__name__}: {text}" if text else shown.__class__.__name__


def _is_timeout(error: BaseException) -> bool:
    """treq's timeout cancels the request; the Agent may wrap that in ResponseNeverReceived."""
    if isinstance(error, (CancelledError, TxTimeoutError)):
        return True
    reasons = getattr(error, "reasons", None) or []
    return any(reason.check(CancelledError, TxTimeoutError) for reason in reasons)


def discard_body(response: Any) -> None:
    raw: Any = treq_raw_response(response)
    try:
        raw.deliverBody(_Discard())
    except RuntimeError:
        pass  # already delivered or finished: nothing left to drop
