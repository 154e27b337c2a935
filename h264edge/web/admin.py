# -*- test-case-name: tests.test_admin -*-
"""
The admin listener (C{--admin-listen}): what an operator's tools ask of an edge, apart from viewers.

    GET  /metrics                 Prometheus text format (L{h264edge.metrics.EdgeMetrics})
    GET  /healthz                 200 while the process serves (liveness)
    GET  /readyz                  200 when the index is loaded, the cache directory takes writes and an
                                  origin answers; else 503 with the reasons (readiness)
    POST /purge?path=/clip.mp4    drop a path's objects (every query variant; seeks go with them)
    POST /purge?prefix=/videos/   drop every object under a prefix
    GET  /status                  the status page (L{h264edge.web.status})

Purges answer C{{"purged": N}} as JSON and follow L{PurgeAuth}: with a token, C{Authorization:
Bearer TOKEN}; without one, loopback clients only.  The listener is held to the viewer port's
deadlines (L{admin_site}), with a connection cap and a body cap of its own.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from h264edge.metrics import CONTENT_TYPE, EdgeMetrics
from h264edge.web.http import BadRequest, PurgeAuth
from h264edge.web.limits import ConnectionLimits, LimitedSite
from h264edge.web.resource import purge_refusal
from h264edge.web.status import status_pages

log = Logger()

READY_PROBE_EVERY = 5.0  # seconds a readiness probe of the origins is trusted
ADMIN_MAX_CONNECTIONS = 32  # connections to the admin listener at once (scrapers, a purge script)
ADMIN_MAX_BODY = 64 * 1024  # bytes of a request body on the admin listener (its API takes none)


def _plain(request: Request, code: int, text: str, content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    body = text.encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", str(len(body)).encode())
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _json(request: Request, code: int, value: Any) -> bytes:
    return _plain(request, code, json.dumps(value, indent=1) + "\n", b"application/json")


def _internal_error(failure: Failure, request: Request, what: str) -> None:
    log.failure("{what} failed", failure, what=what)
    if not request.finished and not getattr(request, "_disconnected", False):
        request.write(_plain(request, 500, f"{what} failed\n"))
        request.finish()


class _Leaf(Resource):
    isLeaf = True

    def render_HEAD(self, request: Request) -> Any:
        return self.render_GET(request)  # type: ignore[attr-defined]


class MetricsPage(_Leaf):
    def __init__(self, metrics: EdgeMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        return _plain(request, 200, self.metrics.render().decode("utf-8"), CONTENT_TYPE.encode())


class HealthPage(_Leaf):
    """Liveness: the process is up and its reactor answers."""

    def render_GET(self, request: Request) -> bytes:
        return _plain(request, 200, "ok\n")


class ReadyPage(_Leaf):
    """
    Readiness: 200 C{ready} when the cache index is loaded, the cache directory takes a new file,
    and an origin answered lately (else the origins are probed, at most every few seconds); 503
    with one line per reason otherwise.
    """

    def __init__(self, store: Any, origin: Any, metrics: EdgeMetrics, clock: Any = None) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        self.store = store
        self.origin = origin
        self.metrics = metrics
        self.clock = clock
        self._probed_at = float("-inf")

    def render_GET(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self.problems())

        def answer(problems: list[str]) -> None:
            body = _plain(request, 503 if problems else 200, "".join(p + "\n" for p in problems) or "ready\n")
            request.write(body)
            request.finish()

        d.addCallback(answer)
        d.addErrback(_internal_error, request, "readiness check")
        return NOT_DONE_YET

    async def problems(self) -> list[str]:
        problems = []
        if self.store.loading:
            problems.append("the cache index is still loading")
        try:
            with tempfile.NamedTemporaryFile(dir=self.store.root, prefix=".h264edge-ready-"):
                pass
        except OSError as e:
            problems.append(f"the cache directory takes no new file ({e.strerror})")
        if not self._an_origin_is_up():
            now = self.clock.seconds()
            if now - self._probed_at >= READY_PROBE_EVERY:
                self._probed_at = now
                for base, result in (await self.origin.probe()).items():
                    self.metrics.origin_probed(base, result)
            if not self._an_origin_is_up():
                states = ", ".join(f"{base} {self._state(base)}" for base in self.origin.bases)
                problems.append(f"no origin answers ({states})")
        return problems

    def _state(self, base: str) -> str:
        """C{up}, or why not: what the last answers and probes said, or the origin client's circuit."""
        circuits = getattr(self.origin, "health", None)
        circuit = circuits.states.get(base) if circuits is not None else None
        if circuit is not None and circuit.describe(self.clock.seconds()) != "up":
            return circuit.describe(self.clock.seconds())
        health = self.metrics.origins.get(base)
        if health is None:
            return "unknown"
        return health.state + (f": {health.last_error}" if health.state == "down" and health.last_error else "")

    def _an_origin_is_up(self) -> bool:
        return any(self._state(base) == "up" for base in self.origin.bases)


class PurgePage(_Leaf):
    """C{POST /purge?path=P} or C{?prefix=P}: drop objects, answer how many went."""

    def __init__(
        self,
        edge: Any,
        auth: PurgeAuth,
        metrics: Optional[EdgeMetrics] = None,
        prepare: Optional[Callable[[], Awaitable[Any]]] = None,
    ) -> None:
        """
        @param edge: the L{EdgeResource} whose C{purge}/C{purge_prefix} drop the objects.
        @param prepare: awaited before a purge by prefix (with several processes: a rescan of the
            cache directory, so that objects the others cached since are seen too).
        """
        super().__init__()
        self.edge = edge
        self.auth = auth
        self.metrics = metrics
        self.prepare = prepare

    def render_POST(self, request: Request) -> Any:
        refusal = purge_refusal(self.auth, request, viewer_listener=False)
        if refusal is not None:
            return _json(request, refusal[0], {"error": refusal[1]})
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
        paths, prefixes = query.get("path", []), query.get("prefix", [])
        if len(paths) + len(prefixes) != 1 or set(query) - {"path", "prefix"}:
            return _json(request, 400, {"error": "give one path=/... or prefix=/..."})
        d = Deferred.fromCoroutine(self._purge(paths[0] if paths else None, prefixes[0] if prefixes else None))

        def answer(result: tuple[int, Any]) -> None:
            request.write(_json(request, *result))
            request.finish()

        d.addCallback(answer)
        d.addErrback(_internal_error, request, "purge")
        return NOT_DONE_YET

    render_PURGE = render_POST

    async def _purge(self, path: Optional[str], prefix: Optional[str]) -> tuple[int, Any]:
        try:
            if path is not None:
                count = self.edge.purge(path)
            else:
                assert prefix is not None
                if self.prepare is not None:
                    await self.prepare()
                count = self.edge.purge_prefix(prefix)
        except BadRequest as e:
            return 400, {"error": str(e)}
        if self.metrics is not None:
            self.metrics.purges(count, "admin", path if path is not None else f"{prefix}*")
        log.info("purged {count} objects ({what})", count=count,
                 what=f"path {path}" if path is not None else f"prefix {prefix}")
        return 200, {"purged": count, **({"path": path} if path is not None else {"prefix": prefix})}


class AdminRoot(Resource):
    """The admin listener's tree."""

    def __init__(self, pages: dict[bytes, Any]) -> None:
        super().__init__()
        for name, page in pages.items():
            self.putChild(name, page)

    def getChild(self, path: bytes, request: Request) -> Any:
        return self if path == b"" else super().getChild(path, request)

    def render_GET(self, request: Request) -> bytes:
        names = sorted(name.decode() for name in self.children if b"." not in name)
        return _plain(request, 200, "h264edge admin: " + " ".join("/" + name for name in names) + "\n")


def admin_resource(
    edge: Any,
    metrics: EdgeMetrics,
    prepare_prefix_purge: Optional[Callable[[], Awaitable[Any]]] = None,
    clock: Any = None,
) -> AdminRoot:
    """The admin tree for C{edge} (an L{EdgeResource}) and its C{metrics}."""
    pages: dict[bytes, Any] = {
        b"metrics": MetricsPage(metrics),
        b"healthz": HealthPage(),
        b"readyz": ReadyPage(edge.store, edge.origin, metrics, clock),
        b"purge": PurgePage(edge, edge.purge_auth, metrics, prepare_prefix_purge),
        **status_pages(metrics, edge.origin),
    }
    return AdminRoot(pages)


def admin_site(root: Resource, limits: ConnectionLimits) -> LimitedSite:
    """
    The admin listener's site for C{root}: the viewer port's deadlines (C{limits}: a head trickling in,
    an idle connection, a peer that stops reading), at most L{ADMIN_MAX_CONNECTIONS} connections and
    L{ADMIN_MAX_BODY} bytes of body; no access log and no tracebacks.
    """
    site = LimitedSite(root, limits=ConnectionLimits(
        header_timeout=limits.header_timeout, idle_timeout=limits.idle_timeout, send_timeout=limits.send_timeout,
        max_connections=ADMIN_MAX_CONNECTIONS, max_body=ADMIN_MAX_BODY, quiet_body=min(limits.quiet_body,
                                                                                        ADMIN_MAX_BODY)))
    site.log = lambda request: None  # type: ignore[method-assign]  # scrapes are not viewers
    site.displayTracebacks = False
    return site


def read_token_file(path: str) -> str:
    """The token in C{path} (its first line, stripped)."""
    with open(path, encoding="utf-8") as f:
        return f.readline().strip()

