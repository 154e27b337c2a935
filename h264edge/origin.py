# -*- test-case-name: tests.test_edge -*-
"""
The origin client: ranged GETs over treq with timeouts and failover across several origins in order.

An origin is any HTTP server that honours (or ignores) C{Range}: a plain web server, an S3-compatible
store behind a URL, or a parent h264edge.  Bodies are never buffered: the caller gets an L{OriginReply}
whose body it streams with L{OriginReply.deliver}, pausing the socket when it must.
"""

from __future__ import annotations

import re
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Callable, Iterable, Mapping, Optional

import treq
from attrs import field, frozen
from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeoutError
from twisted.internet.task import deferLater
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError as TxTimeoutError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from h264edge._twisted_compat import TreqResponse, set_read_size, treq_raw_response
from h264edge.errors import OriginStatus, OriginUnavailable
from h264edge.health import OriginHealth, RetryBudget
from h264edge.observer import NULL_OBSERVER, EdgeObserver
from h264edge.s3 import S3_AUTH_ERRORS, S3Origin, error_code as s3_error_code
from h264edge.tcpio import write_at_once

log = Logger()

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


def parse_content_range(value: str) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """C{(first, last, total)} of a Content-Range value; parts are None where the header has C{*}."""
    match = _CONTENT_RANGE.match(value)
    if match is None:
        raise ValueError(f"bad Content-Range {value!r}")
    first, last, total = match.groups()
    return (
        int(first) if first is not None else None,
        int(last) if last is not None else None,
        int(total) if total != "*" else None,
    )


def header(headers: Headers, name: str) -> Optional[str]:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    return values[-1].decode("latin-1") if isinstance(values[-1], bytes) else values[-1]


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

    C{first} is the object offset of the body's first byte (0 for a 200), C{total} the object's size
    when the origin told it (Content-Length of a 200, Content-Range of a 206).
    """

    code: int
    headers: Headers
    first: int
    length: Optional[int]
    total: Optional[int]
    url: str
    response: Any
    slot: _Slot = field(factory=_Slot)

    def header(self, name: str) -> Optional[str]:
        return header(self.headers, name)

    def deliver(self, protocol: IProtocol) -> None:
        """Stream the body into C{protocol} (its transport can pause and stop the origin socket)."""
        self.response.deliverBody(_Releasing(protocol, self.slot))

    def discard(self) -> None:
        """We do not want this body: drop the connection rather than read it."""
        self.slot.release()
        discard_body(self.response)


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
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                set_read_size(transport, self._size)
            # a request leaves when it is written, not on the reactor's next turn (~0.2 ms of a miss)
            write_at_once(transport)
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

    def endpointForURI(self, uri: Any) -> Any:
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
    ContentDecoderAgent) and replays cookies the origin set: an edge must not do either, since a
    gzip-decoded body no longer matches the origin's Content-Length and Content-Range, and one
    viewer's cookies must not reach the origin on another's behalf.  So every request leaves with
    C{Accept-Encoding: identity} only and no Cookie, and an answer that is encoded anyway is
    refused (L{EncodedBody}) before treq could decode it: nothing of it is cached or served.
    """

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def request(self, method: bytes, uri: bytes, headers: Optional[Headers] = None, bodyProducer: Any = None) -> Any:
        headers = headers.copy() if headers is not None else Headers()
        headers.setRawHeaders(b"Accept-Encoding", [b"identity"])
        headers.removeHeader(b"Cookie")
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


_TRANSIENT = (
    ConnectError,
    DNSLookupError,
    TxTimeoutError,
    CancelledError,
    ResponseNeverReceived,
    OSError,
)


class OriginClient:
    """
    Ranged GETs against one or more origin base URLs, tried in order.

    A connect failure, a timeout before the headers, or a 5xx moves on to the next origin; a 4xx is the
    object's answer and is raised as L{OriginStatus}; when every origin failed, L{OriginUnavailable}.
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
        pool.maxPersistentPerHost = pool_size
        pool.retryAutomatically = True  # GETs are idempotent: a stale keep-alive connection is retried once
        self.pool = pool
        agent = Agent.usingEndpointFactory(reactor, _OriginEndpoints(reactor, timeout, ORIGIN_READ_SIZE), pool=pool)
        self._client = treq.client.HTTPClient(_PlainAgent(agent), cookiejar=_NoCookies())  # type: ignore[arg-type]
        self.requests = 0  # statistics: origin requests sent
        self.passes = 2  # rounds over the origin list before giving up (a dropped connection gets a second try)
        self.retry_delay = 0.05
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
        C{first} asks for the last C{-first} bytes).

        With C{first == 0 and last is None} we still send C{Range: bytes=0-} so that the answer carries
        the total size in Content-Range even from an origin that streams without Content-Length.
        """
        if first < 0:
            wanted = f"bytes=-{-first}"  # a suffix range: the last -first bytes
        else:
            wanted = f"bytes={first}-{'' if last is None else last}"
        headers: dict[Any, Any] = {"Range": wanted, "Accept-Encoding": "identity"}
        if conditional:
            headers.update(conditional)
        if via:
            headers["Via"] = via  # a parent edge adds itself and refuses a request that went round
        failures: list[str] = []
        timed_out = False
        attempts = 0
        health = self.health
        for attempt in range(self.passes):
            if attempt:
                if timed_out:
                    break  # a second round of timeouts would only make the viewer wait longer
                await deferLater(self.reactor, self.retry_delay, lambda: None)
            for base in self.bases:
                if not health.admit(base):
                    continue  # down: the next origin at once
                attempts += 1
                if attempts == 1:
                    self.budget.deposit()
                elif not self.budget.withdraw():
                    health.abandoned(base)
                    failures.append("retry budget spent")
                    raise OriginUnavailable("no origin answered: " + "; ".join(failures), timeout=timed_out)
                slot = await self._slot(base)
                if slot is None:
                    failures.append(f"{base}: {health.limit} requests in flight for {self.timeout}s")
                    continue
                url = self.url_for(base, path)
                self.requests += 1
                began = self.reactor.seconds()
                try:
                    response = await self._client.request(
                        method,
                        url,
                        headers=self._signed(base, method, url, headers),
                        unbuffered=True,
                        allow_redirects=False,
                        timeout=self.timeout,
                        reactor=self.reactor,
                    )
                except EncodedBody as e:
                    self.observer.origin_failed(base, "encoded")
                    slot.release()
                    health.succeeded(base)  # it answered; the answer is unusable
                    failures.append(str(e))
                    log.warn("{error}", error=e)
                    continue
                except _TRANSIENT as e:
                    slot.release()
                    timed_out = timed_out or _is_timeout(e)
                    self.observer.origin_failed(base, "timeout" if _is_timeout(e) else "connect")
                    # no connection or no answer in time: skip it for a while; a connection dropped
                    # before the answer (a restart, a stale keep-alive) counts like a 5xx
                    health.failed(base, hard=not isinstance(e, ResponseNeverReceived) or _is_timeout(e))
                    failures.append(f"{base}: {'timeout' if _is_timeout(e) else e.__class__.__name__}")
                    log.warn("origin {url} failed: {error}", url=url, error=e)
                    continue
                code = response.code
                self.observer.origin_answered(base, code, self.reactor.seconds() - began)
                if code >= 500:
                    self.observer.origin_failed(base, "status_5xx")
                    slot.release()
                    health.failed(base, hard=False)
                    discard_body(response)
                    failures.append(f"{base}: {code}")
                    log.warn("origin {url} answered {code}", url=url, code=code)
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
                health.succeeded(base)
                return self._reply(response, url, slot)
        if not attempts:
            raise OriginUnavailable(health.all_skipped_message())
        raise OriginUnavailable("no origin answered: " + "; ".join(failures), timeout=timed_out)

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
        response = await self._client.request(
            "HEAD", url, headers=self._signed(base, "HEAD", url, {}), unbuffered=True, allow_redirects=False,
            timeout=self.timeout, reactor=self.reactor,
        )
        discard_body(response)
        return 200 <= response.code < 400

    def _reply(self, response: TreqResponse, url: str, slot: Optional[_Slot] = None) -> OriginReply:
        slot = slot or _Slot()
        try:
            return self._checked_reply(response, url, slot)
        except BaseException:
            slot.release()
            raise

    def _checked_reply(self, response: Any, url: str, slot: _Slot) -> OriginReply:
        code = response.code
        raw = treq_raw_response(response)
        hdrs: Headers = response.headers
        length = response.length if isinstance(response.length, int) else None
        first, total = 0, None
        if code == 206:
            value = header(hdrs, "Content-Range")
            if value is None:
                discard_body(response)
                raise OriginUnavailable(f"{url}: 206 without Content-Range")
            try:
                cr_first, cr_last, total = parse_content_range(value)
            except ValueError as e:
                discard_body(response)
                raise OriginUnavailable(f"{url}: {e}") from None
            if cr_first is None or cr_last is None:
                discard_body(response)
                raise OriginUnavailable(f"{url}: 206 with unsatisfied Content-Range")
            first = cr_first
            length = cr_last - cr_first + 1
        elif code == 200:
            total = length
        elif code in (304,):
            slot.release()
            discard_body(response)
        elif code == 416:
            value = header(hdrs, "Content-Range")
            if value:
                try:
                    total = parse_content_range(value)[2]
                except ValueError:
                    pass
            slot.release()
            discard_body(response)
        else:
            discard_body(response)
            raise OriginStatus(code)
        return OriginReply(code, hdrs, first, length, total, url, raw, slot)

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
                response = await self._client.request(
                    "HEAD", url, headers=self._signed(base, "HEAD", url, {}), unbuffered=True,
                    allow_redirects=False, timeout=self.timeout, reactor=self.reactor,
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
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> TreqResponse:
        """Pass an unsafe method through to the first origin that answers (uncached)."""
        failures = []
        for base in self.bases:
            url = self.url_for(base, path)
            self.requests += 1
            try:
                response = await self._client.request(
                    method, url, headers=self._signed(base, method, url, headers, body), data=body or None,
                    allow_redirects=False, timeout=self.timeout, reactor=self.reactor,
                )
            except _TRANSIENT as e:
                failures.append(f"{base}: {e.__class__.__name__}")
                continue
            if response.code >= 500 and base is not self.bases[-1]:
                failures.append(f"{base}: {response.code}")
                continue
            return response
        raise OriginUnavailable("no origin answered: " + "; ".join(failures))


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
